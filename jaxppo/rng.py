"""Named random streams: every random draw of a run derives from its seed, a stream name and a step.

``stream_key(root, "ppo-sample", 12)`` is ``fold_in(fold_in(root, crc32("ppo-sample")), 12)``;
``stream_seed(seed, "sft-demos")`` is the host-side (NumPy) counterpart. CRC-32 gives distinct
streams distinct integers (a character sum made anagrams such as ``"rm-init"`` / ``"rm-tini"``
collide), and a draw is a pure function of ``(seed, name, step)``: a resumed run sees the same
data and noise as an uninterrupted one.
"""

from __future__ import annotations

import zlib

import jax

# The seeds that give distinct root keys: ``jax.random.key(seed)`` keeps a seed's low 32 bits (without
# ``jax_enable_x64``), so ``seed`` and ``seed + 2**32`` give the same key and a negative seed the key of
# ``seed + 2**32``. A run's seed must lie in ``[0, NUM_SEEDS)`` (``PipelineConfig`` refuses others).
NUM_SEEDS = 2**32


def stream_id(name: str) -> int:
    """The stream's integer: CRC-32 of its UTF-8 name, in ``[0, 2**32)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"stream_id: `name` must be a non-empty string, got {name!r}")
    return zlib.crc32(name.encode("utf-8"))


def stream_key(root: jax.Array, name: str, step: int = 0) -> jax.Array:
    """The key of draw ``step`` of stream ``name``: ``fold_in(fold_in(root, crc32(name)), step)``."""
    return jax.random.fold_in(jax.random.fold_in(root, stream_id(name)), step)


def stream_seed(seed: int, name: str) -> int:
    """The NumPy seed of host-side draws of stream ``name``: ``seed · 2**32 + crc32(name)``, distinct for
    distinct ``(seed, name)`` with ``seed`` in ``[0, NUM_SEEDS)`` (the seeds root keys tell apart, so the
    host and device streams of two runs differ together); e.g. :func:`jaxppo.data.batch_indices`'s seed."""
    if not 0 <= int(seed) < NUM_SEEDS:
        raise ValueError(f"stream_seed: `seed` must be in [0, 2**32), got {seed}")
    return (int(seed) << 32) + stream_id(name)
