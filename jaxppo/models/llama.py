"""A Llama-family decoder in Flax (Llama 2/3, SmolLM2, Qwen2) with stacked, scanned layers.

The decoder layers are stacked on a leading axis and run with ``nn.scan``, so compile time does
not grow with depth (30 layers for SmolLM2). A layer is RMSNorm → grouped-query attention with
RoPE → residual → RMSNorm → SwiGLU MLP → residual (Touvron et al. 2023).

The KV cache is explicit and functional: a :class:`KVCache` of static shape
``[L, B, H_kv, S_max, D_h]`` goes in and the updated cache comes out, so generation is a
``lax.while_loop`` over pure functions. The layer scan only reads the cache; the step's new keys
and values are written with one ``dynamic_update_slice`` afterwards, which XLA performs in place
on the loop-carried buffer (writing inside the scan made it copy the whole cache every step). Attention masks are explicit too: a ``[B, S_kv]`` mask of
valid key slots (never derived from token ids: SmolLM2's pad token is also its EOS).

Parameter tree (``L`` = layers; kernels are ``[in, out…]``; ``G = H / H_kv`` query heads per KV head)::

    embed/embedding                      [V, D]
    layers/attn/qkv_proj/kernel          [L, D, H_kv, G + 2, Dh]: Q, K and V fused, grouped by KV head
                                         (its G query heads, its key, its value); bias [L, H_kv, G + 2, Dh] (Qwen2)
    layers/attn/o_proj/kernel            [L, H·Dh, D]
    layers/mlp/gate_up_proj/kernel       [L, D, 2, F]: gate and up fused
    layers/mlp/down_proj/kernel          [L, F, D]
    layers/input_norm/scale, layers/post_attention_norm/scale   [L, D]
    final_norm/scale                     [D]

Fusing Q/K/V and gate/up makes two large matmuls of five small ones per layer (what a decode step
at a small batch is bound by); grouping the fused QKV output by KV head keeps a tensor-parallel
split over ``H_kv`` local (each shard holds whole groups). Hugging Face and GGUF files keep the
split layout: :mod:`jaxppo.weights.hf` fuses on import and splits on export.

LM and scalar heads live beside this tree and are applied by :mod:`jaxppo.models.heads`.

**A quantised base** (QLoRA, :func:`jaxppo.quant.quantize_params`): the four projection kernels may be
stored as int8 / NF4 codes and scales. Inside the layer scan each layer dequantises its own kernels to
the compute dtype (``nn.map_variables``), so the float kernels of all layers never exist at once, and
the layer is rematerialised (``model.remat_policy``, or saving every matmul output without
``model.remat``): the backward pass recomputes a layer's kernels from the codes instead of storing
every layer's. Gradients reach LoRA adapters and heads; integer codes get none.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxppo.lora import check_adapters, fused_delta, fused_parts
from jaxppo.models.config import REMAT_POLICIES, ModelConfig
from jaxppo.quant import PROJECTIONS, dequantize_projection, is_quantized

Array = jax.Array


class KVCache(NamedTuple):
    """Keys and values of every layer, head-major: ``[L, B, H_kv, S_max, D_h]`` each.

    Head-major puts the attention's batch dimensions (b, h) first, so XLA contracts the cache
    as it lies instead of transposing it every layer and step.
    """

    k: Array
    v: Array


class RMSNorm(nn.Module):
    """:math:`x / \\sqrt{\\mathrm{mean}(x^2) + ε} · g`, computed in float32."""

    eps: float
    param_dtype: jnp.dtype

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return (normed * scale.astype(jnp.float32)).astype(x.dtype)


def rope_angles(config: ModelConfig, positions: Array) -> tuple[Array, Array]:
    """cos, sin of the rotary angles ``[B, S, D_h]`` for integer ``positions`` ``[B, S]``."""
    inv_freq = jnp.asarray(config.inv_frequencies(), jnp.float32)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, S, D_h/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """Rotates ``x`` ``[B, S, H, D_h]`` by the angles (Hugging Face's half-split convention)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    x32 = x.astype(jnp.float32)
    out = x32 * cos[:, :, None, :] + rotated.astype(jnp.float32) * sin[:, :, None, :]
    return out.astype(x.dtype)


def _plus(y: Array, delta: Array | None) -> Array:
    """``y + delta``; ``y`` where a projection has no LoRA adapters (``delta`` None)."""
    return y if delta is None else y + delta


def _dense(features: int, name: str, config: ModelConfig, use_bias: bool = False) -> nn.Dense:
    return nn.Dense(
        features, use_bias=use_bias, dtype=config.jnp_dtype, param_dtype=config.jnp_param_dtype,
        kernel_init=nn.initializers.normal(0.02), name=name,
    )


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, kv_mask, q_offset, layer_cache, dropout_keys=None):
        """Grouped-query attention of ``x`` ``[B, S, D]`` → (output, this call's keys and values).

        Query i sits at slot ``q_offset + i``. Without a cache (training, prefill) the keys are the
        call's own tokens, masked causally and by ``kv_mask`` ``[B, S]``. With ``layer_cache``
        (this layer's ``[B, H_kv, S_max, D_h]`` keys and values, *read only*) a query attends to
        the cached slots ``j < q_offset`` with ``kv_mask[b, j]`` and, causally, to the call's own
        tokens (``kv_mask[b, q_offset + i]``); both parts share one softmax. The caller writes the
        returned keys/values into the cache once per step, outside the layer scan, so the cache
        buffer is updated in place instead of copied. ``dropout_keys`` ``[B, 2]``: this layer's
        per-row keys of LoRA dropout (:func:`jaxppo.lora.fused_delta`), None: no dropout.
        """
        c = self.config
        batch, seq, _ = x.shape
        groups = c.num_heads // c.num_kv_heads
        # one matmul for Q, K and V: per KV head, its `groups` query heads, then its key, then its value
        qkv = nn.DenseGeneral((c.num_kv_heads, groups + 2, c.head_dim), use_bias=c.attention_bias, dtype=c.jnp_dtype,
                              param_dtype=c.jnp_param_dtype, kernel_init=nn.initializers.normal(0.02),
                              name="qkv_proj")(x)  # [B, S, H_kv, G + 2, D_h]
        lora = self.variables.get("lora", {})  # this layer's LoRA adapters, if any (jaxppo.lora)
        drop = {"dropout_keys": dropout_keys, "dropout": c.lora_dropout}
        qkv = _plus(qkv, fused_delta(x, lora, fused_parts(c)["qkv_proj"], scale=c.lora_scale, **drop))
        q = apply_rope(qkv[:, :, :, :groups].reshape(batch, seq, c.num_heads, c.head_dim), cos, sin)
        k = apply_rope(qkv[:, :, :, groups], cos, sin).transpose(0, 2, 1, 3)
        v = qkv[:, :, :, groups + 1].transpose(0, 2, 1, 3)  # [B, H_kv, S, D_h]
        q = q.reshape(batch, seq, c.num_kv_heads, groups, c.head_dim) / jnp.sqrt(jnp.asarray(c.head_dim, q.dtype))
        neg = jnp.finfo(jnp.float32).min  # finite: rows with no valid key (left padding) stay NaN-free

        def scores(keys, allowed):  # allowed: [B, S, S_k]
            s = jnp.einsum("bqhgd,bhkd->bhgqk", q, keys.astype(q.dtype), preferred_element_type=jnp.float32)
            return jnp.where(allowed[:, None, None], s, neg)

        causal = jnp.arange(seq)[None, :] <= jnp.arange(seq)[:, None]  # [S, S_k=S]
        per_row = jnp.ndim(q_offset) == 1  # [B] offsets: each row's query at its own slot (slot-refill decoding)
        if layer_cache is None:
            own_mask = kv_mask
        elif per_row:
            own_mask = jnp.take_along_axis(kv_mask, q_offset[:, None] + jnp.arange(seq)[None, :], axis=1)
        else:
            own_mask = jax.lax.dynamic_slice_in_dim(kv_mask, q_offset, seq, axis=1)
        parts_s = [scores(k, causal[None] & (own_mask[:, None, :] > 0))]
        parts_v = [v]
        if layer_cache is not None:
            cache_k, cache_v = layer_cache
            slots = jnp.arange(cache_k.shape[2])
            before = slots[None, :] < (q_offset[:, None] if per_row else q_offset)
            cached_ok = before & (kv_mask[:, : slots.size] > 0)  # [B, S_max]
            parts_s.insert(0, scores(cache_k, jnp.broadcast_to(cached_ok[:, None, :], (batch, seq, slots.size))))
            parts_v.insert(0, cache_v)
        probs = jax.nn.softmax(jnp.concatenate(parts_s, axis=-1), axis=-1).astype(c.jnp_dtype)
        out, start = 0.0, 0
        for part_s, part_v in zip(parts_s, parts_v):
            width = part_s.shape[-1]
            out = out + jnp.einsum("bhgqk,bhkd->bqhgd", probs[..., start:start + width], part_v.astype(c.jnp_dtype))
            start += width
        out = out.reshape(batch, seq, c.num_heads * c.head_dim)
        y = _dense(c.hidden_size, "o_proj", c)(out)
        return _plus(y, fused_delta(out, lora, fused_parts(c)["o_proj"], scale=c.lora_scale, **drop)), (k, v)


class MLP(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, dropout_keys=None):
        c = self.config
        drop = {"dropout_keys": dropout_keys, "dropout": c.lora_dropout}  # LoRA dropout, as in Attention
        # one matmul for the gate and up projections: [.., 2, F]
        gate_up = nn.DenseGeneral((2, c.intermediate_size), use_bias=False, dtype=c.jnp_dtype,
                                  param_dtype=c.jnp_param_dtype, kernel_init=nn.initializers.normal(0.02),
                                  name="gate_up_proj")(x)
        lora = self.variables.get("lora", {})  # this layer's LoRA adapters, if any (jaxppo.lora)
        gate_up = _plus(gate_up, fused_delta(x, lora, fused_parts(c)["gate_up_proj"], scale=c.lora_scale, **drop))
        h = nn.silu(gate_up[..., 0, :]) * gate_up[..., 1, :]
        y = _dense(c.hidden_size, "down_proj", c)(h)
        return _plus(y, fused_delta(h, lora, fused_parts(c)["down_proj"], scale=c.lora_scale, **drop))


class DecoderLayer(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, cos, sin, kv_mask, q_offset, layer_cache, dropout_keys):
        c = self.config
        h = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="input_norm")(x)
        attn, new_kv = Attention(c, name="attn")(h, cos, sin, kv_mask, q_offset, layer_cache, dropout_keys)
        x = x + attn
        h = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="post_attention_norm")(x)
        x = x + MLP(c, name="mlp")(h, dropout_keys)
        return x, new_kv


def _dequantize_layer(config: ModelConfig, variables: dict) -> dict:
    """One layer's variables (inside the layer scan) with its quantised projections as float kernels in
    the compute dtype."""
    params = variables["params"]
    for group, name in PROJECTIONS:
        projection = dequantize_projection(params[group][name], in_axis=0, dtype=config.jnp_dtype)
        params = {**params, group: {**params[group], name: projection}}
    return {**variables, "params": params}


class Decoder(nn.Module):
    """Embedding → scanned decoder layers → final RMSNorm. Returns hidden states and KV."""

    config: ModelConfig
    quantized: bool = False  # the projections are stored as codes (jaxppo.quant): dequantised layer by layer

    @nn.compact
    def __call__(self, tokens, positions, kv_mask, cache: KVCache | None = None, cache_index=0, dropout_keys=None):
        c = self.config
        embed = nn.Embed(c.vocab_size, c.hidden_size, dtype=c.jnp_dtype, param_dtype=c.jnp_param_dtype,
                         embedding_init=nn.initializers.normal(0.02), name="embed")
        x = embed(tokens)
        cos, sin = rope_angles(c, positions)
        layer = DecoderLayer
        if self.quantized:
            layer = nn.map_variables(layer, "params", trans_in_fn=functools.partial(_dequantize_layer, c))
        if c.remat or self.quantized:
            # A quantised layer's float kernels are no matmul's output, so none of these policies saves
            # them: the backward pass recomputes them from the codes instead of storing every layer's.
            # (Naming them and saving "anything except" would store the value before the name instead.)
            policy = REMAT_POLICIES[c.remat_policy] if c.remat else jax.checkpoint_policies.dots_saveable
            layer = nn.remat(layer, prevent_cse=False, policy=policy)
        scanned = nn.scan(
            layer,
            variable_axes={"params": 0, "lora": 0},
            split_rngs={"params": True},
            in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, 0),
            length=c.num_layers,
        )(c, name="layers")
        layer_cache = None if cache is None else (cache.k, cache.v)
        layer_keys = None  # LoRA dropout: row b's key in layer l is fold_in(dropout_keys[b], l)
        if dropout_keys is not None and c.lora_dropout > 0:
            layer_keys = jax.vmap(lambda l: jax.vmap(jax.random.fold_in, in_axes=(0, None))(dropout_keys, l))(
                jnp.arange(c.num_layers))
        x, (k, v) = scanned(x, cos, sin, kv_mask, cache_index, layer_cache, layer_keys)
        x = RMSNorm(c.rms_norm_eps, c.jnp_param_dtype, name="final_norm")(x)
        if cache is None:
            return x, KVCache(k, v)
        with jax.named_scope("cache_write"):  # a name for profiles (experiments/profile_rollout.py)
            if jnp.ndim(cache_index) == 1:  # row b's one new token goes to its own slot cache_index[b]: a scatter
                rows = jnp.arange(cache.k.shape[1])
                write = lambda buf, new: buf.at[:, rows, :, cache_index, :].set(  # noqa: E731
                    new[:, :, :, 0, :].swapaxes(0, 1).astype(buf.dtype))
                return x, KVCache(write(cache.k, k), write(cache.v, v))
            # One small in-place write of every layer's new keys/values at the step's slots.
            start = (0, 0, 0, cache_index, 0)
            return x, KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), start),
                              jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), start))


TRUNK_KEYS = ("embed", "layers", "final_norm")


def fuse_projections(config: ModelConfig, attn: dict, mlp: dict) -> tuple[dict, dict]:
    """Split projections → the fused parameter layout. ``attn`` has ``{q,k,v,o}_proj`` (kernels
    ``[L, D, H·Dh]`` …, q/k/v biases ``[L, H·Dh]`` when present), ``mlp`` ``{gate,up,down}_proj``;
    returns ``attn`` with ``qkv_proj`` + ``o_proj`` and ``mlp`` with ``gate_up_proj`` + ``down_proj``.
    Returns JAX arrays (:mod:`jaxppo.weights.hf` fuses on import with it)."""
    hkv, dh = config.num_kv_heads, config.head_dim
    g = config.num_heads // hkv

    def grouped(x, heads_per_kv):  # [..., heads·Dh] → [..., H_kv, heads_per_kv, Dh]
        return x.reshape(*x.shape[:-1], hkv, heads_per_kv, dh)

    qkv = {"kernel": jnp.concatenate([grouped(attn[n]["kernel"], g if n == "q_proj" else 1)
                                     for n in ("q_proj", "k_proj", "v_proj")], axis=-2)}
    if "bias" in attn["q_proj"]:
        qkv["bias"] = jnp.concatenate([grouped(attn[n]["bias"], g if n == "q_proj" else 1)
                                      for n in ("q_proj", "k_proj", "v_proj")], axis=-2)
    gate_up = {"kernel": jnp.stack([mlp["gate_proj"]["kernel"], mlp["up_proj"]["kernel"]], axis=-2)}
    return {"qkv_proj": qkv, "o_proj": attn["o_proj"]}, {"gate_up_proj": gate_up, "down_proj": mlp["down_proj"]}


def split_projections(config: ModelConfig, attn: dict, mlp: dict) -> tuple[dict, dict]:
    """The inverse of :func:`fuse_projections`: ``{q,k,v,o}_proj`` and ``{gate,up,down}_proj``."""
    g = config.num_heads // config.num_kv_heads

    def flat(x):  # [..., H_kv, n, Dh] → [..., H_kv·n·Dh]
        return x.reshape(*x.shape[:-3], -1)

    out_attn = {}
    for name, part in (("q_proj", slice(0, g)), ("k_proj", slice(g, g + 1)), ("v_proj", slice(g + 1, g + 2))):
        out_attn[name] = {k: flat(v[..., part, :]) for k, v in attn["qkv_proj"].items()}
    out_attn["o_proj"] = attn["o_proj"]
    gate_up = mlp["gate_up_proj"]["kernel"]
    return out_attn, {"gate_proj": {"kernel": gate_up[..., 0, :]}, "up_proj": {"kernel": gate_up[..., 1, :]},
                      "down_proj": mlp["down_proj"]}


def positions_from_mask(attention_mask: Array) -> Array:
    """Position ids of left- (or right-) padded rows: the count of real tokens before each one."""
    mask = attention_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)


def decoder_hidden(
    config: ModelConfig,
    params: dict,
    tokens: Array,
    attention_mask: Array,
    *,
    positions: Array | None = None,
    cache: KVCache | None = None,
    cache_index: Array | int = 0,
    kv_mask: Array | None = None,
    dropout_keys: Array | None = None,
) -> tuple[Array, KVCache]:
    """Final hidden states ``[B, S, D]`` (float32) and the keys/values of this call.

    Without ``cache``: ``tokens``/``attention_mask`` are whole (left-padded) sequences and the
    returned :class:`KVCache` holds their keys/values (``[L, B, H_kv, S, D_h]``). With ``cache``:
    the tokens are written at slot ``cache_index`` of the cache and attend to the slots marked in
    ``kv_mask`` ``[B, S_max]``; the updated cache is returned. ``cache_index`` may also be ``[B]``
    (one token per row, ``S = 1``): row ``b``'s token is written at, and attends before, its own slot.

    ``dropout_keys`` ``[B, 2]`` (one raw key per row; training steps only) turns on LoRA dropout at
    rate ``config.lora_dropout`` on the adapters' inputs; without them (evaluation, sampling, RL) the
    model is deterministic.
    """
    if tokens.ndim != 2:
        raise ValueError(f"decoder_hidden: `tokens` must have shape [B, S], got {tokens.shape}")
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"decoder_hidden: `attention_mask` has shape {attention_mask.shape}, expected {tokens.shape}")
    if positions is None:
        positions = positions_from_mask(attention_mask)
    if kv_mask is None:
        kv_mask = attention_mask
    if dropout_keys is not None and dropout_keys.shape != (tokens.shape[0], 2):
        raise ValueError(f"decoder_hidden: `dropout_keys` must have shape [{tokens.shape[0]}, 2] (one raw key per "
                         f"row), got {dropout_keys.shape}")
    variables = {"params": {k: params[k] for k in TRUNK_KEYS}}
    if "lora" in params:  # LoRA adapters (jaxppo.lora) on the projections
        check_adapters(config, params["lora"], where="decoder_hidden: params['lora']")
        variables["lora"] = params["lora"]
    decoder = Decoder(config, quantized=is_quantized(params))
    hidden, kv = decoder.apply(variables, tokens, positions, kv_mask, cache, cache_index, dropout_keys)
    return hidden.astype(jnp.float32), kv


def init_trunk(config: ModelConfig, key: Array) -> dict:
    """Randomly initialised trunk parameters (normal(0.02) kernels, unit norms)."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config).init(key, tokens, tokens, jnp.ones((1, 1), jnp.int32))["params"]

