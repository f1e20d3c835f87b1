"""Train states, optimizers that skip and count non-finite steps, and micro-batch gradient accumulation.

A trained role (SFT model, reward model, actor, critic) is a ``flax.training.train_state.TrainState``
— a frozen pytree of params, optax state and step. A frozen role (reference, reward model in PPO) is
a bare params pytree.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax.training.train_state import TrainState

from jaxppo.errors import InputError

Array = jax.Array
_log = logging.getLogger(__name__)


def make_optimizer(
    *, learning_rate: float, max_grad_norm: float | None = 1.0, weight_decay: float = 0.0,
    warmup_steps: int = 0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8, skip_nonfinite: bool = True,
) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW, with an optional linear warm-up.

    With ``skip_nonfinite`` (default) the chain is wrapped in :func:`skip_nonfinite_steps`: a step that
    would leave a NaN or ±inf anywhere (gradients, updates, new params, optimizer moments) leaves
    params and moments unchanged and is counted; :func:`skipped_updates` reads the count.
    """
    lr = learning_rate
    if warmup_steps > 0:
        lr = optax.linear_schedule(0.0, learning_rate, warmup_steps)
    parts = [optax.clip_by_global_norm(max_grad_norm)] if max_grad_norm else []
    parts.append(optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    tx = optax.chain(*parts)
    return skip_nonfinite_steps(tx) if skip_nonfinite else tx


def all_finite(tree) -> Array:
    """Whether every floating-point entry of ``tree`` is finite: a scalar bool (True without any)."""
    checks = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return functools.reduce(jnp.logical_and, checks, jnp.array(True))


def finite_step(grads, updates, new_params, opt_state) -> Array:
    """Whether an optimizer step leaves every value finite: a scalar bool.

    One reduction per parameter over its gradient, update, new value and each optimizer moment
    shaped like the params (Adam's ``mu`` and ``nu``), and one over the rest of ``opt_state``
    (counts). XLA fuses each parameter's reduction into one pass that recomputes the step instead
    of holding it (one reduction per array made it buffer the step: 2-3x the params' memory on CPU).
    """
    structure, shapes = jax.tree.structure(new_params), [x.shape for x in jax.tree.leaves(new_params)]

    def like_params(tree) -> bool:
        return jax.tree.structure(tree) == structure and [x.shape for x in jax.tree.leaves(tree)] == shapes

    parts = jax.tree.leaves(opt_state, is_leaf=like_params)
    moments = [part for part in parts if like_params(part)]
    per_param = jax.tree.map(lambda *xs: jnp.all(functools.reduce(jnp.logical_and, map(jnp.isfinite, xs))),
                             grads, updates, new_params, *moments)
    return functools.reduce(jnp.logical_and, jax.tree.leaves(per_param),
                            all_finite([part for part in parts if not like_params(part)]))


def skip_nonfinite_steps(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``inner`` taking only the steps that leave everything finite; the others are skipped and counted.

    A step is taken when the gradients, ``inner``'s updates, the new params ``params + updates`` and
    ``inner``'s new state are all finite (:func:`finite_step`). Otherwise it returns zero updates
    and ``inner``'s old state (params and moments unchanged) and adds one to ``total_notfinite``.
    Unlike ``optax.apply_if_finite``, which checks the gradients alone, this also skips finite
    gradients that a huge learning rate turns into ±inf updates or params.

    The step is computed twice inside the program, no host sync: once for the check, once in the
    ``lax.cond`` that takes it (elementwise work, cheaper than buffers for an unchecked step). With
    finite steps the results are bit-identical to ``optax.apply_if_finite``'s, which also computes
    the step in a ``lax.cond``.

    The state is ``optax.ApplyIfFiniteState`` (``notfinite_count``: skips in a row, ``last_finite``,
    ``total_notfinite``, ``inner_state``), the pytree ``apply_if_finite`` had, so older checkpoints
    restore. ``params`` are needed (every jaxppo optimizer gets them: ``TrainState.apply_gradients``).
    """
    inner = optax.with_extra_args_support(inner)

    def init(params):
        return optax.ApplyIfFiniteState(notfinite_count=jnp.zeros([], jnp.int32), last_finite=jnp.array(True),
                                        total_notfinite=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update(grads, state, params=None, **extra_args):
        if params is None:
            raise ValueError("skip_nonfinite_steps: update needs params (it checks params + updates)")

        def take(_):
            return inner.update(grads, state.inner_state, params, **extra_args)

        updates, inner_state = take(None)
        finite = finite_step(grads, updates, optax.apply_updates(params, updates), inner_state)
        zeros = jax.tree.map(jnp.zeros_like, updates)  # the updates' shapes and dtypes, not their values
        updates, inner_state = jax.lax.cond(finite, take, lambda _: (zeros, state.inner_state), None)
        return updates, optax.ApplyIfFiniteState(
            notfinite_count=jnp.where(finite, 0, state.notfinite_count + 1), last_finite=finite,
            total_notfinite=state.total_notfinite + jnp.logical_not(finite).astype(jnp.int32),
            inner_state=inner_state)

    return optax.GradientTransformationExtraArgs(init, update)


def skipped_updates(state: TrainState) -> Array:
    """How many updates of ``state`` were skipped as non-finite (:func:`skip_nonfinite_steps`; 0 without it)."""
    opt_state = state.opt_state
    if isinstance(opt_state, optax.ApplyIfFiniteState):
        return opt_state.total_notfinite
    return jnp.zeros([], jnp.int32)


class AllUpdatesSkipped(InputError):
    """A stage skipped every update it attempted as non-finite: it trained nothing."""


def check_updates_applied(state: TrainState, *, stage: str, learning_rate_field: str, learning_rate: float) -> None:
    """Host side, once per stage (reads two counters from the device): raises :class:`AllUpdatesSkipped`
    when :func:`skip_nonfinite_steps` skipped every update ``state`` attempted (``state.step`` counts
    the skipped ones too); logs a one-line warning when it skipped some."""
    attempted, skipped = (int(x) for x in jax.device_get((state.step, skipped_updates(state))))
    if attempted and skipped == attempted:
        raise AllUpdatesSkipped(
            f"{stage}: all {attempted} updates were skipped as non-finite (NaN/inf gradients, updates or params), "
            f"nothing was trained; lower `{learning_rate_field}` ({learning_rate:g}) or check the training data")
    if skipped:
        _log.warning(f"{stage}: {skipped} of {attempted} updates skipped as non-finite "
                     f"(NaN/inf gradients, updates or params)")


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
