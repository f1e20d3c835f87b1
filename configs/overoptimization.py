"""Over-optimisation: the default pipeline with a *fixed* reward model and the KL penalty off.

Run:  python -m experiments.run --config configs/overoptimization.py

PPO optimises the reward model trained once on SFT samples (no online refreshes), with no KL anchor
to the SFT policy: the proxy reward keeps rising while the hidden gold reward peaks and then falls
(the policy drifts to responses the reward model never saw, such as repeated liked words). Compare
``--set ppo.kl_coef=0.1`` (the KL anchor holds the policy where the fixed reward model is right)
and the default config (online refreshes correct the reward model where the policy goes).
"""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("jaxppo_default_config", Path(__file__).with_name("default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config():
    import dataclasses

    # β = 0 builds no reference unless asked: the reference stays, to measure the KL the policy drifts to
    config = _default.get_config(kl_coef=0.0, reference_model=True)
    return dataclasses.replace(config, reward_model=dataclasses.replace(config.reward_model, online_every=0))
