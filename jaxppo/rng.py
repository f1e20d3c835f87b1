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


def stream_id(name: str) -> int:
    """The stream's integer: CRC-32 of its UTF-8 name, in ``[0, 2**32)``."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"stream_id: `name` must be a non-empty string, got {name!r}")
    return zlib.crc32(name.encode("utf-8"))


def stream_key(root: jax.Array, name: str, step: int = 0) -> jax.Array:
    """The key of draw ``step`` of stream ``name``: ``fold_in(fold_in(root, crc32(name)), step)``."""
    return jax.random.fold_in(jax.random.fold_in(root, stream_id(name)), step)


def stream_seed(seed: int, name: str) -> int:
    """The NumPy seed of host-side draws of stream ``name``: ``seed · 2**32 + crc32(name)`` (distinct
    for distinct ``(seed, name)`` with ``seed >= 0``); e.g. :func:`jaxppo.data.batch_indices`'s seed."""
    if int(seed) < 0:
        raise ValueError(f"stream_seed: `seed` must be >= 0, got {seed}")
    return (int(seed) << 32) + stream_id(name)
