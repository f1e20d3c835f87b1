"""Memory of one PPO iteration with four roles: full fine-tuning against LoRA (rank 16) against QLoRA, one run.

    python -m experiments.bench_memory [--out FILE.json] [--largest 360m 1.7b] [--skip-largest]

The work is ``experiments/bench.py``'s PPO iteration (16 prompts × 64 tokens, 64 new tokens at
temperature 0.7, actor + separate critic initialised from the reward model + frozen reference +
frozen reward model, one epoch of one minibatch, ``model.remat`` with the ``"dots"`` policy, fp32),
as one fused XLA program (:func:`jaxppo.ppo.make_iteration`), on random weights of the SmolLM2 shapes:

* ``full``: every role its own copy of the weights; actor and critic with AdamW moments;
* ``lora``: one frozen base (:class:`jaxppo.ppo.FrozenRoles`), LoRA rank 16 on q/k/v/o/gate/up/down
  for the actor, the critic and the reward model (the reference is the base);
* ``qlora``: ``lora`` with the base stored in NF4 (:mod:`jaxppo.quant`), dequantised per layer.

Each (mode, shape) runs in its own process. Measured:

* **XLA peak bytes** (the figure the goal compares, the same measure for all three): of the
  compiled iteration program, ``arguments + outputs − aliased (donated) + temporaries`` from
  ``compiled.memory_analysis()`` — every buffer the program holds at once at most (the roles, the
  optimizer states, the KV cache and activations), as XLA plans it; independent of the host.
* **peak RSS** of the process that ran two iterations (compilation included), and seconds per
  iteration (the second one).

``--largest`` names SmolLM2 shapes for which the LoRA iteration runs (the largest that fits this
machine's 24 GiB is the point), and full fine-tuning where ``--full-largest`` lists the shape. The
JSON (``--out``) has ``full_peak_bytes``, ``lora_peak_bytes``, ``qlora_peak_bytes`` (XLA peak bytes
at 135M), ``lora_over_full``, and every row under ``rows``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from experiments.bench import bench_ppo_config
from experiments.bench_sampling import write_json
from experiments.peer import peak_rss_mib

RANK, ALPHA, BATCH, PROMPT = 16, 32.0, 16, 64
# SmolLM2 shapes (the Hugging Face configs of HuggingFaceTB/SmolLM2-{135M,360M,1.7B}-Instruct)
SHAPES = {
    "135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3),
    "360m": dict(hidden_size=960, intermediate_size=2560, num_layers=32, num_heads=15, num_kv_heads=5),
    "1.7b": dict(hidden_size=2048, intermediate_size=8192, num_layers=24, num_heads=32, num_kv_heads=32),
}
MODES = ("full", "lora", "qlora")


def model_config(shape: str, mode: str):
    from jaxppo.lora import scaling
    from jaxppo.models.config import ModelConfig

    dims = SHAPES[shape]
    return ModelConfig(vocab_size=49152, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
                       tie_word_embeddings=True, remat=True, remat_policy="dots",
                       lora_scale=None if mode == "full" else scaling(rank=RANK, alpha=ALPHA), **dims)


def roles(config, mode: str, key):
    """``(sft params, reward params)`` of a mode: the reward model is the trunk + a head (full) or
    adapters + a head on the (quantised) base."""
    from jaxppo.lora import init_adapters
    from jaxppo.models.heads import init_params, init_scalar_head
    from jaxppo.quant import quantize_params

    params = init_params(config, key)
    head = init_scalar_head(config, jax.random.fold_in(key, 1), "reward_head")
    if mode == "full":
        return params, {**{k: v for k, v in params.items() if k != "lm_head"}, "reward_head": head}
    if mode == "qlora":
        params = quantize_params(config, params, kind="nf4")
    lora = init_adapters(config, jax.random.fold_in(key, 2), rank=RANK)
    return params, {**params, "lora": lora, "reward_head": head}


def child(mode: str, shape: str, run: bool, micro_batches: int) -> dict:
    """One (mode, shape): the compiled iteration's memory analysis and, with ``run``, two iterations."""
    from jaxppo.ppo import init_ppo, make_iteration
    from jaxppo.sharding import MeshConfig, make_mesh

    config = model_config(shape, mode)
    ppo = dataclasses.replace(bench_ppo_config(epochs=1, iterations=2, plain=False), critic_init="reward_model",
                              micro_batches=micro_batches, score_micro_batches=micro_batches)
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])

    key = jax.random.key(0)
    sft, reward = jax.jit(lambda key: roles(config, mode, key))(key)
    state, frozen = init_ppo(config, ppo, mesh, sft_params=sft, reward_params=reward, key=jax.random.fold_in(key, 3),
                             lora_rank=0 if mode == "full" else RANK)
    del sft, reward  # the roles hold what they need (full: their own copies; LoRA: the one base)

    prompt = jax.random.randint(jax.random.key(4), (1, BATCH, PROMPT), 1, config.vocab_size)
    mask = jnp.ones_like(prompt)
    keys = jax.random.split(jax.random.key(5), 2)[:, None]
    iterate = make_iteration(config, ppo)
    start = time.perf_counter()
    compiled = iterate.lower(state, frozen, prompt, mask, keys[0], keys[1]).compile()
    analysis = compiled.memory_analysis()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    row = {
        "mode": mode, "shape": shape, "num_params": config.num_params,
        "xla_peak_bytes": analysis.argument_size_in_bytes + analysis.output_size_in_bytes
        - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes,
        "xla_argument_bytes": analysis.argument_size_in_bytes, "xla_temp_bytes": analysis.temp_size_in_bytes,
        "xla_output_bytes": analysis.output_size_in_bytes, "xla_alias_bytes": analysis.alias_size_in_bytes,
        "trained_bytes": nbytes(state), "frozen_bytes": nbytes(frozen), "compile_seconds": time.perf_counter() - start,
    }
    if run:
        times = []
        for k in range(2):
            start = time.perf_counter()
            state, _, metrics = compiled(state, frozen, prompt, mask, keys[k], keys[k])
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
        row.update(seconds_per_iteration=times[-1], first_seconds=times[0], peak_rss_bytes=peak_rss_mib() * 2**20,
                   kl=float(metrics["kl"][0]))
    return row


def run_child(mode: str, shape: str, micro_batches: int, run: bool = True) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [sys.executable, "-m", "experiments.bench_memory", "--child", mode, shape, "--out", f.name,
               "--micro-batches", str(micro_batches)]
        proc = subprocess.run(cmd + ([] if run else ["--compile-only"]), capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"mode": mode, "shape": shape, "error": proc.stderr.strip().splitlines()[-1:] or ["killed"],
                    "returncode": proc.returncode}
        return json.loads(open(f.name).read())


def gib(x) -> str:
    return "—" if x is None else f"{x / 2**30:.2f}"


def print_table(rows: list[dict]) -> None:
    print(f"\n{'shape':>6} {'mode':>6} {'params':>8} {'XLA peak GiB':>13} {'trained GiB':>12} {'frozen GiB':>11} "
          f"{'peak RSS GiB':>13} {'s/iteration':>12}")
    for r in rows:
        if "error" in r:
            print(f"{r['shape']:>6} {r['mode']:>6}  failed: {r['error']}")
            continue
        seconds = r.get("seconds_per_iteration")
        print(f"{r['shape']:>6} {r['mode']:>6} {r['num_params'] / 1e6:>7.0f}M {gib(r['xla_peak_bytes']):>13} "
              f"{gib(r['trained_bytes']):>12} {gib(r['frozen_bytes']):>11} {gib(r.get('peak_rss_bytes')):>13} "
              f"{'—' if seconds is None else f'{seconds:.1f}':>12}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="write the figures as JSON here")
    parser.add_argument("--largest", nargs="*", default=["360m", "1.7b"], choices=[s for s in SHAPES if s != "135m"])
    parser.add_argument("--skip-largest", action="store_true")
    parser.add_argument("--micro-batches", type=int, default=4,
                        help="ppo.micro_batches and ppo.score_micro_batches (the same for every mode)")
    parser.add_argument("--full-largest", nargs="*", default=["360m"], help="shapes of --largest to run in full too")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "SHAPE"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        write_json(args.out, child(*args.child, run=not args.compile_only, micro_batches=args.micro_batches))
        return {}
    rows = [run_child(mode, "135m", args.micro_batches) for mode in MODES]
    for shape in [] if args.skip_largest else args.largest:
        if shape in args.full_largest:
            rows.append(run_child("full", shape, args.micro_batches))
        rows.append(run_child("lora", shape, args.micro_batches))
    print_table(rows)
    at_135m = {r["mode"]: r for r in rows if r["shape"] == "135m" and "error" not in r}
    result = {f"{mode}_peak_bytes": at_135m[mode]["xla_peak_bytes"] for mode in at_135m}
    if "full" in at_135m and "lora" in at_135m:
        result["lora_over_full"] = at_135m["lora"]["xla_peak_bytes"] / at_135m["full"]["xla_peak_bytes"]
        print(f"\nLoRA / full fine-tuning, XLA peak bytes at 135M: {result['lora_over_full']:.1%} (goal ≤ 40%)")
    result.update(measure="XLA peak bytes of the compiled iteration: arguments + outputs - donated aliases + temporaries",
                  rows=rows, machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    if args.out:
        write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
