"""SFT, the DPO family and PPO on the same preference data of the embedded task: gold reward against KL.

Run:  python -m experiments.compare_methods [--seeds 0 1 2] [--out runs/compare_methods] [--quick]

Per seed, one SFT policy (``configs/default.py``'s) is trained once; from it every method runs with the
same model, task and seed, so the offline methods see the *same* labelled pairs (the reward model's
preference data: 8,192 prompts, two SFT samples each, Bradley–Terry labels of the hidden gold reward):

* ``sft``: the SFT policy itself;
* ``dpo`` (β = 0.1), ``cdpo`` (β = 0.1, ε = 0.1), ``ipo`` (τ = 0.1), ``simpo`` (β = 2, γ = 1), ``orpo``
  (λ = 0.1): ``configs/dpo.py`` (300 steps of 64 pairs, learning rate 1e-3) with that loss;
* ``online-dpo``: DPO on labelled SFT samples of 4,097 prompts (its own draw, half the budget), then
  three rounds of 1,365 prompts whose two samples of the current policy are labelled by the gold reward
  with the same noise (the oracle setting), every 75 steps: the same 8,192-prompt labelling budget;
* ``ppo-fixed-rm``: PPO (``configs/default.py``) against a reward model trained once on the same
  pairs (the same budget);
* ``ppo-online-rm``: today's default, PPO with the reward model refreshed on 1,024 labelled prompts of
  the policy every 25 iterations (15 refreshes: 23,552 labelled prompts, ~3x the budget).

Each row reports the held-out gold reward of the final policy's samples and KL(π ‖ π_SFT) per response on
those samples (:func:`jaxppo.pipeline.context.sequence_kl`). Writes ``results.json``, ``table.md`` and
``gold_vs_kl.png`` (every method's seeds and mean) under ``--out``; ``--quick`` runs one seed with
short stages, a smoke test of the script.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from jaxppo.cli import apply_overrides
from jaxppo.config import load_config
from jaxppo.logging import RunLogger

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 8192  # labelled prompts of every budget-matched method
DPO_METHODS = {
    "dpo": dict(loss="dpo", beta=0.1),
    "cdpo": dict(loss="cdpo", beta=0.1, label_smoothing=0.1),
    "ipo": dict(loss="ipo", tau=0.1),
    "simpo": dict(loss="simpo", beta=2.0, gamma=1.0),
    "orpo": dict(loss="orpo", lam=0.1),
    "online-dpo": dict(loss="dpo", beta=0.1, online_every=75, online_prompts=1365, online_label="gold"),
}
PPO_METHODS = ("ppo-fixed-rm", "ppo-online-rm")
METHODS = ("sft", *DPO_METHODS, *PPO_METHODS)


def method_configs(seed: int, quick: bool) -> dict:
    """Every method's pipeline config for ``seed`` (checkpoints off: one process trains them in turn)."""
    off = ["checkpoint.enabled=false", f"seed={seed}"]
    dpo_base = apply_overrides(load_config(ROOT / "configs" / "dpo.py"), off)
    ppo = apply_overrides(load_config(ROOT / "configs" / "default.py"), off)
    configs = {}
    for name, fields in DPO_METHODS.items():
        fields = dict(fields)
        rm = dpo_base.reward_model
        if fields.get("online_every"):  # half the budget offline, the rest in the online rounds
            rm = dataclasses.replace(rm, num_prompts=BUDGET - 3 * fields["online_prompts"])
        configs[name] = dataclasses.replace(dpo_base, dpo=dataclasses.replace(dpo_base.dpo, **fields), reward_model=rm)
    configs["ppo-fixed-rm"] = dataclasses.replace(ppo, reward_model=dataclasses.replace(ppo.reward_model, online_every=0))
    configs["ppo-online-rm"] = ppo
    if quick:
        for name, c in configs.items():
            rm = dataclasses.replace(c.reward_model, num_prompts=min(c.reward_model.num_prompts, 1024), steps=100,
                                     online_prompts=256, online_steps=20)
            dpo = dataclasses.replace(c.dpo, steps=60, online_every=20 if c.dpo.online_every else 0, online_prompts=128)
            ppo_c = dataclasses.replace(c.ppo, iterations=20)
            configs[name] = dataclasses.replace(c, reward_model=rm, dpo=dpo, ppo=ppo_c,
                                                sft=dataclasses.replace(c.sft, steps=100))
    return configs


def labels_used(name: str, config) -> int:
    """Prompts whose samples were labelled (the preference budget a method spent)."""
    rm = config.reward_model
    if name == "sft":
        return 0
    if name.startswith("ppo"):
        refreshes = (config.ppo.iterations - 1) // rm.online_every if rm.online_every else 0
        return rm.num_prompts + refreshes * rm.online_prompts
    rounds = (config.dpo.steps - 1) // config.dpo.online_every if config.dpo.online_every else 0
    return rm.num_prompts + rounds * config.dpo.online_prompts


def run_seed(seed: int, out: Path, quick: bool) -> list[dict]:
    from jaxppo.pipeline import dpo_stage, evaluate, open_run, ppo_stage, reward_model_stage, sft_stage

    configs = method_configs(seed, quick)
    results = []
    with open_run(configs["dpo"], out / f"seed{seed}") as (ctx, pretrained):
        start = time.perf_counter()
        sft = sft_stage(ctx, pretrained)
        row = {"method": "sft", "seed": seed, **evaluate(ctx, sft, reference=sft), "labels": 0,
               "seconds": time.perf_counter() - start}
        results.append(row)
        print(json.dumps(row), flush=True)
        for name, config in configs.items():
            start = time.perf_counter()
            resolved = config.resolved(stop_token_ids=ctx.task.stop_token_ids, pad_token_id=ctx.task.pad_token_id)
            with RunLogger(out / f"seed{seed}" / name, echo=None) as logger:
                mctx = dataclasses.replace(ctx, config=resolved, logger=logger)
                if name.startswith("ppo"):
                    final, _ = ppo_stage(mctx, sft, reward_model_stage(mctx, sft))
                else:
                    final = dpo_stage(mctx, sft)
                result = evaluate(mctx, final, i=1, reference=sft)
            row = {"method": name, "seed": seed, **result, "labels": labels_used(name, config),
                   "seconds": time.perf_counter() - start}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def summarise(results: list[dict], optimal: float) -> str:
    """The markdown table: per method, gold and KL per seed and their means."""
    lines = [f"| method | labelled prompts | gold reward (seeds {', '.join(str(s) for s in sorted({r['seed'] for r in results}))}) "
             f"| mean gold | KL to SFT (nats) | mean KL |", "|---|---|---|---|---|---|"]
    for method in METHODS:
        rows = sorted((r for r in results if r["method"] == method), key=lambda r: r["seed"])
        if not rows:
            continue
        gold, kl = [r["gold_reward"] for r in rows], [r["kl_to_sft"] for r in rows]
        lines.append(f"| {method} | {rows[0]['labels']:,} | {' / '.join(f'{g:.2f}' for g in gold)} | "
                     f"**{np.mean(gold):.2f}** | {' / '.join(f'{k:.1f}' for k in kl)} | {np.mean(kl):.1f} |")
    lines.append(f"\nBest possible gold reward: {optimal:.1f}.")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 5.0), layout="constrained")
    ax = fig.add_subplot()
    for i, method in enumerate(METHODS):
        rows = [r for r in results if r["method"] == method]
        if not rows:
            continue
        kl, gold = np.array([r["kl_to_sft"] for r in rows]), np.array([r["gold_reward"] for r in rows])
        color = f"C{i}"
        ax.scatter(kl, gold, color=color, alpha=0.35, s=18)
        ax.scatter([kl.mean()], [gold.mean()], color=color, s=70, marker="D", label=method, edgecolor="black")
    ax.set_xlabel("KL(π ‖ π_SFT) per response, nats (on the policy's samples)")
    ax.set_ylabel("held-out gold reward")
    ax.set_title("Same preference data: gold reward vs KL to SFT (diamonds: seed means)", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    FigureCanvasAgg(fig).print_png(str(path))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/compare_methods")
    parser.add_argument("--quick", action="store_true", help="one seed, short stages: a smoke test of the script")
    args = parser.parse_args(argv)
    out = Path(args.out)
    seeds = args.seeds[:1] if args.quick else args.seeds
    results = []
    for seed in seeds:
        results += run_seed(seed, out, args.quick)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    optimal = method_configs(seeds[0], args.quick)["dpo"].task.optimal_gold
    table = summarise(results, optimal)
    (out / "table.md").write_text(table + "\n")
    plot(results, out / "gold_vs_kl.png")
    print(table)
    print(f"results: {out / 'results.json'}   table: {out / 'table.md'}   plot: {out / 'gold_vs_kl.png'}")


if __name__ == "__main__":
    main()
