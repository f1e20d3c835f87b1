"""Non-finite steps: the optimizer skips a step that would leave a NaN / ±inf anywhere (gradients,
updates, params, moments) and counts it; a stage that skips every update stops with an error, and a
PPO iteration whose updates were all skipped logs a warning.

Each skipped case also runs the old wrapper (``optax.apply_if_finite``, which checks the gradients
only) to show it applied the step, so the test can fail.
"""

from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from tiny import PPO, setup, tiny_config

from jaxppo.models.heads import init_params
from jaxppo.optim import (
    AllUpdatesSkipped,
    check_updates_applied,
    create_train_state,
    make_optimizer,
    skipped_updates,
)
from jaxppo.pipeline import RewardModel, open_run
from jaxppo.pipeline import ppo as ppo_pipeline
from jaxppo.pipeline import sft as sft_pipeline
from jaxppo.pipeline.ppo import warn_skipped_iterations


def old_optimizer(*, learning_rate, max_grad_norm=1.0, weight_decay=0.0, warmup_steps=0):
    """make_optimizer before the fix: the same chain under ``optax.apply_if_finite``."""
    unguarded = make_optimizer(learning_rate=learning_rate, max_grad_norm=max_grad_norm, weight_decay=weight_decay,
                               warmup_steps=warmup_steps, skip_nonfinite=False)
    return optax.apply_if_finite(unguarded, max_consecutive_errors=2**30)


def assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, a), jax.tree.map(np.asarray, b))


def is_finite(tree) -> bool:
    return all(bool(np.all(np.isfinite(np.asarray(x)))) for x in jax.tree.leaves(tree))


# (name, params, grads, optimizer kwargs): every gradient finite, the step is not
CASES = [
    # lr = inf: the updates are ±inf (and NaN where a moment is 0)
    ("inf updates", {"w": jnp.array([1.0, -2.0, 0.5])}, {"w": jnp.array([0.3, -1.0, 0.0])},
     {"learning_rate": float("inf")}),
    # finite updates of ~1e38 (Adam's first step is lr·sign(g)) push params near float32's max past it
    ("inf params", {"w": jnp.array([3e38, -3e38, 1.0])}, {"w": jnp.array([-1.0, 1.0, 0.5])},
     {"learning_rate": 1e38}),
    # |g| = 1e20 without clipping: g² overflows, the second moment is inf, the update 0 · finite
    ("inf moment", {"w": jnp.array([1.0, 2.0])}, {"w": jnp.array([1e20, 1.0])},
     {"learning_rate": 1e-3, "max_grad_norm": None}),
]


@pytest.mark.parametrize("params, grads, kwargs", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_a_step_that_would_leave_a_non_finite_value_is_skipped_and_counted(params, grads, kwargs):
    state = create_train_state(params, make_optimizer(**kwargs))
    after = jax.jit(lambda s, g: s.apply_gradients(grads=g))(state, grads)
    assert int(skipped_updates(after)) == 1 and int(after.step) == 1
    assert_trees_equal(after.params, params)
    assert_trees_equal(after.opt_state.inner_state, state.opt_state.inner_state)
    old = create_train_state(params, old_optimizer(**kwargs)).apply_gradients(grads=grads)
    assert int(skipped_updates(old)) == 0 and not is_finite((old.params, old.opt_state))  # the bug


def test_the_count_accumulates_and_a_finite_step_after_a_skip_applies():
    tx = make_optimizer(learning_rate=1e-2)
    state = create_train_state({"w": jnp.ones(3)}, tx)
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    state = step(step(state, {"w": jnp.array([jnp.nan, 1.0, 1.0])}), {"w": jnp.array([1.0, jnp.inf, 1.0])})
    assert int(skipped_updates(state)) == 2 and int(state.opt_state.notfinite_count) == 2
    np.testing.assert_array_equal(np.asarray(state.params["w"]), np.ones(3))
    state = step(state, {"w": jnp.array([1.0, -1.0, 1.0])})
    assert int(skipped_updates(state)) == 2 and int(state.opt_state.notfinite_count) == 0
    assert not np.array_equal(np.asarray(state.params["w"]), np.ones(3))


def test_finite_steps_are_bit_identical_to_the_old_and_the_plain_chain():
    kwargs = {"learning_rate": 3e-2, "weight_decay": 0.1, "warmup_steps": 2, "max_grad_norm": 0.5}
    keys = jax.random.split(jax.random.key(0), 6)
    params = {"a": jax.random.normal(keys[0], (4, 3)), "b": {"c": jax.random.normal(keys[1], (5,))}}
    new, old, plain = (create_train_state(params, tx) for tx in (
        make_optimizer(**kwargs), old_optimizer(**kwargs), make_optimizer(**kwargs, skip_nonfinite=False)))
    # the same state pytree as apply_if_finite's: checkpoints saved before the fix restore
    assert jax.tree.structure(new.opt_state) == jax.tree.structure(old.opt_state)
    step = jax.jit(lambda s, g: s.apply_gradients(grads=g))
    for key in keys[2:]:
        grads = jax.tree.map(lambda x, k=key: 3.0 * jax.random.normal(k, x.shape), params)
        new, old, plain = step(new, grads), step(old, grads), step(plain, grads)
        assert_trees_equal(new.params, old.params)
        assert_trees_equal(new.params, plain.params)
        assert_trees_equal(new.opt_state, old.opt_state)
        assert_trees_equal(new.opt_state.inner_state, plain.opt_state)
    assert int(skipped_updates(new)) == 0


def test_a_ppo_update_is_bit_identical_to_the_old_optimizer():
    """Inside the jitted PPO update (a scan of minibatch steps) too: both optimizers compute the step
    in a ``lax.cond``, which XLA compiles alike (the unguarded chain may differ in the last bit)."""
    results = []
    for tx in (old_optimizer(learning_rate=PPO.learning_rate, max_grad_norm=PPO.max_grad_norm),
               make_optimizer(learning_rate=PPO.learning_rate, max_grad_norm=PPO.max_grad_norm)):
        actor, critic, _, traj, _, update = setup(actor_tx=tx)
        actor, _, _ = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
        results.append((actor.params, actor.opt_state))
    assert_trees_equal(*results)


@pytest.mark.parametrize("max_grad_norm", [1.0, None])
def test_the_check_needs_no_more_memory_than_the_old_one(max_grad_norm):
    """The compiled step's temporary buffers (abstract shapes: nothing is allocated): checking every
    value per parameter in one fused pass holds no copy of the step (one reduction per array did:
    2-3x the params' bytes more)."""
    params = {"a": jax.ShapeDtypeStruct((1024, 512), jnp.float32), "b": jax.ShapeDtypeStruct((1024,), jnp.float32)}

    def temp_bytes(tx):
        state = jax.eval_shape(lambda p: create_train_state(p, tx), params)
        step = jax.jit(lambda s, g: s.apply_gradients(grads=g), donate_argnums=0)
        return step.lower(state, params).compile().memory_analysis().temp_size_in_bytes

    kwargs = {"learning_rate": 1e-3, "max_grad_norm": max_grad_norm, "weight_decay": 0.1}
    assert temp_bytes(make_optimizer(**kwargs)) <= temp_bytes(old_optimizer(**kwargs))


def test_a_stage_that_skipped_every_update_raises_and_one_that_skipped_some_warns(caplog):
    state = create_train_state({"w": jnp.ones(2)}, make_optimizer(learning_rate=1e-2))
    check = {"stage": "sft", "learning_rate_field": "sft.learning_rate", "learning_rate": 1e-2}
    check_updates_applied(state, **check)  # no update attempted: nothing to say
    bad = state.apply_gradients(grads={"w": jnp.array([jnp.nan, 1.0])})
    bad = bad.apply_gradients(grads={"w": jnp.array([1.0, jnp.inf])})
    with pytest.raises(AllUpdatesSkipped, match=r"^sft: all 2 updates were skipped as non-finite .*"
                                                r"lower `sft\.learning_rate` \(0\.01\) or check the training data"):
        check_updates_applied(bad, **check)
    with caplog.at_level(logging.WARNING, logger="jaxppo.optim"):
        check_updates_applied(bad.apply_gradients(grads={"w": jnp.ones(2)}), **check)
    assert [r.getMessage() for r in caplog.records] == [
        "sft: 2 of 3 updates skipped as non-finite (NaN/inf gradients, updates or params)"]


def test_ppo_iterations_whose_updates_were_all_skipped_are_warned_of(caplog):
    # 4 updates per iteration; cumulative counts after iterations 10, 11, 12 and then 13
    calls = [(10, {"actor": np.array([5, 9, 10]), "critic": np.array([1, 1, 1])}),
             (13, {"actor": np.array([14]), "critic": np.array([5])})]
    with caplog.at_level(logging.WARNING, logger="jaxppo.pipeline.ppo"):
        after = warn_skipped_iterations(calls, {"actor": 1, "critic": 1}, updates=4)
    assert after == {"actor": 14, "critic": 5}
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "ppo iteration 10: all 4 actor updates skipped as non-finite",
        "ppo iteration 11: all 4 actor updates skipped as non-finite",
        "ppo iteration 13: all 4 actor updates skipped as non-finite",
        "ppo iteration 13: all 4 critic updates skipped as non-finite"]


# ------------------------------------------------------------------------- the stages, on the tiny config


@pytest.fixture
def tiny_run(tmp_path):
    config = tiny_config()
    config = dataclasses.replace(
        config, sft=dataclasses.replace(config.sft, steps=3, batch_size=4, warmup_steps=0),
        ppo=dataclasses.replace(config.ppo, iterations=4, iterations_per_call=1), log_every=3)
    with open_run(config, tmp_path) as (ctx, base):
        yield ctx, base


def test_an_sft_stage_whose_every_step_is_skipped_stops(tiny_run, monkeypatch):
    """A research fork's optimizer whose steps are all non-finite (here AdamW at lr = inf)."""
    monkeypatch.setattr(sft_pipeline, "make_optimizer",
                        lambda **kw: make_optimizer(**{**kw, "learning_rate": float("inf")}))
    with pytest.raises(AllUpdatesSkipped, match=r"^sft: all 3 updates were skipped .*`sft\.learning_rate`"):
        sft_pipeline.sft_stage(*tiny_run)


def fake_iteration(bad: dict):
    """A PPO iteration whose updates are ``epochs × minibatches`` optimizer steps of each role, on
    NaN gradients in the iterations ``bad[role]`` names and finite ones otherwise: the host loop of
    :func:`jaxppo.pipeline.ppo.ppo_stage` around it as it is."""
    apply = jax.jit(lambda state, scale: state.apply_gradients(
        grads=jax.tree.map(lambda p: jnp.full_like(p, scale), state.params)))

    def make_iteration(*args, **kwargs):
        def iterate(state, frozen, prompts, *rest):
            metrics = {"gold_reward": [], "proxy_reward": [], "kl": [], "actor_skipped_updates": [],
                       "critic_skipped_updates": []}
            for _ in range(prompts.shape[0]):
                it = int(state.actor.step) // (PPO.epochs * PPO.minibatches)
                roles = {}
                for role in ("actor", "critic"):
                    roles[role] = getattr(state, role)
                    for _ in range(PPO.epochs * PPO.minibatches):
                        roles[role] = apply(roles[role], jnp.nan if it in bad[role] else 1e-3)
                    metrics[f"{role}_skipped_updates"].append(skipped_updates(roles[role]))
                state = state.replace(**roles)
                for name in ("gold_reward", "proxy_reward", "kl"):
                    metrics[name].append(jnp.zeros([]))
            return state, None, {name: jnp.stack(v) for name, v in metrics.items()}

        return iterate

    return make_iteration


def test_ppo_warns_of_each_all_skipped_iteration_and_stops_when_every_update_was(tiny_run, monkeypatch, caplog):
    ctx, _ = tiny_run
    sft_params = init_params(ctx.config.model, jax.random.key(0))
    reward = RewardModel(params=None, state=None, train=None, result={}, norm_samples=None)
    # log_every=3: iterations 1 and 2 reach the host only with iteration 3's call
    monkeypatch.setattr(ppo_pipeline, "make_iteration", fake_iteration({"actor": {1}, "critic": set()}))
    with caplog.at_level(logging.WARNING):
        ppo_pipeline.ppo_stage(ctx, sft_params, reward)
    why = "as non-finite (NaN/inf gradients, updates or params)"
    assert [r.getMessage() for r in caplog.records] == [
        f"ppo iteration 1: all 4 actor updates skipped {why}; the actor did not change",
        f"ppo (actor): 4 of 16 updates skipped {why}"]
    caplog.clear()
    monkeypatch.setattr(ppo_pipeline, "make_iteration", fake_iteration({"actor": set(), "critic": {0, 1, 2, 3}}))
    with caplog.at_level(logging.WARNING), pytest.raises(
            AllUpdatesSkipped, match=r"^ppo \(critic\): all 16 updates were skipped .*`ppo\.learning_rate`"):
        ppo_pipeline.ppo_stage(ctx, sft_params, reward)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == [f"ppo iteration {i}" for i in range(4)]
