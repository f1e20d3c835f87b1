"""Masking helpers: the last valid index of any mask pattern, counts, and masked means with a given denominator."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxppo.masking import last_valid_index, masked_mean, nonempty_rows, valid_count


def test_last_valid_index_of_any_mask_pattern():
    mask = jnp.array([
        [1, 1, 1, 0, 0, 0],  # prefix (a right-padded response): length − 1
        [0, 0, 1, 1, 1, 0],  # padding on both sides (left-padded prompt + right-padded response)
        [1, 0, 1, 0, 0, 0],  # a gap
        [1, 1, 1, 1, 1, 1],  # full
        [0, 0, 0, 0, 0, 0],  # empty: −1
        [0, 0, 0, 0, 0, 1],
    ])
    np.testing.assert_array_equal(last_valid_index(mask), [2, 4, 2, 5, -1, 5])
    assert last_valid_index(mask).dtype == jnp.int32
    np.testing.assert_array_equal(last_valid_index(mask.astype(bool)), last_valid_index(mask.astype(jnp.float32)))


def test_counts_and_masked_mean_with_a_denominator():
    mask = jnp.array([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    x = jnp.array([[2.0, 4.0, jnp.nan], [jnp.nan, 1.0, 1.0], [6.0, 0.0, 0.0]])
    assert float(valid_count(mask)) == 3 and float(nonempty_rows(mask)) == 2
    assert float(masked_mean(x, mask)) == 4.0
    assert float(masked_mean(x, mask, denominator=6.0)) == 2.0  # a part of a batch with 6 valid entries
    # two parts normalised by the whole's count sum to the whole's mean
    parts = [masked_mean(x[rows], mask[rows], denominator=valid_count(mask)) for rows in (slice(0, 1), slice(1, 3))]
    assert float(sum(parts)) == 4.0
    assert float(masked_mean(x, jnp.zeros_like(mask), denominator=0.0)) == 0.0  # empty: 0, not NaN
