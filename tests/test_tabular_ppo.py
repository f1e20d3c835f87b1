"""End-to-end smoke of the RL math: tabular PPO learns, the KL penalty holds it back, configs validate."""

from __future__ import annotations

import dataclasses

import pytest

from jaxppo.config import load_config
from jaxppo.tabular_ppo import TabularPPOConfig, train


def quiet(_):
    pass


def test_ppo_raises_gold_score_and_kl_penalty_limits_drift():
    base = TabularPPOConfig(iterations=31, kl_target=None)
    free = train(dataclasses.replace(base, kl_coef=0.0), log=quiet)
    anchored = train(dataclasses.replace(base, kl_coef=0.1), log=quiet)
    assert free[0]["score"] < 0.25  # near-uniform start over 8 tokens
    assert free[-1]["score"] > 0.9  # no KL penalty: the policy collapses onto the target token
    assert free[-1]["kl"] > anchored[-1]["kl"] > 0.1
    assert free[0]["score"] + 0.1 < anchored[-1]["score"] < free[-1]["score"]


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="`target_token`"):
        TabularPPOConfig(target_token=8)
    with pytest.raises(ValueError, match="`lam`"):
        TabularPPOConfig(lam=1.5)
    for field, value in (("learning_rate", float("inf")), ("learning_rate", 1e30), ("vf_coef", -5.0),
                         ("clip_eps", float("nan")), ("entropy_coef", -0.1), ("kl_horizon", 0.0), ("seed", 2**32)):
        with pytest.raises(ValueError, match=f"config field `{field}`"):
            TabularPPOConfig(**{field: value})
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'lr': 1}\n")
    with pytest.raises(ValueError, match="frozen dataclass"):
        load_config(bad)
    with pytest.raises(FileNotFoundError, match="missing.py"):
        load_config(tmp_path / "missing.py")
    assert isinstance(load_config("configs/tabular.py"), TabularPPOConfig)
