"""Main job: ``python -m experiments.run [--config configs/<x>.py] [--run-dir DIR]``.

Kept thin on purpose: parse the command line, load the config, call the library.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from jaxppo.config import load_config
from jaxppo.pipeline_config import PipelineConfig
from jaxppo.tabular_ppo import TabularPPOConfig, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.py", help="config file defining get_config()")
    parser.add_argument("--run-dir", default=None, help="output directory (default: a fresh folder under runs/)")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if isinstance(config, TabularPPOConfig):
        history = train(config)
        print(f"gold score {history[0]['score']:.3f} -> {history[-1]['score']:.3f} (optimum 1.0)")
        return
    if not isinstance(config, PipelineConfig):
        raise SystemExit(f"{args.config}: get_config() returned {type(config).__name__}, which experiments.run cannot run")
    from jaxppo.train import run_pipeline  # heavy imports only for the pipeline

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    run_dir = Path(args.run_dir or f"runs/{Path(args.config).stem}-{stamp}")
    print(f"jaxppo: SFT -> reward model -> PPO ({args.config}); writing {run_dir}")
    summary = run_pipeline(config, run_dir)
    print(json.dumps(summary, indent=2))
    print(f"metrics: {run_dir / 'metrics.jsonl'}   plot: {run_dir / 'ppo.png'}   "
          f"tensorboard: {run_dir / 'tensorboard'}   summary: {run_dir / 'summary.json'}")


if __name__ == "__main__":
    main()
