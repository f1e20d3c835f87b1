"""LoRA adapters (Hu et al. 2021) on the decoder's projections, as a pytree of their own beside the frozen params.

A targeted projection ``y = x W`` becomes

.. math::  y = x W + s \\, (x A) B, \\qquad A ∈ ℝ^{d_{in} × r},\\; B ∈ ℝ^{r × d_{out}},\\; s = α / r

(``s = α / \\sqrt{r}`` with rsLoRA, Kalajdzievski 2023). ``B = 0`` at initialisation, so the adapted
model starts as the base model exactly; ``A`` and ``B`` are what a LoRA run trains (only they and
the scalar heads have optimizer state). LoRA dropout (PEFT's ``lora_dropout``) drops entries of the
adapter's input ``x`` in training steps that pass per-row keys (:func:`fused_delta`); the base path
``x W`` never sees it.

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

**One base, many roles.** With LoRA a trained or frozen role is its *own* params only — adapters
and a scalar head (:data:`ROLE_KEYS`) — over one frozen base shared by all roles; the model a role
computes is :func:`compose` ``(base, role)`` (a dict merge: no copy of the base). The PPO reference
is the base itself (``role = {}``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # jaxppo.models imports this module: no import of it at run time
    from jaxppo.models.config import ModelConfig

Array = jax.Array

TARGETS = ("q", "k", "v", "o", "gate", "up", "down")
GROUPS = {"attn": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}  # the layer module each target is in


ROLE_KEYS = ("lora", "value_head", "reward_head")  # a role's own params over a shared frozen base


def role_params(params: dict) -> dict:
    """The entries of ``params`` that belong to a role rather than to the shared base (:data:`ROLE_KEYS`)."""
    return {k: v for k, v in params.items() if k in ROLE_KEYS}


def base_params(params: dict) -> dict:
    """The entries of ``params`` that are the shared frozen base: all but :func:`role_params`."""
    return {k: v for k, v in params.items() if k not in ROLE_KEYS}


def compose(base: dict | None, role: dict | None) -> dict | None:
    """The model of ``role`` on ``base``: ``{**base, **role}`` (the role's adapters and heads over the
    shared frozen weights, no copy); ``role`` as it is when there is no base (full fine-tuning) or no role."""
    return role if base is None or role is None else {**base, **role}


def group_of(target: str) -> str:
    """``"attn"`` or ``"mlp"``: where ``target``'s adapters sit under ``lora/layers``."""
    return "attn" if target in GROUPS["attn"] else "mlp"


def fused_parts(config: ModelConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Per projection of :mod:`jaxppo.models.llama`: its targets, in the order their outputs are
    concatenated along the fused output's second-to-last axis, with each one's width there."""
    groups = config.num_heads // config.num_kv_heads
    return {"qkv_proj": (("q", groups), ("k", 1), ("v", 1)), "o_proj": (("o", 1),),
            "gate_up_proj": (("gate", 1), ("up", 1)), "down_proj": (("down", 1),)}


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
    if isinstance(targets, str) or not targets or set(targets) - set(TARGETS):
        raise ValueError(f"init_adapters: `targets` must be a non-empty sequence of names from {TARGETS}, "
                         f"got {targets!r}")
    if rank < 1:
        raise ValueError(f"init_adapters: `rank` must be >= 1, got {rank}")
    tree: dict = {"attn": {}, "mlp": {}}
    layers = config.num_layers
    for name, key_t in zip(TARGETS, jax.random.split(key, len(TARGETS))):
        if name not in targets:
            continue
        a_shape, b_shape = shapes(config, rank)[name]
        bound = 1.0 / math.sqrt(a_shape[0])
        group = tree[group_of(name)]
        group[f"{name}_a"] = jax.random.uniform(key_t, (layers, *a_shape), dtype, -bound, bound)
        group[f"{name}_b"] = jnp.zeros((layers, *b_shape), dtype)
    return {"layers": {k: v for k, v in tree.items() if v}}


def check_adapters(config: ModelConfig, lora: dict, *, where: str = "lora") -> int:
    """The rank of an adapter tree, after checking it is one :func:`init_adapters` could have made for
    ``config`` (its keys, every leaf's shape, one rank) and that ``config.lora_scale`` is set;
    ``ValueError`` naming the leaf otherwise. Shapes only: free inside ``jit``."""
    if config.lora_scale is None:
        raise ValueError(f"{where}: params hold LoRA adapters but model.lora_scale is not set (α / r: "
                         "jaxppo.lora.scaling)")
    if not isinstance(lora, dict) or set(lora) != {"layers"} or not set(lora["layers"]) <= {"attn", "mlp"}:
        raise ValueError(f"{where}: expected {{'layers': {{'attn': ..., 'mlp': ...}}}}, got keys "
                         f"{list(lora) if isinstance(lora, dict) else type(lora).__name__}")
    rank = None
    for group_name, group in lora["layers"].items():
        for leaf, value in group.items():
            name, _, part = leaf.rpartition("_")
            in_group = name in GROUPS[group_name]
            if part not in ("a", "b") or not in_group or f"{name}_a" not in group or f"{name}_b" not in group:
                raise ValueError(f"{where}/layers/{group_name}/{leaf}: not an adapter leaf (each target has "
                                 f"<target>_a and <target>_b; targets under {group_name}: {GROUPS[group_name]})")
            rank = rank or int(jnp.shape(value)[-1 if part == "a" else 1])
            expected = (config.num_layers, *shapes(config, rank)[name][0 if part == "a" else 1])
            if tuple(jnp.shape(value)) != expected:
                raise ValueError(f"{where}/layers/{group_name}/{leaf}: shape {tuple(jnp.shape(value))}, expected "
                                 f"{expected} (rank {rank}, this model's sizes)")
    if rank is None:
        raise ValueError(f"{where}: holds no adapters")
    return rank


def row_dropout(x: Array, keys: Array, *, rate: float) -> Array:
    """Inverted dropout of ``x`` ``[B, ...]``: each entry zeroed with probability ``rate``, the others
    scaled by ``1 / (1 − rate)`` (so ``E[out] = x``); row ``b``'s mask is drawn from its own key
    ``keys[b]`` (``[B, 2]`` raw uint32), so it does not depend on the other rows of the batch (a
    micro-batch of a batch draws the masks the whole batch would)."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"row_dropout: `rate` must be in [0, 1), got {rate}")
    if keys.shape != (x.shape[0], 2):
        raise ValueError(f"row_dropout: `keys` must have shape [{x.shape[0]}, 2] (one raw key per row), "
                         f"got {keys.shape}")
    keep = jax.vmap(lambda key: jax.random.bernoulli(key, 1.0 - rate, x.shape[1:]))(keys)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros((), x.dtype))


def step_dropout_keys(key: Array, step: Array | int, rows: int) -> Array:
    """LoRA dropout's per-row keys ``[rows, 2]`` (raw uint32) of training step ``step``:
    ``split(fold_in(key, step), rows)``. A function of the stage's key and the train state's step, so a
    resumed run draws the masks an uninterrupted one would; row ``b`` of a micro-batch keeps its key."""
    keys = jax.random.split(jax.random.fold_in(key, step), rows)
    return jax.random.key_data(keys) if jnp.issubdtype(keys.dtype, jax.dtypes.prng_key) else keys


def with_dropout_keys(batch: dict, key: Array | None, step: Array | int, *, rate: float) -> dict:
    """``batch`` with :func:`step_dropout_keys` for its rows under ``"dropout_keys"`` when a training step
    has a ``key`` and ``rate > 0``; ``batch`` as it is otherwise (no dropout). Called on the whole batch,
    before micro-batching."""
    if key is None or rate <= 0:
        return batch
    return {**batch, "dropout_keys": step_dropout_keys(key, step, batch["prompt"].shape[0])}


def fused_delta(x: Array, adapters: dict, parts: Sequence[tuple[str, int]], *, scale: float,
                dropout_keys: Array | None = None, dropout: float = 0.0) -> Array | None:
    """``s · (x A_p) B_p`` of each part ``p`` (name, width), concatenated along the output's
    second-to-last axis (zeros for a part without adapters); one part: no concatenation. ``x``
    ``[B, ..., d_in]``. None when no part has adapters.

    LoRA dropout (as PEFT's ``lora_dropout``: on the adapter's input only, the base path untouched):
    with ``dropout_keys`` ``[B, 2]`` and ``dropout > 0`` each part reads :func:`row_dropout` of ``x``
    with its own mask, from row ``b``'s key folded with the part's index in :data:`TARGETS`."""
    present = [name for name, _ in parts if f"{name}_a" in adapters]
    if not present:
        return None
    with jax.named_scope("lora"):  # a name for profiles (experiments/profile_rollout.py)
        deltas = {}
        for name in present:
            x_in = x
            if dropout_keys is not None and dropout > 0:
                target_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, TARGETS.index(name))
                x_in = row_dropout(x, target_keys, rate=dropout)
            xa = jnp.einsum("...d,dr->...r", x_in, adapters[f"{name}_a"].astype(x.dtype))
            deltas[name] = jnp.tensordot(xa, adapters[f"{name}_b"].astype(x.dtype), axes=1)
        if len(parts) == 1:
            return scale * deltas[parts[0][0]]
        like = deltas[present[0]]
        pieces = [deltas[name] if name in deltas else jnp.zeros((*like.shape[:-2], width, like.shape[-1]), like.dtype)
                  for name, width in parts]
        return scale * jnp.concatenate(pieces, axis=-2)


def merge(config: ModelConfig, params: dict) -> dict:
    """The params with each adapted kernel replaced by ``W + s·A B`` (in the fused layout) and the
    ``"lora"`` tree dropped: a plain model with the same function (up to float rounding)."""
    if "lora" not in params:
        return params
    check_adapters(config, params["lora"], where="merge: lora")
    lora = params["lora"]["layers"]
    layers = dict(params["layers"])
    for group_name, projections in (("attn", ("qkv_proj", "o_proj")), ("mlp", ("gate_up_proj", "down_proj"))):
        group, new_group = lora.get(group_name, {}), dict(layers[group_name])
        for projection in projections:
            parts = fused_parts(config)[projection]
            if not any(f"{name}_a" in group for name, _ in parts):
                continue
            kernel = new_group[projection]["kernel"]
            # the delta applied to the identity, layer by layer: s·A B in the projection's fused output layout
            eye = jnp.eye(kernel.shape[1], dtype=jnp.float32)
            delta = jax.vmap(lambda g: fused_delta(eye, g, parts, scale=config.lora_scale))(  # noqa: B023
                {k: v.astype(jnp.float32) for k, v in group.items()})
            new_group[projection] = {**new_group[projection], "kernel": (kernel + delta).astype(kernel.dtype)}
        layers[group_name] = new_group
    return {**{k: v for k, v in params.items() if k != "lora"}, "layers": layers}
