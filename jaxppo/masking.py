"""Shape checks and masked reductions shared by the math modules.

Every public math function in jaxppo validates its inputs with :func:`check_shape` /
:func:`check_same_shape` *at trace time* (shapes are static under ``jax.jit``), so a wrong
shape fails with one ``ValueError`` that names the function and the argument, before any
compute. Masks are carried explicitly (never derived from token ids) and may be bool or
float; they are converted with :func:`as_mask`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

Array = jax.Array


def check_rank(fn: str, name: str, x, ndim: int, dims: str) -> None:
    """Raises ``ValueError`` unless ``x`` has ``ndim`` dimensions (``dims`` names them, e.g. ``"[B, T]"``)."""
    shape = jnp.shape(x)
    if len(shape) != ndim:
        raise ValueError(f"{fn}: `{name}` must have shape {dims}, got shape {tuple(shape)}")


def check_shape(fn: str, name: str, x, expected: Sequence[int], dims: str) -> None:
    """Raises ``ValueError`` unless ``x.shape == expected``."""
    shape = tuple(jnp.shape(x))
    if shape != tuple(expected):
        raise ValueError(f"{fn}: `{name}` must have shape {dims} = {tuple(expected)}, got {shape}")


def check_same_shape(fn: str, ref_name: str, ref, **others) -> None:
    """Raises ``ValueError`` naming the first argument in ``others`` whose shape differs from ``ref``'s."""
    expected = tuple(jnp.shape(ref))
    for name, x in others.items():
        if tuple(jnp.shape(x)) != expected:
            raise ValueError(
                f"{fn}: `{name}` has shape {tuple(jnp.shape(x))}, expected {expected} "
                f"(the shape of `{ref_name}`)"
            )


def check_choice(fn: str, name: str, value, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{fn}: `{name}`={value!r} is not one of {sorted(choices)}")


def compute_dtype(*xs) -> jnp.dtype:
    """The floating dtype math is done in: the inputs' promoted float dtype, at least float32.

    bf16 log-prob differences exponentiated into ratios lose most of their precision, so
    losses never compute below float32 (float64 inputs stay float64 under ``jax_enable_x64``).
    """
    dtype = jnp.result_type(*[jnp.asarray(x).dtype for x in xs])
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.float32
    return jnp.promote_types(dtype, jnp.float32)


def as_mask(mask, dtype) -> Array:
    """A bool or {0, 1} float mask as a float array of ``dtype``."""
    return jnp.asarray(mask).astype(dtype)


def masked_sum(x: Array, mask: Array, axis=None) -> Array:
    """Σ x·mask over ``axis``; masked entries never contribute, even if they hold NaN or inf."""
    return jnp.sum(jnp.where(mask > 0, x, 0), axis=axis)


def masked_mean(x: Array, mask: Array, axis=None, *, denominator: Array | float | None = None) -> Array:
    """Σ x·mask / Σ mask over ``axis``, and 0 where the mask is empty.

    ``denominator`` replaces Σ mask (a count over a larger batch of which ``x`` is a part: then the
    means of the parts *sum* to the mean of the whole, which is how micro-batches are accumulated).
    A denominator below 1 is taken as 1, so an empty batch gives 0.
    """
    count = jnp.sum(mask, axis=axis) if denominator is None else denominator
    return masked_sum(x, mask, axis=axis) / jnp.maximum(count, 1)


def valid_count(mask: Array) -> Array:
    """Number of valid entries of ``mask`` (any shape), a float32 scalar: e.g. a batch's token count."""
    return jnp.sum(jnp.asarray(mask) > 0).astype(jnp.float32)


def nonempty_rows(mask: Array) -> Array:
    """Number of rows of ``mask`` ``[B, T]`` with at least one valid entry, a float32 scalar."""
    return jnp.sum(jnp.any(jnp.asarray(mask) > 0, axis=-1)).astype(jnp.float32)


def last_valid_index(mask: Array) -> Array:
    """Index ``[B]`` int32 of the last valid entry of each row of ``mask`` ``[B, T]``; −1 for an empty row.

    Any mask pattern works: a prefix mask (a right-padded response) gives its length − 1, a mask with
    padding on both sides (a left-padded prompt followed by a right-padded response) its last 1.
    """
    check_rank("last_valid_index", "mask", mask, 2, "[B, T]")
    valid = jnp.asarray(mask) > 0
    last = valid.shape[-1] - 1 - jnp.argmax(valid[:, ::-1], axis=-1)
    return jnp.where(jnp.any(valid, axis=-1), last, -1).astype(jnp.int32)
