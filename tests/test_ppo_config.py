"""PPOConfig: the KL estimator is resolved from where the KL goes, and k1 / abs are refused as a loss."""

from __future__ import annotations

import dataclasses

import pytest

from jaxppo.ppo_config import PPOConfig


def test_kl_estimator_default_follows_kl_in_reward():
    assert PPOConfig().kl_penalty_estimator == "k1"  # in the reward: k1 is the unbiased per-token KL
    loss_mode = PPOConfig(kl_in_reward=False)
    assert loss_mode.kl_estimator is None and loss_mode.kl_penalty_estimator == "k3"  # as a loss: k3
    assert PPOConfig(kl_in_reward=False, kl_estimator="k2").kl_penalty_estimator == "k2"
    assert PPOConfig(kl_estimator="k3").kl_penalty_estimator == "k3"
    # switching a default config to loss mode (`--set ppo.kl_in_reward=false`) gets k3, not a refused k1
    assert dataclasses.replace(PPOConfig(), kl_in_reward=False).kl_penalty_estimator == "k3"


def test_the_saved_config_shows_the_estimator_that_ran():
    from jaxppo.pipeline_config import PipelineConfig
    from tiny import MODEL, PPO, TASK

    config = PipelineConfig(model=MODEL, task=TASK, ppo=dataclasses.replace(PPO, kl_in_reward=False))
    resolved = config.resolved(stop_token_ids=(2,), pad_token_id=0)
    assert dataclasses.asdict(resolved)["ppo"]["kl_estimator"] == "k3"
    assert resolved.ppo.stop_token_ids == PPO.stop_token_ids  # set explicitly: kept


@pytest.mark.parametrize("estimator", ["k1", "abs"])
def test_kl_estimators_without_a_kl_gradient_are_refused_as_a_loss(estimator):
    with pytest.raises(ValueError, match=r"config field `ppo\.kl_estimator`.*'k3' or 'k2'"):
        PPOConfig(kl_in_reward=False, kl_estimator=estimator)
    # an explicit k1 / abs stays explicit: switching it to loss mode is refused
    with pytest.raises(ValueError, match=r"`ppo\.kl_estimator`"):
        dataclasses.replace(PPOConfig(kl_estimator=estimator), kl_in_reward=False)
