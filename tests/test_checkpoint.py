"""Orbax stage checkpoints: save/restore round trip, one clear error for every mismatch or corruption,
checksums that catch a flipped bit, and a resume that falls back past a damaged newest checkpoint."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxppo import sharding
from jaxppo.checkpoint import CheckpointError, StageCheckpoints, leaf_checksum
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.pipeline.context import CHECKPOINTED, RunDirInUse, _rewind, lock_run, lock_run_dir, resume
from jaxppo.sharding import MeshConfig, init_sharded, make_mesh, to_host


# pytest swaps in its own sys.unraisablehook for each test, so orbax's stray reads of a damaged
# checkpoint (which jaxppo.checkpoint drops outside pytest) surface here as pytest warnings instead
pytestmark = pytest.mark.filterwarnings(
    "ignore:Exception ignored in. <coroutine object _read_array_index_and_device_put:"
    "pytest.PytestUnraisableExceptionWarning")

def tiny_state(width: int = 4):
    params = {"w": jnp.arange(3 * width, dtype=jnp.float32).reshape(3, width), "b": jnp.zeros(width)}
    return create_train_state(params, make_optimizer(learning_rate=1e-3))


def adam_state(offset: float):
    """A state with non-zero Adam moments (the reproduced corruption changed one of them); its three
    64x64 arrays fill most of the checkpoint's data file, so a byte flipped mid-file lands in one."""
    params = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64) / 4096 + offset}
    state = create_train_state(params, make_optimizer(learning_rate=1e-3))
    return state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))


def assert_bit_equal(got, want):
    paths = [[jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(t)[0]] for t in (got, want)]
    assert paths[0] == paths[1]
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.asarray(a).dtype == np.asarray(b).dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def array_files(step_dir):
    """The files holding array bytes (not orbax's metadata) of every item of one checkpoint."""
    return sorted(p for p in step_dir.rglob("*") if p.is_file() and "ocdbt.process_" in str(p) and p.parent.name == "d")


def flip_one_byte(step_dir):
    data = max(array_files(step_dir), key=lambda p: p.stat().st_size)  # the 64x64 arrays' bytes
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    data.write_bytes(bytes(raw))


def damage(step_dir, how: str):
    files = [p for p in step_dir.rglob("*") if p.is_file()] if how.endswith("everything") else array_files(step_dir)
    for path in files:
        raw = path.read_bytes()
        path.write_bytes(raw[: len(raw) // 2] if how.startswith("truncate") else b"garbage")


def test_mismatched_and_corrupt_checkpoints_raise_one_clear_error(tmp_path):
    ckpt = StageCheckpoints(tmp_path / "ppo", keep=2, config={"ppo": {"kl_coef": 0.1}})
    state = tiny_state()
    ckpt.save(4, {"actor": state}, {"done": False})
    items, meta = ckpt.restore(4, {"actor": tiny_state()})
    np.testing.assert_array_equal(items["actor"].params["w"], state.params["w"])
    assert meta["step"] == 4
    # a different model shape: names the checkpoint path and the mismatched array
    with pytest.raises(CheckpointError, match=r"ppo/4/actor.*params/w shape \(3, 4\) in the checkpoint, \(3, 5\) now"):
        ckpt.restore(4, {"actor": tiny_state(width=5)})
    # a different config
    other = StageCheckpoints(tmp_path / "ppo", keep=2, config={"ppo": {"kl_coef": 0.2}})
    with pytest.raises(CheckpointError, match=r"ppo/4: saved with a different config.*ppo.kl_coef"):
        other.restore(4, {"actor": tiny_state()})
    # a missing item
    with pytest.raises(CheckpointError, match=r"has no item 'critic'"):
        ckpt.restore(4, {"critic": tiny_state()})
    # corrupt array data: every file of the stored arrays overwritten with garbage
    for path in (tmp_path / "ppo" / "4" / "actor").rglob("*"):
        if path.is_file() and "metadata" not in path.name:
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"ppo/4") as error:
        ckpt.restore(4, {"actor": tiny_state()})
    assert "\n" not in str(error.value) and "tensorstore_spec" not in str(error.value)


def test_a_flipped_bit_is_refused_and_the_newest_good_checkpoint_is_used(tmp_path, caplog):
    ckpt = StageCheckpoints(tmp_path / "ppo", keep=3, config={})
    ckpt.save(2, {"actor": adam_state(0.0)})
    ckpt.save(4, {"actor": adam_state(1.0)})
    flip_one_byte(tmp_path / "ppo" / "4")
    # before: restored silently with one array changed; now the step is refused, naming it and the array
    fresh = StageCheckpoints(tmp_path / "ppo", keep=3, config={})
    with pytest.raises(CheckpointError, match=r"ppo/4: actor: checksum mismatch in \S+ \(saved sha256") as error:
        fresh.restore(4, {"actor": adam_state(0.0)})
    assert "\n" not in str(error.value)
    with pytest.raises(CheckpointError, match=r"ppo/4: actor: checksum mismatch"):
        fresh.verify(4)
    with caplog.at_level(logging.WARNING, logger="jaxppo.checkpoint"):
        assert fresh.latest_step() == 2
        assert fresh.latest_step() == 2  # warned once
    [record] = caplog.records
    assert "ppo/4: damaged checkpoint skipped (actor: checksum mismatch" in record.getMessage()
    assert record.getMessage().endswith("using step 2") and "\n" not in record.getMessage()
    items, _ = fresh.restore(2, {"actor": adam_state(5.0)})
    assert_bit_equal(items["actor"], adam_state(0.0))
    # the run goes on from step 2: its next save replaces the damaged step (else orbax would refuse step 4)
    fresh.save(3, {"actor": adam_state(3.0)})
    assert fresh._manager.all_steps() == [2, 3] and fresh.latest_step() == 3


@pytest.mark.parametrize("how", ["truncate the arrays", "garbage the arrays", "truncate everything",
                                 "garbage everything"])
def test_a_truncated_or_garbage_newest_checkpoint_falls_back_quietly(tmp_path, capfd, caplog, how):
    ckpt = StageCheckpoints(tmp_path / "ppo", keep=3, config={})
    ckpt.save(2, {"actor": adam_state(0.0)})
    ckpt.save(4, {"actor": adam_state(1.0)})
    damage(tmp_path / "ppo" / "4", how)
    capfd.readouterr()
    fresh = StageCheckpoints(tmp_path / "ppo", keep=3, config={})
    with pytest.raises(CheckpointError, match=r"ppo/4[:/]") as error:
        fresh.restore(4, {"actor": adam_state(0.0)})
    assert "\n" not in str(error.value) and "tensorstore_spec" not in str(error.value)
    with caplog.at_level(logging.WARNING, logger="jaxppo.checkpoint"):
        assert fresh.latest_step() == 2
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [f"{tmp_path}/ppo/4: damaged checkpoint skipped"]
    items, _ = fresh.restore(2, {"actor": adam_state(5.0)})
    assert_bit_equal(items["actor"], adam_state(0.0))
    out, err = capfd.readouterr()  # no TensorStore / asyncio tracebacks around the one line
    assert "Traceback" not in out + err and "Event loop is closed" not in out + err, err


def stage_checkpoints(run_dir):
    return {name: StageCheckpoints(run_dir / "checkpoints" / name, keep=3, config={}) for name in CHECKPOINTED}


def test_resume_verifies_before_rewinding_metrics(tmp_path, caplog):
    """The PPO stage is in progress with checkpoints at iterations 2 and 4; 4 is damaged."""
    checkpoints = stage_checkpoints(tmp_path)
    checkpoints["sft"].save(3, {"state": tiny_state()}, {"done": True})
    checkpoints["reward_model"].save(3, {"state": tiny_state()}, {"done": True})
    checkpoints["ppo"].save(2, {"actor": adam_state(0.0)}, {"done": False})
    checkpoints["ppo"].save(4, {"actor": adam_state(1.0)}, {"done": False})
    flip_one_byte(tmp_path / "checkpoints" / "ppo" / "4")
    rows = ([{"stage": "sft", "step": i, "loss": 1.0} for i in range(3)]
            + [{"stage": "ppo", "step": i, "loss": float(i)} for i in range(6)])
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))

    # before: metrics.jsonl cut to step 4, then the restore failed (or restored the flipped bit);
    # now the rewind and the restore both use step 2, the newest that verifies, with one warning
    fresh = stage_checkpoints(tmp_path)
    with caplog.at_level(logging.WARNING, logger="jaxppo.checkpoint"):
        _rewind(tmp_path, fresh)
        start, items, meta = resume(types.SimpleNamespace(checkpoints=fresh), "ppo", {"actor": adam_state(9.0)})
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == rows[:3 + 2]
    assert start == 2 and meta["step"] == 2
    assert_bit_equal(items["actor"], adam_state(0.0))
    [record] = caplog.records  # the rewind and the resume both looked; one warning
    assert "checkpoints/ppo/4: damaged checkpoint skipped (actor: checksum mismatch" in record.getMessage()

    # no checkpoint verifies: one line naming the directory, and metrics.jsonl untouched
    metrics.write_text("".join(json.dumps(row) + "\n" for row in rows))
    damage(tmp_path / "checkpoints" / "ppo" / "2", "garbage the arrays")
    with pytest.raises(CheckpointError, match=r"checkpoints/ppo: no checkpoint verifies \(step 4: .*; step 2: ") as error:
        _rewind(tmp_path, stage_checkpoints(tmp_path))
    assert "\n" not in str(error.value)
    assert [json.loads(line) for line in metrics.read_text().splitlines()] == rows


def test_a_damaged_finished_stage_with_later_stages_checkpointed_is_refused(tmp_path):
    """SFT's done checkpoint (step 3) is damaged, so SFT would resume from step 2 and be trained again,
    but the reward model already has a checkpoint made after SFT finished: rewinding metrics.jsonl to
    SFT step 2 would drop the reward model's rows for good. One line, nothing touched."""
    checkpoints = stage_checkpoints(tmp_path)
    checkpoints["sft"].save(2, {"state": adam_state(0.0)}, {"done": False})
    checkpoints["sft"].save(3, {"state": adam_state(1.0)}, {"done": True})
    checkpoints["reward_model"].save(3, {"state": tiny_state()}, {"done": False})
    flip_one_byte(tmp_path / "checkpoints" / "sft" / "3")
    metrics = tmp_path / "metrics.jsonl"
    text = "".join(json.dumps(row) + "\n" for row in [{"stage": "sft", "step": i} for i in range(3)]
                   + [{"stage": "reward_model", "step": i} for i in range(3)])
    metrics.write_text(text)
    with pytest.raises(CheckpointError, match=r"checkpoints/sft: sft would resume from step 2 .* but reward_model "
                                              r"already has checkpoints .*; move .*checkpoints/reward_model away"):
        _rewind(tmp_path, stage_checkpoints(tmp_path))
    assert metrics.read_text() == text


def test_checksums_do_not_depend_on_the_mesh(tmp_path):
    mesh = Mesh(np.array(jax.devices()[:8]), ("x",))
    host = adam_state(0.5)
    sharded = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P("x") if x.ndim else P())), host)
    assert sharded.params["w"].sharding.num_devices == 8
    assert jax.tree.map(leaf_checksum, sharded) == jax.tree.map(leaf_checksum, host)
    ckpt = StageCheckpoints(tmp_path / "sft", keep=1, config={})
    ckpt.save(1, {"state": sharded})
    ckpt.verify(1)
    items, _ = StageCheckpoints(tmp_path / "sft", keep=1, config={}).restore(1, {"state": adam_state(0.0)})
    assert_bit_equal(items["state"], host)  # saved on 8 devices, restored on one, bit for bit
    assert items["state"].params["w"].sharding.num_devices == 1


def _two_process_worker(process_id: int, port: int, root: str, phase: str) -> None:
    """One process of :func:`test_checksums_across_two_processes` (``process_id`` -1: a single process)."""
    if process_id >= 0:
        sharding.initialize_distributed(f"127.0.0.1:{port}", 2, process_id)
    if phase == "lock":  # the test holds the run directory: every process stops with process 0's error
        try:
            with lock_run(Path(root) / "run"):
                print(json.dumps({"error": None}))
        except RunDirInUse as e:
            print(json.dumps({"error": str(e)}))
        return
    mesh = make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    state = init_sharded(lambda params: adam_state(0.0).replace(params=params), mesh, adam_state(0.0).params)
    ckpt = StageCheckpoints(Path(root) / "ppo", keep=3, config={})
    if phase == "save":
        assert not state.params["w"].is_fully_addressable or process_id < 0  # each process holds half of it
        ckpt.save(2, {"actor": state})
        ckpt.save(4, {"actor": jax.tree.map(lambda x: x * 2 if x.dtype == jnp.float32 else x, state)})
        return
    first = ckpt.latest_step() if jax.process_index() == 0 else None  # process 0 alone, as the metrics rewind
    step = ckpt.latest_step()
    items, _ = ckpt.restore(step, {"actor": state})
    equal = all(np.array_equal(to_host(a), to_host(b)) for a, b in zip(jax.tree.leaves(items["actor"]),
                                                                       jax.tree.leaves(state)))
    print(json.dumps({"first": first, "step": step, "equal": equal}))


def _run_workers(root: Path, phase: str, processes: int) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "PYTHONPATH": str(Path(__file__).parents[1])}
    ids = [-1] if processes == 1 else range(processes)
    procs = [subprocess.Popen([sys.executable, __file__, str(i), str(port), str(root), phase], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in ids]
    outs = []
    try:
        for proc in procs:
            outs.append(proc.communicate(timeout=300)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [proc.returncode for proc in procs] == [0] * len(procs), "\n".join(out[-2000:] for out in outs)
    return [json.loads(out.strip().splitlines()[-1]) for out in outs] if phase != "save" else []


@pytest.mark.slow
def test_checksums_across_two_processes(tmp_path):
    """Saved by two processes (each holds half of every array), checked by process 0 alone without a
    cross-process barrier, restored by both and by a single process; a flipped bit is caught (~10 s)."""
    _run_workers(tmp_path, "save", 2)
    flip_one_byte(tmp_path / "ppo" / "4")
    results = _run_workers(tmp_path, "resume", 2)
    assert results == [{"first": 2, "step": 2, "equal": True}, {"first": None, "step": 2, "equal": True}]
    assert _run_workers(tmp_path, "resume", 1) == [{"first": 2, "step": 2, "equal": True}]


@pytest.mark.slow
def test_a_run_dir_in_use_stops_every_process_of_a_two_process_run(tmp_path):
    """Process 0 cannot take the lock; process 1 (which never tries) gets process 0's error instead of
    waiting at the first collective for a process 0 that has gone."""
    with lock_run_dir(tmp_path / "run"):
        results = _run_workers(tmp_path, "lock", 2)
        expected = f"{tmp_path / 'run'}: in use by process {os.getpid()} on "
        assert [r["error"][:len(expected)] for r in results] == [expected, expected]
    assert _run_workers(tmp_path, "lock", 2) == [{"error": None}, {"error": None}]


if __name__ == "__main__":
    _two_process_worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
