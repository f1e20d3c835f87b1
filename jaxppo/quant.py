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

**A quantised base** (:func:`quantize_params`). The four stacked projection kernels of
:mod:`jaxppo.models.llama` (:data:`PROJECTIONS`; input axis 1, after the layer axis) are stored as
codes and scales; everything else (embeddings, norms, biases, ``lm_head``, scalar heads, ``"lora"``)
stays as it is. A projection's ``kernel`` is replaced by two leaves, the codes named after the kind::

    int8: kernel_int8   int8    like the kernel                  [L, d_in, out…]
          kernel_scale  float32 one per output channel           [L, 1, out…]
    nf4:  kernel_nf4    uint8   two codes per byte along d_in     [L, d_in / 2, out…]
          kernel_scale  float32 the absmax of each block          [L, d_in / block, out…]

(``block`` is not stored: it is twice the codes' input size over the scales', static shapes). The
model dequantises one layer at a time inside its layer scan (:func:`dequantize_projection` with
``in_axis=0``); :func:`dequantize_params` gives the whole float tree back (tests, merged export).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:  # jaxppo.models imports this module: no import of it at run time
    from jaxppo.models.config import ModelConfig

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


# the decoder's projections a quantised base stores as codes: (group under params["layers"], name)
PROJECTIONS = (("attn", "qkv_proj"), ("attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
KINDS = ("none", "int8", "nf4")


def _input_size(config: ModelConfig, name: str) -> tuple[int, str]:
    """A projection's input dimension and the config field it comes from."""
    if name in ("qkv_proj", "gate_up_proj"):
        return config.hidden_size, "hidden_size"
    if name == "o_proj":
        return config.num_heads * config.head_dim, "num_heads · head_dim"
    return config.intermediate_size, "intermediate_size"


def quantize_params(config: ModelConfig, params: dict, *, kind: str, block: int = 64) -> dict:
    """``params`` with the :data:`PROJECTIONS` kernels stored as ``kind`` codes and scales (the layout of
    the module docstring); ``"none"``: ``params`` as they are. NF4 needs ``block`` (even) to divide
    each projection's input dimension (``hidden_size``, ``num_heads · head_dim``, ``intermediate_size``)."""
    if kind not in KINDS:
        raise ValueError(f"lora.quantize_base: {kind!r} is not one of {KINDS}")
    if kind == "none":
        return params
    for group, name in PROJECTIONS:  # every check before any work
        if "kernel" not in params["layers"][group][name]:
            raise ValueError(f"quantize_params: layers/{group}/{name} has no float `kernel` (already quantised?)")
        d_in, field = _input_size(config, name)
        if kind == "nf4" and (block < 2 or block % 2 or d_in % block):
            raise ValueError(f"lora.quantize_base='nf4': blocks of {block} input features must divide "
                             f"layers/{group}/{name}'s input dimension {d_in} (model.{field}); use int8 or an "
                             "even block size that divides it")
    layers = dict(params["layers"])
    for group, name in PROJECTIONS:
        projection = dict(layers[group][name])
        kernel = projection.pop("kernel")
        if kind == "int8":
            codes, scale = quantize_int8(kernel, in_axis=1)
        else:
            codes, scale = quantize_nf4(kernel, block=block, in_axis=1)
        layers[group] = {**layers[group], name: {**projection, f"kernel_{kind}": codes, "kernel_scale": scale}}
    return {**params, "layers": layers}


def dequantize_projection(projection: dict, *, in_axis: int, dtype) -> dict:
    """One projection's leaves with ``kernel_int8`` / ``kernel_nf4`` and ``kernel_scale`` replaced by
    the float ``kernel`` in ``dtype`` (input axis ``in_axis``: 1 stacked, 0 for one layer); a float
    projection as it is."""
    rest = {k: v for k, v in projection.items() if k not in ("kernel_int8", "kernel_nf4", "kernel_scale")}
    if "kernel_int8" in projection:
        return {**rest, "kernel": dequantize_int8(projection["kernel_int8"], projection["kernel_scale"], dtype=dtype)}
    if "kernel_nf4" in projection:
        codes, absmax = projection["kernel_nf4"], projection["kernel_scale"]
        block = 2 * codes.shape[in_axis] // absmax.shape[in_axis]
        return {**rest, "kernel": dequantize_nf4(codes, absmax, block=block, in_axis=in_axis, dtype=dtype)}
    return projection


def dequantize_params(config: ModelConfig, params: dict) -> dict:
    """The float params of :func:`quantize_params`'s output (kernels in ``config``'s param dtype)."""
    layers = dict(params["layers"])
    for group, name in PROJECTIONS:
        projection = dequantize_projection(layers[group][name], in_axis=1, dtype=config.jnp_param_dtype)
        layers[group] = {**layers[group], name: projection}
    return {**params, "layers": layers}


def is_quantized(params: dict) -> bool:
    """Whether ``params`` hold a quantised projection (:func:`quantize_params`)."""
    layers = params.get("layers", {})
    return any("kernel_scale" in layers.get(group, {}).get(name, {}) for group, name in PROJECTIONS)
