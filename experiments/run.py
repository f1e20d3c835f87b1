"""Main job: ``python -m experiments.run --config configs/<x>.py``.

Kept thin on purpose: parse the command line, load the config, call the library.
"""

from __future__ import annotations

import argparse
import time

from jaxppo.config import load_config
from jaxppo.tabular_ppo import TabularPPOConfig, train


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="configs/default.py", help="config file defining get_config()")
    args = parser.parse_args(argv)
    config = load_config(args.config)
    if not isinstance(config, TabularPPOConfig):
        raise SystemExit(f"{args.config}: this version of experiments.run runs TabularPPOConfig only")
    print(f"jaxppo: tabular PPO check of the RL math ({args.config})")
    start = time.perf_counter()
    history = train(config)
    first, last = history[0], history[-1]
    print(f"gold score {first['score']:.3f} -> {last['score']:.3f} (optimum 1.0) with sequence KL "
          f"{last['kl']:.3f} to the reference, in {time.perf_counter() - start:.1f}s")


if __name__ == "__main__":
    main()
