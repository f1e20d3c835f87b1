"""Jitted generation with a static-shape KV cache: prefill, then a ``lax.while_loop`` decode.

Prompts are left-padded ``[B, P]`` with an explicit mask. The cache has ``P + max_new_tokens``
slots: the prompt fills slots ``0..P−1`` and response token ``i`` is written at slot ``P + i`` for
every row, so one ``dynamic_update_slice`` serves the whole batch. Key slots are masked by an
explicit ``[B, P + N]`` mask, never derived from token ids.

Each row stops independently at its first stop token (EOS by default); the stop token belongs to
the response (mask 1: the reward model scores it, the policy is trained on it); later positions
hold ``pad_token_id`` with mask 0. The loop exits early once every row has stopped.

``logprobs`` are :math:`\\log \\mathrm{softmax}(z/τ)[a]` of the sampled tokens at the sampling
temperature τ, *before* top-k / top-p truncation: exactly what PPO recomputes as old log-probs
with a forward pass at the same temperature. Greedy decoding (``temperature=0``) reports
log-probs at τ = 1.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.config import require, require_range
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import lm_logits
from jaxppo.models.llama import KVCache, decoder_hidden
from jaxppo.sharding import KV_CACHE_SPEC, constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to decode. Hashable: it is a static argument of the jitted sampler."""

    max_new_tokens: int = 64
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 disables
    top_p: float = 1.0  # 1 disables
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "sampling.max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        require_range(self.temperature, "sampling.temperature", ge=0)  # 0: greedy
        require_range(self.top_k, "sampling.top_k", ge=0)
        require_range(self.top_p, "sampling.top_p", gt=0, le=1)
        require_range(self.pad_token_id, "sampling.pad_token_id", ge=0)
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))


class SampleOutput(struct.PyTreeNode):
    """Responses ``[B, N]``: tokens, validity mask (1 up to and including the stop token) and log-probs."""

    tokens: Array
    mask: Array
    logprobs: Array


def filter_logits(logits: Array, *, top_k: int = 0, top_p: float = 1.0) -> Array:
    """Sets logits outside the top-k / nucleus (top-p) set to −inf. ``logits``: ``[B, V]``."""
    neg_inf = jnp.finfo(logits.dtype).min
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, neg_inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # keep the smallest prefix whose mass reaches top_p: token i stays if the mass before it < p
        n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
        threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
        logits = jnp.where(logits < threshold, neg_inf, logits)
    return logits


def categorical_inverse_cdf(key: Array, logits: Array) -> Array:
    """One draw per row of ``softmax(logits)`` ``[B, V]`` by inverting the CDF with one uniform per row.

    The same distribution as ``jax.random.categorical`` (Gumbel-max), but it draws B random numbers
    instead of B·V: with a 49k vocabulary the Gumbel noise costs more than the LM head on a CPU.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, logits.shape[:-1] + (1,), jnp.float32) * cdf[..., -1:]
    index = jnp.sum(cdf <= u, axis=-1)
    # Guard the float edge (u at the very top of the CDF) and never land on a zero-probability id.
    index = jnp.minimum(index, logits.shape[-1] - 1)
    fallback = jnp.argmax(logits, axis=-1)
    ok = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0] > 0
    return jnp.where(ok, index, fallback)


def sample(
    config: ModelConfig,
    params: dict,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    *,
    sampling: SamplingParams,
) -> SampleOutput:
    """Generates up to ``sampling.max_new_tokens`` tokens for left-padded prompts ``[B, P]``.

    Pure and jittable (``sampling`` and ``config`` static); see the module docstring.
    """
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"sample: `prompt_tokens` [B, P] and `prompt_mask` must match, got "
                         f"{prompt_tokens.shape} and {prompt_mask.shape}")
    batch, prompt_len = prompt_tokens.shape
    n_new = sampling.max_new_tokens
    prompt_mask = prompt_mask.astype(jnp.int32)

    hidden, prompt_kv = decoder_hidden(config, params, prompt_tokens, prompt_mask)
    pad_kv = jnp.zeros(prompt_kv.k.shape[:3] + (n_new,) + prompt_kv.k.shape[4:], prompt_kv.k.dtype)
    # under a mesh: batch over (data, fsdp), KV heads over tensor, like the projections that fill it
    cache = KVCache(constrain(jnp.concatenate([prompt_kv.k, pad_kv], 3), KV_CACHE_SPEC),
                    constrain(jnp.concatenate([prompt_kv.v, pad_kv], 3), KV_CACHE_SPEC))
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, n_new), jnp.int32)], axis=1)
    logits = lm_logits(config, params, hidden[:, -1])
    positions = jnp.sum(prompt_mask, axis=1)  # next token's position in each row
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def choose(logits, step_key):
        if sampling.temperature == 0:
            token = jnp.argmax(logits, axis=-1)
            logp = jax.nn.log_softmax(logits, axis=-1)
        else:
            scaled = logits / sampling.temperature
            logp = jax.nn.log_softmax(scaled, axis=-1)
            filtered = filter_logits(scaled, top_k=sampling.top_k, top_p=sampling.top_p)
            token = categorical_inverse_cdf(step_key, filtered)
        return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]

    def cond(state):
        i, done = state[0], state[1]
        return (i < n_new) & ~jnp.all(done)

    def body(state):
        i, done, logits, cache, kv_mask, positions, out_tokens, out_mask, out_logp = state
        token, logp = choose(logits, jax.random.fold_in(key, i))
        live = ~done
        token = jnp.where(live, token, sampling.pad_token_id)
        out_tokens = out_tokens.at[:, i].set(token)
        out_mask = out_mask.at[:, i].set(live.astype(jnp.float32))
        out_logp = out_logp.at[:, i].set(jnp.where(live, logp, 0.0))
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1)
        slot = prompt_len + i
        kv_mask = jax.lax.dynamic_update_slice(kv_mask, live.astype(jnp.int32)[:, None], (0, slot))
        hidden, cache = decoder_hidden(
            config, params, token[:, None], live.astype(jnp.int32)[:, None], positions=positions[:, None],
            cache=cache, cache_index=slot, kv_mask=kv_mask,
        )
        logits = lm_logits(config, params, hidden[:, 0])
        positions = positions + live.astype(jnp.int32)
        return i + 1, done, logits, cache, kv_mask, positions, out_tokens, out_mask, out_logp

    init = (
        jnp.int32(0), jnp.zeros((batch,), bool), logits, cache, kv_mask, positions,
        jnp.full((batch, n_new), sampling.pad_token_id, jnp.int32),
        jnp.zeros((batch, n_new), jnp.float32), jnp.zeros((batch, n_new), jnp.float32),
    )
    final = jax.lax.while_loop(cond, body, init)
    return SampleOutput(tokens=final[6], mask=final[7], logprobs=final[8])


def make_sampler(config: ModelConfig, sampling: SamplingParams):
    """``jax.jit``-ed ``sampler(params, prompt_tokens, prompt_mask, key) -> SampleOutput``.

    Traced once per (batch, prompt length) for the given ``sampling`` (which fixes N).
    """
    return jax.jit(functools.partial(sample, config, sampling=sampling))
