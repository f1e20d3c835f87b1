"""Critic-free RL on a verifiable reward: SFT on often-wrong demonstrations, then GRPO on exact match.

Run:  python -m experiments.run --config configs/verifiable.py [--set ppo.estimator=rloo] [--run-dir DIR]

The embedded addition task (:mod:`jaxppo.addition_task`): a small Llama-architecture model learns
2-digit addition from demonstrations of which half are wrong (a forgotten carry, a digit off by
one), so the SFT policy's sampled held-out accuracy is far below 100 %. GRPO then samples
``group_size`` answers per problem, scores each with the exact-match verifier (no reward model is
trained) and pushes the policy toward the right ones, with GRPO's k3 KL loss to the SFT policy.
``summary.json`` has ``sft_accuracy`` / ``final_accuracy`` (held-out, sampled at temperature 1) and
``sft_greedy_accuracy`` / ``final_greedy_accuracy``. A few minutes on 2 CPU cores.
"""

from jaxppo.addition_task import EOS, PAD, AdditionTaskConfig
from jaxppo.models.config import ModelConfig
from jaxppo.pipeline_config import CheckpointConfig, PipelineConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig


def get_config(**ppo_overrides) -> PipelineConfig:
    task = AdditionTaskConfig(digits=2, demo_error_prob=0.5)
    model = ModelConfig(vocab_size=task.vocab_size, hidden_size=64, intermediate_size=256, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=16,
                        tie_word_embeddings=True, rope_theta=10_000.0)
    ppo = dict(estimator="grpo", group_size=8, batch_size=256, iterations=250, max_new_tokens=task.max_response_tokens,
               stop_token_ids=(EOS,), pad_token_id=PAD, kl_in_reward=False, kl_coef=0.01, kl_estimator="k3",
               learning_rate=5e-4, epochs=1, minibatches=4, temperature=1.0)
    ppo.update(ppo_overrides)
    return PipelineConfig(model=model, task=task, sft=SFTConfig(steps=2000, batch_size=64, learning_rate=1e-3,
                                                                warmup_steps=50),
                          ppo=PPOConfig(**ppo), reward_functions=("exact_match",), log_every=5,
                          checkpoint=CheckpointConfig(every_iterations=20), eval_batch_size=1000)

