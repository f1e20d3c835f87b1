"""Reward-model steps on a tiny model: head-only training, the cached-feature probe, non-finite steps."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.toy_task import EOS, sample_prompts
from tiny import MODEL, TASK, demonstrations_of


def test_non_finite_sft_and_reward_steps_are_skipped():
    from jaxppo.reward_model import make_reward_step
    from jaxppo.sft import make_sft_step

    params = init_params(MODEL, jax.random.key(0))
    prompts, mask = sample_prompts(TASK, jax.random.key(1), 4)
    response = jnp.full((4, 3), EOS, jnp.int32)
    ones = jnp.ones((4, 3), jnp.int32)
    poisoned = {**params, "final_norm": jax.tree.map(lambda x: x * jnp.nan, params["final_norm"])}
    state = create_train_state(jax.tree.map(jnp.copy, poisoned), make_optimizer(learning_rate=1e-2))
    state, metrics = make_sft_step(MODEL)(state, {"prompt": prompts, "prompt_mask": mask, "response": response,
                                                 "response_mask": ones})
    assert not np.isfinite(float(metrics["loss"])) and int(metrics["skipped_updates"]) == 1
    assert int(state.step) == 1  # the step counts, the params do not move
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["embedding"]),
                                  np.asarray(params["embed"]["embedding"]))
    rm_params = {**{k: v for k, v in params.items() if k != "lm_head"},
                 "reward_head": init_scalar_head(MODEL, jax.random.key(2), "reward_head")}
    rm_params["reward_head"] = {"kernel": rm_params["reward_head"]["kernel"] * jnp.inf,
                                "bias": rm_params["reward_head"]["bias"]}
    state = create_train_state(rm_params, make_optimizer(learning_rate=1e-2))
    batch = {"prompt": prompts, "prompt_mask": mask, "chosen": response, "chosen_mask": ones,
             "rejected": response, "rejected_mask": ones, "margin": jnp.zeros(4)}
    before = np.asarray(state.params["embed"]["embedding"])
    state, metrics = make_reward_step(MODEL)(state, batch)
    assert int(metrics["skipped_updates"]) == 1
    np.testing.assert_array_equal(np.asarray(state.params["embed"]["embedding"]), before)


def test_head_only_reward_step_trains_the_head_and_freezes_the_trunk():
    from jaxppo.reward_model import make_reward_step

    prompts, mask = sample_prompts(TASK, jax.random.key(1), 8)
    chosen, chosen_mask = demonstrations_of(prompts, mask, seed=2)
    rejected, rejected_mask = demonstrations_of(prompts, mask, seed=3)
    batch = {"prompt": prompts, "prompt_mask": mask, "chosen": chosen, "chosen_mask": chosen_mask,
             "rejected": rejected, "rejected_mask": rejected_mask, "margin": jnp.zeros(8)}
    params = {**{k: v for k, v in init_params(MODEL, jax.random.key(0)).items() if k != "lm_head"},
              "reward_head": init_scalar_head(MODEL, jax.random.key(4), "reward_head")}
    before = jax.tree.map(np.asarray, params)
    state = create_train_state(params, make_optimizer(learning_rate=1e-2))
    step = make_reward_step(MODEL, train_trunk=False)
    for _ in range(2):
        state, metrics = step(state, batch)
    after = jax.tree.map(np.asarray, state.params)
    for name in ("embed", "layers", "final_norm"):  # bit for bit
        jax.tree.map(np.testing.assert_array_equal, after[name], before[name])
    assert not np.allclose(after["reward_head"]["kernel"], before["reward_head"]["kernel"])
    assert float(metrics["grad_norm"]) > 0
    # the trainable-trunk step moves the trunk from the same start
    state = create_train_state(params, make_optimizer(learning_rate=1e-2))
    state, _ = make_reward_step(MODEL)(state, batch)
    assert not np.allclose(np.asarray(state.params["layers"]["mlp"]["gate_up_proj"]["kernel"]),
                           before["layers"]["mlp"]["gate_up_proj"]["kernel"])


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_probe_on_cached_features_equals_head_only_steps(pooling):
    """fit_probe on features computed once = make_reward_step(train_trunk=False) on the same batches."""
    from jaxppo.reward_model import features_of, fit_probe, make_reward_step

    n, size, steps = 16, 4, 6
    prompts, mask = sample_prompts(TASK, jax.random.key(1), n)
    chosen, chosen_mask = demonstrations_of(prompts, mask, seed=2)
    rejected, rejected_mask = demonstrations_of(prompts, mask, seed=3)
    data = {"prompt": prompts, "prompt_mask": mask, "chosen": chosen, "chosen_mask": chosen_mask,
            "rejected": rejected, "rejected_mask": rejected_mask, "margin": jnp.linspace(0.0, 1.0, n)}
    params = {**{k: v for k, v in init_params(MODEL, jax.random.key(0)).items() if k != "lm_head"},
              "reward_head": init_scalar_head(MODEL, jax.random.key(4), "reward_head")}
    rows = np.stack([np.random.default_rng(i).permutation(n)[:size] for i in range(steps)])
    tx = make_optimizer(learning_rate=3e-2, warmup_steps=2)
    state = create_train_state(jax.tree.map(jnp.copy, params), tx)  # the step donates its state
    step = make_reward_step(MODEL, train_trunk=False, pooling=pooling, use_margin=True)
    for r in rows:
        state, metrics = step(state, jax.tree.map(lambda x: x[r], data))
    features = features_of(MODEL, params, data, pooling=pooling)
    probe, probe_metrics = fit_probe(create_train_state(params["reward_head"], tx), features, rows, use_margin=True)
    np.testing.assert_allclose(np.asarray(probe.params["kernel"]), np.asarray(state.params["reward_head"]["kernel"]),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(probe_metrics["loss"]), float(metrics["loss"]), rtol=1e-5)
    assert int(probe.step) == steps
    # and the head moved: the comparison is not between two untouched heads
    assert not np.allclose(np.asarray(probe.params["kernel"]), np.asarray(params["reward_head"]["kernel"]))
