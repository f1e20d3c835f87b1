"""PPO rollout: generate → log-probs (actor, reference) → values → reward → Trajectory.

One jitted function turns a batch of prompts into a frozen :class:`Trajectory` (seed 003's
pipeline, Ziegler et al. 2019):

1. sample responses from the actor (:mod:`jaxppo.sampling`);
2. one forward pass of the actor over prompt + response gives the old log-probs (at the sampling
   temperature) — and the values, for a shared-trunk critic; a separate critic does its own pass.
   With ``ppo.sampler_logprobs`` the old log-probs are the sampler's own (the same
   log-softmax at the same temperature, from the KV-cache logits: equal to the forward pass up to
   float rounding, ~1e-6) and a separate critic's rollout skips the actor's pass;
3. the frozen reference gives the reference log-probs (same temperature), the frozen reward model
   the score at the last response token; a response that never stopped loses
   ``missing_eos_penalty``;
4. per-token rewards −β·KL_t plus the score at the last token (:func:`~jaxppo.advantages.kl_shaped_rewards`),
   optionally whitened without shifting their mean;
5. advantages and returns from the estimator that ``ppo.estimator`` names in
   :data:`jaxppo.advantages.ESTIMATORS` (PPO: GAE by reverse scan over the critic's values), then
   optional advantage whitening.

The scoring passes (2–3) can run over ``ppo.score_micro_batches`` slices of the batch in turn
(:func:`micro_batched`): the same values, a fraction of the activation memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.advantages import ESTIMATORS, AdvantageInputs, explained_variance, kl_shaped_rewards, sequence_sum, whiten
from jaxppo.masking import masked_mean
from jaxppo.models.config import ModelConfig, cast_params, with_dtype
from jaxppo.optim import split_micro_batches
from jaxppo.ppo_config import PPOConfig
from jaxppo.sampling import SamplingParams, sample
from jaxppo.sequences import response_logprobs, response_scores, response_values

Array = jax.Array


class Trajectory(struct.PyTreeNode):
    """Everything the PPO update needs about one batch of episodes; ``[B, N]`` unless noted."""

    prompt: Array  # [B, P] left-padded
    prompt_mask: Array  # [B, P]
    response: Array  # [B, N] right-padded
    response_mask: Array  # [B, N] float, 1 up to and including the stop token
    old_logprobs: Array
    ref_logprobs: Array
    old_values: Array
    scores: Array  # [B] reward-model score (after the missing-EOS penalty)
    rewards: Array  # per-token rewards fed to GAE
    kl: Array  # per-token KL estimate to the reference
    advantages: Array
    returns: Array


def micro_batched(fn, batch, *, micro_batches: int):
    """``fn(batch)`` computed over ``micro_batches`` equal slices of the leading (batch) axis, one
    after another (``lax.map``), and concatenated: the same values, 1/``micro_batches`` of the
    activation memory. ``batch`` and ``fn``'s output are pytrees of ``[B, ...]`` arrays."""
    if micro_batches == 1:
        return fn(batch)
    out = jax.lax.map(fn, split_micro_batches(batch, micro_batches))
    return jax.tree.map(lambda x: x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]), out)


def make_rollout(
    actor_config: ModelConfig,
    ppo: PPOConfig,
    *,
    critic_config: ModelConfig | None = None,
    reward_config: ModelConfig | None = None,
    reward_pooling: str = "last",
    score_fn=None,
    gold_fn=None,
):
    """Jitted ``rollout(actor, critic, reference, reward, prompt, prompt_mask, key, kl_coef)``.

    ``actor``/``reference``/``reward`` are params (the frozen two computed in ``ppo.frozen_dtype``;
    pass them stored in it, :func:`jaxppo.models.config.cast_params`, to save memory); ``critic``
    is the separate critic's params, or None for a shared-trunk value head (``ppo.critic ==
    "shared"``) and for estimators without a critic. With ``score_fn(prompt,
    prompt_mask, response, response_mask) -> [B]`` (a programmatic, verifiable reward) the score
    comes from it and ``reward`` is ignored; ``reward_pooling`` is the reward model's
    (:func:`jaxppo.sequences.response_scores`). With ``gold_fn`` (same signature, jittable: a task's
    hidden gold reward) the metrics also hold its mean, ``gold_reward``, computed inside the program.
    Returns ``(Trajectory, metrics)``. Traced once per prompt shape.
    """
    estimator = ESTIMATORS[ppo.estimator]
    critic_config = critic_config or actor_config
    # frozen roles in ppo.frozen_dtype (their params are cast here too; pass them already cast to save memory)
    reference_config = with_dtype(actor_config, ppo.frozen_dtype)
    reward_config = with_dtype(reward_config or actor_config, ppo.frozen_dtype)
    sampling = SamplingParams(
        max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_k=ppo.top_k, top_p=ppo.top_p,
        stop_token_ids=ppo.stop_token_ids, pad_token_id=ppo.pad_token_id,
    )
    shared, separate = ppo.critic_role == "shared", ppo.critic_role == "separate"

    @jax.jit
    def rollout(actor, critic, reference, reward, prompt, prompt_mask, key, kl_coef):
        reference, reward = cast_params((reference, reward), ppo.frozen_dtype)
        out = sample(actor_config, actor, prompt, prompt_mask, key, sampling=sampling)
        response, mask = out.tokens, out.mask
        args = (prompt, prompt_mask, response, mask)

        def score(args):  # the scoring passes over (a micro-batch of) the episodes
            logprobs, values = None, None
            if shared or not ppo.sampler_logprobs:
                logprobs, values, _ = response_logprobs(actor_config, actor, *args, temperature=ppo.temperature,
                                                        value_head="value_head" if shared else None)
            if separate:
                values = response_values(critic_config, critic, *args)
            ref_logprobs, _, _ = response_logprobs(reference_config, reference, *args, temperature=ppo.temperature)
            proxy = score_fn(*args) if score_fn is not None else response_scores(reward_config, reward, *args,
                                                                                  pooling=reward_pooling)
            return logprobs, values, ref_logprobs, proxy

        old_logprobs, values, ref_logprobs, proxy = micro_batched(score, args, micro_batches=ppo.score_micro_batches)
        if ppo.sampler_logprobs:
            old_logprobs = out.logprobs
        stopped = jnp.any((mask > 0) & jnp.isin(response, jnp.asarray(ppo.stop_token_ids or (-1,))), axis=1)
        # without stop tokens no response can stop: there is nothing to penalise
        penalty = ppo.missing_eos_penalty if ppo.stop_token_ids else 0.0
        scores = jnp.where(stopped, proxy, proxy - penalty)
        beta = kl_coef if ppo.kl_in_reward else 0.0
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=beta,
                                        estimator=ppo.kl_penalty_estimator)
        if ppo.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        hyperparameters = {name: getattr(ppo, name) for name in estimator.hyperparameters}
        advantages, returns = estimator.fn(AdvantageInputs(scores, rewards, values, mask), **hyperparameters)
        if ppo.whiten_advantages:
            advantages = whiten(advantages, mask)
        traj = Trajectory(prompt, prompt_mask, response, mask, old_logprobs, ref_logprobs, values, scores,
                          rewards, kl, advantages, returns)
        metrics = {
            "proxy_reward": jnp.mean(proxy),  # the reward model's score, before the missing-EOS penalty
            "score": jnp.mean(scores),
            "kl": jnp.mean(sequence_sum(kl, mask)),
            "kl_coef": jnp.asarray(kl_coef, jnp.float32),
            "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "stopped_fraction": jnp.mean(stopped.astype(jnp.float32)),
            "return_mean": masked_mean(returns, mask),
        }
        if values is not None:
            metrics.update(value_mean=masked_mean(values, mask),
                           explained_variance=explained_variance(values, returns, mask))
        if gold_fn is not None:
            metrics["gold_reward"] = jnp.mean(gold_fn(*args).astype(jnp.float32))
        return traj, metrics

    return rollout
