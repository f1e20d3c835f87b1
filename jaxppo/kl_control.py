"""KL coefficient control: fixed, or adaptive towards a target KL (Ziegler et al. 2019).

The controller is a pure state update, so it can live inside a jitted PPO iteration:

    state = init_kl_control(kl_coef=0.1)
    state = update_kl_control(state, kl=mean_sequence_kl, n_steps=batch_size,
                              target=6.0, horizon=10_000)   # target=None: fixed β

The adaptive rule (``AdaptiveKLController`` in lm-human-preferences and trl):

.. math::
    e = \\mathrm{clip}(\\mathrm{KL}/\\mathrm{KL}_{target} − 1,\\ −0.2,\\ 0.2), \\qquad
    β ← β\\,(1 + e · n_{steps} / \\mathrm{horizon})

β grows when the policy drifts past the target and shrinks below it, by at most 20 % of
``n_steps / horizon`` per update. ``kl`` is the mean *sequence* KL (sum over tokens) of the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

Array = jax.Array


class KLControlState(struct.PyTreeNode):
    """The KL coefficient β as a frozen pytree (a float32 scalar array, so it can be traced)."""

    kl_coef: Array


def init_kl_control(*, kl_coef: float) -> KLControlState:
    """Initial controller state with β = ``kl_coef`` ≥ 0."""
    if kl_coef < 0:
        raise ValueError(f"init_kl_control: `kl_coef` must be >= 0, got {kl_coef}")
    return KLControlState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def update_kl_control(
    state: KLControlState,
    kl: Array | float,
    *,
    n_steps: int | Array,
    target: float | None = None,
    horizon: float = 10_000.0,
) -> KLControlState:
    """One controller step: unchanged when ``target`` is None (fixed β), else Ziegler's update.

    Args:
      state: current :class:`KLControlState`.
      kl: observed mean sequence KL of the last batch (scalar).
      n_steps: number of samples (episodes) the observation covers, usually the batch size.
      target: target KL > 0, or None for a fixed coefficient.
      horizon: > 0; larger means slower adaptation.

    Returns:
      the new state.
    """
    if target is None:
        return state
    if not isinstance(target, jax.Array) and target <= 0:
        raise ValueError(f"update_kl_control: `target` must be > 0 or None, got {target}")
    if not isinstance(horizon, jax.Array) and horizon <= 0:
        raise ValueError(f"update_kl_control: `horizon` must be > 0, got {horizon}")
    if jnp.ndim(kl) != 0:
        raise ValueError(f"update_kl_control: `kl` must be a scalar, got shape {jnp.shape(kl)}")
    dtype = state.kl_coef.dtype
    error = jnp.clip(jnp.asarray(kl, dtype) / target - 1.0, -0.2, 0.2)
    return state.replace(kl_coef=state.kl_coef * (1.0 + error * n_steps / horizon))
