"""PPOConfig: the KL estimator is resolved from where the KL goes, and k1 / abs are refused as a loss."""

from __future__ import annotations

import dataclasses

import pytest

from jaxppo.ppo_config import PPOConfig


def test_kl_estimator_default_follows_kl_in_reward():
    assert PPOConfig().kl_estimator == "k1"  # in the reward: k1 is the unbiased per-token KL
    loss_mode = PPOConfig(kl_in_reward=False)
    assert loss_mode.kl_estimator == "k3"  # as a loss: k3, whose expected gradient is KL-like
    assert dataclasses.asdict(loss_mode)["kl_estimator"] == "k3"  # the saved config shows what ran
    assert PPOConfig(kl_in_reward=False, kl_estimator="k2").kl_estimator == "k2"
    assert PPOConfig(kl_estimator="k3").kl_estimator == "k3"


@pytest.mark.parametrize("estimator", ["k1", "abs"])
def test_kl_estimators_without_a_kl_gradient_are_refused_as_a_loss(estimator):
    with pytest.raises(ValueError, match=r"config field `ppo\.kl_estimator`.*'k3' or 'k2'"):
        PPOConfig(kl_in_reward=False, kl_estimator=estimator)
    # replace() carries the resolved value: switching a k1 config to loss mode asks for an estimator
    with pytest.raises(ValueError, match=r"`ppo\.kl_estimator`"):
        dataclasses.replace(PPOConfig(kl_estimator=estimator), kl_in_reward=False)
    assert dataclasses.replace(PPOConfig(), kl_in_reward=False, kl_estimator=None).kl_estimator == "k3"
