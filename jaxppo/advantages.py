"""Per-token rewards, GAE and whitening: the advantage side of PPO for language models.

An LLM response is an episode whose actions are its tokens (seed 000 §2.2). The reward model
scores the whole response once, at its last token; every token pays a KL penalty to the
reference model (seed 000 §5.1, seed 003); GAE turns those rewards and the critic's values into
per-token advantages (seed 000 §5.2-5.4).

All functions are pure, jit-compatible, take ``[B, T]`` arrays (batch, response time) and
keyword-only scalars, and check shapes when traced. ``mask`` is 1 on valid response tokens and 0
on padding; the valid tokens of a row are a *prefix* of the row (right padding, as a rollout
produces). Outputs are 0 at masked positions, which never contribute even if they hold NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxppo.losses import kl_penalty
from jaxppo.masking import (
    as_mask,
    check_rank,
    check_same_shape,
    check_shape,
    compute_dtype,
    last_valid_index,
    masked_mean,
    masked_sum,
)

Array = jax.Array


def gae(
    rewards: Array, values: Array, mask: Array, *, gamma: float, lam: float
) -> tuple[Array, Array]:
    r"""Generalized Advantage Estimation (Schulman et al. 2016) by a reverse ``lax.scan``.

    .. math::
        δ_t = r_t + γ V_{t+1} − V_t, \qquad A_t = δ_t + γλ A_{t+1}, \qquad R_t = A_t + V_t

    where :math:`V_{t+1} = 0` and :math:`A_{t+1} = 0` after a row's last valid token (the
    response ends there: EOS or the length limit). ``returns`` :math:`R_t` are the critic's
    regression targets. Seed 000 §5.4: T = 3, γ = 1, λ = 0.95, r = (−0.1, −0.1, 4.9),
    V = (2, 3, 4) gives A = (2.56725, 1.755, 0.9).

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. from :func:`kl_shaped_rewards`).
      values: ``[B, T]`` critic values :math:`V(s_t)` of the states before each token.
      mask: ``[B, T]`` valid response tokens (a prefix of each row).
      gamma: discount γ ∈ [0, 1] (1 is standard for LLMs).
      lam: GAE λ ∈ [0, 1] (0.95 is standard).

    Returns:
      ``(advantages, returns)``, each ``[B, T]``, 0 at masked positions.
    """
    fn = "gae"
    check_rank(fn, "rewards", rewards, 2, "[B, T]")
    check_same_shape(fn, "rewards", rewards, values=values, mask=mask)
    dtype = compute_dtype(rewards, values)
    valid = as_mask(mask, dtype) > 0
    rewards = jnp.where(valid, rewards.astype(dtype), 0.0)
    values = jnp.where(valid, values.astype(dtype), 0.0)
    # V_{t+1}, with V = 0 past the end (the mask is a prefix, so masked next-values are 0 above).
    next_values = jnp.concatenate([values[:, 1:], jnp.zeros_like(values[:, :1])], axis=1)
    deltas = rewards + gamma * next_values - values

    def step(next_advantage, inputs):
        delta_t, valid_t = inputs
        advantage = jnp.where(valid_t, delta_t + gamma * lam * next_advantage, 0.0)
        return advantage, advantage

    _, advantages_tm = jax.lax.scan(
        step, jnp.zeros(rewards.shape[:1], dtype), (deltas.T, valid.T), reverse=True
    )
    advantages = advantages_tm.T
    returns = jnp.where(valid, advantages + values, 0.0)
    return advantages, returns


def whiten(x: Array, mask: Array, *, shift_mean: bool = True, eps: float = 1e-8) -> Array:
    r"""Masked whitening over all valid entries of the batch.

    .. math:: \hat x = \frac{x − μ}{\sqrt{σ^2 + ε}} \;(+\, μ \text{ if not shift\_mean})

    with μ and σ² the mean and population variance of the valid entries. ``shift_mean=False``
    keeps the mean (lm-human-preferences whitens *rewards* this way, so their sign survives);
    advantages are whitened with ``shift_mean=True``.

    Args:
      x: ``[B, T]`` values.
      mask: ``[B, T]`` valid entries.
      shift_mean: subtract the mean (True) or keep it (False).
      eps: added to the variance.

    Returns:
      ``[B, T]``, 0 at masked positions.
    """
    fn = "whiten"
    check_rank(fn, "x", x, 2, "[B, T]")
    check_same_shape(fn, "x", x, mask=mask)
    dtype = compute_dtype(x)
    m = as_mask(mask, dtype)
    x = x.astype(dtype)
    mean = masked_mean(x, m)
    centered = x - mean
    var = masked_mean(jnp.square(centered), m)
    out = centered * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return jnp.where(m > 0, out, 0.0)


def kl_shaped_rewards(
    scores: Array,
    logprobs: Array,
    ref_logprobs: Array,
    mask: Array,
    *,
    kl_coef: float | Array,
    estimator: str = "k1",
) -> tuple[Array, Array]:
    r"""Token-level rewards: a KL penalty at every token plus the sequence score at the last.

    .. math::
        \mathrm{KL}_t = \mathrm{est}(\log π(a_t) − \log π_{ref}(a_t)), \qquad
        r_t = −β\,\mathrm{KL}_t + [t = T_b]\, s_b

    where :math:`T_b` is row b's last valid token and β = ``kl_coef`` (seed 000 §5.1; seed 003:
    the score lands on the last non-pad token). Rows with no valid token get no score.

    Args:
      scores: ``[B]`` reward-model score of each response.
      logprobs: ``[B, T]`` actor log-probs of the response tokens (at rollout time).
      ref_logprobs: ``[B, T]`` reference-model log-probs of the same tokens.
      mask: ``[B, T]`` valid response tokens (a prefix of each row).
      kl_coef: β ≥ 0 (a Python float or a traced scalar from :mod:`jaxppo.kl_control`).
      estimator: KL estimator name, see :func:`jaxppo.losses.kl_penalty`.

    Returns:
      ``(rewards, kl)``, each ``[B, T]`` and 0 at masked positions; ``kl`` is the per-token
      estimate (sum it over t for the sequence KL).
    """
    fn = "kl_shaped_rewards"
    check_rank(fn, "logprobs", logprobs, 2, "[B, T]")
    check_same_shape(fn, "logprobs", logprobs, ref_logprobs=ref_logprobs, mask=mask)
    check_shape(fn, "scores", scores, logprobs.shape[:1], "[B]")
    kl = kl_penalty(logprobs, ref_logprobs, estimator=estimator)
    valid = as_mask(mask, kl.dtype) > 0
    kl = jnp.where(valid, kl, 0.0)
    last = last_valid_index(valid)
    at_last = (jnp.arange(kl.shape[1])[None, :] == last[:, None]) & (last[:, None] >= 0)
    rewards = -kl_coef * kl + jnp.where(at_last, scores.astype(kl.dtype)[:, None], 0.0)
    return rewards, kl


def explained_variance(values: Array, returns: Array, mask: Array) -> Array:
    r"""Fraction of the returns' variance the critic explains: :math:`1 − \mathrm{Var}[R − V] / \mathrm{Var}[R]`.

    1 is a perfect critic, 0 is no better than a constant, negative is worse. Computed over the
    valid entries of ``[B, T]`` arrays; 0 when the returns have no variance.
    """
    fn = "explained_variance"
    check_rank(fn, "values", values, 2, "[B, T]")
    check_same_shape(fn, "values", values, returns=returns, mask=mask)
    dtype = compute_dtype(values, returns)
    m = as_mask(mask, dtype)
    values, returns = values.astype(dtype), returns.astype(dtype)

    def var(x):
        return masked_mean(jnp.square(x - masked_mean(x, m)), m)

    var_returns = var(returns)
    return jnp.where(var_returns > 0, 1.0 - var(returns - values) / jnp.where(var_returns > 0, var_returns, 1.0), 0.0)


def sequence_sum(x: Array, mask: Array) -> Array:
    """Σ_t x·mask per row: ``[B, T]`` → ``[B]`` (e.g. the sequence KL from per-token KL)."""
    check_rank("sequence_sum", "x", x, 2, "[B, T]")
    check_same_shape("sequence_sum", "x", x, mask=mask)
    return masked_sum(x, as_mask(mask, compute_dtype(x)), axis=-1)


def _groups(fn: str, rewards: Array, group_size: int, name: str = "rewards") -> Array:
    """``rewards [B]`` as ``[B / n, n]``: row ``g`` holds the ``n = group_size`` responses to prompt ``g``;
    ``name`` is the argument's, for the errors."""
    check_rank(fn, name, rewards, 1, "[B]")
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"{fn}: `group_size` must be an integer >= 2, got {group_size!r}")
    if rewards.shape[0] % group_size:
        raise ValueError(f"{fn}: `{name}` has {rewards.shape[0]} rows, not a multiple of group_size={group_size}")
    return rewards.astype(compute_dtype(rewards)).reshape(-1, group_size)


def group_advantages(rewards: Array, *, group_size: int, scale: str = "std", eps: float = 1e-6) -> Array:
    r"""Group-relative advantages of GRPO (Shao et al. 2024, DeepSeekMath) and Dr. GRPO.

    Rows come in contiguous groups: rows ``g·n … g·n+n−1`` are the ``n = group_size`` responses to
    prompt ``g``. With ``scale="std"`` (GRPO)

    .. math:: A_i = \frac{r_i − \bar r_g}{s_g + ε}, \qquad
              s_g = \sqrt{\tfrac{1}{n−1} \textstyle\sum_{j∈g} (r_j − \bar r_g)^2}

    (the group's *sample* standard deviation, ddof = 1, as DeepSeekMath's and TRL's code); with
    ``scale="none"`` (Dr. GRPO, Liu et al. 2025, which drops the division as a difficulty bias)
    :math:`A_i = r_i − \bar r_g`. A group whose rewards are all equal gets advantages 0 either way.

    Args:
      rewards: ``[B]`` sequence rewards, ``B`` a multiple of ``group_size``.
      group_size: ``n ≥ 2`` responses per prompt.
      scale: ``"std"`` or ``"none"``.
      eps: added to the standard deviation.

    Returns:
      ``[B]`` advantages, one per response (every token of a response shares it).
    """
    fn = "group_advantages"
    if scale not in ("std", "none"):
        raise ValueError(f"{fn}: `scale` must be 'std' or 'none', got {scale!r}")
    r = _groups(fn, rewards, group_size)
    centered = r - jnp.mean(r, axis=1, keepdims=True)
    if scale == "std":
        std = jnp.sqrt(jnp.sum(jnp.square(centered), axis=1, keepdims=True) / (group_size - 1))
        centered = centered / (std + eps)
    # a group of equal rewards gets exactly 0: in float32 the mean of e.g. seven 0.9s is off by an ulp,
    # and that rounding error divided by a std of the same size would not be small
    constant = jnp.max(r, axis=1, keepdims=True) == jnp.min(r, axis=1, keepdims=True)
    return jnp.where(constant, 0.0, centered).reshape(-1)


def rloo_advantages(rewards: Array, *, group_size: int) -> Array:
    r"""REINFORCE leave-one-out advantages (Ahmadian et al. 2024; Kool et al. 2019).

    .. math:: A_i = r_i − \frac{1}{n−1} \sum_{j∈g,\, j≠i} r_j = \frac{n}{n−1}\,(r_i − \bar r_g)

    each response's baseline is the mean reward of the *other* responses to its prompt, so it is
    independent of the response and the estimate stays unbiased. Groups as in :func:`group_advantages`.

    Args:
      rewards: ``[B]`` sequence rewards, ``B`` a multiple of ``group_size``.
      group_size: ``n ≥ 2`` responses per prompt.

    Returns:
      ``[B]`` advantages.
    """
    r = _groups("rloo_advantages", rewards, group_size)
    others = (jnp.sum(r, axis=1, keepdims=True) - r) / (group_size - 1)
    return (r - others).reshape(-1)


# --------------------------------------------------------------------------------------------
# Advantage estimators: the plug-in point of the rollout (chosen by ``ppo.estimator``)
# --------------------------------------------------------------------------------------------


def reward_to_go(rewards: Array, mask: Array, *, gamma: float) -> Array:
    r"""Discounted reward-to-go of each token, no critic (REINFORCE's return).

    .. math:: G_t = \sum_{k ≥ t} γ^{k−t} r_k

    over the row's valid tokens: :func:`gae` with values 0 and λ = 1. ``[B, T]`` → ``[B, T]``, 0 at
    masked positions.
    """
    check_rank("reward_to_go", "rewards", rewards, 2, "[B, T]")
    check_same_shape("reward_to_go", "rewards", rewards, mask=mask)
    returns, _ = gae(rewards, jnp.zeros_like(rewards), mask, gamma=gamma, lam=1.0)
    return returns


def group_center_scores(rewards: Array, scores: Array, mask: Array, *, group_size: int) -> Array:
    r"""Per-token rewards with each response's score replaced by its score minus its group's mean
    score (REINFORCE++-baseline, Hu 2025): the reward at the last valid token becomes
    :math:`r_T − \bar s_g` (the score was added there, :func:`kl_shaped_rewards`), every other
    token's reward (the −β·KL terms) is kept. Groups as in :func:`group_advantages`.

    Args:
      rewards: ``[B, T]`` per-token rewards holding the score ``scores[i]`` at each row's last valid token.
      scores: ``[B]`` sequence scores.
      mask: ``[B, T]`` valid tokens (a prefix of each row).
      group_size: ``n ≥ 2`` responses per prompt.

    Returns:
      ``[B, T]`` rewards, 0 at masked positions.
    """
    fn = "group_center_scores"
    check_rank(fn, "rewards", rewards, 2, "[B, T]")
    check_same_shape(fn, "rewards", rewards, mask=mask)
    check_shape(fn, "scores", scores, rewards.shape[:1], "[B]")
    groups = _groups(fn, scores, group_size, "scores")
    group_mean = jnp.repeat(jnp.mean(groups, axis=1), group_size)
    dtype = compute_dtype(rewards, scores)
    m = as_mask(mask, dtype)
    last = jnp.arange(rewards.shape[1])[None, :] == last_valid_index(m)[:, None]
    shifted = rewards.astype(dtype) - jnp.where(last, group_mean[:, None], 0.0)
    return jnp.where(m > 0, shifted, 0.0)


def reinforce_pp_advantages(rewards: Array, mask: Array, *, gamma: float, eps: float = 1e-8) -> Array:
    r"""REINFORCE++ advantages (Hu 2025): the reward-to-go of the KL-shaped per-token rewards,
    whitened over every valid token of the batch (the "global advantage normalisation" that
    replaces the critic's baseline):

    .. math:: A_t = \frac{G_t − μ}{\sqrt{σ^2 + ε}}, \qquad G_t = \sum_{k≥t} γ^{k−t} r_k

    with μ, σ² the mean and population variance of :math:`G` over the batch's valid tokens. For
    REINFORCE++-baseline, pass rewards from :func:`group_center_scores`.

    Args:
      rewards: ``[B, T]`` per-token rewards (e.g. :func:`kl_shaped_rewards`).
      mask: ``[B, T]`` valid tokens.
      gamma: discount γ ∈ [0, 1].
      eps: added to the variance.

    Returns:
      ``[B, T]`` advantages, 0 at masked positions.
    """
    check_rank("reinforce_pp_advantages", "rewards", rewards, 2, "[B, T]")
    check_same_shape("reinforce_pp_advantages", "rewards", rewards, mask=mask)
    return whiten(reward_to_go(rewards, mask, gamma=gamma), mask, eps=eps)


def per_token(sequence_values: Array, mask: Array) -> Array:
    """``[B]`` → ``[B, T]``: each row's value on its valid tokens, 0 on padding."""
    check_rank("per_token", "mask", mask, 2, "[B, T]")
    check_shape("per_token", "sequence_values", sequence_values, mask.shape[:1], "[B]")
    dtype = compute_dtype(sequence_values)
    return jnp.where(as_mask(mask, dtype) > 0, sequence_values.astype(dtype)[:, None], 0.0)


# --------------------------------------------------------------------------------------------
# Advantage estimators: the plug-in point of the rollout (chosen by ``ppo.estimator``)
# --------------------------------------------------------------------------------------------


class AdvantageInputs(NamedTuple):
    """What the rollout hands an estimator; ``[B, N]`` unless noted."""

    scores: Array  # [B] sequence reward (reward model / reward functions, after the missing-EOS penalty)
    rewards: Array  # per-token rewards: −β·KL_t plus the score at the last token (kl_shaped_rewards)
    values: Array | None  # critic values V(s_t); None when the estimator needs no critic
    mask: Array  # valid response tokens


class Estimator(NamedTuple):
    """An entry of :data:`ESTIMATORS`.

    ``fn(inputs: AdvantageInputs, **hyperparameters) -> (advantages [B, N], returns [B, N])`` is a
    pure function; ``hyperparameters`` names the ``PPOConfig`` scalars it takes as keywords;
    ``needs_critic`` says whether the run builds, trains and checkpoints a critic for it (then
    ``inputs.values`` is set and ``returns`` are the critic's targets; without a critic ``returns``
    are only logged). ``whiten`` is the default of ``ppo.whiten_advantages`` (batch whitening after
    the estimator): on for GAE, off where it would change the estimator (a group-relative advantage
    whitened over the batch's tokens is no longer group-relative) or the estimator whitens itself.
    ``grouped``: the batch must come in groups of ``ppo.group_size`` responses per prompt;
    ``per_response``: one advantage per response, shared by its tokens (what GSPO's sequence-level
    loss and DAPO's dynamic sampling assume).
    """

    fn: Callable[..., tuple[Array, Array]]
    hyperparameters: tuple[str, ...]
    needs_critic: bool
    whiten: bool = False
    grouped: bool = False
    per_response: bool = False


def gae_estimator(inputs: AdvantageInputs, *, gamma: float, lam: float) -> tuple[Array, Array]:
    """PPO's estimator: :func:`gae` of the KL-shaped per-token rewards and the critic's values."""
    if inputs.values is None:
        raise ValueError("gae_estimator: `inputs.values` is None; GAE needs a critic")
    return gae(inputs.rewards, inputs.values, inputs.mask, gamma=gamma, lam=lam)


def _sequence_returns(fn: str, inputs: AdvantageInputs) -> Array:
    r"""Each response's return :math:`R_i = \sum_t r_{it}` ``[B]``, the arguments checked under ``fn``'s name."""
    check_rank(fn, "rewards", inputs.rewards, 2, "[B, T]")
    check_same_shape(fn, "rewards", inputs.rewards, mask=inputs.mask)
    return sequence_sum(inputs.rewards, inputs.mask)


def _per_response(advantages: Array, inputs: AdvantageInputs, gamma: float) -> tuple[Array, Array]:
    """``(advantages [B]`` on every valid token of their response, the reward-to-go as ``returns``,
    logged only: no critic regresses on them)."""
    return per_token(advantages, inputs.mask), reward_to_go(inputs.rewards, inputs.mask, gamma=gamma)


# The group estimators score each response by its return R_i = Σ_t r_it: the score, minus β·ΣKL when
# the KL is in the reward (ppo.kl_in_reward), or the score alone when the KL is a loss term (GRPO's way).

def grpo_estimator(inputs: AdvantageInputs, *, group_size: int, gamma: float) -> tuple[Array, Array]:
    r"""GRPO (Shao et al. 2024): :math:`A_{it} = (R_i − \bar R_g) / (s_g + ε)`, :func:`group_advantages`
    (``scale="std"``) of each response's return, on all its tokens."""
    returns = _sequence_returns("grpo_estimator", inputs)
    return _per_response(group_advantages(returns, group_size=group_size, scale="std"), inputs, gamma)


def dr_grpo_estimator(inputs: AdvantageInputs, *, group_size: int, gamma: float) -> tuple[Array, Array]:
    r"""Dr. GRPO (Liu et al. 2025): :math:`A_{it} = R_i − \bar R_g`, :func:`group_advantages`
    (``scale="none"``) on all its tokens. The paper's loss also needs ``ppo.aggregation =
    "seq-mean-token-sum-norm"`` (no per-response length normalisation)."""
    returns = _sequence_returns("dr_grpo_estimator", inputs)
    return _per_response(group_advantages(returns, group_size=group_size, scale="none"), inputs, gamma)


def rloo_estimator(inputs: AdvantageInputs, *, group_size: int, gamma: float) -> tuple[Array, Array]:
    r"""RLOO (Ahmadian et al. 2024): :math:`A_{it} = R_i − \frac{1}{n−1}\sum_{j≠i} R_j`,
    :func:`rloo_advantages` of each response's return, on all its tokens."""
    returns = _sequence_returns("rloo_estimator", inputs)
    return _per_response(rloo_advantages(returns, group_size=group_size), inputs, gamma)


def reinforce_pp_estimator(inputs: AdvantageInputs, *, gamma: float) -> tuple[Array, Array]:
    """REINFORCE++: :func:`reinforce_pp_advantages` of the KL-shaped rewards; returns: the reward-to-go."""
    return (reinforce_pp_advantages(inputs.rewards, inputs.mask, gamma=gamma),
            reward_to_go(inputs.rewards, inputs.mask, gamma=gamma))


def reinforce_pp_baseline_estimator(inputs: AdvantageInputs, *, group_size: int, gamma: float) -> tuple[Array, Array]:
    """REINFORCE++-baseline: REINFORCE++ of the rewards with the group-mean score subtracted
    (:func:`group_center_scores`)."""
    rewards = group_center_scores(inputs.rewards, inputs.scores, inputs.mask, group_size=group_size)
    return (reinforce_pp_advantages(rewards, inputs.mask, gamma=gamma),
            reward_to_go(inputs.rewards, inputs.mask, gamma=gamma))


# A fork adds an estimator with one pure function (+ its test) and one row here; `ppo.estimator`
# then accepts its name. The rollout calls ESTIMATORS[name].fn(inputs, **{h: ppo.<h>}).
ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(gae_estimator, hyperparameters=("gamma", "lam"), needs_critic=True, whiten=True),
    "grpo": Estimator(grpo_estimator, hyperparameters=("group_size", "gamma"), needs_critic=False, grouped=True,
                      per_response=True),
    "dr_grpo": Estimator(dr_grpo_estimator, hyperparameters=("group_size", "gamma"), needs_critic=False,
                         grouped=True, per_response=True),
    "rloo": Estimator(rloo_estimator, hyperparameters=("group_size", "gamma"), needs_critic=False, grouped=True,
                      per_response=True),
    "reinforce++": Estimator(reinforce_pp_estimator, hyperparameters=("gamma",), needs_critic=False),
    "reinforce++_baseline": Estimator(reinforce_pp_baseline_estimator, hyperparameters=("group_size", "gamma"),
                                      needs_critic=False, grouped=True),
}
