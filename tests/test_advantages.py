"""GAE, whitening, KL-shaped rewards: the seed example, a float64 loop reference, errors, tracing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import count_traces, prefix_mask, random_lengths, with_garbage
from reference_np import gae_ref, kl_shaped_rewards_ref, whiten_ref

from jaxppo.advantages import (
    explained_variance,
    gae,
    group_advantages,
    kl_shaped_rewards,
    rloo_advantages,
    sequence_sum,
    whiten,
)

B, T = 9, 13


def random_batch(seed: int):
    rng = np.random.default_rng(seed)
    mask = prefix_mask(random_lengths(rng, B, T), T)
    return rng, mask


# --- seed 000 §5.4 worked example -------------------------------------------------------------


def test_gae_seed_worked_example():
    rewards = jnp.array([[-0.1, -0.1, 4.9]])
    values = jnp.array([[2.0, 3.0, 4.0]])
    mask = jnp.ones((1, 3))
    advantages, returns = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(advantages[0], [2.56725, 1.755, 0.9], rtol=1e-6)
    np.testing.assert_allclose(returns[0], np.array([2.56725, 1.755, 0.9]) + [2.0, 3.0, 4.0], rtol=1e-6)


def test_seed_example_from_scores_and_logprobs():
    """The same example built the way a rollout builds it: score 5, β = 0.1, log π − log π_ref = 1."""
    logprobs = jnp.array([[-1.0, -2.0, -0.5, -9.0]])
    ref_logprobs = logprobs - 1.0
    mask = jnp.array([[1.0, 1.0, 1.0, 0.0]])  # one padded step after the response
    rewards, kl = kl_shaped_rewards(jnp.array([5.0]), logprobs, ref_logprobs, mask, kl_coef=0.1)
    np.testing.assert_allclose(rewards[0], [-0.1, -0.1, 4.9, 0.0], rtol=1e-6)
    np.testing.assert_allclose(kl[0], [1.0, 1.0, 1.0, 0.0], rtol=1e-6)
    values = jnp.array([[2.0, 3.0, 4.0, 123.0]])
    advantages, _ = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    np.testing.assert_allclose(advantages[0], [2.56725, 1.755, 0.9, 0.0], rtol=1e-6)


# --- float64 reference on random batches ------------------------------------------------------


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.99, 0.9), (1.0, 1.0), (0.9, 0.0)])
@pytest.mark.parametrize("seed", [0, 1])
def test_gae_matches_float64_loop(x64, seed, gamma, lam):
    rng, mask = random_batch(seed)
    rewards = rng.normal(size=(B, T))
    values = rng.normal(size=(B, T)) * 3
    expected_adv, expected_ret = gae_ref(rewards, values, mask, gamma, lam)
    adv, ret = gae(
        jnp.asarray(with_garbage(rewards, mask)), jnp.asarray(with_garbage(values, mask)),
        jnp.asarray(mask), gamma=gamma, lam=lam,
    )
    assert adv.dtype == jnp.float64
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(ret, expected_ret, rtol=1e-6, atol=1e-12)


def test_gae_float32_close_to_float64_loop():
    rng, mask = random_batch(3)
    rewards, values = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    expected_adv, expected_ret = gae_ref(rewards, values, mask, 1.0, 0.95)
    adv, ret = gae(jnp.asarray(rewards, jnp.float32), jnp.asarray(values, jnp.float32),
                   jnp.asarray(mask > 0), gamma=1.0, lam=0.95)
    assert adv.dtype == jnp.float32
    np.testing.assert_allclose(adv, expected_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, expected_ret, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_matches_float64_loop(x64, shift_mean):
    rng, mask = random_batch(4)
    x = rng.normal(loc=2.0, scale=5.0, size=(B, T))
    out = whiten(jnp.asarray(with_garbage(x, mask)), jnp.asarray(mask), shift_mean=shift_mean)
    np.testing.assert_allclose(out, whiten_ref(x, mask, shift_mean=shift_mean), rtol=1e-6, atol=1e-12)
    valid = np.asarray(out)[mask > 0]
    np.testing.assert_allclose(valid.std(), 1.0, rtol=1e-6)
    np.testing.assert_allclose(valid.mean(), 0.0 if shift_mean else x[mask > 0].mean(), atol=1e-9)


def test_whiten_empty_mask_is_zero_not_nan():
    out = whiten(jnp.ones((2, 3)), jnp.zeros((2, 3)))
    np.testing.assert_array_equal(out, 0.0)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_shaped_rewards_match_float64_loop(x64, estimator):
    rng, mask = random_batch(5)
    logprobs = -rng.exponential(size=(B, T))
    ref_logprobs = -rng.exponential(size=(B, T))
    scores = rng.normal(size=B)
    expected_rewards, expected_kl = kl_shaped_rewards_ref(
        scores, logprobs, ref_logprobs, mask, 0.05, estimator
    )
    rewards, kl = kl_shaped_rewards(
        jnp.asarray(scores), jnp.asarray(with_garbage(logprobs, mask)),
        jnp.asarray(with_garbage(ref_logprobs, mask)), jnp.asarray(mask),
        kl_coef=0.05, estimator=estimator,
    )
    np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-6, atol=1e-12)
    # The score lands exactly once per non-empty row: Σ_t r_t = s − β Σ_t KL_t.
    lengths = mask.sum(1)
    np.testing.assert_allclose(
        sequence_sum(rewards, jnp.asarray(mask)),
        np.where(lengths > 0, scores, 0.0) - 0.05 * expected_kl.sum(1), rtol=1e-6, atol=1e-12,
    )


def test_explained_variance(x64):
    rng, mask = random_batch(6)
    returns = rng.normal(size=(B, T))
    noise = rng.normal(size=(B, T)) * 0.5
    valid = mask > 0
    expected = 1.0 - np.var(noise[valid]) / np.var(returns[valid])
    got = explained_variance(jnp.asarray(with_garbage(returns - noise, mask)), jnp.asarray(returns), jnp.asarray(mask))
    np.testing.assert_allclose(got, expected, rtol=1e-9)
    assert explained_variance(jnp.asarray(returns), jnp.asarray(returns), jnp.asarray(mask)) == 1.0


# --- errors and tracing -----------------------------------------------------------------------


def test_shape_errors_name_the_argument():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="`mask`"):
        gae(x, x, jnp.zeros((2, 4)), gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match="`values`"):
        gae(x, jnp.zeros((3, 3)), x, gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match="`rewards`"):
        gae(jnp.zeros(3), jnp.zeros(3), jnp.zeros(3), gamma=1.0, lam=0.95)
    with pytest.raises(ValueError, match="`scores`"):
        kl_shaped_rewards(jnp.zeros((2, 1)), x, x, x, kl_coef=0.1)
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        kl_shaped_rewards(jnp.zeros(2), x, jnp.zeros((2, 2)), x, kl_coef=0.1)
    with pytest.raises(ValueError, match="`estimator`"):
        kl_shaped_rewards(jnp.zeros(2), x, x, x, kl_coef=0.1, estimator="k4")
    with pytest.raises(ValueError, match="`mask`"):
        whiten(x, jnp.zeros((3, 2)))


def test_each_function_traced_once_for_repeated_shapes():
    rng, mask = random_batch(7)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    cases = [
        (gae, dict(gamma=1.0, lam=0.95), 3),
        (whiten, dict(shift_mean=False), 2),
        (kl_shaped_rewards, dict(kl_coef=0.1, estimator="k3"), 4),
        (explained_variance, {}, 3),
    ]
    for fn, static, n_args in cases:
        jitted, calls = count_traces(fn, **static)
        for _ in range(3):
            args = [f32(rng.normal(size=(B, T))) for _ in range(n_args - 1)] + [f32(mask)]
            if fn is kl_shaped_rewards:
                args = [f32(rng.normal(size=B))] + args[:2] + [f32(mask)]
            jax.block_until_ready(jitted(*args))
        assert calls["traces"] == 1, fn.__name__


def test_kl_coef_may_be_traced():
    """β comes from the KL controller inside a jitted rollout: it must not need to be static."""
    mask = jnp.ones((2, 3))
    lp = jnp.zeros((2, 3))
    f = jax.jit(lambda beta: kl_shaped_rewards(jnp.ones(2), lp + 1.0, lp, mask, kl_coef=beta)[0])
    np.testing.assert_allclose(f(0.5)[0], [-0.5, -0.5, 0.5])
    np.testing.assert_allclose(f(0.0)[0], [0.0, 0.0, 1.0])


# ------------------------------------------------------------------ group estimators (critic-free)


def _group_ref(rewards, n, kind):
    """Float64 loops over each group, written from the papers' definitions."""
    out = np.zeros(len(rewards))
    for g in range(0, len(rewards), n):
        r = [float(x) for x in rewards[g:g + n]]
        mean = sum(r) / n
        std = (sum((x - mean) ** 2 for x in r) / (n - 1)) ** 0.5  # sample std (ddof = 1)
        for i in range(n):
            if kind == "grpo":
                out[g + i] = (r[i] - mean) / (std + 1e-6)
            elif kind == "dr_grpo":
                out[g + i] = r[i] - mean
            else:  # rloo: minus the mean of the *other* responses
                out[g + i] = r[i] - sum(r[j] for j in range(n) if j != i) / (n - 1)
    return out


@pytest.mark.parametrize("n", [2, 3, 5])
def test_group_advantages_and_rloo_match_float64_loops(x64, n):
    rng = np.random.default_rng(n)
    rewards = rng.normal(size=4 * n)
    rewards[:n] = 0.5  # one group whose rewards are all equal: advantages 0, not NaN
    rewards[n:2 * n] = rng.integers(0, 2, size=n)  # a verifiable 0/1 reward
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), group_size=n), _group_ref(rewards, n, "grpo"),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(group_advantages(jnp.asarray(rewards), group_size=n, scale="none"),
                               _group_ref(rewards, n, "dr_grpo"), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(rloo_advantages(jnp.asarray(rewards), group_size=n), _group_ref(rewards, n, "rloo"),
                               rtol=1e-12, atol=1e-12)
    assert np.all(np.asarray(group_advantages(jnp.asarray(rewards), group_size=n))[:n] == 0)


def test_group_advantages_worked_example():
    # two of four answers correct: mean 0.5, sample std sqrt(1/3), so ±0.5·sqrt(3) = ±0.866;
    # RLOO: 1 − (1 + 0 + 0)/3 = 2/3 and 0 − (1 + 1 + 0)/3 = −2/3
    r = jnp.array([1.0, 0.0, 0.0, 1.0])
    np.testing.assert_allclose(group_advantages(r, group_size=4), [0.8660, -0.8660, -0.8660, 0.8660], atol=1e-4)
    np.testing.assert_allclose(rloo_advantages(r, group_size=4), [2 / 3, -2 / 3, -2 / 3, 2 / 3], rtol=1e-6)


def test_group_estimators_check_their_arguments():
    r = jnp.zeros(6)
    with pytest.raises(ValueError, match="group_advantages: `rewards` has 6 rows, not a multiple of group_size=4"):
        group_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="rloo_advantages: `group_size` must be an integer >= 2, got 1"):
        rloo_advantages(r, group_size=1)
    with pytest.raises(ValueError, match=r"group_advantages: `rewards` must have shape \[B\]"):
        group_advantages(jnp.zeros((2, 3)), group_size=3)
    with pytest.raises(ValueError, match="`scale` must be 'std' or 'none'"):
        group_advantages(r, group_size=3, scale="mad")
    fn, calls = count_traces(group_advantages, group_size=3)
    for seed in range(3):
        fn(jnp.asarray(np.random.default_rng(seed).normal(size=6), jnp.float32))
    assert calls["traces"] == 1
