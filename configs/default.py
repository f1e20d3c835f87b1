"""Default experiment: PPO on a tabular token policy (the RL math end to end, in seconds).

Run:  python -m experiments.run --config configs/default.py
"""

from jaxppo.tabular_ppo import TabularPPOConfig


def get_config() -> TabularPPOConfig:
    return TabularPPOConfig()
