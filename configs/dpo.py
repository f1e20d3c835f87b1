"""SFT then DPO on the embedded task: the policy learns directly from the preference pairs an RL run's
reward model would train on (the same labelled samples of the SFT policy), with the SFT policy as the
frozen reference.

Run:  python -m experiments.run --config configs/dpo.py
      python -m experiments.run --config configs/dpo.py --set dpo.loss=ipo      (cdpo, ipo, simpo, orpo)
      python -m experiments.run --config configs/dpo.py --set dpo.online_every=50   (online DPO, gold oracle)

The model, task, SFT and preference data are ``configs/default.py``'s, so ``summary.json``'s gold rewards
compare with the PPO run's; ``experiments/compare_methods.py`` runs the whole family beside PPO.
"""

import dataclasses
import importlib.util
from pathlib import Path

from jaxppo.pipeline_config import DPOConfig, PipelineConfig

_spec = importlib.util.spec_from_file_location("jaxppo_default_config", Path(__file__).with_name("default.py"))
_default = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_default)


def get_config(**dpo) -> PipelineConfig:
    config = _default.get_config()
    dpo = DPOConfig(**{"loss": "dpo", "beta": 0.1, "steps": 300, "batch_size": 64, "learning_rate": 1e-3,
                       "warmup_steps": 10, **dpo})
    # no online reward-model refreshes: they belong to PPO
    reward_model = dataclasses.replace(config.reward_model, online_every=0)
    return dataclasses.replace(config, method="dpo", dpo=dpo, reward_model=reward_model)
