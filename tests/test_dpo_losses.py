"""DPO-family losses: float64 loop references, gradients at their fixed points, invariances,
micro-batch counts, argument errors, and values computed by TRL's own loss code."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_traces, prefix_mask
from jaxppo.losses import (
    PREFERENCE_LOSSES,
    bradley_terry_loss,
    dpo_loss,
    ipo_loss,
    log1mexp,
    orpo_loss,
    sft_loss,
    simpo_loss,
)
from jaxppo.masking import valid_count
from reference_np import dpo_ref, ipo_ref, orpo_ref, simpo_ref

B = 64
AUX = ("accuracy", "margin", "chosen_reward", "rejected_reward")


def random_pairs(seed: int, b: int = B) -> dict[str, np.ndarray]:
    """Summed response log-probs of b pairs with unequal lengths; the policy's per-token average is < 0."""
    rng = np.random.default_rng(seed)
    len_chosen, len_rejected = rng.integers(1, 60, b), rng.integers(1, 60, b)
    policy_chosen = -len_chosen * rng.uniform(0.05, 2.0, b)
    policy_rejected = -len_rejected * rng.uniform(0.05, 2.0, b)
    return {
        "policy_chosen": policy_chosen, "policy_rejected": policy_rejected,
        "ref_chosen": policy_chosen + rng.normal(0.0, 2.0, b), "ref_rejected": policy_rejected + rng.normal(0.0, 2.0, b),
        "len_chosen": len_chosen, "len_rejected": len_rejected, "nll_chosen": rng.uniform(0.1, 3.0, b),
    }


def as_jax(pairs: dict, *names: str) -> list[jax.Array]:
    return [jnp.asarray(pairs[n]) for n in names]


WITH_REF = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
LENGTHS = ("len_chosen", "len_rejected")


def assert_matches(result, expected, rtol=1e-10):
    (loss, aux), (ref_loss, ref_aux) = result, expected
    np.testing.assert_allclose(float(loss), ref_loss, rtol=rtol)
    for key, value in ref_aux.items():
        np.testing.assert_allclose(float(aux[key]), value, rtol=rtol, atol=1e-14, err_msg=key)
    assert set(AUX) <= set(aux)


# --- float64 loop references ------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.5, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.5])
def test_dpo_matches_float64_loop(x64, beta, label_smoothing):
    pairs = random_pairs(0)
    result = dpo_loss(*as_jax(pairs, *WITH_REF), beta=beta, label_smoothing=label_smoothing)
    expected = dpo_ref(*(pairs[n] for n in WITH_REF), beta, label_smoothing)
    assert_matches(result, expected)
    assert 0 < expected[1]["accuracy"] < 1


@pytest.mark.parametrize("tau", [0.01, 0.1, 1.0])
@pytest.mark.parametrize("with_lengths", [False, True])
def test_ipo_matches_float64_loop(x64, tau, with_lengths):
    pairs = random_pairs(1)
    lengths = dict(zip(LENGTHS, as_jax(pairs, *LENGTHS))) if with_lengths else {}
    result = ipo_loss(*as_jax(pairs, *WITH_REF), tau=tau, **lengths)
    expected = ipo_ref(*(pairs[n] for n in WITH_REF), tau, *(pairs[n] for n in LENGTHS if with_lengths))
    assert_matches(result, expected)


def test_ipo_lengths_average_the_log_ratios(x64):
    """Passing lengths is the same as passing length-averaged log-probs (what TRL's "ipo" does)."""
    pairs = random_pairs(2)
    lc, lr = pairs["len_chosen"], pairs["len_rejected"]
    averaged = [pairs["policy_chosen"] / lc, pairs["policy_rejected"] / lr, pairs["ref_chosen"] / lc,
                pairs["ref_rejected"] / lr]
    with_lengths = ipo_loss(*as_jax(pairs, *WITH_REF), tau=0.1, len_chosen=jnp.asarray(lc), len_rejected=jnp.asarray(lr))
    pre_averaged = ipo_loss(*map(jnp.asarray, averaged), tau=0.1)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12), with_lengths, pre_averaged)
    summed = ipo_loss(*as_jax(pairs, *WITH_REF), tau=0.1)
    assert abs(float(summed[0]) - float(with_lengths[0])) > 1.0


@pytest.mark.parametrize("beta, gamma", [(2.0, 0.0), (2.5, 1.375), (10.0, 3.0)])
def test_simpo_matches_float64_loop(x64, beta, gamma):
    pairs = random_pairs(3)
    names = ("policy_chosen", "policy_rejected") + LENGTHS
    result = simpo_loss(*as_jax(pairs, *names), beta=beta, gamma=gamma)
    assert_matches(result, simpo_ref(*(pairs[n] for n in names), beta, gamma))


@pytest.mark.parametrize("lam", [0.1, 1.0])
@pytest.mark.parametrize("nll", ["per-pair", "scalar"])
def test_orpo_matches_float64_loop(x64, lam, nll):
    pairs = random_pairs(4)
    names = ("policy_chosen", "policy_rejected") + LENGTHS
    nll_chosen = pairs["nll_chosen"] if nll == "per-pair" else np.float64(1.7)
    result = orpo_loss(*as_jax(pairs, *names), jnp.asarray(nll_chosen), lam=lam)
    assert_matches(result, orpo_ref(*(pairs[n] for n in names), nll_chosen, lam))


def test_float32_inputs_compute_in_float32_close_to_float64():
    pairs = random_pairs(5)
    f32 = {k: jnp.asarray(v, jnp.float32) for k, v in pairs.items()}
    loss, aux = dpo_loss(*(f32[n] for n in WITH_REF), beta=0.1, label_smoothing=0.1)
    assert loss.dtype == jnp.float32 and aux["margin"].dtype == jnp.float32
    np.testing.assert_allclose(float(loss), dpo_ref(*(pairs[n] for n in WITH_REF), 0.1, 0.1)[0], rtol=1e-5)
    loss, _ = orpo_loss(*(f32[n] for n in ("policy_chosen", "policy_rejected") + LENGTHS + ("nll_chosen",)), lam=0.5)
    ref = orpo_ref(*(pairs[n] for n in ("policy_chosen", "policy_rejected") + LENGTHS + ("nll_chosen",)), 0.5)
    np.testing.assert_allclose(float(loss), ref[0], rtol=1e-5)


# --- identities and gradients -----------------------------------------------------------------


def test_cdpo_with_zero_smoothing_is_dpo_and_dpo_is_bradley_terry_on_implicit_rewards(x64):
    pairs = random_pairs(6)
    args = as_jax(pairs, *WITH_REF)
    dpo = jax.value_and_grad(lambda *a: dpo_loss(*a, beta=0.3)[0], argnums=(0, 1))
    cdpo = jax.value_and_grad(lambda *a: dpo_loss(*a, beta=0.3, label_smoothing=0.0)[0], argnums=(0, 1))
    jax.tree.map(np.testing.assert_array_equal, dpo(*args), cdpo(*args))  # exactly, value and gradient
    # DPO is the Bradley-Terry loss of the implicit rewards β(π − π_ref) (Rafailov et al. 2023, §4)
    bt = bradley_terry_loss(0.3 * (args[0] - args[2]), 0.3 * (args[1] - args[3]))
    np.testing.assert_allclose(float(dpo(*args)[0]), float(bt[0]), rtol=1e-14)


def test_gradients_at_the_tie_and_at_the_fixed_points():
    r"""What is true of the gradient at a tie (h = 0), with β = 0.5 and B pairs.

    The issue says "DPO's gradient vanishes when the policy equals the reference and the pair is
    tied". That is imprecise: when the policy equals the reference, h = 0 for every pair, and the
    DPO gradient is dL/dπ_c = −β σ(−βh)/B = −β/(2B) per pair, not 0 — DPO keeps pushing the chosen
    response up and the rejected one down from the start (this is what makes its first step move).
    What does vanish:

    * cDPO (loss −(1−ε)log σ(βh) − ε log σ(−βh)) has dL/dh = −β[(1−ε)σ(−βh) − εσ(βh)], which is
      −β(1−2ε)/2 at h = 0: zero at a tie only for ε = 0.5 (labels carry no information), and zero
      in general at βh = log((1−ε)/ε), its finite optimum;
    * IPO's (h − 1/(2τ))² has zero gradient at h = 1/(2τ), not at h = 0 (there it is −1/τ per pair).

    The reference log-probs are data: no gradient reaches them.
    """
    n, beta = 4, 0.5
    same = jnp.full((n,), -7.0)  # policy = reference on both responses: h = 0 for every pair

    def grads(fn, *args, **kw):
        return jax.grad(lambda *a: fn(*a, **kw)[0], argnums=(0, 1, 2, 3))(*args)

    for eps in (0.0, 0.1, 0.5):
        g_c, g_r, g_ref_c, g_ref_r = grads(dpo_loss, same, same, same, same, beta=beta, label_smoothing=eps)
        np.testing.assert_allclose(g_c, -beta * (1 - 2 * eps) / 2 / n, atol=1e-7)
        np.testing.assert_allclose(g_r, beta * (1 - 2 * eps) / 2 / n, atol=1e-7)
        assert not np.any(g_ref_c) and not np.any(g_ref_r)
    # cDPO's optimum: βh = log((1−ε)/ε)
    eps = 0.1
    h = np.log((1 - eps) / eps) / beta
    g_c = grads(dpo_loss, same + h, same, same, same, beta=beta, label_smoothing=eps)[0]
    np.testing.assert_allclose(g_c, 0.0, atol=1e-7)
    # IPO: zero gradient at h = 1/(2τ), −1/τ per pair at h = 0
    tau = 0.25
    g_c = grads(ipo_loss, same + 1 / (2 * tau), same, same, same, tau=tau)[0]
    np.testing.assert_allclose(g_c, 0.0, atol=1e-7)
    g_c = grads(ipo_loss, same, same, same, same, tau=tau)[0]
    np.testing.assert_allclose(g_c, -1 / tau / n, rtol=1e-6)


@pytest.mark.parametrize("tau", [0.1, 0.5])
def test_ipo_minimum_is_at_the_target_margin(x64, tau):
    target = 1 / (2 * tau)
    hs = target + np.linspace(-2.0, 2.0, 41)  # h = target is the middle point
    zeros = jnp.zeros(hs.shape)
    per_h = jax.vmap(lambda h: ipo_loss(h[None], jnp.zeros(1), jnp.zeros(1), jnp.zeros(1), tau=tau)[0])(jnp.asarray(hs))
    assert int(np.argmin(per_h)) == 20 and float(per_h[20]) == 0.0
    np.testing.assert_allclose(per_h, (hs - target) ** 2, rtol=1e-12, atol=1e-15)
    _, aux = ipo_loss(jnp.asarray(hs), zeros, zeros, zeros, tau=tau)
    np.testing.assert_allclose(float(aux["margin"]), target, rtol=1e-12)


def test_simpo_takes_no_reference_and_is_invariant_to_scaling_lengths_with_log_probs(x64):
    assert not {"ref_chosen", "ref_rejected"} & set(inspect.signature(simpo_loss).parameters)
    assert not {"ref_chosen", "ref_rejected"} & set(PREFERENCE_LOSSES["simpo"].inputs)
    pairs = random_pairs(7)
    names = ("policy_chosen", "policy_rejected") + LENGTHS
    base = simpo_loss(*as_jax(pairs, *names), beta=2.0, gamma=1.0)
    for k in (2, 3):  # k-fold longer responses with k-fold log-probs: the same per-token average
        scaled = simpo_loss(*(k * x for x in as_jax(pairs, *names)), beta=2.0, gamma=1.0)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), base, scaled)
    # the same reference-free margin is reached by DPO only when the reference is ignored: SimPO
    # with γ = 0 is DPO on per-token averages with π_ref = 0
    avg = [pairs["policy_chosen"] / pairs["len_chosen"], pairs["policy_rejected"] / pairs["len_rejected"]]
    zero = jnp.zeros(B)
    np.testing.assert_allclose(
        float(simpo_loss(*as_jax(pairs, *names), beta=2.0, gamma=0.0)[0]),
        float(dpo_loss(*map(jnp.asarray, avg), zero, zero, beta=2.0)[0]), rtol=1e-13)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_orpo_gradient_is_finite_as_the_probability_tends_to_one(dtype):
    with jax.enable_x64(dtype == "float64"):
        lengths = jnp.asarray([1.0, 7.0, 3.0])
        chosen = jnp.asarray([-1e-6, -7e-6, -3e-8], dtype)  # per-token log p = −1e-6, −1e-6, −1e-8: p ≈ 1
        rejected = jnp.asarray([-2.0, -9.0, -0.5], dtype)
        nll = jnp.asarray([0.1, 0.2, 0.3], dtype)
        loss, grad = jax.value_and_grad(lambda c, r: orpo_loss(c, r, lengths, lengths, nll, lam=0.5)[0],
                                        argnums=(0, 1))(chosen, rejected)
        assert np.isfinite(float(loss)) and all(np.all(np.isfinite(g)) for g in grad)
        ref = orpo_ref(np.asarray(chosen, np.float64), np.asarray(rejected, np.float64), lengths, lengths, nll, 0.5)
        np.testing.assert_allclose(float(loss), ref[0], rtol=1e-6 if dtype == "float32" else 1e-12)
        # log(1 − e^x) and its gradient −1/(e^{−x} − 1), on both sides of the −ln 2 branch point
        xs = np.array([-1e-8, -1e-6, -0.1, -0.69, -0.7, -5.0, -50.0])
        value, slope = jax.vmap(jax.value_and_grad(log1mexp))(jnp.asarray(xs, dtype))
        expected = np.where(xs > -1, np.log(-np.expm1(xs)), np.log1p(-np.exp(xs)))  # each form where it is exact
        np.testing.assert_allclose(value, expected, rtol=1e-6 if dtype == "float32" else 1e-14)
        np.testing.assert_allclose(slope, -1 / np.expm1(-xs), rtol=1e-5 if dtype == "float32" else 1e-12)


# --- micro-batches ----------------------------------------------------------------------------


def halves(*arrays, cut=3):
    """Splits each [B, ...] array at row ``cut``: two micro-batches of unequal size."""
    return [[a[:cut] for a in arrays], [a[cut:] for a in arrays]]


HYPERPARAMETERS = {"dpo": dict(beta=0.1), "cdpo": dict(beta=0.1, label_smoothing=0.2), "ipo": dict(tau=0.1),
                   "simpo": dict(beta=2.0, gamma=1.0), "orpo": dict(lam=0.5)}


@pytest.mark.parametrize("name", sorted(PREFERENCE_LOSSES))
def test_pair_count_makes_micro_batch_losses_and_aux_sum_to_the_batch_loss(x64, name):
    entry = PREFERENCE_LOSSES[name]
    assert set(entry.hyperparameters) == set(HYPERPARAMETERS[name])
    n = 8
    pairs = random_pairs(8, n)
    inputs = [jnp.asarray(pairs[k]) for k in entry.inputs]

    def call(arrays, **counts):
        return entry.fn(**dict(zip(entry.inputs, arrays)), **HYPERPARAMETERS[name], **counts)

    whole = call(inputs)
    parts = [call(part, pair_count=n) for part in halves(*inputs)]
    jax.tree.map(lambda w, *p: np.testing.assert_allclose(sum(p), w, rtol=1e-12, atol=1e-15), whole, *parts)
    # and so do the gradients w.r.t. the policy's log-probs of the chosen responses
    def grad(arrays, **counts):
        return jax.grad(lambda chosen: call([chosen, *arrays[1:]], **counts)[0])(arrays[0])

    parts_grad = np.concatenate([grad(part, pair_count=n) for part in halves(*inputs)])
    np.testing.assert_allclose(parts_grad, grad(inputs), rtol=1e-12)


def test_orpo_scalar_nll_from_sft_loss_with_the_minibatch_token_count_splits_too(x64):
    """TRL's NLL is a token mean over the batch's chosen tokens: a scalar. Computed per micro-batch by
    sft_loss with the minibatch's token count, the micro-batch ORPO losses still sum to the whole's."""
    n, t = 8, 9
    pairs = random_pairs(9, n)
    rng = np.random.default_rng(9)
    mask = prefix_mask(np.minimum(pairs["len_chosen"], t), t)
    token_logprobs = -rng.exponential(size=(n, t))
    names = ("policy_chosen", "policy_rejected") + LENGTHS
    arrays = as_jax(pairs, *names)
    whole = orpo_loss(*arrays, sft_loss(jnp.asarray(token_logprobs), jnp.asarray(mask)), lam=0.5)
    tokens = valid_count(jnp.asarray(mask))
    parts = [orpo_loss(*part[:4], sft_loss(part[4], part[5], token_count=tokens), lam=0.5, pair_count=n)
             for part in halves(*arrays, jnp.asarray(token_logprobs), jnp.asarray(mask))]
    jax.tree.map(lambda w, *p: np.testing.assert_allclose(sum(p), w, rtol=1e-12), whole, *parts)


# --- errors and tracing -----------------------------------------------------------------------


def test_errors_name_the_argument():
    v, w = jnp.zeros(3), jnp.zeros(4)
    with pytest.raises(ValueError, match=r"dpo_loss: `policy_chosen` must have shape \[B\]"):
        dpo_loss(jnp.zeros((3, 2)), v, v, v, beta=0.1)
    for position, name in enumerate(WITH_REF[1:], start=1):
        args = [v, v, v, v]
        args[position] = w
        with pytest.raises(ValueError, match=f"dpo_loss: `{name}` has shape"):
            dpo_loss(*args, beta=0.1)
        with pytest.raises(ValueError, match=f"ipo_loss: `{name}` has shape"):
            ipo_loss(*args, tau=0.1)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        dpo_loss(v, v, v, v, beta=0.0)
    with pytest.raises(ValueError, match="`label_smoothing` must be in"):
        dpo_loss(v, v, v, v, beta=0.1, label_smoothing=0.7)
    with pytest.raises(ValueError, match="`tau` must be > 0"):
        ipo_loss(v, v, v, v, tau=-1.0)
    with pytest.raises(ValueError, match="both `len_chosen` and `len_rejected`"):
        ipo_loss(v, v, v, v, tau=0.1, len_chosen=v)
    with pytest.raises(ValueError, match="ipo_loss: `len_rejected` has shape"):
        ipo_loss(v, v, v, v, tau=0.1, len_chosen=v, len_rejected=w)
    with pytest.raises(ValueError, match="simpo_loss: `len_chosen` has shape"):
        simpo_loss(v, v, w, v, beta=1.0, gamma=0.5)
    with pytest.raises(ValueError, match="`beta` must be > 0"):
        simpo_loss(v, v, v, v, beta=-1.0, gamma=0.5)
    with pytest.raises(ValueError, match="orpo_loss: `policy_rejected` has shape"):
        orpo_loss(v, w, v, v, v, lam=0.1)
    with pytest.raises(ValueError, match=r"orpo_loss: `nll_chosen` must have shape \[B\] or a scalar"):
        orpo_loss(v, v, v, v, w, lam=0.1)
    with pytest.raises(ValueError, match="`lam` must be >= 0"):
        orpo_loss(v, v, v, v, v, lam=-0.1)


def test_each_preference_loss_traced_once_for_repeated_shapes():
    rng = np.random.default_rng(10)
    for name, entry in PREFERENCE_LOSSES.items():
        jitted, calls = count_traces(lambda *a, e=entry, n=name: e.fn(**dict(zip(e.inputs, a)), **HYPERPARAMETERS[n]))
        for _ in range(3):
            args = [jnp.asarray(-rng.uniform(1.0, 5.0, 8), jnp.float32) for _ in entry.inputs]
            jax.block_until_ready(jitted(*args))
        assert calls["traces"] == 1, name


# --- peer values: TRL's own loss code ----------------------------------------------------------
#
# Computed with TRL 1.16.0 (torch 2.13.0+cpu, float64 tensors) in a separate venv; this test does not
# import trl. The calls, on the four pairs below (lengths = response tokens):
# * "dpo": DPOTrainer._compute_loss(stub, stub_model, inputs, return_outputs=False), loss_type="sigmoid",
#   f_divergence_type="reverse_kl", precompute_ref_logps=True, ld_alpha=None, use_weighting=False; the stub
#   model returns per-token log-probs spread evenly over each response's completion_mask, summing to
#   POLICY_*; ref_chosen_logps / ref_rejected_logps = REF_*. Aux from its metrics rewards/chosen,
#   rewards/rejected, rewards/margins, rewards/accuracies.
# * "cdpo": TRL 1.16's DPOTrainer "sigmoid" ignores label_smoothing (it reads it only for "robust",
#   "exo_pair", "aot"), so cDPO's values come from CPOTrainer.cpo_loss(stub, π_c − ref_c, π_r − ref_r)
#   with loss_type="sigmoid", alpha=0, label_smoothing=ε, .mean() — the cDPO formula on the log-ratios
#   — and agree (≤ 1e-15) with DPOTrainer loss_type="aot" called one pair at a time (no sorting at B=1).
# * "ipo": DPOTrainer._compute_loss as for "dpo", loss_type="ipo", beta = τ (it divides each log-ratio by
#   completion_mask.sum(1), i.e. LEN_*).
# * "simpo": CPOTrainer.cpo_loss(stub, POLICY_c / LEN_c, POLICY_r / LEN_r) with loss_type="simpo",
#   alpha=0, label_smoothing=0, simpo_gamma=γ, .mean(); rewards = its chosen/rejected_rewards means.
# * "orpo": ORPOTrainer.odds_ratio_loss(stub, POLICY_c / LEN_c, POLICY_r / LEN_r) with beta = λ, and
#   loss = nll − losses.mean() as in ORPOTrainer.get_batch_loss_metrics (it computes in float32).
POLICY_CHOSEN = [-12.5, -30.25, -7.0, -55.5]
POLICY_REJECTED = [-14.0, -28.0, -9.5, -50.0]
REF_CHOSEN = [-13.0, -29.0, -8.25, -52.0]
REF_REJECTED = [-13.5, -29.5, -8.0, -53.5]
LEN_CHOSEN = [10, 25, 6, 40]
LEN_REJECTED = [12, 20, 8, 35]
TRL_VALUES = [  # (name, hyperparameters, loss, {aux: value})
    ("dpo", dict(beta=0.1), 0.788181011084557,
     {"chosen_reward": -0.075, "rejected_reward": 0.075, "margin": -0.15, "accuracy": 0.5}),
    ("dpo", dict(beta=0.5), 1.457413176414,
     {"chosen_reward": -0.375, "rejected_reward": 0.375, "margin": -0.75, "accuracy": 0.5}),
    ("cdpo", dict(beta=0.1, label_smoothing=0.1), 0.773181011084557, {}),
    ("cdpo", dict(beta=0.5, label_smoothing=0.3), 1.23241317641401, {}),
    ("cdpo", dict(beta=0.1, label_smoothing=0.5), 0.713181011084557, {}),
    ("ipo", dict(tau=0.1), 24.6164670138889, {}),
    ("ipo", dict(tau=0.5), 0.966467013888889, {}),
    ("simpo", dict(beta=2.0, gamma=1.0), 1.2562664740125,
     {"chosen_reward": -2.50708333333333, "rejected_reward": -2.59136904761905}),
    ("simpo", dict(beta=2.5, gamma=1.375), 1.52239769225901,
     {"chosen_reward": -3.13385416666667, "rejected_reward": -3.23921130952381}),
    ("simpo", dict(beta=10.0, gamma=0.5), 0.844019045668571,
     {"chosen_reward": -12.5354166666667, "rejected_reward": -12.9568452380952}),
    ("orpo", dict(lam=0.1, nll_chosen=1.25), 1.31675080955029, {"margin": 0.0566457360982895}),
    ("orpo", dict(lam=1.0, nll_chosen=0.5), 1.16750812530518, {"margin": 0.0566457360982895}),
]


@pytest.mark.parametrize("name, hyperparameters, trl_loss, trl_aux", TRL_VALUES)
def test_matches_trl_loss_values(x64, name, hyperparameters, trl_loss, trl_aux):
    data = {"policy_chosen": POLICY_CHOSEN, "policy_rejected": POLICY_REJECTED, "ref_chosen": REF_CHOSEN,
            "ref_rejected": REF_REJECTED, "len_chosen": LEN_CHOSEN, "len_rejected": LEN_REJECTED}
    kwargs = dict(hyperparameters)
    if "nll_chosen" in kwargs:
        data["nll_chosen"] = kwargs.pop("nll_chosen")  # a scalar, as TRL's token-mean NLL
    entry = PREFERENCE_LOSSES[name]
    loss, aux = entry.fn(**{k: jnp.asarray(data[k], jnp.float64) for k in entry.inputs}, **kwargs)
    np.testing.assert_allclose(float(loss), trl_loss, rtol=1e-6, atol=1e-6)
    for key, value in trl_aux.items():
        np.testing.assert_allclose(float(aux[key]), value, rtol=1e-6, atol=1e-6, err_msg=key)
