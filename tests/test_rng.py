"""Named random streams: distinct names give distinct keys, the same name the same key."""

from __future__ import annotations

import zlib

import jax
import numpy as np
import pytest

from jaxppo.rng import stream_id, stream_key, stream_seed


def test_anagram_stream_names_get_different_keys():
    # a character sum (the old scheme) gave "rm-init" and "rm-tini" the same stream
    assert sum(map(ord, "rm-init")) == sum(map(ord, "rm-tini"))
    root = jax.random.key(0)
    a, b = (np.asarray(jax.random.key_data(stream_key(root, name))) for name in ("rm-init", "rm-tini"))
    assert not np.array_equal(a, b)


def test_stream_key_is_fold_in_of_crc32_then_step():
    root = jax.random.key(3)
    expected = jax.random.fold_in(jax.random.fold_in(root, zlib.crc32(b"ppo-sample")), 7)
    np.testing.assert_array_equal(jax.random.key_data(stream_key(root, "ppo-sample", 7)), jax.random.key_data(expected))
    assert stream_id("ppo-sample") == zlib.crc32(b"ppo-sample")


def test_the_pipelines_stream_names_are_distinct_and_seeds_do_not_collide():
    names = ["init", "eval", "eval-sample", "rm-init", "rm-head", "rm-norm", "rm-samples", "rm-labels", "rm-prompts",
             "rm-online-samples", "rm-online-labels", "rm-online-prompts", "ppo-sample", "ppo-update", "ppo-prompts",
             "sft-prompts", "sft-demos", "ppo-ptx-prompts", "ppo-ptx-demos", "value-head", "rm-batches"]
    assert len({stream_id(n) for n in names}) == len(names)
    seeds = {stream_seed(seed, name) for seed in range(4) for name in names}
    assert len(seeds) == 4 * len(names)
    with pytest.raises(ValueError, match="seed"):
        stream_seed(-1, "eval")
    with pytest.raises(ValueError, match="name"):
        stream_id("")
