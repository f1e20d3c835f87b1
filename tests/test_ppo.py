"""The PPO update and iteration on a tiny model: ratio 1 at the start, the clip, critics, KL-as-loss and
PPO-ptx, non-finite steps, one program per iteration, and the estimator plug-in point."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import backend_compiles
from jaxppo.advantages import explained_variance
from jaxppo.models.heads import init_params
from jaxppo.ppo import init_ppo
from jaxppo.sequences import response_logprobs, response_values
from jaxppo.toy_task import sample_prompts
from tiny import MODEL, ONE_DEVICE, PPO, TASK, gold_score, setup, surrogate


@pytest.mark.slow
def test_update_recomputes_old_logprobs_and_decreases_the_surrogate():
    actor, critic, _, traj, _, update = setup()
    before, old = surrogate(actor.params, traj)
    assert before == pytest.approx(0.0, abs=1e-6)  # ratio 1 and whitened advantages: the surrogate is 0
    np.testing.assert_allclose(old, traj.old_logprobs, atol=1e-5)
    actor, critic, metrics = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
    assert float(metrics["first_max_abs_log_ratio"]) <= 1e-5  # ratio = 1 on the first minibatch
    after, _ = surrogate(actor.params, traj)
    assert after < before - 1e-3


@pytest.mark.slow
def test_tiny_clip_barely_moves_the_policy():
    # Plain SGD: once every ratio leaves [1 − ε, 1 + ε] the gradient is zero and so is the step
    # (Adam's momentum would keep drifting, which is Adam, not the clip).
    moves = {}
    for clip in (0.2, 1e-4):
        ppo = dataclasses.replace(PPO, clip_eps=clip, epochs=4)
        actor, critic, _, traj, _, update = setup(ppo, actor_tx=optax.sgd(0.01))
        _, old = surrogate(actor.params, traj, ppo)
        actor, _, _ = update(actor, critic, traj, jax.random.key(9), ppo.kl_coef, None)
        _, new = surrogate(actor.params, traj, ppo)
        moves[clip] = float(jnp.sum(jnp.abs(new - old) * traj.response_mask) / jnp.sum(traj.response_mask))
    assert moves[1e-4] < 0.35 * moves[0.2], moves


@pytest.mark.slow
def test_zero_advantages_leave_the_actor_unchanged():
    actor, critic, _, traj, _, update = setup()
    traj = traj.replace(advantages=jnp.zeros_like(traj.advantages))
    before = jax.tree.map(np.asarray, actor.params)
    actor, critic, _ = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, actor.params))


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_critic_learns_a_value_function(critic):
    ppo = dataclasses.replace(PPO, critic=critic, learning_rate=3e-3, critic_learning_rate=3e-3, vf_coef=1.0,
                              value_clip_eps=None, epochs=4)
    actor, critic_state, _, traj, _, update = setup(ppo)
    for i in range(40):
        actor, critic_state, _ = update(actor, critic_state, traj, jax.random.key(i), 0.0, None)
    args = (traj.prompt, traj.prompt_mask, traj.response, traj.response_mask)
    if critic == "shared":
        values = response_logprobs(MODEL, actor.params, *args, value_head="value_head")[1]
    else:
        values = response_values(MODEL, critic_state.params, *args)
    assert float(explained_variance(values, traj.returns, traj.response_mask)) > 0.5


def test_kl_loss_ptx_and_shapes_are_traced_once():
    ppo = dataclasses.replace(PPO, kl_in_reward=False, kl_estimator="k3", ptx_coef=0.1, critic="shared")
    actor, critic, ref, traj, rollout, update = setup(ppo)
    ptx = {"prompt": traj.prompt, "prompt_mask": traj.prompt_mask, "response": traj.response,
           "response_mask": traj.response_mask.astype(jnp.int32)}
    np.testing.assert_array_equal(traj.rewards.sum(1), traj.scores * (traj.response_mask.sum(1) > 0))  # no KL in reward
    with backend_compiles() as compiles:
        for i in range(3):
            prompts = sample_prompts(TASK, jax.random.key(100 + i), ppo.batch_size)
            traj, _ = rollout(actor.params, None, ref, None, *prompts, jax.random.key(i), 0.1)
            actor, critic, metrics = update(actor, critic, traj, jax.random.key(i), 0.1, ptx)
            if i == 0:
                assert compiles  # the first iteration compiles (so the counter counts); later ones must not
                compiles.clear()
    assert compiles == []
    assert {"kl_loss", "ptx_loss", "value_loss"} <= set(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_fused_iterations_equal_the_two_function_loop(critic):
    """make_iteration: three iterations folded into one XLA program (lax.scan) = the same body called
    from the host with the jitted rollout and update (fused=False) = rollout then update by hand,
    with the same keys, adaptive-KL controller included; traced once per K."""
    from jaxppo.kl_control import update_kl_control
    from jaxppo.ppo import make_iteration

    ppo = dataclasses.replace(PPO, critic=critic, kl_target=0.5, kl_horizon=100.0)
    _, _, _, _, rollout, update = setup(ppo)
    state, frozen = init_ppo(MODEL, ppo, ONE_DEVICE, sft_params=init_params(MODEL, jax.random.key(0)),
                             reward_params=None, key=jax.random.key(0))
    prompts = [sample_prompts(TASK, jax.random.key(10 + i), ppo.batch_size) for i in range(3)]
    sample_keys = jnp.stack([jax.random.key(20 + i) for i in range(3)])
    update_keys = jnp.stack([jax.random.key(30 + i) for i in range(3)])
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (every path donates its state)
    a, c, kl = copy(state.actor), copy(state.critic), copy(state.kl)
    loop_metrics = []
    for i in range(3):
        traj, m = rollout(a.params, None if c is None else c.params, frozen.reference, None, *prompts[i],
                          sample_keys[i], kl.kl_coef)
        a, c, um = update(a, c, traj, update_keys[i], kl.kl_coef, None)
        kl = update_kl_control(kl, m["kl"], n_steps=ppo.batch_size, target=ppo.kl_target, horizon=ppo.kl_horizon)
        loop_metrics.append({**m, **um})
    stacked = [jnp.stack(x) for x in zip(*prompts)]
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    for fused in (True, False):
        iterate = make_iteration(MODEL, ppo, score_fn=gold_score, fused=fused)
        out, samples, metrics = iterate(copy(state), frozen, *stacked, sample_keys, update_keys)
        np.testing.assert_array_equal(np.asarray(samples["response"][2]), np.asarray(traj.response))
        jax.tree.map(lambda x, y: close(np.asarray(x), np.asarray(y)), out.actor.params, a.params)
        if c is not None:
            jax.tree.map(lambda x, y: close(np.asarray(x), np.asarray(y)), out.critic.params, c.params)
        close(float(out.kl.kl_coef), float(kl.kl_coef))
        for i in range(3):
            for name in ("policy_loss", "kl", "score", "value_loss", "approx_kl"):
                close(float(metrics[name][i]), float(loop_metrics[i][name]), atol=1e-5)
    assert float(kl.kl_coef) != ppo.kl_coef  # the controller moved
    # a second call of the fused program with the same K compiles nothing
    iterate = make_iteration(MODEL, ppo, score_fn=gold_score, fused=True)
    out, _, _ = iterate(copy(state), frozen, *stacked, sample_keys, update_keys)
    with backend_compiles() as compiles:
        iterate(out, frozen, *stacked, sample_keys, update_keys)
    assert compiles == []
    assert iterate._cache_size() == 1


def test_non_finite_loss_skips_the_update_counts_it_and_keeps_params():
    actor, critic, _, traj, _, update = setup()
    before = jax.tree.map(np.asarray, (actor.params, critic.params))
    # a NaN advantage in one row poisons every minibatch it lands in; returns inf poison the critic
    bad = traj.replace(advantages=traj.advantages.at[:, 0].set(jnp.nan), returns=traj.returns.at[:, 0].set(jnp.inf))
    actor, critic, metrics = update(actor, critic, bad, jax.random.key(9), PPO.kl_coef, None)
    steps = PPO.epochs * PPO.minibatches
    assert int(metrics["actor_skipped_updates"]) == steps and int(metrics["critic_skipped_updates"]) == steps
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, (actor.params, critic.params)))
    # the next finite trajectory trains normally and the count stays
    actor, critic, metrics = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
    assert int(metrics["actor_skipped_updates"]) == steps
    assert not np.array_equal(before[0]["embed"]["embedding"], np.asarray(actor.params["embed"]["embedding"]))


def test_a_fork_adds_an_estimator_with_one_function_and_one_table_row(monkeypatch):
    """The plug-in point: a pure estimator in ``ESTIMATORS`` is chosen by ``ppo.estimator``; here one
    without a critic that returns the score minus the batch mean at every token (REINFORCE with a
    mean baseline). No critic is built, the rollout's advantages are that function's, and the update
    runs on them."""
    from jaxppo import advantages

    def mean_baseline(inputs, *, gamma):
        adv = (inputs.scores - jnp.mean(inputs.scores))[:, None] * gamma * inputs.mask
        return adv, adv

    monkeypatch.setitem(advantages.ESTIMATORS, "mean_baseline",
                        advantages.Estimator(mean_baseline, hyperparameters=("gamma",), needs_critic=False))
    ppo = dataclasses.replace(PPO, estimator="mean_baseline", whiten_advantages=False)
    actor, critic, _, traj, _, update = setup(ppo)
    assert critic is None and traj.old_values is None
    scores = np.asarray(traj.scores)
    np.testing.assert_allclose(np.asarray(traj.advantages), (scores - scores.mean())[:, None]
                               * np.asarray(traj.response_mask), atol=1e-6)
    before = jax.tree.map(np.asarray, actor.params)
    actor, critic, metrics = update(actor, None, traj, jax.random.key(0), 0.0, None)
    assert critic is None and "value_loss" not in metrics
    assert not np.allclose(before["embed"]["embedding"], np.asarray(actor.params["embed"]["embedding"]))
    with pytest.raises(ValueError, match="ppo.estimator"):
        dataclasses.replace(PPO, estimator="no-such-estimator")


@pytest.mark.slow
def test_a_fork_adds_a_policy_loss_with_one_function_and_one_table_row(monkeypatch):
    """``ppo.policy_loss`` picks the actor's surrogate from ``POLICY_LOSSES``: a loss that ignores the
    advantages leaves the actor where it was, while the default clip loss moves it from the same start."""
    from jaxppo import losses

    def no_signal(logprobs, old_logprobs, advantages, mask, *, token_count, row_count):
        zero = 0.0 * jnp.sum(jnp.where(mask > 0, logprobs, 0.0))  # depends on θ, zero gradient
        return zero, {"clip_fraction": zero, "approx_kl": zero}

    monkeypatch.setitem(losses.POLICY_LOSSES, "no_signal", losses.PolicyLoss(no_signal, hyperparameters=()))
    for name, moves in (("no_signal", False), ("clip", True)):
        actor, critic, _, traj, _, update = setup(dataclasses.replace(PPO, policy_loss=name, entropy_coef=0.0))
        before = np.asarray(actor.params["embed"]["embedding"])
        actor, _, metrics = update(actor, critic, traj, jax.random.key(9), 0.0, None)
        assert np.allclose(before, np.asarray(actor.params["embed"]["embedding"])) != moves, name
    with pytest.raises(ValueError, match="ppo.policy_loss"):
        dataclasses.replace(PPO, policy_loss="no-such-loss")
