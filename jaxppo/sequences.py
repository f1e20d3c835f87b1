"""Forward passes over (prompt, response) pairs, shared by SFT, reward modelling and PPO.

Layout (the same everywhere): prompts are left-padded ``[B, P]`` with ``prompt_mask``; responses
are right-padded ``[B, N]`` with ``response_mask`` (1 up to and including the stop token). The
sequence is their concatenation ``[B, P + N]``. Response token t sits at position P + t and is
predicted from position P + t − 1, so "the state before token t" — where the policy's log-prob and
the critic's value V(s_t) are read — is position P + t − 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxppo.masking import last_valid_index
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import chosen_logprobs, scalar_head
from jaxppo.models.llama import decoder_hidden

Array = jax.Array


def concat(prompt: Array, prompt_mask: Array, response: Array, response_mask: Array) -> tuple[Array, Array]:
    """``(tokens, mask)`` of the whole sequences ``[B, P + N]`` (masks as int32)."""
    if prompt.shape[0] != response.shape[0]:
        raise ValueError(f"prompt batch {prompt.shape[0]} != response batch {response.shape[0]}")
    tokens = jnp.concatenate([prompt, response], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([prompt_mask, response_mask], axis=1).astype(jnp.int32)
    return tokens, mask


def response_hidden(
    config: ModelConfig, params: dict, prompt: Array, prompt_mask: Array, response: Array, response_mask: Array,
    *, dropout_keys: Array | None = None,
) -> tuple[Array, Array]:
    """Hidden states of the states before each response token ``[B, N, D]`` and of all positions.
    ``dropout_keys`` ``[B, 2]``: LoRA dropout's per-row keys (:func:`jaxppo.models.llama.decoder_hidden`)."""
    tokens, mask = concat(prompt, prompt_mask, response, response_mask)
    hidden, _ = decoder_hidden(config, params, tokens, mask, dropout_keys=dropout_keys)
    p = prompt.shape[1]
    return hidden[:, p - 1 : p - 1 + response.shape[1]], hidden


def response_logprobs(
    config: ModelConfig,
    params: dict,
    prompt: Array,
    prompt_mask: Array,
    response: Array,
    response_mask: Array,
    *,
    temperature: float = 1.0,
    value_head: str | None = None,
    with_entropy: bool = False,
    dropout_keys: Array | None = None,
):
    """log π(response_t | prefix) ``[B, N]`` at ``temperature``; optionally values and entropy.

    With ``value_head`` (a shared-trunk actor-critic) also returns that head's values ``[B, N]``
    from the same forward pass; with ``with_entropy`` also the per-token entropy ``[B, N]``.
    Returns a tuple ``(logprobs, values or None, entropy or None)``. ``dropout_keys``: as in
    :func:`response_hidden` (SFT and DPO steps; never RL, whose ratio needs a deterministic policy).
    """
    hidden, _ = response_hidden(config, params, prompt, prompt_mask, response, response_mask,
                                dropout_keys=dropout_keys)
    out = chosen_logprobs(config, params, hidden, response.astype(jnp.int32), temperature=temperature,
                          with_entropy=with_entropy)
    logprobs, ent = out if with_entropy else (out, None)
    values = scalar_head(params[value_head], hidden) if value_head is not None else None
    return logprobs, values, ent


def response_values(
    config: ModelConfig, params: dict, prompt: Array, prompt_mask: Array, response: Array, response_mask: Array,
    *, head: str = "value_head",
) -> Array:
    """Critic values V(s_t) ``[B, N]`` of the states before each response token."""
    hidden, _ = response_hidden(config, params, prompt, prompt_mask, response, response_mask)
    return scalar_head(params[head], hidden)


POOLINGS = ("last", "mean")


def response_features(
    config: ModelConfig, params: dict, prompt: Array, prompt_mask: Array, response: Array, response_mask: Array,
    *, pooling: str = "last", dropout_keys: Array | None = None,
) -> Array:
    """The pooled final hidden state ``[B, D]`` (float32) that a linear reward head reads.

    ``pooling="last"``: the state at the sequence's last real token (InstructGPT). ``"mean"``: the
    mean of the states at the response's own tokens, ``mean_t h_t`` (zeros for an empty response).
    ``dropout_keys``: as in :func:`response_hidden` (reward-model training steps).
    """
    if pooling not in POOLINGS:
        raise ValueError(f"response_features: `pooling`={pooling!r} is not one of {POOLINGS}")
    tokens, mask = concat(prompt, prompt_mask, response, response_mask)
    hidden, _ = decoder_hidden(config, params, tokens, mask, dropout_keys=dropout_keys)
    hidden = hidden.astype(jnp.float32)
    if pooling == "last":
        last = jnp.maximum(last_valid_index(mask), 0)  # an empty sequence (never in practice) reads position 0
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
    weights = response_mask.astype(jnp.float32)[..., None]  # [B, N, 1]
    return jnp.sum(hidden[:, prompt.shape[1]:] * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)


def response_scores(
    config: ModelConfig, params: dict, prompt: Array, prompt_mask: Array, response: Array, response_mask: Array,
    *, head: str = "reward_head", pooling: str = "last",
) -> Array:
    """Reward-model score ``[B]`` of each (prompt, response): the linear head of :func:`response_features`.

    ``pooling="last"``: the head at the sequence's last real token. ``"mean"``: the head's mean over
    the response's own tokens, ``w · mean_t h_t + b`` (the head is linear), a summary of the whole
    response rather than of the state after its stop token; an empty response scores the bias.
    """
    features = response_features(config, params, prompt, prompt_mask, response, response_mask, pooling=pooling)
    return scalar_head(params[head], features)
