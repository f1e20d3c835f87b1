"""Config validation: settings that cannot run fail before any compute, naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from jaxppo.pipeline_config import PipelineConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig
from tiny import MODEL, PPO, TASK


def test_reward_model_check_fails_on_mismatched_config():
    with pytest.raises(ValueError, match="ppo.minibatches"):
        PPOConfig(batch_size=10, minibatches=4)
    with pytest.raises(ValueError, match="model.vocab_size"):
        PipelineConfig(model=dataclasses.replace(MODEL, vocab_size=99), task=TASK,
                       ppo=dataclasses.replace(PPO, max_new_tokens=TASK.max_response_tokens))


def test_configs_that_cannot_fit_fail_before_any_compute():
    with pytest.raises(ValueError, match="ppo.minibatches"):
        PPOConfig(batch_size=64, minibatches=3)
    with pytest.raises(ValueError, match="ppo.micro_batches"):
        PPOConfig(batch_size=64, minibatches=4, micro_batches=3)
    with pytest.raises(ValueError, match="sft.micro_batches"):
        SFTConfig(batch_size=10, micro_batches=4)
    long_task = dataclasses.replace(TASK, max_response_tokens=40, demo_max_words=4)
    with pytest.raises(ValueError, match=r"task.max_response_tokens.*exceed the model's context of 32"):
        PipelineConfig(model=MODEL, task=long_task, ppo=dataclasses.replace(PPO, max_new_tokens=40))
    with pytest.raises(ValueError, match="sft.steps"):
        PipelineConfig(model=MODEL, task=TASK, ppo=PPO, sft=SFTConfig(steps=0))


def test_ptx_on_a_text_task_without_demonstrations_is_a_config_error(tmp_path):
    from jaxppo.tasks import TextTaskConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "hi"}\n')
    task = TextTaskConfig(prompts=str(prompts), max_prompt_tokens=8, max_response_tokens=4)
    with pytest.raises(ValueError, match="ppo.ptx_coef"):
        PipelineConfig(model=MODEL, task=task, pretrained="smollm2", sft=SFTConfig(steps=0),
                       ppo=dataclasses.replace(PPO, max_new_tokens=4, ptx_coef=0.1))


def test_dpo_configs_that_cannot_run_name_the_field():
    from jaxppo.config import ConfigError
    from jaxppo.pipeline_config import DPOConfig, RewardModelConfig
    from tiny import tiny_config

    config = tiny_config()
    for bad, field in ((dict(loss="kto"), "dpo.loss"), (dict(beta=0.0), "dpo.beta"),
                       (dict(label_smoothing=0.6), "dpo.label_smoothing"), (dict(online_label="human"), "dpo.online_label"),
                       (dict(batch_size=10, micro_batches=4), "dpo.micro_batches")):
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            DPOConfig(**bad)
    cases = {"method": dict(method="kto"),
             "reward_functions": dict(method="dpo", reward_functions=("gold",)),
             "reward_model.objective": dict(method="dpo", reward_model=RewardModelConfig(objective="plackett_luce")),
             "reward_model.online_every": dict(method="dpo", reward_model=RewardModelConfig(online_every=5))}
    for field, change in cases.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            dataclasses.replace(config, **change)
    assert DPOConfig(loss="simpo").needs_reference is False and DPOConfig(loss="ipo").needs_reference is True
