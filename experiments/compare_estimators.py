"""PPO against the critic-free family on the embedded verifiable task, same sample budget, several seeds.

    python -m experiments.compare_estimators [--seeds 0 1 2] [--iterations 150] [--out DIR]

For each seed: SFT once (``configs/verifiable.py``: 2-digit addition from demonstrations of which
half are wrong), then from the same SFT policy each estimator below for the same number of
iterations of the same number of sampled responses (``ppo.batch_size × ppo.iterations``), scored by
the exact-match verifier (no reward model), one epoch of two minibatches per batch. Prints one
table — held-out accuracy (sampled at temperature 1, and greedy) mean ± spread over seeds, RL wall
seconds, and the XLA memory of one iteration's program (arguments + temporaries: the state, the
batch and the activations; from the compiled program's memory analysis) — and writes
``DIR/estimators.png`` (training-batch accuracy against RL wall time, mean over seeds) and
``DIR/estimators.json``. Runs one after another on this machine: wall times include whatever else
runs beside it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxppo.config import load_config
from jaxppo.logging import RunLogger
from jaxppo.pipeline import evaluate, open_run, ppo_stage, sft_stage
from jaxppo.pipeline.ppo import iteration_prompts, reward_score_fn
from jaxppo.ppo import init_ppo, make_iteration

ROOT = Path(__file__).resolve().parents[1]

# estimator → overrides of configs/verifiable.py's ppo section (GRPO, 8 samples per prompt, k3 KL loss β = 0.01)
ESTIMATORS = {
    "ppo": dict(estimator="gae", group_size=1, critic="separate", critic_init="sft", critic_learning_rate=1e-3,
                vf_coef=0.5, kl_in_reward=True, kl_estimator="k1"),
    "grpo": dict(),
    "dr_grpo": dict(estimator="dr_grpo", aggregation="seq-mean-token-sum-norm"),
    "rloo": dict(estimator="rloo"),
    "reinforce++": dict(estimator="reinforce++", group_size=1, kl_in_reward=True, kl_estimator="k1"),
    "reinforce++_baseline": dict(estimator="reinforce++_baseline", kl_in_reward=True, kl_estimator="k1"),
    "gspo": dict(policy_loss="gspo", clip_eps=3e-4, clip_eps_high=4e-4),
    "dapo": dict(dynamic_sampling=True, clip_eps_high=0.28, kl_coef=0.0),
}


def base_config(seed: int, iterations: int):
    config = load_config(ROOT / "configs" / "verifiable.py")
    return dataclasses.replace(config, seed=seed, export_hf=False, num_samples=0,
                               ppo=dataclasses.replace(config.ppo, iterations=iterations),
                               checkpoint=dataclasses.replace(config.checkpoint, enabled=False))


class TimedLogger(RunLogger):
    """A run logger whose RL rows also hold the seconds since it was made (for the accuracy-vs-time plot)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = time.perf_counter()

    def log(self, stage, step, metrics):
        if stage == "ppo":
            metrics = {**metrics, "elapsed_seconds": time.perf_counter() - self.start}
        return super().log(stage, step, metrics)


def iteration_bytes(ctx, sft_params) -> int:
    """Argument + temporary bytes of the compiled one-iteration program (XLA's memory analysis)."""
    c, ppo = ctx.config, ctx.config.ppo
    state, frozen = init_ppo(c.model, ppo, ctx.mesh, sft_params=sft_params, reward_params=None,
                             key=ctx.key("value-head"))
    prompts = iteration_prompts(ctx, 0)
    keys = jnp.stack([ctx.key("ppo-sample", 0)])
    iterate = make_iteration(c.model, ppo, score_fn=reward_score_fn(ctx), gold_fn=ctx.task.gold_fn)
    stats = iterate.lower(state, frozen, prompts[0][None], prompts[1][None], keys, keys).compile().memory_analysis()
    return int(stats.argument_size_in_bytes + stats.temp_size_in_bytes)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--estimators", nargs="+", default=list(ESTIMATORS), choices=list(ESTIMATORS))
    parser.add_argument("--out", default="runs/compare_estimators")
    args = parser.parse_args(argv)
    out = Path(args.out)
    results = {name: {"final": [], "final_greedy": [], "seconds": [], "curves": []} for name in args.estimators}
    sft_results, memory = [], {}
    for seed in args.seeds:
        config = base_config(seed, args.iterations)
        with open_run(config, out / f"seed{seed}" / "sft") as (ctx, _):
            sft_params = sft_stage(ctx, None)
            sft_eval = evaluate(ctx, sft_params)
        sft_results.append(sft_eval)
        print(f"seed {seed}: SFT held-out accuracy {sft_eval['accuracy']:.3f} (greedy {sft_eval['greedy_accuracy']:.3f})")
        for name in args.estimators:
            run_config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, **ESTIMATORS[name]))
            run_dir = out / f"seed{seed}" / name
            with open_run(run_config, run_dir) as (ctx, _):
                if name not in memory:
                    memory[name] = iteration_bytes(ctx, sft_params)
                with TimedLogger(run_dir / "timed", echo=None) as logger:
                    start = time.perf_counter()
                    params, _ = ppo_stage(dataclasses.replace(ctx, logger=logger), sft_params, None)
                    seconds = time.perf_counter() - start
                rows = [json.loads(line) for line in (run_dir / "timed" / "metrics.jsonl").read_text().splitlines()]
                final = evaluate(ctx, params, i=1)
            r = results[name]
            r["final"].append(final["accuracy"])
            r["final_greedy"].append(final["greedy_accuracy"])
            r["seconds"].append(seconds)
            r["curves"].append([(row["elapsed_seconds"], row["gold_reward"], row["iteration"]) for row in rows
                                if row["stage"] == "ppo"])
            print(f"seed {seed}: {name}: held-out accuracy {final['accuracy']:.3f} (greedy "
                  f"{final['greedy_accuracy']:.3f}) in {seconds:.0f} s")
    summary = {"seeds": args.seeds, "iterations": args.iterations, "sft_accuracy": [s["accuracy"] for s in sft_results],
               "sft_greedy_accuracy": [s["greedy_accuracy"] for s in sft_results],
               "estimators": {name: {**r, "iteration_bytes": memory[name]} for name, r in results.items()}}
    out.mkdir(parents=True, exist_ok=True)
    (out / "estimators.json").write_text(json.dumps(summary, indent=2))
    print_table(summary)
    plot(summary, out / "estimators.png")
    return summary


def _mean_spread(values) -> str:
    values = np.asarray(values)
    return f"{values.mean():.3f} ± {(values.max() - values.min()) / 2:.3f}"


def print_table(summary: dict) -> None:
    sft = summary["sft_accuracy"]
    print(f"\nSFT policy: held-out accuracy {_mean_spread(sft)} sampled, "
          f"{_mean_spread(summary['sft_greedy_accuracy'])} greedy (seeds {summary['seeds']}; ± half the range)\n")
    print("| estimator | held-out accuracy (sampled) | greedy | gap closed | RL wall s | iteration memory MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in summary["estimators"].items():
        gap = np.mean([(f - s) / max(1 - s, 1e-9) for f, s in zip(r["final"], sft)])
        print(f"| {name} | {_mean_spread(r['final'])} | {_mean_spread(r['final_greedy'])} | {gap:.0%} | "
              f"{np.mean(r['seconds']):.0f} | {r['iteration_bytes'] / 2**20:.1f} |")


def plot(summary: dict, path: Path) -> None:
    """Training-batch accuracy (sampled) against RL wall seconds (compilation included) and against
    iterations (the sample budget), mean over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for name, r in summary["estimators"].items():
        curves = [np.asarray(c) for c in r["curves"]]
        n = min(len(c) for c in curves)
        mean = np.mean([c[:n] for c in curves], axis=0)
        axes[0].plot(mean[:, 0], mean[:, 1], label=name)
        axes[1].plot(mean[:, 2], mean[:, 1], label=name)
    for ax, label in zip(axes, ("RL wall seconds (compilation included)", "iteration (128 sampled responses each)")):
        ax.axhline(np.mean(summary["sft_accuracy"]), color="gray", ls=":", label="SFT (held-out)")
        ax.set_xlabel(label)
    axes[0].set_ylabel("accuracy of the training batch (sampled)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"Estimators on 2-digit addition, mean of seeds {summary['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
