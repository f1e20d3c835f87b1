"""The tiny task, model and PPO config the unit tests share, and ``setup``: PPO roles from ``init_ppo``
plus one trajectory scored by the gold reward."""

from __future__ import annotations

import dataclasses

import jax

from jaxppo.losses import policy_loss
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params
from jaxppo.optim import create_train_state
from jaxppo.pipeline_config import CheckpointConfig, PipelineConfig, RewardModelConfig, SFTConfig
from jaxppo.ppo import init_ppo, make_update
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import make_rollout
from jaxppo.sequences import response_logprobs
from jaxppo.sharding import MeshConfig, make_mesh
from jaxppo.toy_task import EOS, PAD, ToyTaskConfig, gold_reward, sample_prompts


TASK = ToyTaskConfig(num_topics=1, words_per_topic=4, context_words=1, max_response_tokens=6,
                     demo_min_words=1, demo_max_words=4, demo_liked_prob=0.4)


MODEL = ModelConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)


PPO = PPOConfig(batch_size=16, minibatches=2, epochs=2, max_new_tokens=TASK.max_response_tokens, stop_token_ids=(EOS,),
                pad_token_id=PAD, learning_rate=1e-3, kl_coef=0.05, critic_init="sft")


# the samplers' tests (test_sampling.py, test_engine.py): GQA, two layers, a vocabulary of 61
SAMPLER_MODEL = ModelConfig(vocab_size=61, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                            num_kv_heads=2, head_dim=8)


def peaky_params(config: ModelConfig = SAMPLER_MODEL) -> dict:
    """Random params with matrices 6× their init scale: varied, non-uniform next-token distributions."""
    p = init_params(config, jax.random.key(0))
    return jax.tree.map(lambda x: 6 * x if x.ndim >= 2 else x, p)


def gold_score(*args):
    return gold_reward(TASK, *args)


ONE_DEVICE = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])


def setup(ppo: PPOConfig = PPO, seed: int = 0, actor_tx=None):
    """Actor/critic states (``init_ppo``, critic from the SFT trunk), reference params and one
    trajectory scored by the gold reward."""
    key = jax.random.key(seed)
    base = init_params(MODEL, key)
    state, frozen = init_ppo(MODEL, ppo, ONE_DEVICE, sft_params=base, reward_params=None, key=key)
    actor = state.actor if actor_tx is None else create_train_state(state.actor.params, actor_tx)
    rollout = make_rollout(MODEL, ppo, score_fn=gold_score)
    prompts = sample_prompts(TASK, jax.random.key(seed + 1), ppo.batch_size)
    traj, metrics = rollout(actor.params, None if state.critic is None else state.critic.params, frozen.reference,
                            None, *prompts, jax.random.key(seed + 2), ppo.kl_coef)
    return actor, state.critic, frozen.reference, traj, rollout, make_update(MODEL, ppo)


def surrogate(params, traj, ppo=PPO):
    logprobs, _, _ = response_logprobs(MODEL, params, traj.prompt, traj.prompt_mask, traj.response,
                                       traj.response_mask, temperature=ppo.temperature)
    return float(policy_loss(logprobs, traj.old_logprobs, traj.advantages, traj.response_mask,
                             clip_eps=ppo.clip_eps)[0]), logprobs


def tiny_config(**rm) -> PipelineConfig:
    """The stage tests' run: no checkpoints (the resume tests cover them)."""
    rm = {"num_prompts": 1024, "steps": 300, "learning_rate": 3e-3, **rm}
    return PipelineConfig(
        model=MODEL, task=TASK, sft=SFTConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10),
        reward_model=RewardModelConfig(batch_size=32, **rm),
        ppo=dataclasses.replace(PPO, iterations=4), checkpoint=CheckpointConfig(enabled=False), seed=1)


def demonstrations_of(prompts, mask, seed):
    from jaxppo.toy_task import demonstrations

    return demonstrations(TASK, jax.random.key(seed), prompts, mask)
