"""Slot-refill decoding ("continuous batching") as one jitted program with static shapes.

The static sampler (:func:`jaxppo.sampling.sample`) decodes a batch until its longest row stops,
so with long-tailed response lengths most decode steps are spent on rows that are already done.
:func:`generate` keeps ``S`` decode slots busy instead: ``N ≥ S`` requests (one left-padded prompt
row each) wait in a queue; when a slot's row emits a stop token or reaches its length cap, its
result is already written out and the next request takes the slot on the same step.

**Layout.** The slot cache is ``[L, S, H_kv, P + N_new, D_h]`` with the same per-row layout as the
static sampler's: the prompt fills slots ``0..P−1`` (left-padded), response token ``i`` of the
request goes to slot ``P + i``. A slot's rows are independent, so each slot is at its own step
(:func:`jaxppo.models.decoder_hidden` with a ``[S]`` ``cache_index`` scatters each row's new keys
and values at its own position).

**Prefill.** All ``N`` prompts are prefilled up front in one batched forward pass — the same
compute-bound pass the static sampler makes for its batch — into a pool of prompt keys/values
``[L, N, H_kv, P, D_h]`` and last hidden states ``[N, D]``. Refilling a slot copies its request's
pool rows into the slot (a gather of ``P`` positions, under ``lax.cond`` so that steps without a
refill pay nothing); there is no forward pass inside the decode loop but the one-token step. Chosen
over prefilling inside the loop because a refill then costs no decode step at all (a slot emits a
useful token on every step while the queue lasts) and because batching the refills of one step
would make finished slots wait; the price is the pool's memory (``P/(P+N_new)`` of a static
sampler's cache for the same ``N``).

**Draining.** When the queue is empty the last rows finish one by one. While at most half of the
``W`` slots are live, the live rows are compacted into the first ``W/2`` slots and decoding
continues at half the width (``S, S/2, …, min_slots``): each width is its own ``while_loop`` in the
same program, so the tail of long responses runs at a small batch instead of ``S`` mostly idle rows.

**Same samples.** Token ``t`` of request ``r`` is drawn with the key ``fold_in(fold_in(key, r), t)``
(:func:`jaxppo.sampling.token_keys`), as in the static sampler, so a request's tokens and log-probs do
not depend on which slot or step decodes it: ``generate`` returns what :func:`~jaxppo.sampling.sample`
returns for the same prompts, key and caps (the tests check token-for-token equality).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import lm_logits
from jaxppo.models.llama import KVCache, decoder_hidden
from jaxppo.sampling import SampleOutput, SamplingParams, check_requests, choose, token_keys
from jaxppo.sharding import KV_CACHE_SPEC, batch_shards, constrain

Array = jax.Array


class EngineStats(struct.PyTreeNode):
    """Counters of one :func:`generate` call (int32 scalars)."""

    steps: Array  # decode steps (loop iterations at any width)
    slot_steps: Array  # Σ over steps of the width decoded (rows computed)
    useful_tokens: Array  # response tokens produced (Σ of the output mask)
    refills: Array  # requests placed into a slot after the first fill

    @property
    def utilisation(self) -> Array:
        """Fraction of decoded rows that produced a response token."""
        return self.useful_tokens / jnp.maximum(self.slot_steps, 1)


class _Slots(struct.PyTreeNode):
    """The loop state of ``W`` decode slots."""

    hidden: Array  # [W, D] last hidden state of each slot's row (the next token's logits come from it)
    k: Array  # [L, W, H_kv, T, D_h]
    v: Array
    kv_mask: Array  # [W, T] valid key slots
    positions: Array  # [W] position id of the next token
    step: Array  # [W] response index of the next token
    request: Array  # [W] request id (N when idle)
    active: Array  # [W] bool


def _widths(slots: int, min_slots: int) -> list[int]:
    widths = [slots]
    while widths[-1] // 2 >= min_slots and widths[-1] > 1:
        widths.append(widths[-1] // 2)
    return widths


def generate(
    config: ModelConfig,
    params: dict,
    prompt_tokens: Array,
    prompt_mask: Array,
    key: Array,
    *,
    sampling: SamplingParams,
    slots: int,
    min_slots: int = 1,
    request_ids: Array | None = None,
    max_lengths: Array | None = None,
) -> tuple[SampleOutput, EngineStats]:
    """Responses ``[N, N_new]`` to left-padded prompts ``[N, P]`` by slot-refill decoding over
    ``min(slots, N)`` slots; see the module docstring. ``request_ids`` / ``max_lengths`` as in
    :func:`jaxppo.sampling.sample` (each row's key id and length cap). ``min_slots`` is the narrowest
    width the drain compacts to (1: down to one row; under a mesh at least the batch axis' shard
    count). Pure and jittable (``config``, ``sampling``, ``slots`` and ``min_slots`` static).
    Returns the same :class:`SampleOutput` as ``sample`` and the :class:`EngineStats`.
    """
    if slots < 1 or min_slots < 1:
        raise ValueError(f"generate: `slots` and `min_slots` must be >= 1, got {slots} and {min_slots}")
    n_new = sampling.max_new_tokens
    prompt_mask, request_ids, max_lengths = check_requests("generate", prompt_tokens, prompt_mask, request_ids,
                                                           max_lengths, n_new)
    n_req, prompt_len = prompt_tokens.shape
    width = min(slots, n_req)
    min_slots = min(width, max(min_slots, batch_shards()))  # under a mesh: at least one row per batch shard
    total = prompt_len + n_new

    # the prompt pool: every request's prompt keys/values and last hidden state, one batched pass
    pool_hidden, pool_kv = decoder_hidden(config, params, prompt_tokens, prompt_mask)
    pool_hidden = pool_hidden[:, -1]
    pool_positions = jnp.sum(prompt_mask, axis=1)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)

    def refill(s: _Slots, next_request: Array) -> tuple[_Slots, Array, Array]:
        """Idle slots take the next requests of the queue, in slot order."""
        free = ~s.active
        new = next_request + jnp.cumsum(free) - 1
        take = free & (new < n_req)
        live = take & (max_lengths[jnp.minimum(new, n_req - 1)] > 0)  # a cap of 0: done before its first token

        def place(s):
            src = jnp.minimum(new, n_req - 1)
            target = jnp.where(take, jnp.arange(s.active.shape[0]), s.active.shape[0])  # out of range: dropped
            put = lambda buf, pool: buf.at[:, target, :, :prompt_len].set(pool[:, src], mode="drop")  # noqa: E731
            row = lambda old, value: jnp.where(take.reshape((-1,) + (1,) * (old.ndim - 1)), value, old)  # noqa: E731
            kv_mask = jnp.concatenate([prompt_mask[src], jnp.zeros((src.shape[0], n_new), jnp.int32)], axis=1)
            return _Slots(hidden=row(s.hidden, pool_hidden[src]), k=put(s.k, pool_kv.k), v=put(s.v, pool_kv.v),
                          kv_mask=row(s.kv_mask, kv_mask), positions=row(s.positions, pool_positions[src]),
                          step=row(s.step, 0), request=row(s.request, jnp.where(live, src, n_req)),
                          active=s.active | live)

        count = jnp.sum(take.astype(jnp.int32))
        with jax.named_scope("refill"):  # names for profiles (experiments/profile_rollout.py)
            s = jax.lax.cond(count > 0, place, lambda s: s, s)
        return s, next_request + count, count

    def decode_step(s: _Slots, out):
        tokens, mask, logp_out = out
        logits = lm_logits(config, params, s.hidden)
        req = jnp.minimum(s.request, n_req - 1)
        token, logp = choose(logits, token_keys(key, request_ids[req], s.step), sampling=sampling)
        live = s.active
        token = jnp.where(live, token, sampling.pad_token_id)
        row = jnp.where(live, s.request, n_req)  # idle rows write nowhere
        col = jnp.minimum(s.step, n_new - 1)
        with jax.named_scope("output_write"):
            tokens = tokens.at[row, col].set(token, mode="drop")
            mask = mask.at[row, col].set(1.0, mode="drop")
            logp_out = logp_out.at[row, col].set(logp, mode="drop")
        finished = jnp.any(token[:, None] == stop_ids[None, :], axis=-1) | (s.step + 1 >= max_lengths[req])
        cache_index = prompt_len + col
        kv_mask = s.kv_mask.at[jnp.arange(live.shape[0]), cache_index].set(live.astype(jnp.int32))
        hidden, cache = decoder_hidden(
            config, params, token[:, None], live.astype(jnp.int32)[:, None], positions=s.positions[:, None],
            cache=KVCache(s.k, s.v), cache_index=cache_index, kv_mask=kv_mask,
        )
        step = live.astype(jnp.int32)
        s = _Slots(hidden=hidden[:, 0], k=cache.k, v=cache.v, kv_mask=kv_mask, positions=s.positions + step,
                   step=s.step + step, request=jnp.where(live & finished, n_req, s.request),
                   active=live & ~finished)
        return s, (tokens, mask, logp_out), jnp.sum(step)

    def run(width_now: int, first: bool, last: bool, carry):
        """Decode at ``width_now`` slots while the queue lasts (refilling: the first width only) or more
        than half the slots are live (any width but the last, which runs until every row is done)."""

        def cond(c):
            s, next_request = c[0], c[1]
            live = jnp.sum(s.active.astype(jnp.int32))
            queued = next_request < n_req
            return (live > 0) & ((live > width_now // 2) | last) | queued

        def body(c):
            s, next_request, out, stats = c
            s, out, useful = decode_step(s, out)
            count = jnp.int32(0)
            if first:
                s, next_request, count = refill(s, next_request)
            stats = EngineStats(steps=stats.steps + 1, slot_steps=stats.slot_steps + width_now,
                                useful_tokens=stats.useful_tokens + useful, refills=stats.refills + count)
            return s, next_request, out, stats

        return jax.lax.while_loop(cond, body, carry)

    def compact(s: _Slots, new_width: int) -> _Slots:
        """The live rows (at most ``new_width``) moved to the first ``new_width`` slots."""
        with jax.named_scope("compact"):
            order = jnp.argsort(~s.active, stable=True)[:new_width]
            return _Slots(hidden=s.hidden[order], k=s.k[:, order], v=s.v[:, order], kv_mask=s.kv_mask[order],
                          positions=s.positions[order], step=s.step[order], request=s.request[order],
                          active=s.active[order])

    kv_shape = (pool_kv.k.shape[0], width, pool_kv.k.shape[2], total, pool_kv.k.shape[4])
    zeros_i = jnp.zeros((width,), jnp.int32)
    s = _Slots(hidden=jnp.zeros((width, pool_hidden.shape[-1]), pool_hidden.dtype),
               k=constrain(jnp.zeros(kv_shape, pool_kv.k.dtype), KV_CACHE_SPEC),
               v=constrain(jnp.zeros(kv_shape, pool_kv.v.dtype), KV_CACHE_SPEC),
               kv_mask=jnp.zeros((width, total), jnp.int32), positions=zeros_i, step=zeros_i,
               request=jnp.full((width,), n_req, jnp.int32), active=jnp.zeros((width,), bool))
    s, next_request, _ = refill(s, jnp.int32(0))
    out = (jnp.full((n_req, n_new), sampling.pad_token_id, jnp.int32), jnp.zeros((n_req, n_new), jnp.float32),
           jnp.zeros((n_req, n_new), jnp.float32))
    zero = jnp.int32(0)
    carry = (s, next_request, out, EngineStats(steps=zero, slot_steps=zero, useful_tokens=zero, refills=zero))
    widths = _widths(width, min_slots)
    for i, w in enumerate(widths):
        if i:
            carry = (compact(carry[0], w),) + carry[1:]
        carry = run(w, i == 0 and n_req > width, i == len(widths) - 1, carry)  # refills: only with a queue
    _, _, (tokens, mask, logprobs), stats = carry
    return SampleOutput(tokens=tokens, mask=mask, logprobs=logprobs), stats


def make_generator(config: ModelConfig, sampling: SamplingParams, *, slots: int, min_slots: int = 1):
    """``jax.jit``-ed ``generator(params, prompt_tokens, prompt_mask, key) -> (SampleOutput, EngineStats)``."""
    return jax.jit(functools.partial(generate, config, sampling=sampling, slots=slots, min_slots=min_slots))
