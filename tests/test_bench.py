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
