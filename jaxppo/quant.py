"""Weight quantisation for a frozen LoRA base (QLoRA): NF4 (Dettmers et al. 2023) and int8 per channel.

Pure functions of a kernel ``W [..., d_in, d_out…]`` (jaxppo's ``[in, out…]`` layout, optionally with
a leading layer axis): ``quantize_*`` returns ``(codes, scales)``, ``dequantize_*`` the float kernel.

**NF4.** Blocks of ``block`` consecutive *input* features of one output (bitsandbytes' blocks of a
row-major torch ``[out, in]`` weight, so the codes are the same when ``d_in % block == 0``); per
block the absmax ``m`` (float32), and each weight's code ``argmin_j |w / m − q_j|`` over the 16
NormalFloat levels ``q`` (:data:`NF4_LEVELS`: quantiles of N(0, 1) scaled to [−1, 1], with an exact
0). Two codes per byte along the input axis, the first in the high nibble. Dequantised:
``q[code] · m``. 4.5 bits per weight (block 64, fp32 absmax).

**int8.** Per output channel ``s = max_in |w| / 127`` (float32), ``code = round(w / s)`` in
[−127, 127]; dequantised ``code · s``. 8 bits per weight plus one scale per output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

# the 16 NF4 levels (QLoRA, appendix E; bitsandbytes' NF4 code)
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], np.float32)


def _blocks(w: Array, block: int, in_axis: int) -> Array:
    """``w`` with its input axis split into ``[d_in / block, block]`` (the block axis right after it)."""
    d_in = w.shape[in_axis]
    if block < 2 or block % 2 or d_in % block:
        raise ValueError(f"nf4: the block size must be even and divide the input dimension {d_in}, got {block}")
    return w.reshape(*w.shape[:in_axis], d_in // block, block, *w.shape[in_axis + 1:])


def quantize_nf4(w: Array, *, block: int = 64, in_axis: int = 0) -> tuple[Array, Array]:
    """``(codes uint8 [.., d_in / 2, ..], absmax float32 [.., d_in / block, ..])`` of ``w`` (input axis
    ``in_axis``): see the module docstring. An all-zero block gets absmax 1 (its codes are all 0.0's)."""
    in_axis = in_axis % w.ndim
    blocks = _blocks(jnp.asarray(w, jnp.float32), block, in_axis)
    absmax = jnp.max(jnp.abs(blocks), axis=in_axis + 1, keepdims=True)
    absmax = jnp.where(absmax > 0, absmax, 1.0)
    normed = jnp.clip(blocks / absmax, -1.0, 1.0)
    levels = jnp.asarray(NF4_LEVELS)
    # the nearest level: below the midpoint between two neighbours, the lower one (ties: the lower)
    codes = jnp.searchsorted((levels[1:] + levels[:-1]) / 2, normed, side="left").astype(jnp.uint8)
    codes = codes.reshape(w.shape)
    pairs = codes.reshape(*w.shape[:in_axis], w.shape[in_axis] // 2, 2, *w.shape[in_axis + 1:])
    high, low = jnp.take(pairs, 0, axis=in_axis + 1), jnp.take(pairs, 1, axis=in_axis + 1)
    return (high << 4) | low, jnp.squeeze(absmax, axis=in_axis + 1)


def dequantize_nf4(codes: Array, absmax: Array, *, block: int = 64, in_axis: int = 0, dtype=jnp.float32) -> Array:
    """The kernel ``q[code] · absmax`` of :func:`quantize_nf4`'s output, in ``dtype``."""
    in_axis = in_axis % codes.ndim
    high, low = codes >> 4, codes & 15
    idx = jnp.stack([high, low], axis=in_axis + 1)
    shape = (*codes.shape[:in_axis], codes.shape[in_axis] * 2, *codes.shape[in_axis + 1:])
    values = jnp.take(jnp.asarray(NF4_LEVELS), idx.reshape(shape).astype(jnp.int32))
    blocks = _blocks(values, block, in_axis) * jnp.expand_dims(absmax, in_axis + 1)
    return blocks.reshape(shape).astype(dtype)


def quantize_int8(w: Array, *, in_axis: int = 0) -> tuple[Array, Array]:
    """``(codes int8 like w, scales float32 with the input axis of size 1)``: per output channel."""
    w = jnp.asarray(w, jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=in_axis, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8), scale


def dequantize_int8(codes: Array, scale: Array, *, dtype=jnp.float32) -> Array:
    """``code · scale``, in ``dtype``."""
    return (codes.astype(jnp.float32) * scale).astype(dtype)
