"""Critic-free estimators, GSPO and DAPO's group filter against independent float64 loops.

Every reference (tests/reference_np.py, section 12) is written from the definition in the docstring or
the paper as Python loops over rows and tokens; the batches are random, with an empty row, a full row
and random lengths in between (right padding), and garbage at the padded positions, which must never
leak into a result. The gaps these tests found (a float32 GRPO
constant group, NaN advantages at GSPO's padding, missing argument checks) are fixed and tested here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import prefix_mask, random_lengths, with_garbage
from reference_np import (
    group_center_scores_ref,
    group_relative_ref,
    gspo_token_advantages_ref,
    gspo_unclipped_grad_ref,
    informative_groups_ref,
    keep_informative_first_ref,
    per_token_ref,
    reinforce_pp_ref,
    reward_to_go_ref,
    sequence_return_ref,
)

from jaxppo.advantages import (
    ESTIMATORS,
    AdvantageInputs,
    group_center_scores,
    per_token,
    reinforce_pp_advantages,
    reward_to_go,
)
from jaxppo.losses import gspo_loss, sequence_policy_loss
from jaxppo.rollout import informative_groups, keep_informative_first

T = 6
TOL = {"rtol": 1e-9, "atol": 1e-12}  # float64 on both sides: far inside the 1e-6 the definitions need


def jitted(fn, **static):
    """``fn`` with keyword arguments ``static`` fixed, jitted: one compile instead of one per eager op."""
    return jax.jit(functools.partial(fn, **static))


def episode_batch(seed: int, groups: int, group_size: int, *, beta: float = 0.05, empty_rows: bool = True,
                  integer_scores: bool = False):
    """Rewards as the rollout builds them: −β·KL_t on every valid token plus the score at the last one.

    Returns ``(scores [B], rewards [B, T] (0 on padding), mask [B, T])``; with ``empty_rows`` row 0 is
    empty and row 1 full (conftest.random_lengths), else every row has 1 … T tokens.
    """
    rng = np.random.default_rng(seed)
    b = groups * group_size
    lengths = random_lengths(rng, b, T) if empty_rows else rng.integers(1, T + 1, size=b)
    mask = prefix_mask(lengths, T)
    scores = rng.integers(0, 2, size=b).astype(np.float64) if integer_scores else rng.normal(size=b)
    kl = rng.normal(0.0, 0.3, size=(b, T))
    rewards = np.zeros((b, T))
    for i, n in enumerate(lengths):
        rewards[i, :n] = -beta * kl[i, :n]
        if n:
            rewards[i, n - 1] += scores[i]
    return scores, rewards, mask


# --- the building blocks -------------------------------------------------------------------------


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reward_to_go_matches_the_discounted_sum(x64, gamma):
    _, rewards, mask = episode_batch(0, 3, 3)
    got = jitted(reward_to_go, gamma=gamma)(jnp.asarray(with_garbage(rewards, mask)), jnp.asarray(mask))
    np.testing.assert_allclose(got, reward_to_go_ref(rewards, mask, gamma), **TOL)
    assert np.all(np.asarray(got)[mask == 0] == 0)


def test_group_center_scores_matches_the_definition(x64):
    # Row 0 is empty: it has no token to carry its score, so its output is all 0, but its score is
    # still one of its group's n samples and counts in the group mean of rows 1 … n−1.
    n = 3
    scores, rewards, mask = episode_batch(1, 3, n)
    got = jitted(group_center_scores, group_size=n)(jnp.asarray(with_garbage(rewards, mask)), jnp.asarray(scores),
                                                   jnp.asarray(mask))
    expected = group_center_scores_ref(rewards, scores, mask, n)
    np.testing.assert_allclose(got, expected, **TOL)
    assert np.all(np.asarray(got)[0] == 0) and np.all(np.asarray(got)[mask == 0] == 0)
    # the empty row's score is in the mean: row 1's last token is r − (s0 + s1 + s2) / 3
    np.testing.assert_allclose(got[1, T - 1], rewards[1, T - 1] - scores[:n].mean(), **TOL)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_pp_advantages_whiten_the_reward_to_go(x64, gamma):
    _, rewards, mask = episode_batch(2, 3, 3)
    eps = 1e-8
    got = np.asarray(jitted(reinforce_pp_advantages, gamma=gamma, eps=eps)(jnp.asarray(with_garbage(rewards, mask)),
                                                                         jnp.asarray(mask)))
    np.testing.assert_allclose(got, reinforce_pp_ref(rewards, mask, gamma, eps), **TOL)
    # mean 0 and population variance σ²/(σ² + ε) ≈ 1 over the batch's valid tokens
    g = reward_to_go_ref(rewards, mask, gamma)[mask > 0]
    valid = got[mask > 0]
    assert abs(valid.mean()) < 1e-12
    np.testing.assert_allclose(valid.var(), g.var() / (g.var() + eps), rtol=1e-12)
    assert abs(valid.var() - 1.0) < 1e-6


def test_per_token_spreads_each_rows_value_over_its_valid_tokens(x64):
    rng = np.random.default_rng(3)
    mask = prefix_mask(random_lengths(rng, 5, T), T)
    values = rng.normal(size=5)
    got = jitted(per_token)(jnp.asarray(values), jnp.asarray(mask))
    np.testing.assert_array_equal(got, per_token_ref(values, mask))


# --- the estimator table -------------------------------------------------------------------------

CRITIC_FREE = ["grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"]


def expected_estimate(name, scores, rewards, mask, *, group_size, gamma):
    """``(advantages, returns)`` of estimator ``name`` from the definitions."""
    returns = reward_to_go_ref(rewards, mask, gamma)
    if name in ("grpo", "dr_grpo", "rloo"):
        per_response = group_relative_ref(sequence_return_ref(rewards, mask), group_size, name)
        return per_token_ref(per_response, mask), returns
    if name == "reinforce++":
        return reinforce_pp_ref(rewards, mask, gamma), returns
    if name == "reinforce++_baseline":
        centered = group_center_scores_ref(rewards, scores, mask, group_size)
        return reinforce_pp_ref(centered, mask, gamma), returns  # returns: of the uncentered rewards
    raise AssertionError(name)


def estimate(name, scores, rewards, mask, *, group_size, gamma):
    estimator = ESTIMATORS[name]
    hyper = {"group_size": group_size, "gamma": gamma}
    assert not estimator.needs_critic and estimator.grouped == ("group_size" in estimator.hyperparameters)
    inputs = AdvantageInputs(jnp.asarray(scores), jnp.asarray(with_garbage(rewards, mask)), None, jnp.asarray(mask))
    return jitted(estimator.fn, **{h: hyper[h] for h in estimator.hyperparameters})(inputs)


@pytest.mark.parametrize("group_size, gamma", [(2, 0.9), (4, 1.0)])
@pytest.mark.parametrize("name", CRITIC_FREE)
def test_estimators_match_their_definitions(x64, name, group_size, gamma):
    scores, rewards, mask = episode_batch(10 + group_size, 3, group_size)
    advantages, returns = estimate(name, scores, rewards, mask, group_size=group_size, gamma=gamma)
    expected_advantages, expected_returns = expected_estimate(name, scores, rewards, mask, group_size=group_size,
                                                              gamma=gamma)
    assert np.all(np.abs(expected_advantages[mask > 0]) > 0)  # a non-trivial comparison
    np.testing.assert_allclose(advantages, expected_advantages, **TOL)
    np.testing.assert_allclose(returns, expected_returns, **TOL)
    assert np.all(np.asarray(advantages)[mask == 0] == 0) and np.all(np.asarray(returns)[mask == 0] == 0)


def per_response(advantages, mask):
    """The one advantage of each response (every row non-empty): its first token's."""
    assert np.all(mask[:, 0] > 0)
    advantages = np.asarray(advantages)
    assert np.all((advantages == advantages[:, :1]) | (mask == 0))  # shared by all the response's tokens
    return advantages[:, 0]


def test_grpo_gives_a_constant_score_group_zero_advantages(x64):
    # β = 0 (the KL as a loss term, GRPO's way): a response's return is its score alone
    n = 4
    scores, rewards, mask = episode_batch(20, 3, n, beta=0.0, empty_rows=False)
    scores[n:2 * n] = 0.9  # not a dyadic fraction: the group mean is not exact in floating point
    scores[2 * n:] = 1.0
    rewards = np.where(np.arange(T)[None, :] == mask.sum(1, keepdims=True) - 1, scores[:, None], 0.0)
    for name in ("grpo", "dr_grpo"):
        advantages = per_response(estimate(name, scores, rewards, mask, group_size=n, gamma=1.0)[0], mask)
        np.testing.assert_allclose(advantages[n:], 0.0, atol=1e-8)
        assert np.any(advantages[:n] != 0)


@pytest.mark.parametrize("name", ["rloo", "dr_grpo"])
def test_centered_group_advantages_sum_to_zero_per_group(x64, name):
    n = 4
    scores, rewards, mask = episode_batch(21, 3, n, empty_rows=False)
    advantages = per_response(estimate(name, scores, rewards, mask, group_size=n, gamma=1.0)[0], mask)
    np.testing.assert_allclose(advantages.reshape(-1, n).sum(1), 0.0, atol=1e-12)
    assert np.all(np.abs(advantages) > 0)


def test_reinforce_pp_estimator_advantages_have_mean_zero_and_unit_variance(x64):
    for name in ("reinforce++", "reinforce++_baseline"):
        scores, rewards, mask = episode_batch(22, 4, 3)
        advantages = np.asarray(estimate(name, scores, rewards, mask, group_size=3, gamma=1.0)[0])[mask > 0]
        assert abs(advantages.mean()) < 1e-12
        assert abs(advantages.var() - 1.0) < 1e-6


def test_grpo_constant_group_is_zero_in_float32():
    """Before the fix: ~ −0.1, not 0 (the float32 mean's rounding error divided by a std of the same order + 1e-6)."""
    n = 7
    mask = np.ones((n, T), np.float32)
    scores = np.full(n, 0.9, np.float32)
    rewards = np.zeros((n, T), np.float32)
    rewards[:, -1] = scores
    inputs = AdvantageInputs(jnp.asarray(scores), jnp.asarray(rewards), None, jnp.asarray(mask))
    advantages, _ = jitted(ESTIMATORS["grpo"].fn, group_size=n, gamma=1.0)(inputs)
    np.testing.assert_allclose(advantages, 0.0, atol=1e-3)


# --- GSPO ----------------------------------------------------------------------------------------


def gspo_batch(seed: int, noise: float):
    rng = np.random.default_rng(seed)
    b = 8
    mask = prefix_mask(random_lengths(rng, b, T), T)
    old = rng.normal(-1.0, 0.3, size=(b, T))
    logprobs = old + rng.normal(0.0, noise, size=(b, T))
    advantages = rng.normal(size=(b, T)) * mask  # per-token, not constant along a row
    return logprobs, old, advantages, mask


def gspo_args(logprobs, old, advantages, mask):
    # garbage at padding: NaN in the log-probs, a large finite advantage (NaN advantages: test_gspo_loss_ignores_nan_advantages_at_padding)
    return (jnp.asarray(with_garbage(logprobs, mask)), jnp.asarray(with_garbage(old, mask)),
            jnp.asarray(with_garbage(advantages, mask, 1e3)), jnp.asarray(mask))


def test_gspo_loss_matches_the_sequence_level_definition(x64):
    logprobs, old, advantages, mask = gspo_batch(30, noise=0.05)
    args = gspo_args(logprobs, old, advantages, mask)
    loss, aux = jitted(gspo_loss, clip_eps=0.01, clip_eps_high=0.02, token_count=123.0)(*args)  # token_count: unused
    ref_loss, ref_clip = gspo_token_advantages_ref(logprobs, old, advantages, mask, 0.01, 0.02)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(float(aux["clip_fraction"]), ref_clip, rtol=1e-10)
    assert 0 < ref_clip < 1  # both branches are exercised
    # = sequence_policy_loss with each row's advantage the mean of its valid tokens'
    lengths = mask.sum(1)
    row_advantages = (advantages * mask).sum(1) / np.maximum(lengths, 1)
    seq_loss, _ = jitted(sequence_policy_loss, clip_eps=0.01, clip_eps_high=0.02)(args[0], args[1],
                                                                                jnp.asarray(row_advantages), args[3])
    np.testing.assert_allclose(float(loss), float(seq_loss), rtol=1e-12)
    # two micro-batches with the minibatch's row count sum to the whole loss
    rows = float(np.sum(lengths > 0))
    half = jitted(gspo_loss, clip_eps=0.01, clip_eps_high=0.02, row_count=rows)  # one compile: equal halves
    halves = [half(*(x[s] for x in args))[0] for s in (slice(0, 4), slice(4, None))]
    np.testing.assert_allclose(float(sum(halves)), float(loss), rtol=1e-12)


def test_gspo_gradient_inside_the_clip_range_is_the_unclipped_objectives(x64):
    logprobs, old, advantages, mask = gspo_batch(31, noise=0.02)
    args = gspo_args(logprobs, old, advantages, mask)
    lengths = mask.sum(1)
    s = np.exp(((logprobs - old) * mask).sum(1) / np.maximum(lengths, 1))
    assert np.all((s[lengths > 0] > 0.8) & (s[lengths > 0] < 1.3))  # inside [1 − 0.2, 1 + 0.3]

    def unclipped(lp):  # −(1/S) Σ_i s_i A_i, written directly
        m = args[3]
        n = jnp.sum(m, 1)
        log_ratio = jnp.where(m > 0, lp - args[1], 0.0)
        seq_ratio = jnp.exp(jnp.sum(log_ratio, 1) / jnp.maximum(n, 1))
        row_adv = jnp.sum(jnp.where(m > 0, args[2], 0.0), 1) / jnp.maximum(n, 1)
        return -jnp.sum(jnp.where(n > 0, seq_ratio * row_adv, 0.0)) / jnp.sum(n > 0)

    grad = jax.jit(jax.grad(lambda lp: gspo_loss(lp, *args[1:], clip_eps=0.2, clip_eps_high=0.3)[0]))(args[0])
    np.testing.assert_allclose(grad, jax.jit(jax.grad(unclipped))(args[0]), rtol=1e-10, atol=1e-15)
    np.testing.assert_allclose(grad, gspo_unclipped_grad_ref(logprobs, old, advantages, mask), rtol=1e-10,
                               atol=1e-15)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_gspo_loss_ignores_nan_advantages_at_padding(x64):
    logprobs, old, advantages, mask = gspo_batch(32, noise=0.05)
    args = (jnp.asarray(logprobs), jnp.asarray(old), jnp.asarray(with_garbage(advantages, mask)), jnp.asarray(mask))
    loss, _ = jitted(gspo_loss, clip_eps=0.01, clip_eps_high=0.02)(*args)
    np.testing.assert_allclose(float(loss), gspo_token_advantages_ref(logprobs, old, advantages, mask, 0.01, 0.02)[0],
                               rtol=1e-10)


# --- DAPO dynamic sampling -----------------------------------------------------------------------


@pytest.mark.parametrize("group_size", [2, 3, 4])
def test_informative_groups_and_keep_informative_first_match_loops(group_size):
    n_groups = 6
    for seed in range(4):
        rng = np.random.default_rng(100 * group_size + seed)
        scores = rng.integers(0, 2, size=n_groups * group_size).astype(np.float32)
        scores[:group_size] = 0.9  # a constant group of non-integer scores
        scores[group_size:2 * group_size] = [0.9] * (group_size - 1) + [np.nextafter(np.float32(0.9), 1)]  # 1 ulp
        flags = informative_groups(jnp.asarray(scores), group_size=group_size)  # eager: a few small ops
        np.testing.assert_array_equal(flags, informative_groups_ref(scores, group_size))
        for groups in (1, 3, n_groups):
            rows = keep_informative_first(jnp.asarray(scores), group_size=group_size, groups=groups)
            np.testing.assert_array_equal(rows, keep_informative_first_ref(scores, group_size, groups))


# --- argument checks -----------------------------------------------------------------------------

_R, _M, _S = jnp.zeros((6, 4)), jnp.ones((6, 4)), jnp.arange(6.0)


def _inputs(scores=_S, rewards=_R, mask=_M):
    return AdvantageInputs(scores, rewards, None, mask)


CHECKS = [
    ("reward_to_go rank", lambda: reward_to_go(_S, _S, gamma=1.0), r"reward_to_go: `rewards` must have shape \[B, T\]"),
    ("reward_to_go mask", lambda: reward_to_go(_R, _M[:, :3], gamma=1.0), r"reward_to_go: `mask` has shape"),
    ("reinforce_pp rank", lambda: reinforce_pp_advantages(_S, _S, gamma=1.0), r"`rewards` must have shape \[B, T\]"),
    ("center rank", lambda: group_center_scores(_S, _S, _S, group_size=3),
     r"group_center_scores: `rewards` must have shape \[B, T\]"),
    ("center scores", lambda: group_center_scores(_R, _R, _M, group_size=3),
     r"group_center_scores: `scores` must have shape \[B\]"),
    ("center multiple", lambda: group_center_scores(_R, _S, _M, group_size=4), "not a multiple of group_size=4"),
    ("center group_size", lambda: group_center_scores(_R, _S, _M, group_size=1), "`group_size` must be an integer >= 2"),
    ("per_token mask", lambda: per_token(_S, _S), r"per_token: `mask` must have shape \[B, T\]"),
    ("per_token values", lambda: per_token(_S[:5], _M), r"per_token: `sequence_values` must have shape \[B\]"),
    *[(f"{name} multiple", lambda name=name: ESTIMATORS[name].fn(_inputs(), group_size=4, gamma=1.0),
       "not a multiple of group_size=4") for name in ("grpo", "dr_grpo", "rloo", "reinforce++_baseline")],
    *[(f"{name} group_size", lambda name=name: ESTIMATORS[name].fn(_inputs(), group_size=1, gamma=1.0),
       "`group_size` must be an integer >= 2") for name in ("grpo", "dr_grpo", "rloo", "reinforce++_baseline")],
    ("reinforce++ mask", lambda: ESTIMATORS["reinforce++"].fn(_inputs(mask=_M[:, :3]), gamma=1.0), "`mask` has shape"),
    ("gspo advantages rank", lambda: gspo_loss(_R, _R, _S, _M, clip_eps=0.2),
     r"gspo_loss: `advantages` must have shape \[B, T\]"),
    ("gspo advantages shape", lambda: gspo_loss(_R, _R, _R[:, :3], _M, clip_eps=0.2), "gspo_loss: `advantages` has shape"),
    ("gspo old_logprobs", lambda: gspo_loss(_R, _R[:, :3], _R, _M, clip_eps=0.2), "`old_logprobs` has shape"),
    ("gspo clip_eps", lambda: gspo_loss(_R, _R, _R, _M, clip_eps=0.0), "`clip_eps` must be > 0"),
]

MISSING_CHECKS = [  # (id, call, expected message, what happened before)
    # the group estimators get a rank-1 `rewards` through sequence_sum, whose message names `x`
    ("grpo rewards rank", lambda: ESTIMATORS["grpo"].fn(_inputs(rewards=_S, mask=_S), group_size=3, gamma=1.0),
     r"`rewards` must have shape \[B, T\]", "the message names sequence_sum's `x`"),
    ("informative multiple", lambda: informative_groups(_S, group_size=4), "group_size",
     "a TypeError from reshape"),
    ("informative group_size", lambda: informative_groups(_S, group_size=1), "group_size",
     "group_size=1 gives all False"),
    ("informative rank", lambda: informative_groups(_R, group_size=3), "scores", "[B, T] scores are flattened"),
    ("keep multiple", lambda: keep_informative_first(_S, group_size=4, groups=1), "group_size",
     "a TypeError from reshape"),
    ("keep groups", lambda: keep_informative_first(_S, group_size=3, groups=5), "groups",
     "more groups than there are returns fewer rows"),
]


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m in CHECKS])
def test_arguments_are_checked_with_a_message_naming_them(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("call, match", [pytest.param(c, m, id=i) for i, c, m, _ in MISSING_CHECKS])
def test_argument_checks_that_were_missing(call, match):
    """Each case says what happened before its check was added."""
    with pytest.raises(ValueError, match=match):
        call()
