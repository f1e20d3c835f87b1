"""Losses of the three RLHF stages as pure functions of arrays.

Conventions (shared by every function here):

* ``[B, T]`` arrays are (batch, response time); ``[B, T, V]`` adds the vocabulary.
* ``mask`` is 1.0 (or True) on valid response tokens and 0.0 on padding. Masked positions never
  contribute to a loss or a metric, even if they hold NaN or inf.
* Scalars are keyword-only. Strings (``estimator``, ``aggregation``) and ``None``-able options
  select code paths, so mark them static when you ``jax.jit`` (``static_argnames``).
* Math is done in at least float32 (bf16 log-probs are upcast before ``exp``).
* Each loss returns ``(loss, aux)`` where ``aux`` is a dict of scalar diagnostics, or a scalar.
* Means are over the given batch by default. The optional keyword-only counts (``token_count``,
  ``row_count``, ``pair_count``, ``list_count``) replace the batch's own denominators with those of
  a larger batch the given one is a part of: micro-batch losses (and aux) computed with the
  minibatch's counts *sum* to the minibatch's loss, so micro-batching never changes the objective
  (:func:`jaxppo.optim.accumulate_gradients`). Counts below 1 are taken as 1.

Shapes are checked when traced; a mismatch raises one ``ValueError`` naming the argument.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxppo.masking import (
    as_mask,
    check_choice,
    check_rank,
    check_same_shape,
    check_shape,
    compute_dtype,
    masked_mean,
    masked_sum,
)

Array = jax.Array

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")
OBJECTIVES = ("bradley_terry", "plackett_luce")  # reward-model losses: pairs, ranked lists


# --------------------------------------------------------------------------------------------
# KL between the policy and the reference
# --------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Array, ref_logprobs: Array, *, estimator: str) -> Array:
    r"""Per-token estimate of KL(π ‖ π_ref) from the log-probs of tokens sampled from π.

    With :math:`d = \log π(a) − \log π_{ref}(a)` and :math:`a \sim π` (Schulman, "Approximating
    KL divergence", 2020):

    * ``k1``: :math:`d` — unbiased, high variance, can be negative per token.
    * ``k2``: :math:`½ d^2` — biased, ≥ 0, low variance; its gradient is the KL's gradient.
    * ``k3``: :math:`e^{-d} − (−d) − 1` — unbiased and ≥ 0 (``low_var_kl`` in some stacks).
    * ``abs``: :math:`|d|` — biased, ≥ 0.

    Args:
      logprobs: ``[B, T]`` log π of the sampled tokens.
      ref_logprobs: ``[B, T]`` log π_ref of the same tokens.
      estimator: one of ``KL_ESTIMATORS``.

    Returns:
      ``[B, T]`` per-token KL estimates (unmasked; multiply by a mask to aggregate).
    """
    fn = "kl_penalty"
    check_choice(fn, "estimator", estimator, KL_ESTIMATORS)
    check_rank(fn, "logprobs", logprobs, 2, "[B, T]")
    check_same_shape(fn, "logprobs", logprobs, ref_logprobs=ref_logprobs)
    dtype = compute_dtype(logprobs, ref_logprobs)
    d = logprobs.astype(dtype) - ref_logprobs.astype(dtype)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    if estimator == "k3":
        return jnp.expm1(-d) + d  # e^{-d} - 1 + d, accurate for small d
    return jnp.abs(d)


# --------------------------------------------------------------------------------------------
# PPO: clipped policy loss and clipped value loss
# --------------------------------------------------------------------------------------------


def aggregate(
    loss_mat: Array,
    mask: Array,
    *,
    aggregation: str,
    token_count: Array | float | None = None,
    row_count: Array | float | None = None,
) -> Array:
    r"""Reduces a ``[B, T]`` per-token loss to a scalar over the valid tokens.

    With :math:`N = \sum_{b,t} m_{bt}` valid tokens, :math:`n_b = \sum_t m_{bt}` and
    :math:`S = |\{b : n_b > 0\}|` non-empty rows:

    * ``token-mean``: :math:`\sum_{b,t} m_{bt} l_{bt} / N` — every token weighs the same (trl,
      OpenRLHF default; seed 000 §4.1).
    * ``seq-mean-token-mean``: :math:`\sum_b \big(\sum_t m_{bt} l_{bt} / n_b\big) / S` — every
      sequence weighs the same (the PPO paper's and DeepSpeed-Chat's reading).
    * ``seq-mean-token-sum``: :math:`\sum_{b,t} m_{bt} l_{bt} / S` (no length normalisation).
    * ``seq-mean-token-sum-norm``: :math:`\sum_{b,t} m_{bt} l_{bt} / (S\,T)` — each row's token sum
      divided by a constant, the maximum response length :math:`T` (``loss_mat``'s time axis):
      Dr. GRPO's unbiased aggregation (Liu et al. 2025; veRL's name), no per-row length bias.

    Rows without valid tokens are excluded from the sequence means; an empty batch gives 0.
    ``token_count`` replaces N and ``row_count`` replaces S (the counts of the whole minibatch when
    ``loss_mat`` is one of its micro-batches; see the module docstring). :math:`n_b` is per row, so
    it never changes.
    """
    fn = "aggregate"
    check_choice(fn, "aggregation", aggregation, AGGREGATIONS)
    check_rank(fn, "loss_mat", loss_mat, 2, "[B, T]")
    check_same_shape(fn, "loss_mat", loss_mat, mask=mask)
    mask = as_mask(mask, loss_mat.dtype)
    if aggregation == "token-mean":
        return masked_mean(loss_mat, mask, denominator=token_count)
    row_sum = masked_sum(loss_mat, mask, axis=-1)
    lengths = jnp.sum(mask, axis=-1)
    if aggregation == "seq-mean-token-mean":
        per_row = row_sum / jnp.maximum(lengths, 1)
    elif aggregation == "seq-mean-token-sum-norm":
        per_row = row_sum / loss_mat.shape[-1]
    else:
        per_row = row_sum
    return masked_mean(per_row, lengths > 0, denominator=row_count)


def policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    aggregation: str = "token-mean",
    token_count: Array | float | None = None,
    row_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""PPO clipped surrogate loss (Schulman et al. 2017, eq. 7), per token.

    .. math::
        ρ_t = \exp(\log π_θ(a_t) − \log π_{old}(a_t)),\qquad
        l_t = −\min\big(ρ_t A_t,\ \mathrm{clip}(ρ_t, 1−ε_{low}, 1+ε_{high})\,A_t\big)

    with :math:`ε_{low}` = ``clip_eps`` and :math:`ε_{high}` = ``clip_eps_high`` (default
    ``clip_eps``; a larger value is DAPO's "clip-higher"). With ``dual_clip`` = c > 1 (Ye et al.
    2020, "Mastering Complex Control in MOBA Games") the objective of negative-advantage tokens is
    bounded below by :math:`cA_t`: :math:`l_t ← \min(l_t, −cA_t)` for :math:`A_t < 0`.
    ``l`` is reduced by :func:`aggregate`. Seed 000 §4.2 tabulates the clip for ε = 0.2.

    ``old_logprobs`` and ``advantages`` are data: gradients do not flow into them.

    Args:
      logprobs: ``[B, T]`` log π_θ of the taken tokens (differentiable).
      old_logprobs: ``[B, T]`` log π_old of the same tokens (from the rollout).
      advantages: ``[B, T]`` advantage estimates.
      mask: ``[B, T]`` valid response tokens.
      clip_eps, clip_eps_high: clip range; both must be > 0.
      dual_clip: optional lower bound factor c > 1 for negative advantages.
      aggregation: one of ``AGGREGATIONS``.
      token_count, row_count: optional minibatch counts of valid tokens and non-empty rows that
        replace this batch's in :func:`aggregate` and in the token means of ``aux``.

    Returns:
      ``(loss, aux)`` with scalar aux ``clip_fraction`` (tokens where the clipped term is the
      active one), ``clip_fraction_low`` / ``clip_fraction_high`` (… at ρ < 1−ε_low / ρ > 1+ε_high),
      ``dual_clip_fraction``, ``approx_kl`` (masked mean of (ρ−1) − log ρ, the k3 estimate of
      KL(π_old ‖ π_θ)) and ``ratio_mean``.
    """
    fn = "policy_loss"
    check_rank(fn, "logprobs", logprobs, 2, "[B, T]")
    check_same_shape(
        fn, "logprobs", logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask
    )
    check_choice(fn, "aggregation", aggregation, AGGREGATIONS)
    eps_low = clip_eps
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    if not (isinstance(eps_low, jax.Array) or eps_low > 0):
        raise ValueError(f"{fn}: `clip_eps` must be > 0, got {clip_eps}")
    if not (isinstance(eps_high, jax.Array) or eps_high > 0):
        raise ValueError(f"{fn}: `clip_eps_high` must be > 0, got {clip_eps_high}")
    if dual_clip is not None and not (isinstance(dual_clip, jax.Array) or dual_clip > 1):
        raise ValueError(f"{fn}: `dual_clip` must be > 1, got {dual_clip}")

    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    mask = as_mask(mask, dtype)
    old_logprobs = jax.lax.stop_gradient(old_logprobs.astype(dtype))
    advantages = jax.lax.stop_gradient(advantages.astype(dtype))
    log_ratio = logprobs.astype(dtype) - old_logprobs
    ratio = jnp.exp(log_ratio)

    unclipped = -advantages * ratio
    clipped = -advantages * jnp.clip(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss_mat = jnp.maximum(unclipped, clipped)
    if dual_clip is not None:
        dual = -advantages * dual_clip
        dual_active = (advantages < 0) & (dual < loss_mat)
        loss_mat = jnp.where(dual_active, dual, loss_mat)
    else:
        dual_active = jnp.zeros_like(mask, dtype=bool)

    loss = aggregate(loss_mat, mask, aggregation=aggregation, token_count=token_count, row_count=row_count)
    clip_active = clipped > unclipped

    def token_mean(x):
        return masked_mean(x.astype(dtype), mask, denominator=token_count)

    aux = {
        "clip_fraction": token_mean(clip_active),
        "clip_fraction_low": token_mean(clip_active & (ratio < 1.0)),
        "clip_fraction_high": token_mean(clip_active & (ratio > 1.0)),
        "dual_clip_fraction": token_mean(dual_active),
        "approx_kl": jax.lax.stop_gradient(token_mean(jnp.expm1(log_ratio) - log_ratio)),
        "ratio_mean": jax.lax.stop_gradient(token_mean(ratio)),
    }
    return loss, aux


def sequence_policy_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    row_count: Array | float | None = None,
    token_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""GSPO's sequence-level clipped objective (Zheng et al. 2025, "Group Sequence Policy Optimization").

    .. math::
        s_i = \exp\Big(\frac{1}{|y_i|} \sum_{t} m_{it} (\log π_θ(y_{it}) − \log π_{old}(y_{it}))\Big),\qquad
        L = −\frac{1}{S} \sum_{i:\,|y_i|>0} \min\big(s_i A_i,\ \mathrm{clip}(s_i, 1−ε_{low}, 1+ε_{high})\,A_i\big)

    the length-normalised sequence likelihood ratio, clipped per *sequence* (the paper's ε are
    small, e.g. 3e-4 / 4e-4), with one advantage per response (``[B]``, e.g. from
    :func:`jaxppo.advantages.group_advantages`). :math:`S` is the number of non-empty rows
    (``row_count`` replaces it for a micro-batch of a larger minibatch); empty rows contribute nothing.

    Args:
      logprobs: ``[B, T]`` log π_θ of the taken tokens (differentiable).
      old_logprobs: ``[B, T]`` log π_old of the same tokens (data).
      advantages: ``[B]`` sequence advantages (data).
      mask: ``[B, T]`` valid response tokens.
      clip_eps, clip_eps_high: ``ε_low`` and ``ε_high`` (default ``ε_low``), both > 0.
      row_count: optional count of non-empty rows of the whole minibatch.
      token_count: optional count of valid tokens of the whole minibatch (the ``approx_kl`` diagnostic's
        denominator, so micro-batches' aux sum to the minibatch's too).

    Returns:
      ``(loss, aux)`` with scalar aux ``clip_fraction`` (rows where the clipped term is active),
      ``ratio_mean`` (mean :math:`s_i`) and ``approx_kl`` (mean per-token k3 estimate).
    """
    fn = "sequence_policy_loss"
    check_rank(fn, "logprobs", logprobs, 2, "[B, T]")
    check_same_shape(fn, "logprobs", logprobs, old_logprobs=old_logprobs, mask=mask)
    check_shape(fn, "advantages", advantages, logprobs.shape[:1], "[B]")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    for name, value in (("clip_eps", clip_eps), ("clip_eps_high", eps_high)):
        if not (isinstance(value, jax.Array) or value > 0):
            raise ValueError(f"{fn}: `{name}` must be > 0, got {value}")
    dtype = compute_dtype(logprobs, old_logprobs, advantages)
    mask = as_mask(mask, dtype)
    log_ratio = jnp.where(mask > 0, logprobs.astype(dtype) - jax.lax.stop_gradient(old_logprobs.astype(dtype)), 0.0)
    lengths = jnp.sum(mask, axis=-1)
    nonempty = lengths > 0
    seq_ratio = jnp.exp(jnp.sum(log_ratio, axis=-1) / jnp.maximum(lengths, 1.0))
    advantages = jax.lax.stop_gradient(advantages.astype(dtype))
    unclipped = -advantages * seq_ratio
    clipped = -advantages * jnp.clip(seq_ratio, 1.0 - clip_eps, 1.0 + eps_high)
    loss = masked_mean(jnp.maximum(unclipped, clipped), nonempty, denominator=row_count)

    def row_mean(x):
        return masked_mean(x.astype(dtype), nonempty, denominator=row_count)

    aux = {
        "clip_fraction": row_mean(clipped > unclipped),
        "ratio_mean": jax.lax.stop_gradient(row_mean(seq_ratio)),
        "approx_kl": jax.lax.stop_gradient(masked_mean(jnp.expm1(log_ratio) - log_ratio, mask,
                                                       denominator=token_count)),
    }
    return loss, aux


def overlong_penalty(lengths: Array, *, max_length: int, cache_length: int) -> Array:
    r"""DAPO's soft overlong punishment (Yu et al. 2025, eq. 13): a length-aware reward term.

    .. math:: R(ℓ) = \begin{cases} 0 & ℓ ≤ L − C \\ \frac{(L − C) − ℓ}{C} & L − C < ℓ ≤ L \\ −1 & ℓ > L \end{cases}

    with :math:`L` = ``max_length`` and :math:`C` = ``cache_length``: responses within the last
    ``C`` tokens before the limit are penalised linearly, from 0 to −1. It is added to the
    verifiable reward of each response.

    Args:
      lengths: ``[B]`` response lengths (valid tokens).
      max_length: ``L``, the maximum response length.
      cache_length: ``C``, with ``0 < C ≤ L``.

    Returns:
      ``[B]`` penalties in ``[−1, 0]``.
    """
    fn = "overlong_penalty"
    check_rank(fn, "lengths", lengths, 1, "[B]")
    if not 0 < cache_length <= max_length:
        raise ValueError(f"{fn}: need 0 < cache_length <= max_length, got cache_length={cache_length}, "
                         f"max_length={max_length}")
    lengths = jnp.asarray(lengths, jnp.result_type(float))  # float32, or float64 under x64
    soft = ((max_length - cache_length) - lengths) / cache_length
    return jnp.where(lengths > max_length, -1.0, jnp.minimum(soft, 0.0))


def gspo_loss(
    logprobs: Array,
    old_logprobs: Array,
    advantages: Array,
    mask: Array,
    *,
    clip_eps: float,
    clip_eps_high: float | None = None,
    token_count: Array | float | None = None,
    row_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    """:func:`sequence_policy_loss` with per-token ``advantages [B, T]`` (a :data:`POLICY_LOSSES` row):
    each row's advantage is the mean over its valid tokens (the response's advantage itself for the
    sequence-level estimators, which give every token of a response the same one). The loss averages
    over rows (``row_count``); ``token_count`` only divides the ``approx_kl`` diagnostic."""
    check_rank("gspo_loss", "advantages", advantages, 2, "[B, T]")
    check_same_shape("gspo_loss", "mask", mask, advantages=advantages)
    dtype = compute_dtype(advantages)
    m = as_mask(mask, dtype)
    row_advantages = masked_sum(advantages.astype(dtype), m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return sequence_policy_loss(logprobs, old_logprobs, row_advantages, mask, clip_eps=clip_eps,
                                clip_eps_high=clip_eps_high, row_count=row_count, token_count=token_count)


class PolicyLoss(NamedTuple):
    """An entry of :data:`POLICY_LOSSES`: ``fn(logprobs, old_logprobs, advantages, mask, *, token_count,
    row_count, **hyperparameters) -> (loss, aux)``, a pure function whose aux has at least
    ``clip_fraction`` and ``approx_kl``; ``hyperparameters`` names the ``PPOConfig`` fields it takes
    as keywords. ``token_count`` / ``row_count`` are the minibatch's (see :func:`aggregate`)."""

    fn: Callable[..., tuple[Array, dict[str, Array]]]
    hyperparameters: tuple[str, ...]


# A fork adds a policy loss with one pure function (+ its test) and one row here; `ppo.policy_loss`
# then accepts its name. The actor loss calls POLICY_LOSSES[name].fn(..., **{h: ppo.<h>}).
POLICY_LOSSES: dict[str, PolicyLoss] = {
    "clip": PolicyLoss(policy_loss, hyperparameters=("clip_eps", "clip_eps_high", "dual_clip", "aggregation")),
    "gspo": PolicyLoss(gspo_loss, hyperparameters=("clip_eps", "clip_eps_high")),
}


def value_loss(
    values: Array,
    old_values: Array,
    returns: Array,
    mask: Array,
    *,
    clip_eps: float | None = None,
    token_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""Critic regression loss with optional PPO-style value clipping.

    .. math::
        L^{VF} = ½\ \mathrm{mean}_t \max\big((V_t − R_t)^2,\
                 (\mathrm{clip}(V_t, V^{old}_t − ε, V^{old}_t + ε) − R_t)^2\big)

    and :math:`½\,\mathrm{mean}_t (V_t − R_t)^2` without ``clip_eps``; the mean is over all valid
    tokens of the batch (Σ over them / ``token_count`` when given). ``old_values`` and ``returns``
    are data (no gradient).

    Args:
      values: ``[B, T]`` current critic predictions (differentiable).
      old_values: ``[B, T]`` critic predictions at rollout time.
      returns: ``[B, T]`` regression targets (GAE returns).
      mask: ``[B, T]`` valid response tokens.
      clip_eps: optional clip range ε > 0 around ``old_values``.
      token_count: optional minibatch token count replacing this batch's in every mean.

    Returns:
      ``(loss, aux)`` with ``clip_fraction`` (tokens where the clipped error is the larger) and
      ``value_error`` (masked mean of (V − R)²).
    """
    fn = "value_loss"
    check_rank(fn, "values", values, 2, "[B, T]")
    check_same_shape(fn, "values", values, old_values=old_values, returns=returns, mask=mask)
    if clip_eps is not None and not (isinstance(clip_eps, jax.Array) or clip_eps > 0):
        raise ValueError(f"{fn}: `clip_eps` must be > 0 or None, got {clip_eps}")
    dtype = compute_dtype(values, old_values, returns)
    mask = as_mask(mask, dtype)
    values = values.astype(dtype)
    old_values = jax.lax.stop_gradient(old_values.astype(dtype))
    returns = jax.lax.stop_gradient(returns.astype(dtype))

    unclipped = jnp.square(values - returns)
    if clip_eps is None:
        loss_mat = unclipped
        clip_fraction = jnp.zeros((), dtype)
    else:
        values_clipped = old_values + jnp.clip(values - old_values, -clip_eps, clip_eps)
        clipped = jnp.square(values_clipped - returns)
        loss_mat = jnp.maximum(unclipped, clipped)
        clip_fraction = masked_mean((clipped > unclipped).astype(dtype), mask, denominator=token_count)
    loss = 0.5 * masked_mean(loss_mat, mask, denominator=token_count)
    aux = {
        "clip_fraction": clip_fraction,
        "value_error": jax.lax.stop_gradient(masked_mean(unclipped, mask, denominator=token_count)),
    }
    return loss, aux


# --------------------------------------------------------------------------------------------
# Token-distribution losses: entropy and SFT negative log-likelihood
# --------------------------------------------------------------------------------------------


def token_logprobs(logits: Array, targets: Array) -> Array:
    r"""log softmax(logits)[target] per position: :math:`z_{y} − \log\sum_v e^{z_v}`.

    Gathers the target logit and subtracts the log-partition, so the ``[B, T, V]`` log-softmax
    is never materialised.

    Args:
      logits: ``[B, T, V]``.
      targets: ``[B, T]`` integer token ids in ``[0, V)`` (out-of-range ids give garbage under
        ``jit``; validate ids where they enter, not here).

    Returns:
      ``[B, T]`` log-probs in at least float32.
    """
    fn = "token_logprobs"
    check_rank(fn, "logits", logits, 3, "[B, T, V]")
    check_shape(fn, "targets", targets, logits.shape[:2], "[B, T]")
    if not jnp.issubdtype(jnp.asarray(targets).dtype, jnp.integer):
        raise ValueError(f"{fn}: `targets` must be integer token ids, got {jnp.asarray(targets).dtype}")
    logits = logits.astype(compute_dtype(logits))
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def token_entropy(logits: Array) -> Array:
    r"""Entropy of each position's softmax distribution.

    .. math:: H_t = −\sum_v p_{tv} \log p_{tv} = \log\sum_v e^{z_{tv}} − \sum_v p_{tv} z_{tv}

    Args:
      logits: ``[B, T, V]``.

    Returns:
      ``[B, T]`` entropies in at least float32 (differentiable).
    """
    check_rank("token_entropy", "logits", logits, 3, "[B, T, V]")
    logits = logits.astype(compute_dtype(logits))
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1)


def entropy(logits: Array, mask: Array, *, token_count: Array | float | None = None) -> Array:
    r"""Masked mean of :func:`token_entropy`: :math:`\sum_{b,t} m_{bt} H_{bt} / \sum_{b,t} m_{bt}`.

    Args:
      logits: ``[B, T, V]``.
      mask: ``[B, T]`` valid response tokens.
      token_count: optional minibatch token count replacing :math:`\sum m`.

    Returns:
      scalar mean of :math:`H_t` over valid tokens (0 if none). Differentiable: as a bonus,
      subtract ``entropy_coef * entropy(...)`` from the loss.
    """
    fn = "entropy"
    check_rank(fn, "logits", logits, 3, "[B, T, V]")
    check_shape(fn, "mask", mask, logits.shape[:2], "[B, T]")
    per_token = token_entropy(logits)
    return masked_mean(per_token, as_mask(mask, per_token.dtype), denominator=token_count)


def sft_loss(logprobs: Array, mask: Array, *, token_count: Array | float | None = None) -> Array:
    r"""Masked mean token negative log-likelihood (supervised fine-tuning, PPO-ptx).

    .. math:: L = −\frac{1}{\sum m}\sum_{b,t} m_{bt} \log p_θ(y_{bt} \mid y_{b,<t}, x_b)

    Takes the target tokens' log-probs rather than logits, so a caller can compute them in chunks
    without materialising ``[B, T, V]`` (``token_logprobs(logits, targets)`` gives them from logits).

    Args:
      logprobs: ``[B, T]`` log p_θ of the target tokens.
      mask: ``[B, T]`` 1 on tokens that are trained (responses), 0 on prompt and padding.
      token_count: optional minibatch token count replacing :math:`\sum m`.

    Returns:
      scalar loss (0 if the mask is empty).
    """
    fn = "sft_loss"
    check_rank(fn, "logprobs", logprobs, 2, "[B, T]")
    check_same_shape(fn, "logprobs", logprobs, mask=mask)
    logprobs = logprobs.astype(compute_dtype(logprobs))
    return -masked_mean(logprobs, as_mask(mask, logprobs.dtype), denominator=token_count)


# --------------------------------------------------------------------------------------------
# Reward-model losses: Bradley-Terry pairs and Plackett-Luce rankings
# --------------------------------------------------------------------------------------------


def bradley_terry_loss(
    chosen_scores: Array,
    rejected_scores: Array,
    *,
    margin: float | Array | None = None,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""Pairwise preference loss of a reward model (Bradley & Terry 1952; Ouyang et al. 2022).

    .. math:: L = −\frac{1}{B}\sum_b \log σ(s^c_b − s^r_b − m_b)

    ``margin`` (Llama 2's margin loss, Touvron et al. 2023) is a scalar or a ``[B]`` array of
    how strongly each pair is preferred; ``None`` means 0.

    Args:
      chosen_scores: ``[B]`` reward of the preferred responses.
      rejected_scores: ``[B]`` reward of the rejected responses.
      margin: optional scalar or ``[B]``.
      pair_count: optional minibatch pair count replacing B in every mean.

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of pairs with s_c > s_r) and ``margin_mean``
      (mean of s_c − s_r).
    """
    fn = "bradley_terry_loss"
    check_rank(fn, "chosen_scores", chosen_scores, 1, "[B]")
    check_same_shape(fn, "chosen_scores", chosen_scores, rejected_scores=rejected_scores)
    dtype = compute_dtype(chosen_scores, rejected_scores)
    diff = chosen_scores.astype(dtype) - rejected_scores.astype(dtype)
    logits = diff
    if margin is not None:
        if jnp.ndim(margin) not in (0, 1) or (jnp.ndim(margin) == 1 and jnp.shape(margin) != diff.shape):
            raise ValueError(
                f"{fn}: `margin` must be a scalar or have shape [B] = {diff.shape}, "
                f"got {tuple(jnp.shape(margin))}"
            )
        logits = diff - jnp.asarray(margin, dtype)
    pairs = jnp.ones(diff.shape, dtype)

    def pair_mean(x):
        return masked_mean(x.astype(dtype), pairs, denominator=pair_count)

    loss = -pair_mean(jax.nn.log_sigmoid(logits))
    aux = {"accuracy": pair_mean(diff > 0), "margin_mean": jax.lax.stop_gradient(pair_mean(diff))}
    return loss, aux


def plackett_luce_loss(
    scores: Array,
    *,
    mask: Array | None = None,
    list_count: Array | float | None = None,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""Listwise ranking loss of a reward model (Plackett 1975, Luce 1959).

    A ranking :math:`y_1 ≻ y_2 ≻ … ≻ y_K` (``scores`` ordered best first) has likelihood
    :math:`\prod_k e^{s_k} / \sum_{j ≥ k} e^{s_j}` (pick the best, then the best of the rest, …):

    .. math:: \mathrm{NLL} = −\sum_{k} \big[s_k − \log\sum_{j ≥ k} e^{s_j}\big]

    summed over the valid items of a list; the loss is the mean over lists with at least two valid
    items (shorter lists carry no preference and are not counted). With K = 2 this is exactly
    :func:`bradley_terry_loss` (InstructGPT trains on the K-choose-2 pairs instead).

    Args:
      scores: ``[B, K]`` reward of each response, ordered best first.
      mask: optional ``[B, K]`` valid items (any pattern; invalid items are removed from the list).
      list_count: optional minibatch count of lists with >= 2 valid items, replacing this batch's
        (loss and ``top1_accuracy``); :func:`ranking_counts` computes it.
      pair_count: optional minibatch count of valid pairs, replacing this batch's (``accuracy``).

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of valid pairs i < j, over all lists, with
      s_i > s_j) and ``top1_accuracy`` (lists whose best item scores highest).
    """
    fn = "plackett_luce_loss"
    check_rank(fn, "scores", scores, 2, "[B, K]")
    dtype = compute_dtype(scores)
    scores = scores.astype(dtype)
    if mask is None:
        valid = jnp.ones(scores.shape, bool)
    else:
        check_same_shape(fn, "scores", scores, mask=mask)
        valid = jnp.asarray(mask) > 0
    neg_inf = jnp.finfo(dtype).min
    masked_scores = jnp.where(valid, scores, neg_inf)
    # log Σ_{j ≥ k, valid} e^{s_j}: a reverse cumulative log-sum-exp over the list.
    tail_logsumexp = jax.lax.cumlogsumexp(masked_scores, axis=1, reverse=True)
    per_item = jnp.where(valid, scores - tail_logsumexp, 0.0)
    n_valid = jnp.sum(valid, axis=1)
    list_nll = -jnp.sum(per_item, axis=1)
    loss = masked_mean(list_nll, n_valid >= 2, denominator=list_count)

    pair_correct = scores[:, :, None] > scores[:, None, :]
    best_is_first = jnp.argmax(masked_scores, axis=1) == jnp.argmax(valid, axis=1)
    aux = {
        "accuracy": masked_mean(pair_correct.astype(dtype), _ranked_pairs(valid), denominator=pair_count),
        "top1_accuracy": masked_mean(best_is_first.astype(dtype), n_valid >= 2, denominator=list_count),
    }
    return loss, aux


def _ranked_pairs(valid: Array) -> Array:
    """``[B, K, K]``: True where items i < j of a list are both valid."""
    upper = jnp.triu(jnp.ones((valid.shape[1],) * 2, bool), 1)
    return valid[:, :, None] & valid[:, None, :] & upper


def ranking_counts(mask: Array) -> dict[str, Array]:
    """``{"list_count", "pair_count"}`` of a ``[B, K]`` valid-item mask: the denominators of
    :func:`plackett_luce_loss` (lists with >= 2 valid items; valid pairs), as float32 scalars."""
    check_rank("ranking_counts", "mask", mask, 2, "[B, K]")
    valid = jnp.asarray(mask) > 0
    return {"list_count": jnp.sum(jnp.sum(valid, axis=1) >= 2).astype(jnp.float32),
            "pair_count": jnp.sum(_ranked_pairs(valid)).astype(jnp.float32)}


# --------------------------------------------------------------------------------------------
# Direct preference optimisation: DPO, cDPO, IPO, SimPO, ORPO
# --------------------------------------------------------------------------------------------
#
# Every loss takes per-sequence sums of response-token log-probs (``[B]``: the policy's, and the
# reference's where the loss has one) of the chosen and the rejected response of B pairs, and the
# response lengths (valid tokens, ``[B]``) where it normalises by length; lengths below 1 are taken
# as 1. Each returns ``(loss, aux)`` with aux ``accuracy`` (fraction of pairs whose implicit reward
# margin is > 0), ``margin`` (mean implicit reward margin), ``chosen_reward`` and
# ``rejected_reward`` (means; margin = chosen_reward − rejected_reward); aux carry no gradient.
# Means are over the B pairs, or Σ / ``pair_count`` (the minibatch's pair count, so that the
# losses of micro-batches sum to the minibatch's, as in :func:`bradley_terry_loss`).


def _check_pairs(fn: str, first: str, **arrays) -> jnp.dtype:
    """Checks that ``arrays`` (``first`` among them) are all ``[B]`` with one B; returns the compute dtype."""
    check_rank(fn, first, arrays[first], 1, "[B]")
    check_same_shape(fn, first, arrays[first], **{k: v for k, v in arrays.items() if k != first})
    return compute_dtype(*arrays.values())


def _check_positive(fn: str, name: str, value) -> None:
    if not (isinstance(value, jax.Array) or value > 0):
        raise ValueError(f"{fn}: `{name}` must be > 0, got {value}")


def _pair_mean(x: Array, pair_count: Array | float | None) -> Array:
    """Σ_b x_b / B, or / ``pair_count`` when given (below 1 taken as 1)."""
    return masked_mean(x, jnp.ones(x.shape, x.dtype), denominator=pair_count)


def _preference_aux(chosen_reward: Array, rejected_reward: Array, pair_count) -> dict[str, Array]:
    chosen_reward = jax.lax.stop_gradient(chosen_reward)
    rejected_reward = jax.lax.stop_gradient(rejected_reward)
    margin = chosen_reward - rejected_reward
    return {
        "accuracy": _pair_mean((margin > 0).astype(margin.dtype), pair_count),
        "margin": _pair_mean(margin, pair_count),
        "chosen_reward": _pair_mean(chosen_reward, pair_count),
        "rejected_reward": _pair_mean(rejected_reward, pair_count),
    }


def _per_token(logprob_sum: Array, length: Array, dtype) -> Array:
    """Length-averaged log-prob ``π / max(|y|, 1)``."""
    return logprob_sum.astype(dtype) / jnp.maximum(jnp.asarray(length).astype(dtype), 1.0)


def log1mexp(x: Array) -> Array:
    r""":math:`\log(1 − e^{x})` for :math:`x < 0`, accurate everywhere (Mächler 2012): ``log(−expm1(x))``
    for :math:`x > −\ln 2` and ``log1p(−exp(x))`` below. Each branch only ever sees its own range, so the
    gradient :math:`−1/(e^{−x} − 1)` is finite for every :math:`x < 0` (in float32 too, e.g. x = −1e-8)."""
    t = -0.6931471805599453  # -ln 2
    near_zero = x > t
    return jnp.where(near_zero, jnp.log(-jnp.expm1(jnp.where(near_zero, x, t))),
                     jnp.log1p(-jnp.exp(jnp.where(near_zero, t, x))))


def dpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    *,
    beta: float,
    label_smoothing: float = 0.0,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""DPO (Rafailov et al. 2023, eq. 7) and conservative DPO (cDPO; Mitchell 2023).

    .. math::
        h_b = (π^c_b − π^{ref,c}_b) − (π^r_b − π^{ref,r}_b),\qquad
        L = \frac{1}{B}\sum_b −(1−ε)\log σ(β h_b) − ε \log σ(−β h_b)

    with :math:`π` the summed response log-probs and ε = ``label_smoothing`` the probability that a
    pair's label is flipped (cDPO); ε = 0 is DPO exactly. The implicit rewards are
    :math:`β(π − π^{ref})`, their margin :math:`βh`. The gradient in :math:`h` is
    :math:`−β\,[(1−ε)σ(−βh) − εσ(βh)]`: at :math:`h = 0` it is :math:`−β(1−2ε)/2` per pair (−β/2 for DPO),
    and it vanishes at :math:`βh = \log((1−ε)/ε)`, where cDPO stops pushing the margin up. This is
    TRL's ``DPOTrainer`` ``loss_type="sigmoid"`` (TRL 1.16 applies ``label_smoothing`` only to its
    "robust"/"exo_pair"/"aot" losses; cDPO's form is its ``CPOTrainer`` "sigmoid" loss applied to the
    log-ratios).

    Args:
      policy_chosen, policy_rejected: ``[B]`` summed log π_θ of the chosen / rejected responses.
      ref_chosen, ref_rejected: ``[B]`` summed log π_ref of the same responses (data: no gradient).
      beta: β > 0, the strength of the KL regulariser.
      label_smoothing: ε in [0, 0.5].
      pair_count: optional minibatch pair count replacing B in every mean.

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of h > 0), ``margin`` (mean βh), ``chosen_reward``
      and ``rejected_reward`` (means of β(π − π_ref)).
    """
    fn = "dpo_loss"
    dtype = _check_pairs(fn, "policy_chosen", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                         ref_chosen=ref_chosen, ref_rejected=ref_rejected)
    _check_positive(fn, "beta", beta)
    if not (isinstance(label_smoothing, jax.Array) or 0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"{fn}: `label_smoothing` must be in [0, 0.5], got {label_smoothing}")
    chosen_logratio = policy_chosen.astype(dtype) - jax.lax.stop_gradient(ref_chosen.astype(dtype))
    rejected_logratio = policy_rejected.astype(dtype) - jax.lax.stop_gradient(ref_rejected.astype(dtype))
    logits = beta * (chosen_logratio - rejected_logratio)
    per_pair = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(logits) - label_smoothing * jax.nn.log_sigmoid(
        -logits)
    loss = _pair_mean(per_pair, pair_count)
    return loss, _preference_aux(beta * chosen_logratio, beta * rejected_logratio, pair_count)


def ipo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    ref_chosen: Array,
    ref_rejected: Array,
    *,
    tau: float,
    len_chosen: Array | None = None,
    len_rejected: Array | None = None,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""IPO (Azar et al. 2023, "A General Theoretical Paradigm to Understand Learning from Human
    Preferences", eq. 17): a squared loss that regresses the log-ratio margin onto :math:`1/(2τ)`.

    .. math::
        h_b = \frac{π^c_b − π^{ref,c}_b}{|y^c_b|} − \frac{π^r_b − π^{ref,r}_b}{|y^r_b|},\qquad
        L = \frac{1}{B}\sum_b \Big(h_b − \frac{1}{2τ}\Big)^2

    Length averaging: with ``len_chosen`` and ``len_rejected`` (both or neither) each log-ratio is
    divided by its response length — the per-token average the IPO authors used for the paper's
    results and TRL's ``DPOTrainer`` ``loss_type="ipo"`` (with ``beta`` = τ); without them
    :math:`|y| = 1` and h is the margin of summed log-ratios (eq. 17 read literally, whose optimum
    then scales with length). The loss is minimal (0, zero gradient) at :math:`h = 1/(2τ)`.

    Args:
      policy_chosen, policy_rejected: ``[B]`` summed log π_θ of the chosen / rejected responses.
      ref_chosen, ref_rejected: ``[B]`` summed log π_ref of the same responses (data: no gradient).
      tau: τ > 0, the regulariser (small τ: a large target margin).
      len_chosen, len_rejected: optional ``[B]`` response lengths (valid tokens).
      pair_count: optional minibatch pair count replacing B in every mean.

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of h > 0), ``margin`` (mean h), ``chosen_reward`` and
      ``rejected_reward`` (means of the (length-averaged) log-ratios π − π_ref).
    """
    fn = "ipo_loss"
    if (len_chosen is None) != (len_rejected is None):
        raise ValueError(f"{fn}: pass both `len_chosen` and `len_rejected` or neither")
    lengths = {} if len_chosen is None else {"len_chosen": len_chosen, "len_rejected": len_rejected}
    dtype = _check_pairs(fn, "policy_chosen", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                         ref_chosen=ref_chosen, ref_rejected=ref_rejected, **lengths)
    _check_positive(fn, "tau", tau)
    chosen_logratio = policy_chosen.astype(dtype) - jax.lax.stop_gradient(ref_chosen.astype(dtype))
    rejected_logratio = policy_rejected.astype(dtype) - jax.lax.stop_gradient(ref_rejected.astype(dtype))
    if lengths:
        chosen_logratio = _per_token(chosen_logratio, len_chosen, dtype)
        rejected_logratio = _per_token(rejected_logratio, len_rejected, dtype)
    h = chosen_logratio - rejected_logratio
    loss = _pair_mean(jnp.square(h - 1.0 / (2.0 * tau)), pair_count)
    return loss, _preference_aux(chosen_logratio, rejected_logratio, pair_count)


def simpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    len_chosen: Array,
    len_rejected: Array,
    *,
    beta: float,
    gamma: float,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""SimPO (Meng et al. 2024, eq. 6): reference-free, length-normalised, with a target margin γ.

    .. math::
        L = \frac{1}{B}\sum_b −\log σ\Big(β\frac{π^c_b}{|y^c_b|} − β\frac{π^r_b}{|y^r_b|} − γ\Big)

    The implicit reward is :math:`β π/|y|`. Conventions for γ: this ``gamma`` is the paper's γ, and
    TRL's ``CPOTrainer(loss_type="simpo")`` ``simpo_gamma`` (it computes β(Δ − simpo_gamma/β)); the
    SimPO authors' code takes ``gamma_beta_ratio`` = γ/β instead, so ``gamma = beta * gamma_beta_ratio``
    (their β = 2.5, γ/β = 0.55 is ``gamma=1.375``). TRL's CPO adds a behaviour-cloning NLL term
    unless ``cpo_alpha=0``; this is the preference term alone.

    Args:
      policy_chosen, policy_rejected: ``[B]`` summed log π_θ of the chosen / rejected responses.
      len_chosen, len_rejected: ``[B]`` their lengths (valid tokens).
      beta: β > 0; gamma: the target reward margin γ (≥ 0 in the paper).
      pair_count: optional minibatch pair count replacing B in every mean.

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of pairs whose reward margin, without γ, is > 0),
      ``margin`` (mean β(π_c/|y_c| − π_r/|y_r|)), ``chosen_reward`` and ``rejected_reward``.
    """
    fn = "simpo_loss"
    dtype = _check_pairs(fn, "policy_chosen", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                         len_chosen=len_chosen, len_rejected=len_rejected)
    _check_positive(fn, "beta", beta)
    chosen_reward = beta * _per_token(policy_chosen, len_chosen, dtype)
    rejected_reward = beta * _per_token(policy_rejected, len_rejected, dtype)
    loss = -_pair_mean(jax.nn.log_sigmoid(chosen_reward - rejected_reward - gamma), pair_count)
    return loss, _preference_aux(chosen_reward, rejected_reward, pair_count)


def orpo_loss(
    policy_chosen: Array,
    policy_rejected: Array,
    len_chosen: Array,
    len_rejected: Array,
    nll_chosen: Array,
    *,
    lam: float,
    pair_count: Array | float | None = None,
) -> tuple[Array, dict[str, Array]]:
    r"""ORPO (Hong et al. 2024, "ORPO: Monolithic Preference Optimization without Reference Model", eqs. 4–7).

    .. math::
        \log p = \frac{π}{|y|},\qquad \mathrm{odds} = \log p − \log(1 − p),\qquad
        L = L_{NLL} − \frac{λ}{B}\sum_b \log σ(\mathrm{odds}^c_b − \mathrm{odds}^r_b)

    :math:`p` is the geometric-mean token probability of a response and :math:`\log(1 − p)` is
    computed by :func:`log1mexp`, so the gradient stays finite as p → 1. ``nll_chosen`` is the SFT
    term :math:`L_{NLL}` on the chosen responses, either

    * ``[B]``: each chosen response's mean token NLL, averaged over pairs (Σ / ``pair_count``), or
    * a scalar, added as it is: e.g. TRL's token mean over the batch's chosen tokens,
      :func:`sft_loss` (pass it the minibatch's ``token_count`` for a micro-batch, so the parts sum).

    With a scalar ``nll_chosen`` and λ = TRL's ``beta`` this is TRL's ``ORPOTrainer`` loss.

    Args:
      policy_chosen, policy_rejected: ``[B]`` summed log π_θ of the chosen / rejected responses
        (``< 0``: p = 1 has infinite odds).
      len_chosen, len_rejected: ``[B]`` their lengths (valid tokens).
      nll_chosen: ``[B]`` or scalar NLL of the chosen responses (differentiable), see above.
      lam: λ ≥ 0, the weight of the odds-ratio term (the paper's 0.1 … 1; TRL's ``beta``).
      pair_count: optional minibatch pair count replacing B in every mean.

    Returns:
      ``(loss, aux)`` with ``accuracy`` (fraction of odds_c > odds_r), ``margin`` (mean log odds
      ratio odds_c − odds_r), ``chosen_reward`` / ``rejected_reward`` (mean log odds) and ``nll``.
    """
    fn = "orpo_loss"
    dtype = _check_pairs(fn, "policy_chosen", policy_chosen=policy_chosen, policy_rejected=policy_rejected,
                         len_chosen=len_chosen, len_rejected=len_rejected)
    if jnp.ndim(nll_chosen) != 0:
        check_shape(fn, "nll_chosen", nll_chosen, jnp.shape(policy_chosen), "[B] or a scalar")
    if not (isinstance(lam, jax.Array) or lam >= 0):
        raise ValueError(f"{fn}: `lam` must be >= 0, got {lam}")
    dtype = jnp.promote_types(dtype, compute_dtype(nll_chosen))

    def log_odds(logprob_sum, length):
        log_p = _per_token(logprob_sum, length, dtype)
        return log_p - log1mexp(log_p)

    chosen_odds = log_odds(policy_chosen, len_chosen)
    rejected_odds = log_odds(policy_rejected, len_rejected)
    nll_chosen = jnp.asarray(nll_chosen).astype(dtype)
    nll = nll_chosen if nll_chosen.ndim == 0 else _pair_mean(nll_chosen, pair_count)
    loss = nll - lam * _pair_mean(jax.nn.log_sigmoid(chosen_odds - rejected_odds), pair_count)
    aux = _preference_aux(chosen_odds, rejected_odds, pair_count)
    aux["nll"] = jax.lax.stop_gradient(nll)
    return loss, aux


class PreferenceLoss(NamedTuple):
    """An entry of :data:`PREFERENCE_LOSSES`: ``fn(**{name: batch[name] for name in inputs},
    pair_count=..., **{h: config.h for h in hyperparameters}) -> (loss, aux)``. ``inputs`` names the
    ``[B]`` arrays (or scalar ``nll_chosen``) it takes, all passed by keyword."""

    fn: Callable[..., tuple[Array, dict[str, Array]]]
    inputs: tuple[str, ...]
    hyperparameters: tuple[str, ...]


_WITH_REF = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
_LENGTHS = ("len_chosen", "len_rejected")

# Name -> preference loss; a new one is a pure function (+ its test) and a row here.
PREFERENCE_LOSSES: dict[str, PreferenceLoss] = {
    "dpo": PreferenceLoss(dpo_loss, _WITH_REF, ("beta",)),
    "cdpo": PreferenceLoss(dpo_loss, _WITH_REF, ("beta", "label_smoothing")),
    "ipo": PreferenceLoss(ipo_loss, _WITH_REF + _LENGTHS, ("tau",)),  # length-averaged, as TRL's
    "simpo": PreferenceLoss(simpo_loss, ("policy_chosen", "policy_rejected") + _LENGTHS, ("beta", "gamma")),
    "orpo": PreferenceLoss(orpo_loss, ("policy_chosen", "policy_rejected") + _LENGTHS + ("nll_chosen",), ("lam",)),
}
