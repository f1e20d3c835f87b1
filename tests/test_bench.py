"""The benchmark's model-FLOP count (the MFU numerator) against XLA's own cost analysis."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from experiments.bench import flops_check, forward_flops
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import make_rollout

MODEL = ModelConfig(vocab_size=2048, hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4,
                    num_kv_heads=2, head_dim=32, max_position_embeddings=128, tie_word_embeddings=True)


def test_forward_flops_counts_every_matmul():
    # by hand: d=128, 4 heads × 32, 2 kv heads, MLP 384, V=2048, one token in a sequence of 10
    per_layer = 2 * (128 * 128 + 2 * 128 * 64 + 128 * 128 + 3 * 128 * 384) + 4 * 10 * 128
    assert forward_flops(MODEL, 1, 10, lm_head_tokens=1) == 2 * per_layer + 2 * 128 * 2048
    assert forward_flops(MODEL, 3, 10) == 3 * 2 * per_layer


def test_analytic_update_flops_match_xla_cost_analysis():
    """Under the benchmark's ``remat_policy="dots"``, which must recompute no matmul (with full
    remat XLA counts 1.24× the analytic FLOPs here: the decoder layers run twice)."""
    model = dataclasses.replace(MODEL, remat=True, remat_policy="dots")
    ppo = PPOConfig(batch_size=8, minibatches=1, epochs=1, max_new_tokens=16, stop_token_ids=(), temperature=0.7,
                    critic="separate")
    params = init_params(model, jax.random.key(0))
    reward = {**params, "reward_head": init_scalar_head(model, jax.random.key(1), "reward_head")}
    prompt = jax.random.randint(jax.random.key(2), (8, 16), 0, model.vocab_size)
    traj, _ = make_rollout(model, ppo)(params, {**params, "value_head": reward["reward_head"]}, params, reward,
                                       prompt, jnp.ones_like(prompt), jax.random.key(3), 0.05)
    check = flops_check(model, params, reward, traj, ppo)
    # XLA also counts the element-wise work (norms, softmax, Adam): a few per cent more here
    assert 1.0 <= check["ratio"] < 1.1, check


def test_long_tail_workload_is_long_tailed():
    """bench_rollout's workload: mean length about a quarter of the 128 maximum, a tail up to it."""
    from experiments.bench_rollout import LONG_MAX, LONG_REQUESTS, long_tail_caps

    caps = long_tail_caps()
    assert caps.shape == (LONG_REQUESTS,) and caps.min() >= 1 and caps.max() <= LONG_MAX
    assert 0.2 * LONG_MAX <= caps.mean() <= 0.3 * LONG_MAX
    assert np.median(caps) < caps.mean() and caps.max() >= 3 * caps.mean()  # skewed: a long tail
    np.testing.assert_array_equal(caps, long_tail_caps())  # seeded: the same workload every run


def test_own_times_subtract_nested_events():
    """A thunk's own time is its duration less that of the thunks directly inside it (per thread)."""
    from experiments.profile_rollout import own_times

    events = [  # thread 1: while [0, 100) ⊃ a [10, 30), b [40, 90) ⊃ c [50, 60); thread 2: d [0, 20)
        {"ph": "X", "name": "while", "ts": 0, "dur": 100, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 10, "dur": 20, "pid": 1, "tid": 1},
        {"ph": "X", "name": "b", "ts": 40, "dur": 50, "pid": 1, "tid": 1},
        {"ph": "X", "name": "c", "ts": 50, "dur": 10, "pid": 1, "tid": 1},
        {"ph": "X", "name": "a", "ts": 0, "dur": 20, "pid": 1, "tid": 2},
        {"ph": "i", "name": "marker", "ts": 5, "pid": 1, "tid": 1},
    ]
    assert own_times(events) == {"while": 30, "a": 40, "b": 40, "c": 10}


def test_engine_profile_names_every_kind_of_work():
    """The profile of a tiny engine run (a queue: refills) finds each kind the named scopes mark, and
    the per-op times add up to no more than the call's wall time."""
    import time

    from experiments.profile_rollout import by_kind, profile
    from jaxppo.engine import make_generator
    from jaxppo.sampling import SamplingParams

    config = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=8)
    params = init_params(config, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (6, 5), 3, 64)
    mask = jnp.ones_like(tokens)
    generator = make_generator(config, SamplingParams(max_new_tokens=4, temperature=1.0), slots=2)
    start = time.perf_counter()
    seconds = profile(generator, params, tokens, mask, jax.random.key(2))
    assert sum(seconds.values()) < time.perf_counter() - start
    split = by_kind(seconds)
    for kind in ("weight matmuls", "layer slices", "attention", "MLP + norms", "sampling", "cache + output writes",
                 "refill + compaction", "prefill"):
        assert split[kind] > 0, (kind, split)
