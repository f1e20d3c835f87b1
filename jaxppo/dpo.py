"""Direct preference optimisation: the DPO family's objective of a policy on preference pairs, and its step.

A batch is a dict of preference pairs as the reward model reads them (``prompt`` ``[B, P]`` left-padded,
``prompt_mask``, ``chosen`` / ``rejected`` ``[B, N]`` right-padded with their masks) plus the frozen
reference's summed log-probs ``ref_chosen`` / ``ref_rejected`` ``[B]``, computed once per pair
(:func:`reference_logprobs`) and stored with the data. The policy's summed log-probs

.. math:: π^c_b = \\sum_t m^c_{bt} \\log π_θ(y^c_{bt} \\mid x_b, y^c_{b,<t})

(and :math:`π^r_b`) come from one forward pass over the ``2B`` responses; the loss is the named entry of
:data:`jaxppo.losses.PREFERENCE_LOSSES` (DPO, cDPO, IPO, SimPO, ORPO), its hyperparameters read from a
:class:`jaxppo.pipeline_config.DPOConfig`. With micro-batches, every mean divides by the whole batch's
pair (and, for ORPO's NLL, chosen-token) count (:func:`dpo_denominators`), so micro-batching leaves the
objective as it is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from jaxppo.lora import compose, with_dropout_keys
from jaxppo.losses import PREFERENCE_LOSSES
from jaxppo.masking import valid_count
from jaxppo.models.config import ModelConfig
from jaxppo.optim import accumulate_gradients, skipped_updates
from jaxppo.reward_model import item_dropout_keys
from jaxppo.sequences import response_logprobs
from jaxppo.sharding import constrain_tree

PAIR_KEYS = ("prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask")
REFERENCE_KEYS = ("ref_chosen", "ref_rejected")


def pair_logprobs(config: ModelConfig, params: dict, batch: dict) -> dict:
    """``policy_chosen`` / ``policy_rejected`` (summed response log-probs ``[B]``), ``len_chosen`` /
    ``len_rejected`` (valid tokens) and ``chosen_token_logprobs`` ``[B, N]`` (masked), from one forward
    pass over both responses of every pair; with LoRA dropout when the batch carries a training step's
    ``dropout_keys`` (the rejected responses' keys folded with 1, as the reward model's)."""
    b = batch["prompt"].shape[0]
    keys = item_dropout_keys(batch, 2, item_major=True)
    masks = jnp.concatenate([batch["chosen_mask"], batch["rejected_mask"]]).astype(jnp.float32)
    logprobs, _, _ = response_logprobs(
        config, params, jnp.concatenate([batch["prompt"]] * 2), jnp.concatenate([batch["prompt_mask"]] * 2),
        jnp.concatenate([batch["chosen"], batch["rejected"]]), masks, dropout_keys=keys)
    masked = logprobs * masks
    sums, lengths = jnp.sum(masked, axis=-1), jnp.sum(masks, axis=-1)
    return {"policy_chosen": sums[:b], "policy_rejected": sums[b:], "len_chosen": lengths[:b],
            "len_rejected": lengths[b:], "chosen_token_logprobs": masked[:b]}


def reference_logprobs(config: ModelConfig, params: dict, batch: dict) -> dict:
    """The frozen reference's ``{"ref_chosen", "ref_rejected"}`` ``[B]`` of a batch of pairs (no dropout)."""
    out = pair_logprobs(config, params, {k: batch[k] for k in PAIR_KEYS})
    return {"ref_chosen": out["policy_chosen"], "ref_rejected": out["policy_rejected"]}


def dpo_denominators(batch: dict) -> dict:
    """The counts a DPO-family loss of ``batch`` divides by: ``pairs`` and ``chosen_tokens`` (ORPO's
    NLL is a token mean over the chosen responses, as TRL's). Computed before micro-batching."""
    return {"pairs": jnp.float32(batch["prompt"].shape[0]), "chosen_tokens": valid_count(batch["chosen_mask"])}


def preference_objective(config: ModelConfig, hp, params: dict, batch: dict, denominators: dict | None = None, *,
                         base: dict | None = None) -> tuple[jax.Array, dict]:
    """``(loss, aux)`` of the loss ``hp.loss`` (:data:`jaxppo.losses.PREFERENCE_LOSSES`; ``hp`` a
    :class:`jaxppo.pipeline_config.DPOConfig`) of the policy ``params`` (with ``base``: LoRA adapters on
    it) on a batch of pairs with reference log-probs. ``aux``: ``accuracy``, ``margin``,
    ``chosen_reward``, ``rejected_reward`` (implicit rewards; SimPO/ORPO: their length-normalised
    scores) and, for ORPO, ``nll``. ``denominators``: :func:`dpo_denominators` of the whole batch when
    ``batch`` is a micro-batch of it (None: this batch's own)."""
    spec = PREFERENCE_LOSSES[hp.loss]
    inputs = pair_logprobs(config, compose(base, params), batch)
    inputs.update({k: batch[k] for k in REFERENCE_KEYS if k in batch})
    counts = dpo_denominators(batch) if denominators is None else denominators
    if "nll_chosen" in spec.inputs:  # the SFT term: token mean over the batch's chosen responses
        inputs["nll_chosen"] = -jnp.sum(inputs["chosen_token_logprobs"]) / counts["chosen_tokens"]
    missing = [name for name in spec.inputs if name not in inputs]
    if missing:
        raise ValueError(f"preference_objective: loss {hp.loss!r} needs {missing} in the batch (reference "
                         "log-probs: jaxppo.dpo.reference_logprobs)")
    return spec.fn(**{name: inputs[name] for name in spec.inputs}, pair_count=counts["pairs"],
                   **{name: getattr(hp, name) for name in spec.hyperparameters})


def make_dpo_step(config: ModelConfig, hp, *, micro_batches: int = 1):
    """Jitted ``step(state, batch, base=None, dropout_key=None) -> (state, metrics)``; state donated.

    ``hp``: a :class:`jaxppo.pipeline_config.DPOConfig` (its loss and hyperparameters; static). With
    ``base`` (LoRA: frozen, not donated) the state's params are the policy's adapters. ``dropout_key``:
    LoRA dropout as in :func:`jaxppo.sft.make_sft_step`.
    """
    @functools.partial(jax.jit, donate_argnums=0)
    def step(state: TrainState, batch: dict, base: dict | None = None, dropout_key: jax.Array | None = None):
        batch = with_dropout_keys(batch, dropout_key, state.step, rate=config.lora_dropout)
        loss_fn = functools.partial(preference_objective, config, hp, base=base)
        loss, aux, grads = accumulate_gradients(loss_fn, state.params, batch, dpo_denominators(batch),
                                                micro_batches=micro_batches)
        state = constrain_tree(state.apply_gradients(grads=grads))
        return state, {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "skipped_updates": skipped_updates(state)}

    return step


def make_dpo_eval(config: ModelConfig, hp):
    """Jitted ``evaluate(params, batch) -> {"loss", "accuracy", "margin", ...}`` on held-out pairs with
    reference log-probs (``params``: the whole policy)."""
    @jax.jit
    def evaluate(params: dict, batch: dict):
        loss, aux = preference_objective(config, hp, params, batch)
        return {"loss": loss, **aux}

    return evaluate
