"""LoRA adapters (Hu et al. 2021) on the decoder's projections, as a pytree of their own beside the frozen params.

A targeted projection ``y = x W`` becomes

.. math::  y = x W + s \\, (x A) B, \\qquad A ∈ ℝ^{d_{in} × r},\\; B ∈ ℝ^{r × d_{out}},\\; s = α / r

(``s = α / \\sqrt{r}`` with rsLoRA, Kalajdzievski 2023). ``B = 0`` at initialisation, so the adapted
model starts as the base model exactly; only ``A`` and ``B`` train.

**One adapter per Hugging Face projection.** jaxppo fuses Q/K/V and gate/up into one matmul each
(:mod:`jaxppo.models.llama`); the adapters stay per projection, as PEFT has them (``q``, ``k``,
``v``, ``o``, ``gate``, ``up``, ``down``), and their outputs are concatenated into the fused
output's layout (the fused kernel is the concatenation of the split ones along its second-to-last
axis, so this is exact). Tree (stacked over layers ``L`` like the params; ``G = H / H_kv``)::

    layers/attn/{q,k,v}_a      [L, D, r]         layers/attn/q_b  [L, r, H_kv, G, Dh]   {k,v}_b [L, r, H_kv, 1, Dh]
    layers/attn/o_a            [L, H·Dh, r]      layers/attn/o_b  [L, r, D]
    layers/mlp/{gate,up}_a     [L, D, r]         layers/mlp/{gate,up}_b  [L, r, 1, F]
    layers/mlp/down_a          [L, F, r]         layers/mlp/down_b       [L, r, D]

A role's params hold this tree under ``"lora"`` (:func:`jaxppo.models.llama.decoder_hidden` passes it
to the decoder as the Flax collection ``"lora"``); a projection without adapters is the base one.
The scale ``s`` is the static ``ModelConfig.lora_scale``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxppo.models.config import ModelConfig

Array = jax.Array

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
# the fused projections: their parts along the output's second-to-last axis, with each part's width
ATTN_TARGETS, MLP_TARGETS = ("q", "k", "v", "o"), ("gate", "up", "down")


def scaling(*, rank: int, alpha: float, rslora: bool = False) -> float:
    """LoRA's output scale: ``α / r``, or ``α / √r`` with rsLoRA."""
    if rank < 1:
        raise ValueError(f"scaling: `rank` must be >= 1, got {rank}")
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def shapes(config: ModelConfig, rank: int) -> dict[str, tuple[tuple[int, ...], tuple[int, ...]]]:
    """Per target: the shapes of ``A`` and ``B`` of one layer (see the module docstring)."""
    c = config
    d, f, h_kv, dh = c.hidden_size, c.intermediate_size, c.num_kv_heads, c.head_dim
    groups = c.num_heads // h_kv
    return {"q": ((d, rank), (rank, h_kv, groups, dh)), "k": ((d, rank), (rank, h_kv, 1, dh)),
            "v": ((d, rank), (rank, h_kv, 1, dh)), "o": ((c.num_heads * dh, rank), (rank, d)),
            "gate": ((d, rank), (rank, 1, f)), "up": ((d, rank), (rank, 1, f)), "down": ((f, rank), (rank, d))}


def init_adapters(config: ModelConfig, key: Array, *, rank: int, targets: Sequence[str] = TARGETS,
                  dtype=jnp.float32) -> dict:
    """Adapters for ``targets``: ``A ~ U(±1/√d_in)`` (PEFT's default, Kaiming-uniform with a = √5),
    ``B = 0``, stacked over the layers."""
    unknown = set(targets) - set(TARGETS)
    if unknown or not targets:
        raise ValueError(f"init_adapters: `targets` must be a non-empty subset of {TARGETS}, got {tuple(targets)}")
    if rank < 1:
        raise ValueError(f"init_adapters: `rank` must be >= 1, got {rank}")
    tree: dict = {"attn": {}, "mlp": {}}
    layers = config.num_layers
    for name, key_t in zip(TARGETS, jax.random.split(key, len(TARGETS))):
        if name not in targets:
            continue
        a_shape, b_shape = shapes(config, rank)[name]
        bound = 1.0 / math.sqrt(a_shape[0])
        group = tree["attn"] if name in ATTN_TARGETS else tree["mlp"]
        group[f"{name}_a"] = jax.random.uniform(key_t, (layers, *a_shape), dtype, -bound, bound)
        group[f"{name}_b"] = jnp.zeros((layers, *b_shape), dtype)
    return {"layers": {k: v for k, v in tree.items() if v}}


def fused_delta(x: Array, adapters: dict, parts: Sequence[tuple[str, int]], out_shape: tuple[int, ...], *,
                scale: float) -> Array | None:
    """``s · (x A_p) B_p`` of each part ``p`` (name, width), concatenated along the output's
    second-to-last axis (zeros for a part without adapters); one part: no concatenation. ``x``
    ``[..., d_in]``; ``out_shape``: the projection's output dims. None when no part has adapters."""
    if not any(f"{name}_a" in adapters for name, _ in parts):
        return None
    pieces = []
    for name, width in parts:
        if f"{name}_a" in adapters:
            a, b = adapters[f"{name}_a"], adapters[f"{name}_b"]
            xa = jnp.einsum("...d,dr->...r", x, a.astype(x.dtype))
            pieces.append(jnp.tensordot(xa, b.astype(x.dtype), axes=1))
        else:
            part_shape = out_shape if len(parts) == 1 else (*out_shape[:-2], width, out_shape[-1])
            pieces.append(jnp.zeros((*x.shape[:-1], *part_shape), x.dtype))
    delta = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=-2)
    return scale * delta


def merge(config: ModelConfig, params: dict) -> dict:
    """The params with each adapted kernel replaced by ``W + s·A B`` (in the fused layout) and the
    ``"lora"`` tree dropped: a plain model with the same function (up to float rounding)."""
    if "lora" not in params:
        return params
    lora = params["lora"]["layers"]
    scale = config.lora_scale
    groups = config.num_heads // config.num_kv_heads

    def product(group: dict, name: str) -> Array | None:
        if f"{name}_a" not in group:
            return None
        return jnp.einsum("ldr,lr...->ld...", group[f"{name}_a"], group[f"{name}_b"])

    def fused(group, names_widths, kernel):
        deltas = [product(group, n) for n, _ in names_widths]
        if all(d is None for d in deltas):
            return kernel
        full = [jnp.zeros((*kernel.shape[:-2], w, kernel.shape[-1]), kernel.dtype) if d is None else d
                for d, (_, w) in zip(deltas, names_widths)]
        return (kernel + scale * jnp.concatenate(full, axis=-2)).astype(kernel.dtype)

    def single(group, name, kernel):
        d = product(group, name)
        return kernel if d is None else (kernel + scale * d).astype(kernel.dtype)

    attn, mlp = lora.get("attn", {}), lora.get("mlp", {})
    layers = dict(params["layers"])
    layers["attn"] = {**layers["attn"],
                      "qkv_proj": {**layers["attn"]["qkv_proj"], "kernel": fused(
                          attn, (("q", groups), ("k", 1), ("v", 1)), layers["attn"]["qkv_proj"]["kernel"])},
                      "o_proj": {**layers["attn"]["o_proj"], "kernel": single(
                          attn, "o", layers["attn"]["o_proj"]["kernel"])}}
    layers["mlp"] = {**layers["mlp"],
                     "gate_up_proj": {**layers["mlp"]["gate_up_proj"], "kernel": fused(
                         mlp, (("gate", 1), ("up", 1)), layers["mlp"]["gate_up_proj"]["kernel"])},
                     "down_proj": {**layers["mlp"]["down_proj"], "kernel": single(
                         mlp, "down", layers["mlp"]["down_proj"]["kernel"])}}
    return {**{k: v for k, v in params.items() if k != "lora"}, "layers": layers}
