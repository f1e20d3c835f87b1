"""A run directory you can trust: one process per directory, a config that ties the directory only
once its run started, and input errors as one line from the command line."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from jaxppo.config import to_json
from jaxppo.pipeline.context import LOCK_FILE, RunDirInUse, _check_run_config, lock_run_dir
from tiny import tiny_config

ROOT = Path(__file__).resolve().parent.parent


def cli(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "experiments.run", "--config", str(ROOT / "configs" / "tiny.py"),
           "--run-dir", str(run_dir), *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


def test_a_second_process_on_a_run_dir_stops_at_once_naming_the_holder(tmp_path):
    """Before: two processes on one --run-dir both ran to exit 0, each writing every metrics row."""
    run_dir = tmp_path / "run"
    with lock_run_dir(run_dir):
        holder = (run_dir / LOCK_FILE).read_text()
        assert f"process {os.getpid()} on " in holder
        with pytest.raises(RunDirInUse, match=f"{run_dir}: in use by process {os.getpid()} on "):
            with lock_run_dir(run_dir):
                pass
        result = cli(run_dir)  # the command line: one line naming the directory and the holder, no traceback
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [f"error: {run_dir}: in use by {holder.strip()}; one process per "
                                                     f"run directory (stop it, or use another --run-dir)"]
        assert not (run_dir / "metrics.jsonl").exists() and not (run_dir / "config.json").exists()
    with lock_run_dir(run_dir):  # released on exit
        pass


def test_a_lock_left_by_a_killed_process_does_not_block_a_resume(tmp_path):
    run_dir = tmp_path / "run"
    code = ("import sys, time; from pathlib import Path; from jaxppo.pipeline.context import lock_run_dir\n"
            "with lock_run_dir(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(600)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirInUse, match=f"process {proc.pid} on "):
            with lock_run_dir(run_dir):
                pass
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert (run_dir / LOCK_FILE).exists()  # the file stays; its lock went with the process
    with lock_run_dir(run_dir):
        assert f"process {os.getpid()} on " in (run_dir / LOCK_FILE).read_text()


def test_a_run_that_stopped_before_starting_does_not_tie_its_directory_to_its_config(tmp_path):
    """Before: config.json was written before the run was known to start, so a run that failed on its
    input refused the corrected command in the same directory."""
    config = to_json(tiny_config())
    corrected = to_json(tiny_config(learning_rate=1e-3))
    (tmp_path / "config.json").write_text(json.dumps(config))
    _check_run_config(tmp_path, corrected)  # nothing was logged or saved: the corrected run may start here
    (tmp_path / "checkpoints" / "sft" / "50").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"another config; mismatched fields: .*reward_model\.learning_rate"):
        _check_run_config(tmp_path, corrected)
    (tmp_path / "checkpoints" / "sft" / "50").rmdir()
    (tmp_path / "metrics.jsonl").write_text('{"stage": "sft", "step": 0, "loss": 1.0}\n')
    with pytest.raises(ValueError, match="another config"):
        _check_run_config(tmp_path, corrected)
    _check_run_config(tmp_path, config)  # the same config resumes


@pytest.mark.parametrize("debug", [False, True])
def test_an_input_error_in_a_run_is_one_line_and_a_traceback_with_debug(tmp_path, debug):
    """A mesh that does not divide the devices (found at run start, before any compute)."""
    result = cli(tmp_path / "run", "--set", "mesh.data=3", *(["--debug"] if debug else []))
    assert result.returncode == 1
    message = "config field `mesh.data`"
    if debug:
        assert "Traceback (most recent call last)" in result.stderr and message in result.stderr
    else:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert not (tmp_path / "run" / "config.json").exists()



def test_an_unusable_run_dir_is_one_line(tmp_path):
    """A --run-dir below a file (read-only directories cannot be shown here: the tests run as root)."""
    (tmp_path / "file").write_text("")
    result = cli(tmp_path / "file" / "run")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(tmp_path / "file") in lines[0]


def test_a_config_file_of_the_wrong_shape_is_one_line(tmp_path, capsys):
    from jaxppo.cli import parse_args

    bad = tmp_path / "bad.py"
    bad.write_text("def get_config():\n    return {'lr': 1}\n")
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--config", str(bad)])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(
        f"error: {bad}: get_config() must return a frozen dataclass, got dict")
