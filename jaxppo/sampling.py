"""Jitted generation with a static-shape KV cache: prefill, then a ``lax.while_loop`` decode.

Prompts are left-padded ``[B, P]`` with an explicit mask. The cache has ``P + max_new_tokens``
slots: the prompt fills slots ``0..P−1`` and response token ``i`` is written at slot ``P + i`` for
every row, so one ``dynamic_update_slice`` serves the whole batch. Key slots are masked by an
explicit ``[B, P + N]`` mask, never derived from token ids.

Each row stops independently at its first stop token (EOS by default) or at its own length cap
(``max_lengths``); the stop token belongs to the response (mask 1: the reward model scores it, the
policy is trained on it); later positions hold ``pad_token_id`` with mask 0. The loop exits early
once every row has stopped.

Randomness is keyed per request and per position (:func:`token_keys`): token ``t`` of request ``r``
(row ``b`` is request ``request_ids[b]``, default ``b``) is drawn with ``fold_in(fold_in(key, r), t)``,
so a request gets the same tokens whatever batch row or decode step produces it — the contract
that lets :mod:`jaxppo.engine`'s slot-refill decoding return exactly this sampler's samples.

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


def token_keys(key: Array, request_ids: Array, steps: Array) -> Array:
    """The keys ``[B]`` of response token ``steps[b]`` of request ``request_ids[b]``:
    ``fold_in(fold_in(key, request), step)``. Randomness keyed by request and position, not by batch
    row or decode step, so a request draws the same tokens whichever slot and step decode it
    (:mod:`jaxppo.engine` relies on it)."""
    with jax.named_scope("sampling"):  # a name for profiles (experiments/profile_rollout.py)
        return jax.vmap(lambda r, t: jax.random.fold_in(jax.random.fold_in(key, r), t))(request_ids, steps)


def categorical_inverse_cdf(keys: Array, logits: Array) -> Array:
    """One draw per row of ``softmax(logits)`` ``[B, V]`` by inverting the CDF with one uniform per row,
    row ``b``'s uniform drawn from ``keys[b]`` (a ``[B]`` array of keys, :func:`token_keys`).

    The same distribution as ``jax.random.categorical`` (Gumbel-max), but it draws B random numbers
    instead of B·V: with a 49k vocabulary the Gumbel noise costs more than the LM head on a CPU.
    """
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    cdf = jnp.cumsum(probs, axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k, (1,), jnp.float32))(keys) * cdf[..., -1:]
    index = jnp.sum(cdf <= u, axis=-1)
    # Guard the float edge (u at the very top of the CDF) and never land on a zero-probability id.
    index = jnp.minimum(index, logits.shape[-1] - 1)
    fallback = jnp.argmax(logits, axis=-1)
    ok = jnp.take_along_axis(probs, index[..., None], axis=-1)[..., 0] > 0
    return jnp.where(ok, index, fallback)


def choose(logits: Array, keys: Array, *, sampling: SamplingParams) -> tuple[Array, Array]:
    """The next token ``[B]`` (int32) of each row and its log-prob at the sampling temperature (before
    top-k/top-p; τ = 1 when greedy). ``keys`` ``[B]``: each row's key (:func:`token_keys`)."""
    with jax.named_scope("sampling"):  # a name for profiles (experiments/profile_rollout.py)
        if sampling.temperature == 0:
            token = jnp.argmax(logits, axis=-1)
            logp = jax.nn.log_softmax(logits, axis=-1)
        else:
            scaled = logits / sampling.temperature
            logp = jax.nn.log_softmax(scaled, axis=-1)
            filtered = filter_logits(scaled, top_k=sampling.top_k, top_p=sampling.top_p)
            token = categorical_inverse_cdf(keys, filtered)
        return token.astype(jnp.int32), jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


def check_requests(name: str, prompt_tokens: Array, prompt_mask: Array, request_ids: Array | None,
                   max_lengths: Array | None, max_new_tokens: int) -> tuple[Array, Array, Array]:
    """The checked inputs of a sampler ``name``: ``prompt_mask`` as int32, ``request_ids`` (default
    ``0..B−1``) and ``max_lengths`` (default ``max_new_tokens``) as int32 ``[B]``."""
    if prompt_tokens.ndim != 2 or prompt_mask.shape != prompt_tokens.shape:
        raise ValueError(f"{name}: `prompt_tokens` [B, P] and `prompt_mask` must match, got "
                         f"{prompt_tokens.shape} and {prompt_mask.shape}")
    batch = prompt_tokens.shape[0]
    if request_ids is None:
        request_ids = jnp.arange(batch, dtype=jnp.int32)
    if max_lengths is None:
        max_lengths = jnp.full((batch,), max_new_tokens, jnp.int32)
    for arg, x in (("request_ids", request_ids), ("max_lengths", max_lengths)):
        if jnp.shape(x) != (batch,):
            raise ValueError(f"{name}: `{arg}` must have shape [{batch}] (one per prompt row), got {jnp.shape(x)}")
    return (prompt_mask.astype(jnp.int32), jnp.asarray(request_ids, jnp.int32),
            jnp.minimum(jnp.asarray(max_lengths, jnp.int32), max_new_tokens))


def sample(
    config: ModelConfig,
    params: dict,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    *,
    sampling: SamplingParams,
    request_ids: Array | None = None,
    max_lengths: Array | None = None,
) -> SampleOutput:
    """Generates up to ``sampling.max_new_tokens`` tokens for left-padded prompts ``[B, P]``.

    Row ``b`` is request ``request_ids[b]`` (default ``b``): its token ``t`` is drawn with
    ``token_keys(key, request_ids, t)``. ``max_lengths`` ``[B]`` (default ``max_new_tokens``) caps each
    row's response length (a row that reaches its cap stops without a stop token). Pure and jittable
    (``sampling`` and ``config`` static); see the module docstring.
    """
    n_new = sampling.max_new_tokens
    prompt_mask, request_ids, max_lengths = check_requests("sample", prompt_tokens, prompt_mask, request_ids,
                                                           max_lengths, n_new)
    batch, prompt_len = prompt_tokens.shape

    hidden, prompt_kv = decoder_hidden(config, params, prompt_tokens, prompt_mask)
    pad_kv = jnp.zeros(prompt_kv.k.shape[:3] + (n_new,) + prompt_kv.k.shape[4:], prompt_kv.k.dtype)
    # under a mesh: batch over (data, fsdp), KV heads over tensor, like the projections that fill it
    cache = KVCache(constrain(jnp.concatenate([prompt_kv.k, pad_kv], 3), KV_CACHE_SPEC),
                    constrain(jnp.concatenate([prompt_kv.v, pad_kv], 3), KV_CACHE_SPEC))
    kv_mask = jnp.concatenate([prompt_mask, jnp.zeros((batch, n_new), jnp.int32)], axis=1)
    logits = lm_logits(config, params, hidden[:, -1])
    positions = jnp.sum(prompt_mask, axis=1)  # next token's position in each row
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def cond(state):
        i, done = state[0], state[1]
        return (i < n_new) & ~jnp.all(done)

    def body(state):
        i, done, logits, cache, kv_mask, positions, out_tokens, out_mask, out_logp = state
        token, logp = choose(logits, token_keys(key, request_ids, jnp.full((batch,), i)), sampling=sampling)
        live = ~done
        token = jnp.where(live, token, sampling.pad_token_id)
        out_tokens = out_tokens.at[:, i].set(token)
        out_mask = out_mask.at[:, i].set(live.astype(jnp.float32))
        out_logp = out_logp.at[:, i].set(jnp.where(live, logp, 0.0))
        done = done | jnp.any(token[:, None] == stop_ids[None, :], axis=-1) | (i + 1 >= max_lengths)
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
        jnp.int32(0), max_lengths <= 0, logits, cache, kv_mask, positions,
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
