"""Slot-refill decoding (jaxppo.engine) gives the static sampler's samples, token for token.

Randomness is keyed per request and per position, so a request's tokens and log-probs do not
depend on the slot or the step that decodes it: for every slot count (1, fewer than the requests,
all of them, more), greedy and at temperature with top-k/top-p, with stop tokens hit at varied
positions and per-request length caps (0, short, full), the engine equals
:func:`jaxppo.sampling.sample` on the same prompts and key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import count_traces
from jaxppo.engine import generate, make_generator
from jaxppo.models import chosen_logprobs, decoder_hidden
from jaxppo.sampling import SamplingParams, sample
from tiny import SAMPLER_MODEL, peaky_params

CONFIG = SAMPLER_MODEL
V, P, N, R = CONFIG.vocab_size, 9, 14, 23  # vocabulary, prompt width, max new tokens, requests
SAMPLINGS = {
    "greedy": SamplingParams(max_new_tokens=N, temperature=0.0, stop_token_ids=(7,)),
    "temperature": SamplingParams(max_new_tokens=N, temperature=1.0, stop_token_ids=(7, 11)),
    "top-k-top-p": SamplingParams(max_new_tokens=N, temperature=1.3, top_k=9, top_p=0.8, stop_token_ids=(5,),
                                  pad_token_id=3),
}


@pytest.fixture(scope="module")
def params():
    return peaky_params(CONFIG)


@pytest.fixture(scope="module")
def requests():
    """``R`` left-padded prompts of mixed lengths (one all padding but its last token) and length caps
    from 0 to ``N``."""
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, V, size=(R, P))
    mask = np.ones_like(tokens)
    for row in range(R):
        pad = int(rng.integers(0, P))
        mask[row, :pad] = 0
        tokens[row, :pad] = 0
    caps = rng.integers(1, N + 1, size=R)
    caps[rng.random(R) < 0.4] = N
    caps[[2, 9]] = 0, N
    return jnp.asarray(tokens), jnp.asarray(mask), jnp.asarray(caps)


@pytest.fixture(scope="module")
def static(params, requests):
    tokens, mask, caps = requests
    return {name: jax.jit(lambda p, t, m, k, c, s=s: sample(CONFIG, p, t, m, k, sampling=s, max_lengths=c))(
        params, tokens, mask, jax.random.key(3), caps) for name, s in SAMPLINGS.items()}


def run_engine(params, requests, sampling, slots, **kwargs):
    tokens, mask, caps = requests
    return make_generator(CONFIG, sampling, slots=slots, **kwargs)(params, tokens, mask, jax.random.key(3),
                                                                   max_lengths=caps)


# widths: one slot, an odd width (compaction 7 → 3 → 1), a queue of 4 slots, no queue (R, 2R), top-k/top-p
@pytest.mark.parametrize(("name", "slots"), [("greedy", 1), ("greedy", 7), ("temperature", 4), ("temperature", R),
                                            ("temperature", 2 * R), ("top-k-top-p", 5)])
def test_engine_equals_static_sampler(params, requests, static, name, slots):
    ref = static[name]
    out, stats = run_engine(params, requests, SAMPLINGS[name], slots)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.mask, ref.mask)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=2e-5)
    lengths, caps = np.asarray(ref.mask).sum(1), np.asarray(requests[2])
    stopped = np.any(np.isin(np.asarray(ref.tokens), SAMPLINGS[name].stop_token_ids) & (np.asarray(ref.mask) > 0), 1)
    # the workload is what it claims: stops at varied positions, caps reached, an empty request
    assert len(set(lengths[stopped])) >= 3 and np.sum(~stopped & (lengths == caps) & (caps > 0)) >= 3
    assert lengths[2] == 0 and np.all(lengths <= caps)
    assert int(stats.useful_tokens) == lengths.sum()
    width = min(slots, R)
    assert int(stats.refills) == R - width  # every queued request took a slot once
    assert int(stats.steps) <= int(stats.slot_steps) <= width * int(stats.steps)


def test_refill_keeps_slots_busy(params, requests):
    """With a queue, every decoded row emits a token until the queue runs dry: utilisation near 1,
    and the drain's compaction keeps the tail cheap, where the static batch decodes dead rows."""
    out, stats = run_engine(params, requests, SAMPLINGS["temperature"], 4)
    lengths = np.asarray(out.mask).sum(1)
    assert float(stats.utilisation) > 0.9
    static_rows = sum(4 * lengths[i:i + 4].max() for i in range(0, R, 4))  # static batches of 4, in turn
    assert int(stats.slot_steps) < static_rows
    no_compaction = run_engine(params, requests, SAMPLINGS["temperature"], 4, min_slots=4)[1]
    assert int(no_compaction.slot_steps) == 4 * int(no_compaction.steps) > int(stats.slot_steps)
    assert int(no_compaction.useful_tokens) == int(stats.useful_tokens)


def test_samples_are_keyed_by_request_not_row(params, requests):
    """Permuting the requests (with their ids) permutes the results: the engine and the static sampler
    draw a request's tokens from its own key whatever row or slot it occupies."""
    tokens, mask, caps = requests
    order = np.random.default_rng(1).permutation(R)
    sampling = SAMPLINGS["temperature"]
    ids = jnp.asarray(order, jnp.int32)
    base = sample(CONFIG, params, tokens, mask, jax.random.key(3), sampling=sampling, max_lengths=caps)
    moved = sample(CONFIG, params, tokens[order], mask[order], jax.random.key(3), sampling=sampling,
                   request_ids=ids, max_lengths=caps[order])
    engine, _ = generate(CONFIG, params, tokens[order], mask[order], jax.random.key(3), sampling=sampling, slots=5,
                         request_ids=ids, max_lengths=caps[order])
    for out in (moved, engine):
        np.testing.assert_array_equal(out.tokens, np.asarray(base.tokens)[order])
        np.testing.assert_allclose(out.logprobs, np.asarray(base.logprobs)[order], atol=2e-5)


def test_engine_logprobs_equal_a_forward_pass(params, requests):
    tokens, mask, caps = requests
    out, _ = run_engine(params, requests, SAMPLINGS["top-k-top-p"], 5)
    full = jnp.concatenate([tokens, out.tokens], axis=1)
    full_mask = jnp.concatenate([mask, out.mask.astype(jnp.int32)], axis=1)
    hidden, _ = decoder_hidden(CONFIG, params, full, full_mask)
    expected = chosen_logprobs(CONFIG, params, hidden[:, P - 1:-1], out.tokens, temperature=1.3)
    valid = np.asarray(out.mask) > 0
    np.testing.assert_allclose(np.asarray(out.logprobs)[valid], np.asarray(expected)[valid], atol=1e-4)
    assert np.all(np.asarray(out.logprobs)[~valid] == 0) and np.all(np.asarray(out.tokens)[~valid] == 3)


def test_engine_traced_once_and_checks_shapes(params, requests):
    tokens, mask, caps = requests
    sampling = SAMPLINGS["temperature"]
    jitted, calls = count_traces(lambda p, t, m, k: generate(CONFIG, p, t, m, k, sampling=sampling, slots=4))
    for seed in range(3):
        jax.block_until_ready(jitted(params, tokens, mask, jax.random.key(seed)))
    assert calls["traces"] == 1
    with pytest.raises(ValueError, match="`max_lengths` must have shape"):
        generate(CONFIG, params, tokens, mask, jax.random.key(0), sampling=sampling, slots=4, max_lengths=caps[:3])
    for bad in (tokens[0], tokens[None]):  # [P] and [1, B, P]: one error naming the argument, in both samplers
        for fn in (lambda: generate(CONFIG, params, bad, jnp.ones_like(bad), jax.random.key(0), sampling=sampling,
                                    slots=4),
                   lambda: sample(CONFIG, params, bad, jnp.ones_like(bad), jax.random.key(0), sampling=sampling)):
            with pytest.raises(ValueError, match="`prompt_tokens` \\[B, P\\]"):
                fn()
    with pytest.raises(ValueError, match="`slots`"):
        generate(CONFIG, params, tokens, mask, jax.random.key(0), sampling=sampling, slots=0)
