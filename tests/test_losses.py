"""Losses: the seed clip tables, a float64 loop reference, gradients, estimator statistics, errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_traces, prefix_mask, random_lengths, with_garbage
from jaxppo.losses import (
    AGGREGATIONS,
    bradley_terry_loss,
    entropy,
    kl_penalty,
    overlong_penalty,
    plackett_luce_loss,
    policy_loss,
    sequence_policy_loss,
    ranking_counts,
    sft_loss,
    token_entropy,
    token_logprobs,
    value_loss,
)
from jaxppo.masking import last_valid_index, nonempty_rows, valid_count
from reference_np import (
    bradley_terry_ref,
    entropy_ref,
    kl_penalty_ref,
    plackett_luce_ref,
    policy_loss_ref,
    sft_loss_ref,
    value_loss_ref,
)

B, T, V = 8, 11, 17
RATIOS = np.array([1.5, 1.3, 1.1, 0.9, 0.5])


def random_batch(seed: int):
    rng = np.random.default_rng(seed)
    return rng, prefix_mask(random_lengths(rng, B, T), T)


def per_token_objective(ratios, advantage, **kwargs):
    """−l_t for single-token rows with log π_old = 0: the surrogate objective of seed 000 §4.2."""
    n = len(ratios)
    logprobs = jnp.log(jnp.asarray(ratios, jnp.float32))[:, None]
    objective = []
    for i in range(n):  # one row at a time so each objective is read off alone
        loss, _ = policy_loss(logprobs[i:i + 1], jnp.zeros((1, 1)), jnp.full((1, 1), advantage),
                              jnp.ones((1, 1)), **kwargs)
        objective.append(-float(loss))
    return np.array(objective)


# --- seed 000 §4.2 clip table -----------------------------------------------------------------


def test_seed_clip_table_positive_advantage():
    np.testing.assert_allclose(per_token_objective(RATIOS, 1.0, clip_eps=0.2), [1.2, 1.2, 1.1, 0.9, 0.5], rtol=1e-6)


def test_seed_clip_table_negative_advantage():
    # A < 0: the objective is −max(ρ, clip(ρ)); a bad token already made rarer (ρ < 0.8) stops being pushed.
    np.testing.assert_allclose(per_token_objective(RATIOS, -1.0, clip_eps=0.2), [-1.5, -1.3, -1.1, -0.9, -0.8], rtol=1e-6)


def test_clip_higher_and_dual_clip_tables():
    np.testing.assert_allclose(
        per_token_objective(RATIOS, 1.0, clip_eps=0.2, clip_eps_high=0.4), [1.4, 1.3, 1.1, 0.9, 0.5], rtol=1e-6)
    # dual clip c = 1.4 bounds the A = −1 objective below by −1.4.
    np.testing.assert_allclose(
        per_token_objective(RATIOS, -1.0, clip_eps=0.2, dual_clip=1.4), [-1.4, -1.3, -1.1, -0.9, -0.8], rtol=1e-6)


# --- float64 reference on random batches ------------------------------------------------------


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "abs"])
def test_kl_penalty_matches_float64_loop(x64, estimator):
    rng = np.random.default_rng(0)
    lp, ref = -rng.exponential(size=(B, T)), -rng.exponential(size=(B, T))
    np.testing.assert_allclose(
        kl_penalty(jnp.asarray(lp), jnp.asarray(ref), estimator=estimator),
        kl_penalty_ref(lp, ref, estimator), rtol=1e-6, atol=1e-14)


@pytest.mark.parametrize("aggregation", AGGREGATIONS)
@pytest.mark.parametrize("options", [dict(), dict(clip_eps=0.1, clip_eps_high=0.28), dict(dual_clip=3.0)])
def test_policy_loss_matches_float64_loop(x64, aggregation, options):
    rng, mask = random_batch(1)
    old = -rng.exponential(size=(B, T))
    new = old + rng.normal(scale=0.4, size=(B, T))
    adv = rng.normal(size=(B, T)) * 2
    expected, expected_aux = policy_loss_ref(new, old, adv, mask, aggregation=aggregation, **options)
    loss, aux = policy_loss(
        jnp.asarray(with_garbage(new, mask)), jnp.asarray(with_garbage(old, mask)),
        jnp.asarray(with_garbage(adv, mask)), jnp.asarray(mask), aggregation=aggregation, **options)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    for key in ("clip_fraction", "approx_kl", "dual_clip_fraction"):
        np.testing.assert_allclose(aux[key], expected_aux[key], rtol=1e-6, atol=1e-12, err_msg=key)
    assert 0 < float(aux["clip_fraction"]) < 1
    np.testing.assert_allclose(aux["clip_fraction"], aux["clip_fraction_low"] + aux["clip_fraction_high"], rtol=1e-12)


@pytest.mark.parametrize("clip_eps", [None, 0.2])
def test_value_loss_matches_float64_loop(x64, clip_eps):
    rng, mask = random_batch(2)
    old_values, returns = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    values = old_values + rng.normal(scale=0.5, size=(B, T))
    expected, expected_aux = value_loss_ref(values, old_values, returns, mask, clip_eps=clip_eps)
    loss, aux = value_loss(jnp.asarray(with_garbage(values, mask)), jnp.asarray(old_values),
                           jnp.asarray(returns), jnp.asarray(mask), clip_eps=clip_eps)
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux["clip_fraction"], expected_aux["clip_fraction"], rtol=1e-6)
    if clip_eps is not None:
        assert 0 < float(aux["clip_fraction"]) < 1


def test_entropy_and_sft_loss_match_float64_loop(x64):
    rng, mask = random_batch(3)
    logits = rng.normal(scale=3.0, size=(B, T, V))
    targets = rng.integers(0, V, size=(B, T))
    np.testing.assert_allclose(entropy(jnp.asarray(logits), jnp.asarray(mask)), entropy_ref(logits, mask), rtol=1e-6)
    # the pipeline's path: chunked token log-probs (models.heads.chosen_logprobs), then sft_loss
    logp = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(sft_loss(jnp.asarray(with_garbage(np.asarray(logp), mask)), jnp.asarray(mask)),
                               sft_loss_ref(logits, targets, mask), rtol=1e-6)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    np.testing.assert_allclose(token_entropy(jnp.asarray(logits)), -np.sum(probs * np.log(probs), -1), rtol=1e-6)
    expected_logp = np.stack([[np.log(np.exp(l - l.max()) / np.exp(l - l.max()).sum())[y]
                               for l, y in zip(lr, yr)] for lr, yr in zip(logits, targets)])
    np.testing.assert_allclose(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)), expected_logp, rtol=1e-6)


@pytest.mark.parametrize("margin", [None, 0.5, "array"])
def test_bradley_terry_matches_float64_loop(x64, margin):
    rng = np.random.default_rng(4)
    chosen, rejected = rng.normal(size=64), rng.normal(size=64)
    if margin == "array":
        margin = rng.uniform(0, 1, size=64)
    expected, expected_aux = bradley_terry_ref(chosen, rejected, margin=margin)
    loss, aux = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected),
                                   margin=None if margin is None else jnp.asarray(margin))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], expected_aux["accuracy"], rtol=1e-12)


def test_bradley_terry_is_stable_for_large_scores():
    loss, _ = bradley_terry_loss(jnp.array([-200.0, 200.0]), jnp.array([200.0, -200.0]))
    np.testing.assert_allclose(loss, 200.0, rtol=1e-6)  # (400 + 0) / 2, no overflow


@pytest.mark.parametrize("with_mask", [False, True])
def test_plackett_luce_matches_float64_loop(x64, with_mask):
    rng = np.random.default_rng(5)
    scores = rng.normal(scale=2.0, size=(16, 5))
    mask = (rng.uniform(size=(16, 5)) > 0.3).astype(np.float64) if with_mask else None
    if with_mask:
        mask[0] = 0.0  # an empty list and a one-item list carry no preference
        mask[1] = [0, 0, 1, 0, 0]
    expected, expected_aux = plackett_luce_ref(scores, mask=mask)
    loss, aux = plackett_luce_loss(jnp.asarray(scores), mask=None if mask is None else jnp.asarray(mask))
    np.testing.assert_allclose(loss, expected, rtol=1e-6)
    np.testing.assert_allclose(aux["accuracy"], expected_aux["accuracy"], rtol=1e-12)


# --- gradients --------------------------------------------------------------------------------


def test_no_policy_gradient_where_clipped_on_the_good_side():
    # Per token: (ratio, advantage). Clipped on the good side: ρ > 1+ε with A > 0, ρ < 1−ε with A < 0.
    ratios = jnp.array([[1.5, 0.5, 1.1, 0.9, 1.5, 0.5]])
    advantages = jnp.array([[1.0, -1.0, 1.0, -1.0, -1.0, 1.0]])
    mask = jnp.ones_like(ratios)
    grad = jax.grad(lambda lp: policy_loss(lp, jnp.zeros_like(lp), advantages, mask, clip_eps=0.2)[0])(jnp.log(ratios))
    n = ratios.size
    # d(−ρA/n)/d log π = −ρA/n where unclipped; exactly 0 where the clip is active.
    expected = np.array([[0.0, 0.0, -1.1 / n, 0.9 / n, 1.5 / n, -0.5 / n]])
    np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=0)


def test_no_gradient_into_old_logprobs_or_advantages():
    lp = jnp.array([[-1.0, -2.0]])
    f = lambda old, adv: policy_loss(lp, old, adv, jnp.ones((1, 2)))[0]  # noqa: E731
    g_old, g_adv = jax.grad(f, argnums=(0, 1))(lp - 0.1, jnp.array([[1.0, -1.0]]))
    np.testing.assert_array_equal(g_old, 0.0)
    np.testing.assert_array_equal(g_adv, 0.0)


def test_plackett_luce_with_two_items_equals_bradley_terry():
    rng = np.random.default_rng(6)
    scores = jnp.asarray(rng.normal(size=(32, 2)), jnp.float32)
    pl = lambda s: plackett_luce_loss(s)[0]  # noqa: E731
    bt = lambda s: bradley_terry_loss(s[:, 0], s[:, 1])[0]  # noqa: E731
    np.testing.assert_allclose(pl(scores), bt(scores), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(pl)(scores), jax.grad(bt)(scores), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(plackett_luce_loss(scores)[1]["accuracy"], bradley_terry_loss(scores[:, 0], scores[:, 1])[1]["accuracy"])


def test_value_loss_gradient_is_zero_where_clip_is_active():
    # Token 0: V jumped past V_old + ε towards R = 2, so the clipped error (0.2 − 2)² is the larger
    # and is constant in V: no gradient. Token 1 stays inside the clip range.
    values, old, ret = jnp.array([[1.0, 0.1]]), jnp.array([[0.0, 0.0]]), jnp.array([[2.0, 1.0]])
    grad = jax.grad(lambda v: value_loss(v, old, ret, jnp.ones((1, 2)), clip_eps=0.2)[0])(values)
    np.testing.assert_allclose(grad, [[0.0, 0.5 * (0.1 - 1.0)]], rtol=1e-6)


# --- KL estimators ----------------------------------------------------------------------------


def test_kl_estimators_nonnegative_and_k1_may_be_negative():
    rng = np.random.default_rng(7)
    lp, ref = jnp.asarray(-rng.exponential(size=(64, 32))), jnp.asarray(-rng.exponential(size=(64, 32)))
    for name in ("k2", "k3", "abs"):
        assert float(jnp.min(kl_penalty(lp, ref, estimator=name))) >= 0.0, name
    assert float(jnp.min(kl_penalty(lp, ref, estimator="k1"))) < 0.0


def test_k1_and_k3_unbiased_k2_biased_on_sampled_tokens():
    """E_{a∼p}[k] against the exact KL(p‖q) of two categoricals, with a 5σ statistical tolerance."""
    key_p, key_q, key_s = jax.random.split(jax.random.key(0), 3)
    logp = jax.nn.log_softmax(jax.random.normal(key_p, (V,)))
    logq = jax.nn.log_softmax(logp + 0.8 * jax.random.normal(key_q, (V,)))
    exact = float(jnp.sum(jnp.exp(logp) * (logp - logq)))
    n = 400_000
    tokens = jax.random.categorical(key_s, logp, shape=(1, n))
    for name, unbiased in (("k1", True), ("k3", True), ("k2", False)):
        samples = np.asarray(kl_penalty(logp[tokens], logq[tokens], estimator=name), np.float64)
        stderr = samples.std() / np.sqrt(n)
        if unbiased:
            assert abs(samples.mean() - exact) < 5 * stderr, (name, samples.mean(), exact)
        else:
            assert abs(samples.mean() - exact) > 5 * stderr, (name, samples.mean(), exact)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_expected_gradient_of_kl_as_a_loss(x64, estimator):
    """E_{a∼π}[∇_θ k(log π_θ(a), log π_ref(a))] with the sample a held fixed — how the PPO loss uses the
    estimator — summed exactly over the actions of a softmax policy, against ∇_θ KL(π_θ ‖ π_ref).

    k2's is exactly ∇KL, k3's is ∇KL(π_ref ‖ π) (close to it), k1's is Σ_a π ∇log π = ∇Σ_a π = 0: why
    ``ppo.kl_estimator`` rejects k1 as a loss.
    """
    rng = np.random.default_rng(11)
    theta = jnp.asarray(rng.normal(size=6))
    ref_logp = jax.nn.log_softmax(theta + 0.5 * jnp.asarray(rng.normal(size=6)))

    def true_kl(t):
        logp = jax.nn.log_softmax(t)
        return jnp.sum(jnp.exp(logp) * (logp - ref_logp))

    def surrogate(t):  # Σ_a sg(π(a)) k(a): the expectation over sampled actions, sample fixed
        logp = jax.nn.log_softmax(t)
        per_action = kl_penalty(logp[None, :], ref_logp[None, :], estimator=estimator)[0]
        return jnp.sum(jax.lax.stop_gradient(jnp.exp(logp)) * per_action)

    expected, exact = np.asarray(jax.grad(surrogate)(theta)), np.asarray(jax.grad(true_kl)(theta))
    if estimator == "k1":
        assert np.linalg.norm(expected) < 1e-12 * np.linalg.norm(exact)
    else:
        cosine = expected @ exact / (np.linalg.norm(expected) * np.linalg.norm(exact))
        assert cosine > 0.9, cosine
        if estimator == "k2":
            np.testing.assert_allclose(expected, exact, rtol=1e-10, atol=1e-14)


# --- minibatch counts: micro-batch losses sum to the batch loss ---------------------------------


def halves(*arrays):
    """Each ``[B, ...]`` array split into its first and second half of rows."""
    return [tuple(a[:B // 2] for a in arrays), tuple(a[B // 2:] for a in arrays)]


def test_counts_make_micro_batch_losses_and_aux_sum_to_the_batch_loss(x64):
    rng, _ = random_batch(9)
    mask = prefix_mask(np.array([1, 1, T, T, 0, 3, 2, T]), T)  # short rows together: unequal token counts
    old = -rng.exponential(size=(B, T))
    new, adv = old + rng.normal(scale=0.4, size=(B, T)), rng.normal(size=(B, T))
    values, returns = rng.normal(size=(B, T)), rng.normal(size=(B, T))
    logits = rng.normal(size=(B, T, V))
    counts = {"token_count": valid_count(mask), "row_count": nonempty_rows(mask)}
    assert (float(counts["token_count"]), float(counts["row_count"])) == (mask.sum(), 7)
    cases = [(functools.partial(policy_loss, aggregation=a), (new, old, adv, mask), counts) for a in AGGREGATIONS]
    cases += [
        (functools.partial(value_loss, clip_eps=0.2), (values, old, returns, mask), {"token_count": counts["token_count"]}),
        (entropy, (logits, mask), {"token_count": counts["token_count"]}),
        (sft_loss, (old, mask), {"token_count": counts["token_count"]}),
    ]
    for fn, args, kwargs in cases:
        whole = fn(*map(jnp.asarray, args))
        parts = [fn(*map(jnp.asarray, part), **kwargs) for part in halves(*args)]
        jax.tree.map(lambda w, *p: np.testing.assert_allclose(sum(p), w, rtol=1e-12, atol=1e-15), whole, *parts)
        mean_of_means = np.mean([jax.tree.leaves(fn(*map(jnp.asarray, part)))[0] for part in halves(*args)])
        assert abs(mean_of_means - jax.tree.leaves(whole)[0]) > 1e-3, fn  # the split-dependent reduction

    chosen, rejected = rng.normal(size=B), rng.normal(size=B)
    whole = bradley_terry_loss(jnp.asarray(chosen), jnp.asarray(rejected), margin=0.3)
    parts = [bradley_terry_loss(jnp.asarray(c), jnp.asarray(r), margin=0.3, pair_count=B) for c, r in halves(chosen, rejected)]
    jax.tree.map(lambda w, *p: np.testing.assert_allclose(sum(p), w, rtol=1e-12), whole, *parts)

    scores = rng.normal(size=(B, 4))
    item_mask = np.ones((B, 4))
    item_mask[:3, 2:] = 0  # 2-item lists in the first half, an empty and a 1-item list in the second
    item_mask[4], item_mask[5, 1:] = 0, 0
    pl_counts = ranking_counts(item_mask)
    assert (float(pl_counts["list_count"]), float(pl_counts["pair_count"])) == (6, 3 * 1 + 1 * 6 + 2 * 6)
    whole = plackett_luce_loss(jnp.asarray(scores), mask=jnp.asarray(item_mask))
    parts = [plackett_luce_loss(jnp.asarray(s), mask=jnp.asarray(m), **pl_counts) for s, m in halves(scores, item_mask)]
    jax.tree.map(lambda w, *p: np.testing.assert_allclose(sum(p), w, rtol=1e-12), whole, *parts)


# --- errors and tracing -----------------------------------------------------------------------


def test_errors_name_the_argument():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match="`estimator`"):
        kl_penalty(x, x, estimator="kl")
    with pytest.raises(ValueError, match="`ref_logprobs`"):
        kl_penalty(x, jnp.zeros((2, 4)), estimator="k1")
    with pytest.raises(ValueError, match="`mask`"):
        policy_loss(x, x, x, jnp.zeros((3, 2)))
    with pytest.raises(ValueError, match="`advantages`"):
        policy_loss(x, x, jnp.zeros(3), x)
    with pytest.raises(ValueError, match="`aggregation`"):
        policy_loss(x, x, x, x, aggregation="mean")
    with pytest.raises(ValueError, match="`dual_clip`"):
        policy_loss(x, x, x, x, dual_clip=0.5)
    with pytest.raises(ValueError, match="`clip_eps`"):
        value_loss(x, x, x, x, clip_eps=-1.0)
    with pytest.raises(ValueError, match="`returns`"):
        value_loss(x, x, jnp.zeros((2, 4)), x)
    with pytest.raises(ValueError, match="`mask`"):
        entropy(jnp.zeros((2, 3, 5)), jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="`logprobs`"):
        sft_loss(jnp.zeros((2, 3, 5)), x)
    with pytest.raises(ValueError, match="`mask`"):
        sft_loss(x, jnp.zeros((2, 4)))
    with pytest.raises(ValueError, match="`logits`"):
        token_logprobs(jnp.zeros((2, 3)), jnp.zeros((2, 3), jnp.int32))
    with pytest.raises(ValueError, match="`targets`"):
        token_logprobs(jnp.zeros((2, 3, 5)), jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="`logits`"):
        token_entropy(x)
    with pytest.raises(ValueError, match="`mask`"):
        last_valid_index(jnp.zeros(3))
    with pytest.raises(ValueError, match="`rejected_scores`"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="`margin`"):
        bradley_terry_loss(jnp.zeros(3), jnp.zeros(3), margin=jnp.zeros(4))
    with pytest.raises(ValueError, match="`mask`"):
        plackett_luce_loss(jnp.zeros((3, 4)), mask=jnp.zeros((3, 5)))


def test_each_loss_traced_once_for_repeated_shapes():
    rng, mask = random_batch(8)
    f32 = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)  # noqa: E731
    m = jnp.asarray(mask, jnp.float32)
    cases = [
        (kl_penalty, dict(estimator="k3"), lambda: (f32(B, T), f32(B, T))),
        (policy_loss, dict(clip_eps=0.2, dual_clip=3.0, aggregation="seq-mean-token-mean"),
         lambda: (f32(B, T), f32(B, T), f32(B, T), m)),
        (value_loss, dict(clip_eps=0.2), lambda: (f32(B, T), f32(B, T), f32(B, T), m)),
        (entropy, {}, lambda: (f32(B, T, V), m)),
        (token_logprobs, {}, lambda: (f32(B, T, V), jnp.asarray(rng.integers(0, V, (B, T))))),
        (sft_loss, dict(token_count=40.0), lambda: (f32(B, T), m)),
        (bradley_terry_loss, dict(margin=0.1), lambda: (f32(B), f32(B))),
        (plackett_luce_loss, {}, lambda: (f32(B, 4),)),
    ]
    for fn, static, make_args in cases:
        jitted, calls = count_traces(fn, **static)
        for _ in range(3):
            jax.block_until_ready(jitted(*make_args()))
        assert calls["traces"] == 1, fn.__name__


def test_overlong_penalty_matches_the_dapo_definition():
    # L = 16, C = 4: free up to 12 tokens, then −1/4 per token, −1 at and past the limit
    lengths = np.arange(0, 21)
    expected = [0.0 if n <= 12 else (12 - n) / 4 if n <= 16 else -1.0 for n in lengths]
    np.testing.assert_allclose(overlong_penalty(jnp.asarray(lengths), max_length=16, cache_length=4), expected,
                               rtol=1e-6)
    with pytest.raises(ValueError, match="overlong_penalty: need 0 < cache_length <= max_length"):
        overlong_penalty(jnp.asarray(lengths), max_length=16, cache_length=0)
    with pytest.raises(ValueError, match=r"overlong_penalty: `lengths` must have shape \[B\]"):
        overlong_penalty(jnp.zeros((2, 3)), max_length=16, cache_length=4)


def _gspo_ref(logprobs, old, adv, mask, eps_low, eps_high):
    """Float64 loop over rows: the GSPO objective as the paper writes it."""
    terms, clipped = [], 0
    for lp, ol, a, m in zip(logprobs, old, adv, mask):
        n = int(m.sum())
        if n == 0:
            continue
        s = np.exp(sum(float(x - y) for x, y, v in zip(lp, ol, m) if v) / n)
        clip = min(max(s, 1 - eps_low), 1 + eps_high)
        terms.append(min(s * a, clip * a))
        clipped += clip * a < s * a
    return -sum(terms) / len(terms), clipped / len(terms)


def test_sequence_policy_loss_matches_a_float64_loop_and_splits_into_micro_batches(x64):
    rng = np.random.default_rng(0)
    b, t = 8, 7
    mask = prefix_mask(random_lengths(rng, b, t), t)  # an empty and a full row included
    old = rng.normal(-1.0, 0.3, size=(b, t))
    logprobs = old + rng.normal(0.0, 0.05, size=(b, t))
    adv = rng.normal(size=b)
    args = [jnp.asarray(with_garbage(logprobs, mask)), jnp.asarray(with_garbage(old, mask)), jnp.asarray(adv),
            jnp.asarray(mask)]
    loss, aux = sequence_policy_loss(*args, clip_eps=0.01, clip_eps_high=0.02)
    ref_loss, ref_clip = _gspo_ref(logprobs, old, adv, mask, 0.01, 0.02)
    np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-10)
    np.testing.assert_allclose(float(aux["clip_fraction"]), ref_clip, rtol=1e-10)
    assert 0 < ref_clip < 1  # both branches are exercised
    # two micro-batches with the minibatch's row count sum to the whole loss
    rows = float(nonempty_rows(jnp.asarray(mask)))
    halves = [sequence_policy_loss(*(x[s] for x in args), clip_eps=0.01, clip_eps_high=0.02, row_count=rows)[0]
              for s in (slice(0, 3), slice(3, None))]
    np.testing.assert_allclose(float(sum(halves)), float(loss), rtol=1e-12)
    # a row whose clipped term is active gets no gradient; the others do
    grad = jax.grad(lambda lp: sequence_policy_loss(lp, *args[1:], clip_eps=0.01, clip_eps_high=0.02)[0])(args[0])
    s = np.exp(np.sum((logprobs - old) * mask, 1) / np.maximum(mask.sum(1), 1))
    active = (np.clip(s, 0.99, 1.02) * adv < s * adv) & (mask.sum(1) > 0)
    row_grad = np.abs(np.asarray(grad) * mask).sum(1)
    assert np.all(row_grad[active] == 0) and np.all(row_grad[~active & (mask.sum(1) > 0)] > 0)
    assert np.all(np.asarray(grad)[mask == 0] == 0)


def test_sequence_policy_loss_checks_its_arguments():
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=r"sequence_policy_loss: `advantages` must have shape \[B\] = \(2,\)"):
        sequence_policy_loss(x, x, x, x, clip_eps=0.2)
    with pytest.raises(ValueError, match="sequence_policy_loss: `clip_eps_high` must be > 0"):
        sequence_policy_loss(x, x, jnp.zeros(2), x, clip_eps=0.2, clip_eps_high=0.0)
