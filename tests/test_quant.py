"""NF4 and int8 weight quantisation (jaxppo.quant) against a hand-worked block and a float64 argmin."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.quant import NF4_LEVELS, dequantize_int8, dequantize_nf4, quantize_int8, quantize_nf4


def test_nf4_levels_are_qloras():
    assert NF4_LEVELS.shape == (16,) and NF4_LEVELS[0] == -1 and NF4_LEVELS[7] == 0 and NF4_LEVELS[15] == 1
    assert np.all(np.diff(NF4_LEVELS) > 0)


def test_nf4_by_hand():
    """One block of 4 input features for each of 2 outputs, kernel [in=4, out=2].
    Output 0: w = (0.5, −1, 0, 0.25), absmax 1: 0.5 is nearer 0.4407 (code 12) than 0.5626 (13);
    −1 → 0; 0 → 7; 0.25 → 0.2461 (10). Packed along the input axis, first code high:
    (12 << 4) | 0 = 192, (7 << 4) | 10 = 122. Output 1: w = (0, 0, 0, −2), absmax 2: 0 → 7, −1 → 0."""
    w = np.array([[0.5, 0.0], [-1.0, 0.0], [0.0, 0.0], [0.25, -2.0]], np.float32)
    codes, absmax = quantize_nf4(w, block=4)
    np.testing.assert_array_equal(codes, [[192, 7 * 16 + 7], [122, 7 * 16 + 0]])
    assert codes.dtype == jnp.uint8 and codes.shape == (2, 2)
    np.testing.assert_array_equal(absmax, [[1.0, 2.0]])
    np.testing.assert_allclose(dequantize_nf4(codes, absmax, block=4),
                               [[NF4_LEVELS[12], 0], [-1, 0], [0, 0], [NF4_LEVELS[10], -2]])


def test_nf4_equals_a_float64_argmin_on_stacked_kernels():
    """A stacked [L, in, H, n] kernel (input axis 1), blocks of 64: codes are the argmin over the
    levels (float64, first on ties), scales the blocks' absmax, and the error at most half the widest
    gap between levels times the absmax."""
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 128, 3, 5)).astype(np.float32)
    w[1, :64, 0, 0] = 0.0  # an all-zero block
    codes, absmax = quantize_nf4(w, block=64, in_axis=1)
    assert codes.shape == (2, 64, 3, 5) and absmax.shape == (2, 2, 3, 5)
    blocks = w.astype(np.float64).reshape(2, 2, 64, 3, 5)
    m = np.abs(blocks).max(axis=2, keepdims=True)
    m = np.where(m > 0, m, 1.0)
    expected = np.abs(blocks[..., None] / m[..., None] - NF4_LEVELS.astype(np.float64)).argmin(-1).reshape(w.shape)
    unpacked = np.stack([np.asarray(codes) >> 4, np.asarray(codes) & 15], axis=2).reshape(w.shape)
    np.testing.assert_array_equal(unpacked, expected)
    np.testing.assert_allclose(absmax, m[:, :, 0], rtol=1e-7)
    deq = np.asarray(dequantize_nf4(codes, absmax, block=64, in_axis=1))
    half_gap = np.max(np.diff(NF4_LEVELS)) / 2
    assert np.all(np.abs(deq - w).reshape(2, 2, 64, 3, 5) <= half_gap * m + 1e-6)
    assert np.all(deq[1, :64, 0, 0] == 0)
    with pytest.raises(ValueError, match="block size"):
        quantize_nf4(w, block=48, in_axis=1)  # 48 does not divide 128


def test_int8_per_output_channel():
    w = np.array([[1.0, -0.5], [-2.0, 0.25], [0.5, 0.0]], np.float32)  # [in=3, out=2]
    codes, scale = quantize_int8(w)
    np.testing.assert_allclose(scale, [[2 / 127, 0.5 / 127]], rtol=1e-7)
    np.testing.assert_array_equal(codes, [[64, -127], [-127, 64], [32, 0]])  # 63.5 → 64 (round half to even: 64)
    assert codes.dtype == jnp.int8
    rng = np.random.default_rng(1)
    w = rng.normal(size=(64, 7)).astype(np.float32)
    codes, scale = quantize_int8(w)
    assert np.all(np.abs(np.asarray(dequantize_int8(codes, scale)) - w) <= np.asarray(scale) / 2 + 1e-7)
