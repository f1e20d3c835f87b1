"""A tiny SFT → reward model → PPO run on the embedded task: about a minute on CPU.

Run:  python -m experiments.run --config configs/tiny.py --run-dir DIR

For smoke tests and the kill-and-resume test: checkpoints every 50 SFT / reward-model steps and every
2 PPO iterations; an online reward-model refresh every 2 PPO iterations (its state is checkpointed too).
"""

from jaxppo.models.config import ModelConfig
from jaxppo.pipeline_config import CheckpointConfig, PipelineConfig, RewardModelConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig
from jaxppo.toy_task import EOS, PAD, ToyTaskConfig


def get_config() -> PipelineConfig:
    task = ToyTaskConfig(num_topics=2, words_per_topic=4, context_words=1, max_response_tokens=6,
                         demo_min_words=1, demo_max_words=4, demo_liked_prob=0.3)
    model = ModelConfig(vocab_size=task.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                        num_heads=2, num_kv_heads=1, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
    ppo = PPOConfig(iterations=8, batch_size=16, minibatches=2, epochs=2, max_new_tokens=task.max_response_tokens,
                    stop_token_ids=(EOS,), pad_token_id=PAD, learning_rate=1e-3, kl_coef=0.05)
    return PipelineConfig(
        model=model, task=task, sft=SFTConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10),
        reward_model=RewardModelConfig(num_prompts=512, steps=150, batch_size=32, learning_rate=3e-3,
                                       online_every=2, online_prompts=128, online_steps=20),
        ppo=ppo, checkpoint=CheckpointConfig(every_steps=50, every_iterations=2, keep=2),
        eval_batch_size=256, seed=1)
