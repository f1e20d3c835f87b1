"""PPO on a tabular token policy: the RL math end to end, in seconds (no model).

Run:  python -m experiments.run --config configs/tabular.py
"""

from jaxppo.tabular_ppo import TabularPPOConfig


def get_config() -> TabularPPOConfig:
    return TabularPPOConfig()
