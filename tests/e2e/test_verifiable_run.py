"""The verifiable pipeline end to end on a tiny config: SFT, then GRPO on the exact-match verifier."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments.run import run_pipeline
from jaxppo.addition_task import EOS, PAD, AdditionTaskConfig
from jaxppo.models.config import ModelConfig
from jaxppo.pipeline_config import CheckpointConfig, PipelineConfig, SFTConfig
from jaxppo.ppo_config import PPOConfig

pytestmark = pytest.mark.slow

TASK = AdditionTaskConfig(digits=1, demo_error_prob=0.5)
MODEL = ModelConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_position_embeddings=16, tie_word_embeddings=True)


def test_a_grpo_run_scores_with_the_verifier_and_builds_no_critic(tmp_path):
    ppo = PPOConfig(estimator="grpo", group_size=4, batch_size=16, minibatches=2, epochs=1, iterations=3,
                    max_new_tokens=TASK.max_response_tokens, stop_token_ids=(EOS,), pad_token_id=PAD,
                    kl_in_reward=False, kl_coef=0.01, learning_rate=1e-3)
    config = PipelineConfig(model=MODEL, task=TASK, sft=SFTConfig(steps=20, batch_size=32, warmup_steps=2), ppo=ppo,
                            reward_functions=("exact_match", "format"), reward_weights=(1.0, 0.1),
                            checkpoint=CheckpointConfig(every_iterations=2), eval_batch_size=64, export_hf=False)
    summary = run_pipeline(config, tmp_path)
    for name in ("sft_accuracy", "final_accuracy", "sft_greedy_accuracy", "final_greedy_accuracy", "wall_seconds"):
        assert 0 <= summary[name] <= (1 if "accuracy" in name else 1e9), name
    assert summary["reward_model"] is None and summary["estimator"] == "grpo"
    assert summary["final_accuracy"] == summary["final_gold_reward"]
    assert not (tmp_path / "checkpoints" / "reward_model").exists() or not any(
        (tmp_path / "checkpoints" / "reward_model").iterdir())  # no reward model was trained
    saved = json.loads((tmp_path / "config.json").read_text())["ppo"]
    assert saved["whiten_advantages"] is False and saved["reference_model"] is True  # resolved defaults
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ppo_rows = [r for r in rows if r["stage"] == "ppo"]
    assert [r["iteration"] for r in ppo_rows] == [0, 1, 2]
    for r in ppo_rows:  # each reward function logged by name; the score is their weighted sum
        assert r["score"] == pytest.approx(r["reward_exact_match"] + 0.1 * r["reward_format"] - (1 - r["stopped_fraction"]),
                                           abs=1e-5)
        assert "value_loss" not in r and "critic_grad_norm" not in r
    # the checkpoint holds no critic
    ppo_dir = tmp_path / "checkpoints" / "ppo"
    last = max(int(p.name) for p in ppo_dir.iterdir() if p.name.isdigit())
    items = {p.name for p in (ppo_dir / str(last)).iterdir()}
    assert "actor" in items and "critic" not in items, items
    # resuming the finished run changes nothing and trains nothing again
    again = run_pipeline(config, tmp_path)
    assert again["final_accuracy"] == summary["final_accuracy"]


def test_the_verifiable_config_loads_and_validates():
    from jaxppo.config import load_config

    config = load_config(str(Path(__file__).resolve().parents[2] / "configs" / "verifiable.py"))
    assert config.ppo.estimator == "grpo" and config.reward_functions == ("exact_match",)
    assert dataclasses.replace(config.ppo, estimator="rloo").critic_role == "none"
