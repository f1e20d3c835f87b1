"""Train states, optimizers and micro-batch gradient accumulation.

A trained role (SFT model, reward model, actor, critic) is a ``flax.training.train_state.TrainState``
— a frozen pytree of params, optax state and step. A frozen role (reference, reward model in PPO) is
a bare params pytree.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

Array = jax.Array


def make_optimizer(
    *, learning_rate: float, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
    warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW, with an optional linear warm-up.

    With ``skip_nonfinite`` (default) the chain is wrapped in ``optax.apply_if_finite``: a step whose
    gradients hold a NaN or ±inf (a NaN/inf loss has such gradients) leaves params and optimizer
    moments unchanged and is counted; :func:`skipped_updates` reads the count.
    """
    lr = learning_rate
    if warmup_steps > 0:
        lr = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    # max_consecutive_errors: never give up and apply a non-finite update
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30) if skip_nonfinite else tx


def skipped_updates(state: TrainState) -> Array:
    """How many updates of ``state`` were skipped for non-finite gradients (0 without the guard)."""
    opt_state = state.opt_state
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return jnp.zeros([], jnp.int32)


def create_train_state(params: dict, tx: optax.GradientTransformation) -> TrainState:
    """A train state at step 0 (``apply_fn`` unused: jaxppo's models are plain functions)."""
    # step as an int32 array from the start: a Python 0 would make the first jitted step trace twice
    return TrainState.create(apply_fn=None, params=params, tx=tx).replace(step=jnp.zeros([], jnp.int32))


def split_micro_batches(batch, micro_batches: int):
    """Reshapes every leaf ``[B, ...]`` to ``[micro_batches, B / micro_batches, ...]``."""
    def split(x):
        if x.shape[0] % micro_batches:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by micro_batches={micro_batches}")
        return x.reshape((micro_batches, x.shape[0] // micro_batches) + x.shape[1:])

    return jax.tree.map(split, batch)


def accumulate_gradients(
    loss_fn: Callable, params, batch, denominators, *, micro_batches: int = 1, max_metrics: tuple[str, ...] = ()
) -> tuple[Array, dict, dict]:
    r"""Loss, aux and gradients of ``loss_fn(params, micro_batch, denominators) -> (loss, aux)`` summed
    over ``micro_batches`` equal slices of ``batch``.

    Micro-batching is a memory lever only: it must not change the objective. So ``denominators``
    (token, row, pair… counts) are computed by the caller over the *whole* ``batch``, and
    ``loss_fn`` divides its micro-batch's sums by them: then

    .. math:: L = \frac{1}{N}\sum_{i \in \text{batch}} l_i = \sum_k \frac{1}{N}\sum_{i \in \text{micro}_k} l_i

    and likewise for gradients and aux (fractions normalised the same way sum to the batch's
    fraction). Averaging per-micro-batch means instead would re-weight micro-batches of short
    responses. Aux entries named in ``max_metrics`` are maxima, reduced with ``max``.

    Every leaf of ``batch`` is split on its leading axis (which ``micro_batches`` must divide); a
    ``lax.scan`` runs the micro-batches, so only one micro-batch's activations are alive at a time.
    ``aux`` must be a dict of scalars.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if micro_batches == 1:
        (loss, aux), grads = grad_fn(params, batch, denominators)
        return loss, aux, grads

    def step(grads_sum, micro):
        (loss, aux), grads = grad_fn(params, micro, denominators)
        return jax.tree.map(jnp.add, grads_sum, grads), (loss, aux)

    zeros = jax.tree.map(jnp.zeros_like, params)  # gradients have the params' structure and dtypes
    grads, (losses, auxes) = jax.lax.scan(step, zeros, split_micro_batches(batch, micro_batches))
    aux = {k: jnp.max(v) if k in max_metrics else jnp.sum(v) for k, v in auxes.items()}
    return jnp.sum(losses), aux, grads
