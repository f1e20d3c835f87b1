"""RunLogger: metrics.jsonl rows, read_metrics, TensorBoard events, plots and JSON files."""

from __future__ import annotations

import json
import math

import jax.numpy as jnp
import numpy as np
import pytest

from conftest import tensorboard_scalars
from jaxppo.logging import RunLogger, read_metrics

STAGES = ("sft", "reward", "ppo")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _strict_loads(line: str):
    """json.loads that rejects NaN/Infinity tokens: the files must be strict JSON."""

    def reject(token):
        raise AssertionError(f"non-standard JSON constant {token}")

    return json.loads(line, parse_constant=reject)


def _metrics(stage_idx: int, step: int) -> dict:
    return {
        "loss": 1.0 / (step + 1) + stage_idx,  # Python float
        "lr": np.float32(3e-4 * (step + 1)),  # numpy scalar
        "kl": jnp.asarray(0.01 * step, dtype=jnp.float32),  # jax scalar
        "tokens": np.int64(128 * step),  # numpy integer
        "grad_norm": jnp.asarray(float("nan")) if step == 1 else np.asarray(0.5),  # 0-d arrays
    }


def _fill(run: RunLogger, steps: int = 3) -> list[dict]:
    """Log STAGES x steps and return the rows ``log`` returned, with stage and step added."""
    expected = []
    for s, stage in enumerate(STAGES):
        for step in range(steps):
            row = run.log(stage, step, _metrics(s, step))
            assert all(type(v) is float for v in row.values())
            expected.append({"stage": stage, "step": step, **row})
    return expected


def _as_json(row: dict) -> dict:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def test_log_rows_roundtrip(tmp_path):
    echoed = []
    run_dir = tmp_path / "runs" / "nested" / "r1"  # parents are created
    with RunLogger(run_dir, echo=echoed.append) as run:
        expected = _fill(run)
        row = run.log("ppo", 99, {"reward": float("inf"), "flag": True})
    assert row == {"reward": math.inf, "flag": 1.0}
    expected.append({"stage": "ppo", "step": 99, **row})

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(expected) == 3 * 3 + 1
    parsed = [_strict_loads(line) for line in lines]
    assert parsed == [_as_json(r) for r in expected]
    assert parsed[1]["grad_norm"] is None  # NaN -> null
    assert parsed[-1]["reward"] is None  # inf -> null
    assert parsed[1]["lr"] == float(np.float32(6e-4))
    assert list(parsed[0]) == ["stage", "step", "loss", "lr", "kl", "tokens", "grad_norm"]
    assert read_metrics(run_dir / "metrics.jsonl") == parsed
    assert len(echoed) == len(expected) and echoed[0].startswith("[sft] step 0:")


def test_read_metrics_truncated_and_malformed(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [{"stage": "sft", "step": i, "loss": 1.0 / (i + 1)} for i in range(3)]
    whole = "".join(json.dumps(r) + "\n" for r in good)
    path.write_text(whole + '{"stage": "sft", "step": 3, "lo')  # killed mid-write
    assert read_metrics(path) == good
    path.write_text(whole + "\n\n")  # blank lines are fine
    assert read_metrics(path) == good
    path.write_text(whole.rstrip("\n"))  # whole last object without its newline is kept
    assert read_metrics(path) == good

    lines = whole.splitlines()
    path.write_text("\n".join([lines[0], '{"stage": "sft", "st', lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)
    path.write_text("\n".join([lines[0], "[1, 2]", lines[2]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics\.jsonl:2"):
        read_metrics(path)


def test_reopen_cuts_partial_tail_and_appends(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        run.log("sft", 0, {"loss": 2.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"stage": "sft", "step": 1, "lo')  # a killed run's partial line
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        run.log("sft", 1, {"loss": 1.0})
    assert read_metrics(tmp_path / "metrics.jsonl") == [
        {"stage": "sft", "step": 0, "loss": 2.0},
        {"stage": "sft", "step": 1, "loss": 1.0},
    ]


def test_tensorboard_events(tmp_path):
    with RunLogger(tmp_path, echo=None) as run:
        expected = _fill(run)
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1

    scalars = tensorboard_scalars(tmp_path / "tensorboard")
    for row in expected:
        for key, v in row.items():
            if key in ("stage", "step"):
                continue
            got = scalars[(f"{row['stage']}/{key}", row["step"])]
            assert (math.isnan(got) and math.isnan(v)) or got == pytest.approx(v, rel=1e-6)
    tags = {tag for tag, _ in scalars}
    assert tags == {f"{s}/{k}" for s in STAGES for k in ("loss", "lr", "kl", "tokens", "grad_norm")}


def test_plot_png(tmp_path):
    import matplotlib
    import matplotlib.image

    backend = matplotlib.get_backend()
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        _fill(run, steps=5)
        run.log("ppo", 5, {"loss": 0.1})  # row without the other keys
        path = run.plot(
            "ppo",
            ["loss", "kl", "grad_norm"],
            filename="plots/ppo.png",
            title="PPO",
            ylabel_by_key={"kl": "KL(policy || ref)"},
        )
        with pytest.raises(ValueError, match="nope"):
            run.plot("nope", ["loss"], filename="x.png")
    assert path == tmp_path / "plots" / "ppo.png"
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300
    assert image.std() > 0.01  # not a blank canvas
    assert matplotlib.get_backend() == backend  # the user's backend is left alone
    assert not list(tmp_path.glob("**/*.tmp"))


def test_non_scalar_metric_raises(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        with pytest.raises(ValueError, match="per_token_kl"):
            run.log("ppo", 0, {"loss": 1.0, "per_token_kl": np.ones(3)})
        with pytest.raises(ValueError, match="logits"):
            run.log("ppo", 0, {"logits": jnp.ones((2, 2))})
        with pytest.raises(ValueError, match="name"):
            run.log("ppo", 0, {"name": "not a number"})
        with pytest.raises(ValueError, match="step"):
            run.log("ppo", 0, {"step": 1.0})  # reserved
        run.log("ppo", 1, {"loss": 0.5})
    # failed calls wrote nothing
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"stage": "ppo", "step": 1, "loss": 0.5}]


def test_write_json(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        data = {
            "lr": 1e-5,
            "bad": float("nan"),
            "inf": [1.0, float("-inf")],
            "np": {"i": np.int32(3), "f": np.float32(0.5), "arr": np.arange(3)},
            "jax": jnp.asarray(2.0),
            "name": "ppo",
            "flag": True,
            "none": None,
        }
        path = run.write_json("config.json", data)
        run.write_json("config.json", {"overwritten": 1})
        path2 = run.write_json("eval/summary.json", data)
    assert path == tmp_path / "config.json"
    assert _strict_loads(path.read_text()) == {"overwritten": 1}
    text = path2.read_text()
    assert "\n  " in text  # pretty-printed
    assert _strict_loads(text) == {
        "lr": 1e-5,
        "bad": None,
        "inf": [1.0, None],
        "np": {"i": 3, "f": 0.5, "arr": [0, 1, 2]},
        "jax": 2.0,
        "name": "ppo",
        "flag": True,
        "none": None,
    }
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_progress(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, echo=None) as run:
        bar = run.progress(range(4), desc="rollouts")
        assert sum(bar) == 6
        bar = run.progress(3, desc="ppo")
        assert bar.total == 3
        for _ in range(3):
            bar.set_postfix(loss=0.5, kl=0.01)
            bar.update()
        bar.close()
        assert bar.n == 3


def test_wandb_rows_mirror_metrics_jsonl(tmp_path, monkeypatch):
    """With ``wandb_project`` set, every row also goes to W&B (a recording stand-in for the package)."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("wandb")

    class Run:
        def log(self, data):
            calls.append(("log", data))

        def finish(self):
            calls.append(("finish",))

    def init(**kwargs):
        calls.append(("init", kwargs))
        return Run()

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    with RunLogger(tmp_path, echo=None, tensorboard=False, wandb_project="proj",
                   wandb_config={"ppo": {"kl_coef": 0.1}}) as run:
        run.log("ppo", 3, {"kl": 0.5, "gold_reward": 1.0})
    assert calls[0][0] == "init" and calls[0][1]["project"] == "proj"
    assert calls[0][1]["config"] == {"ppo": {"kl_coef": 0.1}}
    assert calls[1] == ("log", {"ppo/kl": 0.5, "ppo/gold_reward": 1.0, "ppo/step": 3})
    assert calls[-1] == ("finish",)


def test_wandb_missing_is_one_clear_error(tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    with pytest.raises(ValueError, match="wandb_project.*pip install wandb"):
        RunLogger(tmp_path, echo=None, tensorboard=False, wandb_project="proj")
