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

from jaxppo.losses import token_entropy, token_logprobs
from jaxppo.models.config import ModelConfig
from jaxppo.models.llama import init_trunk

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
    Each chunk is :func:`jaxppo.losses.token_logprobs` (and :func:`jaxppo.losses.token_entropy`) of
    its logits, the functions the float64 references test.
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
        logp = token_logprobs(logits, t_chunk)
        return (logp, token_entropy(logits)) if with_entropy else logp

    out = jax.lax.map(lambda xs: one_chunk(*xs), (jnp.moveaxis(h, 1, 0), jnp.moveaxis(t, 1, 0)))
    # [n_chunks, B, chunk] → [B, S]
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(batch, -1)[:, :seq], out)


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
