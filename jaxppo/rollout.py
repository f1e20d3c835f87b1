"""PPO rollout: generate → log-probs (actor, reference) → values → reward → Trajectory.

One jitted function turns a batch of prompts into a frozen :class:`Trajectory` (seed 003's
pipeline, Ziegler et al. 2019):

1. sample responses from the actor (:mod:`jaxppo.engine`: slot-refill decoding, ``ppo.decode_slots``);
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
   :data:`jaxppo.advantages.ESTIMATORS` (PPO: GAE by reverse scan over the critic's values; GRPO,
   RLOO, …: group-relative, no critic), then optional advantage whitening.

Critic-free estimators see the batch in groups: rows ``g·n … g·n+n−1`` answer prompt ``g``
(``n = ppo.group_size``; the caller repeats each prompt n times, :func:`group_prompts`). With
``ppo.dynamic_sampling`` (DAPO) a group whose scores are all equal carries no signal and is dropped
from the loss through ``Trajectory.loss_mask``; with ``ppo.oversample = k`` the rollout samples k ×
the batch's groups, scores them, and keeps the informative groups first (the same static shapes).
Without a reference (``ppo.builds_reference`` false: β = 0) the reference pass is skipped and the
KL is 0.

The scoring passes (2–3) can run over ``ppo.score_micro_batches`` slices of the batch in turn
(:func:`micro_batched`): the same values, a fraction of the activation memory.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    _groups,
    explained_variance,
    kl_shaped_rewards,
    sequence_sum,
    whiten,
)
from jaxppo.losses import overlong_penalty
from jaxppo.masking import masked_mean
from jaxppo.models.config import ModelConfig, cast_params, with_dtype
from jaxppo.optim import split_micro_batches
from jaxppo.ppo_config import PPOConfig
from jaxppo.engine import generate
from jaxppo.sampling import SamplingParams
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
    loss_mask: Array  # response_mask without the rows dynamic sampling drops: what the update's losses average over


def group_prompts(prompt: Array, prompt_mask: Array, *, group_size: int) -> tuple[Array, Array]:
    """Each prompt repeated ``group_size`` times in consecutive rows: ``[G, P]`` → ``[G·n, P]``."""
    return jnp.repeat(prompt, group_size, axis=0), jnp.repeat(prompt_mask, group_size, axis=0)


def informative_groups(scores: Array, *, group_size: int) -> Array:
    """``[B]`` bool: whether the row's group of ``group_size`` consecutive rows has scores that are not
    all equal (DAPO's dynamic-sampling filter: a group of equal scores has zero group-relative advantages)."""
    groups = _groups("informative_groups", scores, group_size, "scores")
    spread = jnp.max(groups, axis=1) > jnp.min(groups, axis=1)
    return jnp.repeat(spread, group_size)


def keep_informative_first(scores: Array, *, group_size: int, groups: int) -> Array:
    """Row indices ``[groups · group_size]`` of ``groups`` whole groups out of those of ``scores`` ``[M]``:
    the informative ones (:func:`informative_groups`) first, each kind in sampling order; static shapes."""
    informative = informative_groups(scores, group_size=group_size)[::group_size]
    if not 1 <= groups <= informative.shape[0]:
        raise ValueError(f"keep_informative_first: `groups` must be in [1, {informative.shape[0]}] (the groups of "
                         f"`scores`), got {groups}")
    order = jnp.argsort(~informative, stable=True)[:groups]
    return (order[:, None] * group_size + jnp.arange(group_size)[None, :]).reshape(-1)


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
    "shared"``) and for estimators without a critic; ``reference`` is None when the run builds none
    (``ppo.builds_reference``). ``prompt`` holds ``ppo.oversample × ppo.batch_size`` rows, each
    prompt repeated ``ppo.group_size`` times. With ``score_fn(prompt, prompt_mask, response,
    response_mask) -> [B]`` (a programmatic, verifiable reward, :mod:`jaxppo.rewards`; or ``([B],
    {name: [B]})``, whose parts are logged as ``reward_<name>``) the score
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
    with_reference = ppo.builds_reference

    def proxy_scores(reward, args):
        """The reward model's score, or the reward functions' (``score_fn``) with their named parts."""
        if score_fn is None:
            return micro_batched(lambda a: response_scores(reward_config, reward, *a, pooling=reward_pooling), args,
                                 micro_batches=ppo.score_micro_batches), {}
        out = score_fn(*args)
        return out if isinstance(out, tuple) else (out, {})

    @jax.jit
    def rollout(actor, critic, reference, reward, prompt, prompt_mask, key, kl_coef):
        reference, reward = cast_params((reference, reward), ppo.frozen_dtype)
        if prompt.shape[0] != ppo.oversample * ppo.batch_size:
            raise ValueError(f"rollout: {prompt.shape[0]} prompt rows; expected oversample × batch_size = "
                             f"{ppo.oversample} × {ppo.batch_size} (each prompt repeated group_size times)")
        slots = ppo.decode_slots or prompt.shape[0]
        with jax.named_scope("generate"):  # phase names for profiles (experiments/profile_rollout.py)
            out, engine = generate(actor_config, actor, prompt, prompt_mask, key, sampling=sampling, slots=slots,
                                   min_slots=ppo.decode_min_slots or slots)
        response, mask, sampler_logprobs = out.tokens, out.mask, out.logprobs
        with jax.named_scope("reward"):
            proxy, parts = proxy_scores(reward, (prompt, prompt_mask, response, mask))
        stopped = jnp.any((mask > 0) & jnp.isin(response, jnp.asarray(ppo.stop_token_ids or (-1,))), axis=1)
        # without stop tokens no response can stop: there is nothing to penalise
        penalty = ppo.missing_eos_penalty if ppo.stop_token_ids else 0.0
        scores = jnp.where(stopped, proxy, proxy - penalty)
        if ppo.overlong_cache_tokens:  # DAPO: long responses lose up to 1 over the last cache tokens
            scores = scores + overlong_penalty(jnp.sum(mask, axis=1), max_length=ppo.max_new_tokens,
                                               cache_length=ppo.overlong_cache_tokens)
        informative = None
        if ppo.dynamic_sampling:  # on the reward's own score (DAPO: 0 < accuracy < 1), not the length penalties
            informative = informative_groups(proxy, group_size=ppo.group_size)
            informative_rate = jnp.mean(informative.astype(jnp.float32))  # of all sampled groups
            if ppo.oversample > 1:  # keep ppo.batch_size rows: informative groups first
                rows = keep_informative_first(proxy, group_size=ppo.group_size,
                                              groups=ppo.batch_size // ppo.group_size)
                (prompt, prompt_mask, response, mask, sampler_logprobs, proxy, scores, stopped, informative,
                 parts) = jax.tree.map(lambda x: x[rows], (prompt, prompt_mask, response, mask, sampler_logprobs,
                                                            proxy, scores, stopped, informative, parts))
        args = (prompt, prompt_mask, response, mask)

        def score(args):  # the scoring passes over (a micro-batch of) the episodes
            logprobs, values, ref_logprobs = None, None, None
            if shared or not ppo.sampler_logprobs:
                with jax.named_scope("actor"):
                    logprobs, values, _ = response_logprobs(actor_config, actor, *args, temperature=ppo.temperature,
                                                            value_head="value_head" if shared else None)
            if separate:
                with jax.named_scope("critic"):
                    values = response_values(critic_config, critic, *args)
            if with_reference:
                with jax.named_scope("reference"):
                    ref_logprobs, _, _ = response_logprobs(reference_config, reference, *args,
                                                           temperature=ppo.temperature)
            return logprobs, values, ref_logprobs

        old_logprobs, values, ref_logprobs = micro_batched(score, args, micro_batches=ppo.score_micro_batches)
        if ppo.sampler_logprobs:
            old_logprobs = sampler_logprobs
        if not with_reference:  # β = 0 and no reference built: the KL is 0 by definition
            ref_logprobs = old_logprobs
        beta = kl_coef if ppo.kl_in_reward else 0.0
        rewards, kl = kl_shaped_rewards(scores, old_logprobs, ref_logprobs, mask, kl_coef=beta,
                                        estimator=ppo.kl_penalty_estimator)
        if ppo.whiten_rewards:
            rewards = whiten(rewards, mask, shift_mean=False)
        hyperparameters = {name: getattr(ppo, name) for name in estimator.hyperparameters}
        advantages, returns = estimator.fn(AdvantageInputs(scores, rewards, values, mask), **hyperparameters)
        loss_mask = mask if informative is None else mask * informative[:, None].astype(mask.dtype)
        if ppo.whiten:
            advantages = whiten(advantages, loss_mask)
        traj = Trajectory(prompt, prompt_mask, response, mask, old_logprobs, ref_logprobs, values, scores,
                          rewards, kl, advantages, returns, loss_mask)
        metrics = {
            "proxy_reward": jnp.mean(proxy),  # the reward model's / functions' score, before the missing-EOS penalty
            "score": jnp.mean(scores),
            "kl": jnp.mean(sequence_sum(kl, mask)),
            "kl_coef": jnp.asarray(kl_coef, jnp.float32),
            "response_length": jnp.mean(jnp.sum(mask, axis=1)),
            "stopped_fraction": jnp.mean(stopped.astype(jnp.float32)),
            "return_mean": masked_mean(returns, mask),
            "decode_utilisation": engine.utilisation,  # of the decoded rows, the fraction that produced a token
            "decode_steps": engine.steps.astype(jnp.float32),
            **{f"reward_{name}": jnp.mean(x.astype(jnp.float32)) for name, x in parts.items()},
        }
        if informative is not None:
            metrics["kept_fraction"] = jnp.mean(informative.astype(jnp.float32))  # rows of the batch in the loss
            metrics["informative_sampled_fraction"] = informative_rate
        if values is not None:
            metrics.update(value_mean=masked_mean(values, mask),
                           explained_variance=explained_variance(values, returns, mask))
        if gold_fn is not None:
            metrics["gold_reward"] = jnp.mean(gold_fn(*args).astype(jnp.float32))
        return traj, metrics

    return rollout
