"""Heads on the decoder trunk: the LM head and scalar (value / reward) heads, plus log-probs.

A model's ``params`` is the trunk tree of :mod:`jaxppo.models.llama` plus optional entries:

* ``lm_head/kernel`` ``[D, V]`` — only when embeddings are untied (tied models use ``embed``);
* ``value_head`` / ``reward_head`` — ``{"kernel": [D, 1], "bias": [1]}`` scalar heads.

Initialisation follows the literature: a value head starts at zero (so the first values do not
disturb GAE), a reward head's kernel is N(0, 1/(D+1)) as in Stiennon et al. 2020 /
lm-human-preferences.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxppo.models.config import ModelConfig
from jaxppo.models.llama import decoder_hidden, init_trunk

Array = jax.Array
SCALAR_HEADS = ("value_head", "reward_head")


def lm_head_kernel(config: ModelConfig, params: dict) -> Array:
    """The ``[D, V]`` output projection: the transposed embedding when tied."""
    if config.tie_word_embeddings:
        return params["embed"]["embedding"].T
    if "lm_head" not in params:
        raise ValueError("params have no `lm_head` but the config says tie_word_embeddings=False")
    return params["lm_head"]["kernel"]


def lm_logits(config: ModelConfig, params: dict, hidden: Array) -> Array:
    """Logits ``[..., V]`` in float32 from hidden states ``[..., D]``."""
    kernel = lm_head_kernel(config, params).astype(config.jnp_dtype)
    return jnp.dot(hidden.astype(config.jnp_dtype), kernel, preferred_element_type=jnp.float32)


def chosen_logprobs(
    config: ModelConfig,
    params: dict,
    hidden: Array,
    targets: Array,
    *,
    temperature: float = 1.0,
    chunk_size: int = 128,
    with_entropy: bool = False,
) -> Array | tuple[Array, Array]:
    r"""log softmax(logits / τ)[target] for ``hidden`` ``[B, S, D]`` and ``targets`` ``[B, S]``.

    The time axis is processed in chunks of ``chunk_size`` under ``jax.checkpoint``: only a
    ``[B, chunk, V]`` block of logits exists at a time, in the forward and in the backward pass
    (vocabularies are 49k-150k, so the full ``[B, S, V]`` log-softmax would dominate memory).
    With ``with_entropy`` also returns the per-token entropy ``[B, S]`` of the same distribution.
    """
    batch, seq, dim = hidden.shape
    if targets.shape != (batch, seq):
        raise ValueError(f"chosen_logprobs: `targets` has shape {targets.shape}, expected {(batch, seq)}")
    chunk = max(1, min(chunk_size, seq))
    n_chunks = -(-seq // chunk)
    pad = n_chunks * chunk - seq
    h = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0))).reshape(batch, n_chunks, chunk, dim)
    t = jnp.pad(targets, ((0, 0), (0, pad))).reshape(batch, n_chunks, chunk)

    @jax.checkpoint
    def one_chunk(h_chunk, t_chunk):
        logits = lm_logits(config, params, h_chunk) / temperature
        log_z = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_chunk[..., None], axis=-1)[..., 0]
        ent = log_z - jnp.sum(jax.nn.softmax(logits, axis=-1) * logits, axis=-1) if with_entropy else log_z
        return picked - log_z, ent

    logp, ent = jax.lax.map(lambda xs: one_chunk(*xs), (jnp.moveaxis(h, 1, 0), jnp.moveaxis(t, 1, 0)))
    logp = jnp.moveaxis(logp, 0, 1).reshape(batch, -1)[:, :seq]
    if not with_entropy:
        return logp
    return logp, jnp.moveaxis(ent, 0, 1).reshape(batch, -1)[:, :seq]


def last_real_index(attention_mask: Array) -> Array:
    """Index ``[B]`` of the last 1 in each row of ``attention_mask`` (0 for an empty row)."""
    length = attention_mask.shape[-1]
    return (length - 1 - jnp.argmax(attention_mask[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def scalar_head(head: dict, hidden: Array) -> Array:
    """``hidden @ kernel + bias`` → ``[B, S]`` float32."""
    out = jnp.dot(hidden.astype(jnp.float32), head["kernel"].astype(jnp.float32)) + head["bias"].astype(jnp.float32)
    return out[..., 0]


def init_scalar_head(config: ModelConfig, key: Array, kind: str) -> dict:
    """``value_head``: zeros; ``reward_head``: kernel ~ N(0, 1/(D+1)), zero bias."""
    if kind not in SCALAR_HEADS:
        raise ValueError(f"init_scalar_head: `kind`={kind!r} is not one of {SCALAR_HEADS}")
    d = config.hidden_size
    if kind == "value_head":
        kernel = jnp.zeros((d, 1), jnp.float32)
    else:
        kernel = jax.random.normal(key, (d, 1), jnp.float32) / jnp.sqrt(d + 1.0)
    return {"kernel": kernel, "bias": jnp.zeros((1,), jnp.float32)}


def init_params(config: ModelConfig, key: Array, *, lm_head: bool = True, scalar_heads: tuple[str, ...] = ()) -> dict:
    """Random parameters: the trunk, an untied LM head if the config asks, and scalar heads."""
    k_trunk, k_lm, k_head = jax.random.split(key, 3)
    params = dict(init_trunk(config, k_trunk))
    if lm_head and not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": (0.02 * jax.random.normal(k_lm, (config.hidden_size, config.vocab_size)))
                             .astype(config.jnp_param_dtype)}
    for i, kind in enumerate(scalar_heads):
        params[kind] = init_scalar_head(config, jax.random.fold_in(k_head, i), kind)
    return params


def causal_lm_logits(config: ModelConfig, params: dict, tokens: Array, attention_mask: Array) -> Array:
    """Next-token logits ``[B, T, V]`` (float32) of left-padded ``tokens`` ``[B, T]``.

    ``attention_mask`` is 1 on real tokens; positions are computed from it, so a left-padded row
    gives the same logits on its real tokens as the unpadded row. Jittable.
    """
    hidden, _ = decoder_hidden(config, params, tokens, attention_mask)
    return lm_logits(config, params, hidden)


def scalar_outputs(config: ModelConfig, params: dict, tokens: Array, attention_mask: Array, *, head: str) -> Array:
    """Per-token outputs ``[B, T]`` of scalar ``head`` (a value model's V(s_t))."""
    hidden, _ = decoder_hidden(config, params, tokens, attention_mask)
    return scalar_head(params[head], hidden)


def sequence_scores(config: ModelConfig, params: dict, tokens: Array, attention_mask: Array, *, head: str = "reward_head") -> Array:
    """Score ``[B]`` of each sequence: the scalar head at its last real token.

    The mask may have padding on both sides (a left-padded prompt followed by a right-padded
    response): the last position with ``attention_mask == 1`` is used.
    """
    per_token = scalar_outputs(config, params, tokens, attention_mask, head=head)
    last = last_real_index(attention_mask)
    return jnp.take_along_axis(per_token, last[:, None], axis=1)[:, 0]
