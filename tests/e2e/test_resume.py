"""Checkpoints and resume: kill -9 mid-run, re-run the same command, get the uninterrupted run exactly.

Runs ``configs/tiny.py`` as subprocesses (the way a user runs it), so every run pays JAX start-up
and compilation; the whole module takes about a minute or two on 2 cores.
"""

from __future__ import annotations

import atexit
import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from jaxppo.logging import read_metrics

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "tiny.py")
pytestmark = pytest.mark.slow  # subprocess runs of configs/tiny.py


# Every run here is the same config: one persistent compilation cache for the module's runs compiles
# each program once instead of in all six runs (configs/tiny.py: 46 s -> 29 s a run, identical results).
CACHE = tempfile.mkdtemp(prefix="jaxppo-resume-jit-cache-")
atexit.register(shutil.rmtree, CACHE, ignore_errors=True)
ENV = {**os.environ, "JAX_COMPILATION_CACHE_DIR": CACHE, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def command(run_dir: Path, *overrides: str) -> list[str]:
    cmd = [sys.executable, "-m", "experiments.run", "--config", CONFIG, "--run-dir", str(run_dir)]
    return cmd + (["--set", *overrides] if overrides else [])


def run(run_dir: Path, *overrides: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(command(run_dir, *overrides), cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=600,
                          check=check)


def run_and_kill(run_dir: Path, until, timeout: float = 300) -> None:
    """Start the run, ``kill -9`` it as soon as ``until(rows)`` holds for its metrics.jsonl rows."""
    proc = subprocess.Popen(command(run_dir), cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            path = run_dir / "metrics.jsonl"
            if path.exists() and until(read_metrics(path)):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                raise AssertionError("the run finished before the kill point")
            time.sleep(0.05)
        raise AssertionError("kill point not reached in time")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def stage_rows(rows, stage):
    return [r for r in rows if r["stage"] == stage]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run(run_dir)
    return run_dir


def final_params(run_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run_dir / "actor_hf" / "model.safetensors")


def test_kill_9_twice_then_resume_reproduces_the_uninterrupted_run(uninterrupted, tmp_path):
    run_dir = tmp_path / "killed"
    # 1st kill: in the reward-model stage, after its first checkpoint (step 50) was written
    run_and_kill(run_dir, lambda rows: any(r["stage"] == "reward_model" and r["step"] >= 100 for r in rows))
    assert (run_dir / "checkpoints" / "reward_model").exists()
    # 2nd kill: mid-PPO (checkpoints every 2 iterations; the one at 4 holds the reward model refreshed
    # online at iteration 2), plus a torn save left behind as by a kill during a save
    run_and_kill(run_dir, lambda rows: len(stage_rows(rows, "ppo")) >= 5)
    ppo_dir = run_dir / "checkpoints" / "ppo"
    assert max(int(p.name) for p in ppo_dir.iterdir() if p.name.isdigit()) >= 4
    torn = ppo_dir / "6.orbax-checkpoint-tmp-1234567890"
    torn.mkdir(parents=True)
    (torn / "actor").mkdir()
    (torn / "actor" / "partial").write_bytes(b"\0" * 10)
    result = run(run_dir)
    assert "resumed from" in result.stdout

    expected, got = read_metrics(uninterrupted / "metrics.jsonl"), read_metrics(run_dir / "metrics.jsonl")
    assert [(r["stage"], r["step"]) for r in got] == [(r["stage"], r["step"]) for r in expected]
    assert got == expected  # every metric of every row, bit for bit (CPU is deterministic)
    summary_a = json.loads((uninterrupted / "summary.json").read_text())
    summary_b = json.loads((run_dir / "summary.json").read_text())
    summary_a.pop("wall_seconds"), summary_b.pop("wall_seconds"), summary_a.pop("actor_hf"), summary_b.pop("actor_hf")
    assert summary_a == summary_b
    params_a, params_b = final_params(uninterrupted), final_params(run_dir)
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        np.testing.assert_array_equal(params_a[name], params_b[name], err_msg=name)


def test_finished_run_rerun_is_a_no_op_and_another_config_is_refused(uninterrupted):
    before = (uninterrupted / "metrics.jsonl").read_text()
    run(uninterrupted)  # everything done: restores, re-evaluates, rewrites the same summary
    rows = read_metrics(uninterrupted / "metrics.jsonl")
    assert [r for r in rows if r["stage"] != "eval"] == [r for r in read_metrics_text(before) if r["stage"] != "eval"]
    result = run(uninterrupted, "ppo.kl_coef=0.2", check=False)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {uninterrupted / 'config.json'}: this run directory was started with another "
                           "config") and "ppo.kl_coef" in line


def read_metrics_text(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_a_resume_whose_metrics_file_is_lost_warns_and_finishes(uninterrupted, tmp_path):
    """Before: it trained, exported, then crashed drawing the SFT plot; summary.json was never written
    and every rerun crashed the same way. Plots never fail a run."""
    run_dir = tmp_path / "lost"
    shutil.copytree(uninterrupted, run_dir, ignore=shutil.ignore_patterns(".lock"))
    (run_dir / "metrics.jsonl").unlink()
    (run_dir / "summary.json").unlink()
    result = run(run_dir)
    assert f"{run_dir / 'metrics.jsonl'}: missing, but the run resumes from checkpoints" in result.stderr
    assert "sft.png: not drawn" in result.stderr  # no SFT rows left to draw
    summary = json.loads((run_dir / "summary.json").read_text())
    expected = json.loads((uninterrupted / "summary.json").read_text())
    assert summary["final_gold_reward"] == expected["final_gold_reward"]
    assert [r["stage"] for r in read_metrics(run_dir / "metrics.jsonl")] == ["eval", "eval"]
