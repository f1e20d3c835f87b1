"""What a host reward function costs: the same GRPO iterations scored inside the program or on the host.

    python -m experiments.bench_rewards [--repeats 5] [--out FILE.json]

``configs/verifiable.py``'s model and GRPO settings (128 responses per iteration, random init: the
timing does not depend on the weights), one fused iteration per call, scored either by
``exact_match`` (a jittable function of token ids, traced into the program) or by
``exact_match_text`` (the same check on decoded text, a host function reached through
``jax.pure_callback``: the program stops, the ids go to the host, are decoded and scored, and the
scores come back). The two are timed interleaved, median of ``--repeats`` calls each after a
warm-up, and the table gives seconds per iteration, the difference and the ratio. The host
function's own time (decode + verify of 128 responses, outside any program) is timed too.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from pathlib import Path

import jax
import numpy as np

from jaxppo import addition_task as at
from jaxppo.config import load_config
from jaxppo.models.heads import init_params
from jaxppo.ppo import init_ppo, make_iteration
from jaxppo.rewards import RewardFunction, make_score_fn
from jaxppo.rollout import group_prompts
from jaxppo.sharding import MeshConfig, make_mesh
from jaxppo.tasks import ADDITION_CODEC

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    config = load_config(ROOT / "configs" / "verifiable.py")
    task, model, ppo = config.task, config.model, config.ppo
    mesh = make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    codec = ADDITION_CODEC
    kinds = {"in-program (jittable)": RewardFunction(functools.partial(at.exact_match, task)),
             "host (pure_callback)": RewardFunction(at.exact_match_text, host=True)}
    params = init_params(model, jax.random.key(0))
    prompts = group_prompts(*at.sample_prompts(task, jax.random.key(1), ppo.prompts_per_batch), group_size=ppo.group_size)
    prompts = jax.tree.map(lambda x: x[None], prompts)
    keys = jax.random.split(jax.random.key(2), 1)
    runs = {}
    for name, fn in kinds.items():
        iterate = make_iteration(model, ppo, score_fn=make_score_fn({"exact_match": fn}, codec=codec))
        state, frozen = init_ppo(model, ppo, mesh, sft_params=params, reward_params=None, key=jax.random.key(3))
        state, _, metrics = iterate(state, frozen, *prompts, keys, keys)  # compile + warm-up
        jax.block_until_ready(metrics)
        runs[name] = {"iterate": iterate, "state": state, "frozen": frozen, "times": []}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits both alike
        for name, r in runs.items():
            start = time.perf_counter()
            r["state"], _, metrics = r["iterate"](r["state"], r["frozen"], *prompts, keys, keys)
            jax.block_until_ready(metrics)
            r["times"].append(time.perf_counter() - start)
    # the host function alone: decode + verify one batch of responses
    response, response_mask = at.demonstrations(task, jax.random.key(4), prompts[0][0], prompts[1][0])
    host_args = [np.asarray(x) for x in (prompts[0][0], prompts[1][0], response, response_mask)]
    host_times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        at.exact_match_text(codec.decode(*host_args[:2]), codec.decode(*host_args[2:]))
        host_times.append(time.perf_counter() - start)
    result = {name: statistics.median(r["times"]) for name, r in runs.items()}
    jit_s, host_s = result["in-program (jittable)"], result["host (pure_callback)"]
    summary = {"jit_seconds_per_iteration": jit_s, "host_seconds_per_iteration": host_s,
               "host_minus_jit_seconds": host_s - jit_s, "host_over_jit": host_s / jit_s,
               "host_function_seconds": statistics.median(host_times), "responses_per_iteration": ppo.batch_size,
               "device": str(jax.devices()[0])}
    print(f"\n{ppo.batch_size} responses per iteration, {ppo.estimator}, median of {args.repeats} interleaved calls\n")
    print("| reward | s / iteration |")
    print("|---|---|")
    for name, seconds in result.items():
        print(f"| {name} | {seconds:.3f} |")
    print(f"\nhost − in-program: {host_s - jit_s:+.3f} s per iteration ({host_s / jit_s:.2f}×); the host function "
          f"itself (decode + verify {ppo.batch_size} responses): {summary['host_function_seconds'] * 1e3:.1f} ms")
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
