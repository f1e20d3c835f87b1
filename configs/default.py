"""Default experiment: SFT → reward model → PPO on the embedded task with a hidden gold reward.

Run:  python -m experiments.run                      (this config; a fresh run dir under runs/)
      python -m experiments.run --config configs/default.py --run-dir DIR

A small Llama-architecture model (random init, the task's 32-token vocabulary) is fine-tuned on
mediocre demonstrations, a reward model learns from Bradley–Terry-noisy preferences of the hidden
gold reward, and PPO optimises the reward model with a KL anchor to the SFT policy. Runs in a few
minutes on 2 CPU cores. ``configs/overoptimization.py`` is the same run with the KL penalty off.
"""

from jaxppo.models.config import ModelConfig
from jaxppo.pipeline_config import PipelineConfig, RewardModelConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig
from jaxppo.toy_task import EOS, PAD, ToyTaskConfig


def get_config(**ppo_overrides) -> PipelineConfig:
    task = ToyTaskConfig()
    model = ModelConfig(vocab_size=task.vocab_size, hidden_size=64, intermediate_size=128, num_layers=2,
                        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=64,
                        tie_word_embeddings=True, rope_theta=10_000.0)
    ppo = dict(iterations=400, batch_size=64, max_new_tokens=task.max_response_tokens, stop_token_ids=(EOS,),
               pad_token_id=PAD, kl_coef=0.1, learning_rate=1e-3, critic_learning_rate=1e-3, epochs=4,
               minibatches=4, vf_coef=0.5, entropy_coef=0.0, critic="separate")
    ppo.update(ppo_overrides)
    # iterated online RLHF: every 25 PPO iterations the reward model learns from labelled samples of the policy
    reward_model = RewardModelConfig(init="scratch", online_every=25, online_prompts=1024, online_steps=150)
    return PipelineConfig(model=model, task=task, sft=SFTConfig(), reward_model=reward_model, ppo=PPOConfig(**ppo))
