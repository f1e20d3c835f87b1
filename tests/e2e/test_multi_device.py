"""Multi-device runs in subprocesses: collectives on several CPU devices of one process, two
processes on localhost (gloo), and the command line on an 8-device mesh against one device.

Each test starts its own Python processes (JAX fixes its device count at start-up), so they live
here with the other end-to-end runs rather than in tests/test_sharding.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


# Two programs with independent all-reduces over two CPU devices. With XLA:CPU's default pool (one
# thread per core, PJRT_NPROC=2 here) one device's blocked collectives took both threads and the run
# aborted at the rendezvous timeout within its first calls (7 runs in 7 on this 2-core machine, Nov 2026).
_PARALLEL_COLLECTIVES = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jaxppo.sharding import reserve_cpu_collective_threads
print("pool threads", reserve_cpu_collective_threads())
mesh = Mesh(np.array(jax.devices()), ("d",))
xs = [jax.device_put(np.random.default_rng(i).random((64, 256), np.float32), NamedSharding(mesh, P("d")))
      for i in range(16)]
f = jax.jit(lambda xs: sum(jnp.sum(jnp.tanh(x * (i + 1)), axis=0).sum() for i, x in enumerate(xs)))
g = jax.jit(lambda x: jnp.sum(x, axis=0).mean() + jnp.max(x, axis=0).mean())
for i in range(50):
    a, b = f(xs), g(xs[i % 16])
np.testing.assert_allclose(float(a), sum(np.tanh(np.asarray(x) * (i + 1)).sum() for i, x in enumerate(xs)), rtol=1e-5)
x = np.asarray(xs[49 % 16])
np.testing.assert_allclose(float(b), x.sum(0).mean() + x.max(0).mean(), rtol=1e-5)
print("ok")
"""


def test_parallel_collectives_on_two_cpu_devices_do_not_deadlock():
    """reserve_cpu_collective_threads (which experiments/run.py and conftest.py call before JAX starts)
    sizes the pool so that independent collectives of one program cannot starve the other device."""
    env = {k: v for k, v in os.environ.items() if k != "PJRT_NPROC"}
    env.update(PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2 "
               "--xla_cpu_collective_call_terminate_timeout_seconds=20")  # a deadlock fails in 20 s, not 40
    result = subprocess.run([sys.executable, "-c", _PARALLEL_COLLECTIVES], env=env, capture_output=True, text=True,
                            timeout=300)
    threads = str(max(os.cpu_count(), 16))
    assert result.returncode == 0 and result.stdout.split() == ["pool", "threads", threads, "ok"], (
        result.stdout + result.stderr[-2000:])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(worker: Path, env: dict, out: Path) -> list[int]:
    """Two worker processes with a local coordinator; each logs to its own file (a pipe nobody
    reads while we wait on the other process could fill up and block the writer)."""
    out.mkdir(exist_ok=True)
    port = _free_port()
    logs = [open(out / f"p{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen([sys.executable, str(worker), "--out", str(out / f"p{i}.json"),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
                              env=env, stdout=logs[i], stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    try:
        for proc in procs:
            proc.wait(timeout=420)
    finally:
        for proc, log in zip(procs, logs):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return [proc.returncode for proc in procs]


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    """Two processes on localhost (one CPU device each, gloo collectives) run an SFT step and a PPO
    iteration with parameters, optimizer states and batches FSDP-sharded over both; their numbers
    equal one process's on two devices."""
    worker = ROOT / "tests" / "distributed_worker.py"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    # One device per process, as on real hosts. With two per process XLA:CPU also runs the
    # collectives between a process's own devices through gloo, and about 1 run in 8 (more under
    # load) died on a gloo message-size mismatch; one device per process ran clean (0 failures in
    # 25 runs, 15 of them beside the full test suite; Nov 2026).
    codes = _run_two_processes(worker, env, tmp_path)
    assert codes == [0, 0], f"return codes {codes}\n" + "\n".join(
        (tmp_path / f"p{i}.log").read_text()[-1500:] for i in range(2))
    single_env = {**env, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    single = subprocess.run([sys.executable, str(worker), "--out", str(tmp_path / "single.json")], env=single_env,
                            capture_output=True, text=True, timeout=420)
    assert single.returncode == 0, single.stdout[-2000:] + single.stderr[-3000:]
    results = [json.loads((tmp_path / name).read_text()) for name in ("p0.json", "p1.json", "single.json")]
    assert results[0]["num_processes"] == 2 and results[2]["num_processes"] == 1
    for key in results[2]["values"]:
        np.testing.assert_allclose(results[0]["values"][key], results[2]["values"][key], rtol=1e-5, atol=1e-6,
                                   err_msg=key)
        np.testing.assert_allclose(results[1]["values"][key], results[0]["values"][key], rtol=0, atol=0, err_msg=key)


@pytest.mark.slow
def test_cli_mesh_run_matches_the_one_device_run(tmp_path):
    """configs/tiny.py on data=2 × fsdp=2 × tensor=2 (8 devices) against 1 device, shortened.

    Sharded reductions sum in another order, so step 0 already differs at float32 rounding (~2e-7).
    Over the full tiny run SFT's 150 Adam steps amplify that to ~3e-3 and a sampled token flips,
    after which the runs are different runs; over 30 SFT and 30 reward-model steps the samples stay
    identical and every SFT / reward-model metric agrees to 1e-4, and PPO's (whose values and scores
    pass through two more trained networks) to 2e-3 relative or 5e-4 absolute.
    """
    from jaxppo.logging import read_metrics

    def run(run_dir, devices, *overrides):
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
        cmd = [sys.executable, "-m", "experiments.run", "--config", str(ROOT / "configs" / "tiny.py"),
               "--run-dir", str(run_dir), "--set", "checkpoint.enabled=false", "export_hf=false", "sft.steps=30",
               "reward_model.steps=30", "ppo.iterations=3", "reward_model.online_every=0", *overrides]
        result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return read_metrics(run_dir / "metrics.jsonl")

    one = run(tmp_path / "one", 1)
    mesh = run(tmp_path / "mesh", 8, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2")
    assert [(r["stage"], r["step"]) for r in mesh] == [(r["stage"], r["step"]) for r in one]
    for a, b in zip(mesh, one):
        rel, abs_ = (1e-4, 1e-6) if b["stage"] in ("sft", "reward_model", "reward_model_eval") else (2e-3, 5e-4)
        for key, value in b.items():
            if isinstance(value, float):
                assert a[key] == pytest.approx(value, rel=rel, abs=abs_), (b["stage"], b["step"], key)
    gold = [r["gold_reward"] for r in one if r["stage"] in ("ppo", "eval")]
    assert gold == [r["gold_reward"] for r in mesh if r["stage"] in ("ppo", "eval")]  # the same samples
