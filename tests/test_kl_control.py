"""Fixed and adaptive KL coefficient against Ziegler et al.'s update written as a float64 loop."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.kl_control import KLControlState, init_kl_control, update_kl_control
from reference_np import adaptive_kl_ref

KLS = [2.0, 12.0, 6.0, 5.5, 0.1, 7.0, 6.0, 30.0]


def test_fixed_coefficient_never_changes():
    state = init_kl_control(kl_coef=0.2)
    for kl in KLS:
        state = update_kl_control(state, kl, n_steps=64)
    assert float(state.kl_coef) == pytest.approx(0.2)


def test_adaptive_matches_reference_loop_inside_jit_scan():
    """The controller runs inside a jitted ``lax.scan`` (as in a fused PPO loop) and matches the loop."""
    def run(state, kls):
        def step(s, kl):
            s = update_kl_control(s, kl, n_steps=256, target=6.0, horizon=10_000)
            return s, s.kl_coef
        return jax.lax.scan(step, state, kls)

    final, history = jax.jit(run)(init_kl_control(kl_coef=0.1), jnp.asarray(KLS))
    expected, beta = [], 0.1
    for kl in KLS:
        beta = adaptive_kl_ref(beta, kl, 256, 6.0, 10_000)
        expected.append(beta)
    np.testing.assert_allclose(history, expected, rtol=1e-6)
    assert isinstance(final, KLControlState)
    # The proportional error is clipped at ±20 %: KL = 30 (5× target) moves β as much as 7.2 does.
    s = init_kl_control(kl_coef=1.0)
    big = update_kl_control(s, 30.0, n_steps=100, target=6.0, horizon=100)
    small = update_kl_control(s, 7.2, n_steps=100, target=6.0, horizon=100)
    np.testing.assert_allclose([big.kl_coef, small.kl_coef], [1.2, 1.2], rtol=1e-6)


def test_errors():
    with pytest.raises(ValueError, match="`kl_coef`"):
        init_kl_control(kl_coef=-1.0)
    s = init_kl_control(kl_coef=0.1)
    with pytest.raises(ValueError, match="`target`"):
        update_kl_control(s, 1.0, n_steps=1, target=0.0)
    with pytest.raises(ValueError, match="`horizon`"):
        update_kl_control(s, 1.0, n_steps=1, target=1.0, horizon=0)
    with pytest.raises(ValueError, match="`kl`"):
        update_kl_control(s, jnp.ones(3), n_steps=1, target=1.0)
