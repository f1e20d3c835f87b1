"""Supervised fine-tuning: masked next-token NLL on response tokens only.

A batch is a dict of ``prompt`` ``[B, P]`` (left-padded), ``prompt_mask``, ``response`` ``[B, N]``
(right-padded) and ``response_mask``. Prompt tokens are context, never targets:

.. math:: L = −\\frac{1}{\\sum m}\\sum_{b,t} m_{bt} \\log π_θ(y_{bt} \\mid x_b, y_{b,<t})

(:func:`jaxppo.losses.sft_loss` of the response tokens' log-probs, computed in chunks so the
``[B, T, V]`` logits never exist at once.) With micro-batches, the sum over a micro-batch is divided
by the whole batch's token count (:func:`sft_denominators`), so micro-batching leaves the loss as is.
"""

from __future__ import annotations

import functools

import jax
import optax
from flax.training.train_state import TrainState

from jaxppo.lora import with_dropout_keys
from jaxppo.losses import sft_loss
from jaxppo.masking import valid_count
from jaxppo.models.config import ModelConfig
from jaxppo.optim import accumulate_gradients, skipped_updates
from jaxppo.sequences import response_logprobs
from jaxppo.sharding import constrain_tree

SFT_KEYS = ("prompt", "prompt_mask", "response", "response_mask")


def sft_denominators(batch: dict) -> dict:
    """``{"tokens": …}``: the batch's count of trained (response) tokens, which :func:`sft_nll` divides by."""
    return {"tokens": valid_count(batch["response_mask"])}


def sft_nll(config: ModelConfig, params: dict, batch: dict, denominators: dict | None = None, *,
            base: dict | None = None) -> tuple[jax.Array, dict]:
    """Masked mean NLL of the response tokens and ``{"nll": …}``.

    ``denominators`` (:func:`sft_denominators` of the whole batch when ``batch`` is a micro-batch of
    it); None: this batch's own. With ``base`` (frozen params) ``params`` are LoRA adapters
    ``{"lora": …}`` and the model is ``{**base, **params}``. A batch with ``dropout_keys`` ``[B, 2]``
    trains with LoRA dropout (:func:`jaxppo.lora.step_dropout_keys`).
    """
    params = params if base is None else {**base, **params}
    logprobs, _, _ = response_logprobs(config, params, *(batch[k] for k in SFT_KEYS),
                                       dropout_keys=batch.get("dropout_keys"))
    tokens = None if denominators is None else denominators["tokens"]
    nll = sft_loss(logprobs, batch["response_mask"], token_count=tokens)
    return nll, {"nll": nll}


def make_sft_step(config: ModelConfig, *, micro_batches: int = 1):
    """Jitted ``step(state, batch, base=None, dropout_key=None) -> (state, metrics)``; the state is
    donated. With ``base`` (frozen params, not donated) the state's params are LoRA adapters
    ``{"lora": …}`` (:mod:`jaxppo.lora`; ``config.lora_scale`` set): the loss is the model
    ``{**base, **params}``'s and only the adapters train (their optimizer state is all there is).
    With ``dropout_key`` and ``config.lora_dropout > 0`` the adapters' inputs are dropped out, row
    ``b``'s masks drawn from :func:`jaxppo.lora.step_dropout_keys` of the key and the state's step
    (so micro-batching does not change them)."""

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: dict, base: dict | None = None, dropout_key: jax.Array | None = None):
        batch = with_dropout_keys(batch, dropout_key, state.step, rate=config.lora_dropout)
        loss, _, grads = accumulate_gradients(functools.partial(sft_nll, config, base=base), state.params, batch,
                                              sft_denominators(batch), micro_batches=micro_batches)
        state = constrain_tree(state.apply_gradients(grads=grads))
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), "skipped_updates": skipped_updates(state)}

    return step
