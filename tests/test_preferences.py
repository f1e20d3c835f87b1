"""Preference labelling and splits: pure functions of arrays and a key, against direct computation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo import preferences


def _responses(rng, b, n):
    return [rng.integers(4, 20, (b, n)).astype(np.int32) for _ in range(2)], [np.ones((b, n), np.int32)] * 2


def test_label_pairs_follow_the_bradley_terry_probability_and_move_ties_last():
    rng = np.random.default_rng(0)
    b, n = 4000, 3
    responses, masks = _responses(rng, b, n)
    gold_a = rng.integers(0, 3, b).astype(np.float64)
    gold_b = rng.integers(0, 3, b).astype(np.float64)
    prompt = rng.integers(4, 20, (b, 2)).astype(np.int32)
    data = preferences.label_pairs(jax.random.key(1), prompt, np.ones_like(prompt), responses, masks, [gold_a, gold_b],
                                   beta=1.0, drop_ties=True)
    ties = int(np.sum(gold_a == gold_b))
    assert int(data["num_pairs"]) == b - ties
    usable = preferences.usable(data)
    assert usable["prompt"].shape[0] == b - ties and "num_pairs" not in usable
    assert np.all(np.asarray(usable["margin"]) > 0)
    # P(the better of two responses one gold point apart is chosen) = σ(β · 1)
    diff = np.asarray(usable["gold_diff"])
    margin = np.asarray(usable["margin"])
    np.testing.assert_array_equal(np.abs(diff), margin)
    correct = np.mean(diff[margin == 1] > 0)  # the better response was chosen
    assert abs(correct - 1 / (1 + np.exp(-1.0))) < 0.03, correct


def test_label_rankings_with_large_beta_sort_by_gold():
    rng = np.random.default_rng(1)
    b, k, n = 64, 4, 3
    responses = [rng.integers(4, 20, (b, n)).astype(np.int32) for _ in range(k)]
    masks = [np.ones((b, n), np.int32)] * k
    golds = list(np.stack([rng.permutation(k) for _ in range(b)]).T.astype(np.float64))
    prompt = np.ones((b, 2), np.int32)
    data = preferences.label_rankings(jax.random.key(2), prompt, prompt, responses, masks, golds, beta=1e3)
    gold = np.asarray(data["gold"])
    assert np.all(np.diff(gold, axis=1) < 0)  # best first
    stacked = np.stack(responses, 1)
    order = np.argsort(-np.stack(golds, 1), axis=1)
    np.testing.assert_array_equal(np.asarray(data["responses"]), np.take_along_axis(stacked, order[:, :, None], 1))


def test_split_holds_out_the_first_rows_and_removes_gold_labels():
    n = 100
    data = {"prompt": np.arange(n)[:, None], "chosen": np.arange(n)[:, None], "gold_diff": np.ones(n),
            "num_pairs": np.int32(90)}
    train, held_out, labels = preferences.split(data, eval_fraction=0.2, batch_size=8)
    assert held_out["prompt"].shape[0] == 18 and train["prompt"].shape[0] == 72
    np.testing.assert_array_equal(held_out["prompt"][:, 0], np.arange(18))
    assert "gold_diff" not in train and labels["gold_diff"].shape == (18,)
    with pytest.raises(ValueError, match="reward_model.num_prompts"):
        preferences.split(data, eval_fraction=0.2, batch_size=64)
    both = preferences.concatenate(train, held_out)
    assert both["prompt"].shape[0] == 90 and isinstance(both["prompt"], np.ndarray)
    assert jnp.asarray(preferences.rows(both, [0, 1])["prompt"]).shape == (2, 1)
