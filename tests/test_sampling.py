"""KV-cache sampler: log-probs equal a separate forward pass, per-row EOS, top-k = 1 is greedy, RNG."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_traces
from jaxppo.models import chosen_logprobs, decoder_hidden
from jaxppo.sampling import SamplingParams, filter_logits, make_sampler, sample
from tiny import SAMPLER_MODEL, peaky_params

CONFIG = SAMPLER_MODEL
V, P, N = CONFIG.vocab_size, 9, 14


@pytest.fixture(scope="module")
def params():
    return peaky_params(CONFIG)


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=(5, P))
    mask = np.ones_like(tokens)
    for row, pad in enumerate([0, 3, 8, 1, 5]):  # mixed lengths, left-padded
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


def forward_logprobs(params, prompts, out, temperature):
    """log π(a_t) of the sampled tokens from one forward pass over prompt + response."""
    tokens = jnp.concatenate([prompts[0], out.tokens], axis=1)
    mask = jnp.concatenate([prompts[1], out.mask.astype(jnp.int32)], axis=1)
    hidden, _ = decoder_hidden(CONFIG, params, tokens, mask)
    return chosen_logprobs(CONFIG, params, hidden[:, P - 1:-1], out.tokens, temperature=temperature)


@pytest.mark.parametrize("sampling", [
    SamplingParams(max_new_tokens=N, temperature=0.7),
    SamplingParams(max_new_tokens=N, temperature=1.3, top_k=5, top_p=0.8, stop_token_ids=(7,)),
    SamplingParams(max_new_tokens=N, temperature=0.0),
])
def test_sampler_logprobs_equal_a_forward_pass(params, prompts, sampling):
    out = make_sampler(CONFIG, sampling)(params, *prompts, jax.random.key(1))
    expected = forward_logprobs(params, prompts, out, sampling.temperature or 1.0)
    valid = np.asarray(out.mask) > 0
    assert valid.sum() > 20
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(expected)[valid], atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[~valid] == 0)


def test_eos_stops_rows_independently(params, prompts):
    free = make_sampler(CONFIG, SamplingParams(max_new_tokens=N, temperature=1.0))(params, *prompts, jax.random.key(2))
    free_tokens = np.asarray(free.tokens)
    stop = int(free_tokens[0, 3])  # a token row 0 emits at step 3; other rows may emit it elsewhere or never
    sampling = SamplingParams(max_new_tokens=N, temperature=1.0, stop_token_ids=(stop,), pad_token_id=0)
    out = make_sampler(CONFIG, sampling)(params, *prompts, jax.random.key(2))
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    lengths = []
    for row in range(tokens.shape[0]):
        hits = np.flatnonzero(free_tokens[row] == stop)
        length = hits[0] + 1 if hits.size else N  # the stop token itself is part of the response
        lengths.append(length)
        np.testing.assert_array_equal(tokens[row, :length], free_tokens[row, :length])
        np.testing.assert_array_equal(mask[row], np.arange(N) < length)
        assert np.all(tokens[row, length:] == 0)
    assert lengths[0] == 4 and len(set(lengths)) > 1


def test_top_k_one_is_greedy_and_keys_reproduce(params, prompts):
    greedy = make_sampler(CONFIG, SamplingParams(max_new_tokens=N, temperature=0.0))(params, *prompts, jax.random.key(0))
    top1 = make_sampler(CONFIG, SamplingParams(max_new_tokens=N, temperature=1.0, top_k=1))(params, *prompts, jax.random.key(5))
    np.testing.assert_array_equal(greedy.tokens, top1.tokens)
    np.testing.assert_allclose(greedy.logprobs, top1.logprobs, atol=1e-6)  # both at τ = 1
    sampler = make_sampler(CONFIG, SamplingParams(max_new_tokens=N, temperature=1.0))
    a, b = sampler(params, *prompts, jax.random.key(3)), sampler(params, *prompts, jax.random.key(3))
    c = sampler(params, *prompts, jax.random.key(4))
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert np.any(np.asarray(a.tokens) != np.asarray(c.tokens))


def test_filter_logits_matches_numpy():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(4, 12)).astype(np.float32)
    out = np.asarray(filter_logits(jnp.asarray(logits), top_k=0, top_p=0.6))
    for row, o in zip(logits, out):
        order = np.argsort(-row)
        p = np.exp(row[order] - row.max())
        p /= p.sum()
        keep = order[: np.searchsorted(np.cumsum(p), 0.6) + 1]  # smallest prefix with mass >= 0.6
        assert set(np.flatnonzero(o > -1e30)) == set(keep)
    out = np.asarray(filter_logits(jnp.asarray(logits), top_k=3))
    assert np.all((out > -1e30).sum(-1) == 3)


def test_sampler_traced_once_per_shape(params, prompts):
    sampling = SamplingParams(max_new_tokens=N, temperature=0.7)
    jitted, calls = count_traces(lambda p, t, m, k: sample(CONFIG, p, t, m, k, sampling=sampling))
    for seed in range(3):
        jax.block_until_ready(jitted(params, *prompts, jax.random.key(seed)))
    assert calls["traces"] == 1
    with pytest.raises(ValueError, match="`sampling.top_p`"):
        SamplingParams(top_p=0.0)
