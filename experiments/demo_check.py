"""Checks the embedded demo's RLHF picture end to end (minutes; not a test, it trains for real).

Run:  python -m experiments.demo_check [--seeds 0 1 2] [--run-root runs/demo_check]

* ``configs/default.py`` (one run per seed): PPO must close at least half of the gap between the
  SFT policy's gold reward and the best achievable one.
* ``configs/overoptimization.py`` (seed 0): a fixed reward model without the KL anchor must show
  over-optimisation: the proxy reward ends higher than where the gold reward peaked, while the
  gold reward ends clearly below its peak.

Prints a table and exits non-zero when a goal is missed.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import numpy as np

from jaxppo.config import load_config
from jaxppo.logging import read_metrics
from experiments.run import run_pipeline

ROOT = Path(__file__).resolve().parent.parent
WINDOW = 25  # PPO iterations averaged for the peak / final gold and proxy rewards of a curve


def _smoothed(rows: list[dict], key: str) -> np.ndarray:
    values = np.array([r[key] for r in rows], np.float64)
    return np.convolve(values, np.ones(WINDOW) / WINDOW, mode="valid")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--run-root", default="runs/demo_check")
    args = parser.parse_args(argv)
    root = Path(args.run_root)
    ok = True

    print(f"{'run':<22}{'SFT gold':>10}{'final gold':>12}{'optimal':>9}{'gap closed':>12}{'wall s':>8}")
    for seed in args.seeds:
        config = dataclasses.replace(load_config(ROOT / "configs" / "default.py"), seed=seed)
        s = run_pipeline(config, root / f"default_seed{seed}")
        ok &= s["gap_closed"] >= 0.5
        print(f"{f'default seed {seed}':<22}{s['sft_gold_reward']:>10.2f}{s['final_gold_reward']:>12.2f}"
              f"{s['optimal_gold_reward']:>9.1f}{s['gap_closed']:>12.0%}{s['wall_seconds']:>8.0f}")

    run_dir = root / "overoptimization"
    s = run_pipeline(load_config(ROOT / "configs" / "overoptimization.py"), run_dir)
    ppo = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "ppo"]
    gold, proxy = _smoothed(ppo, "gold_reward"), _smoothed(ppo, "proxy_reward")
    # over-optimisation: from some point i to a later point j the proxy rises while the gold falls
    gold_drop = gold[:, None] - gold[None, :]  # [i, j]: gold_i − gold_j
    later_and_proxy_up = np.triu(proxy[None, :] > proxy[:, None], 1)
    i, j = np.unravel_index(np.argmax(np.where(later_and_proxy_up, gold_drop, -np.inf)), gold_drop.shape)
    over = bool(later_and_proxy_up[i, j]) and gold_drop[i, j] > 0.25
    ok &= over
    it = lambda k: k + WINDOW - 1  # noqa: E731  (the last iteration of window k)
    print(f"\nover-optimisation (fixed reward model, KL off; {WINDOW}-iteration means):")
    print(f"  gold : start {gold[0]:.2f}  peak {gold.max():.2f} (iteration {it(int(np.argmax(gold)))})  end {gold[-1]:.2f}")
    print(f"  proxy: start {proxy[0]:.2f}  end {proxy[-1]:.2f}")
    print(f"  largest gold fall while the proxy rose: iteration {it(i)} -> {it(j)}: gold {gold[i]:.2f} -> "
          f"{gold[j]:.2f}, proxy {proxy[i]:.2f} -> {proxy[j]:.2f}")
    print(f"  KL at end {ppo[-1]['kl']:.1f} nats; wall {s['wall_seconds']:.0f} s; "
          f"{'shown' if over else 'NOT shown'}")
    print("\nall goals met" if ok else "\nGOAL MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
