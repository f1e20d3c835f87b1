"""Micro-batching is a memory lever only: 1, 2 and 4 micro-batches give the same loss, aux and gradients.

Rows of very unequal lengths (1, 1, 8, 8, an empty row, …) are where averaging per-micro-batch means
(the old ``accumulate_gradients``) re-weighted short responses; each case also checks that this old
reduction gives a different value, so the test can fail.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params
from jaxppo.optim import accumulate_gradients, create_train_state, split_micro_batches
from jaxppo.ppo import actor_loss, critic_loss, make_update, update_denominators
from jaxppo.ppo_config import PPOConfig
from jaxppo.reward_model import pair_loss, preference_denominators, ranking_loss
from jaxppo.rollout import Trajectory
from jaxppo.sequences import response_logprobs
from jaxppo.sft import sft_denominators, sft_nll

V, P, N = 24, 3, 8
MODEL = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
# Micro-batches of 4 / 2 rows: (1, 1, 8, 8 | 0, 5, 2, 8) and (1, 1 | 8, 8 | 0, 5 | 2, 8).
LENGTHS = np.array([1, 1, 8, 8, 0, 5, 2, 8])
B = len(LENGTHS)
PPO = PPOConfig(batch_size=B, minibatches=1, epochs=1, max_new_tokens=N, kl_in_reward=False, entropy_coef=0.01,
                value_clip_eps=0.2)


def random_params(seed: int = 0, scalar_heads=("value_head",)) -> dict:
    params = init_params(MODEL, jax.random.key(seed), scalar_heads=scalar_heads)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def sequences(rng: np.random.Generator, lengths):
    """Left-padded prompts ``[..., P]`` (1–3 tokens) and right-padded responses ``[..., N]`` of ``lengths``
    (any shape ``[...]``)."""
    lengths = np.asarray(lengths)
    prompt_lengths = rng.integers(1, P + 1, size=lengths.shape)
    prompt_mask = (np.arange(P) >= P - prompt_lengths[..., None]).astype(np.int32)
    response_mask = (np.arange(N) < lengths[..., None]).astype(np.float32)
    prompt = rng.integers(1, V, size=prompt_mask.shape) * prompt_mask
    response = (rng.integers(1, V, size=response_mask.shape) * response_mask).astype(np.int32)
    return [jnp.asarray(x) for x in (prompt, prompt_mask, response, response_mask)]


def trajectory(params: dict, seed: int = 0) -> Trajectory:
    """A trajectory whose old log-probs are near the params' own (ratios around 1, some clipped)."""
    rng = np.random.default_rng(seed)
    prompt, prompt_mask, response, response_mask = sequences(rng, LENGTHS)
    logprobs, _, _ = response_logprobs(MODEL, params, prompt, prompt_mask, response, response_mask)
    noise = lambda scale: jnp.asarray(rng.normal(scale=scale, size=(B, N)), jnp.float32)
    return Trajectory(
        prompt=prompt, prompt_mask=prompt_mask, response=response, response_mask=response_mask,
        old_logprobs=logprobs + noise(0.3), ref_logprobs=logprobs + noise(0.5), old_values=noise(1.0),
        scores=jnp.asarray(rng.normal(size=B), jnp.float32), rewards=noise(1.0), kl=noise(0.1),
        advantages=noise(1.0), returns=noise(1.0), loss_mask=response_mask)


def demonstrations(seed: int = 1) -> dict:
    prompt, prompt_mask, response, response_mask = sequences(np.random.default_rng(seed), LENGTHS[::-1])
    return {"prompt": prompt, "prompt_mask": prompt_mask, "response": response, "response_mask": response_mask}


@functools.partial(jax.jit, static_argnums=(0, 4))
def accumulated(loss_fn, params, batch, denominators, micro_batches):
    max_metrics = ("max_abs_log_ratio",)
    return accumulate_gradients(loss_fn, params, batch, denominators, micro_batches=micro_batches,
                                max_metrics=max_metrics)


def per_micro_batch_mean_grads(loss_fn, params, batch, denominators_fn, micro_batches):
    """The old reduction: the mean over micro-batches of the gradients of each micro-batch's own mean loss."""
    micros = split_micro_batches(batch, micro_batches)
    grad_fn = jax.jit(jax.grad(lambda p, m: loss_fn(p, m, denominators_fn(m))[0]))  # one trace for all
    grads = [grad_fn(params, micro)
             for micro in (jax.tree.map(lambda x, i=i: x[i], micros) for i in range(micro_batches))]
    return jax.tree.map(lambda *g: sum(g) / micro_batches, *grads)


def assert_same_objective(loss_fn, params, batch, denominators_fn, *, old_behaviour_differs=True):
    """Loss, aux and gradients with 1, 2 and 4 micro-batches agree to 1e-5 relative."""
    denominators = denominators_fn(batch)
    loss, aux, grads = accumulated(loss_fn, params, batch, denominators, 1)
    # micro_batches=1 is the unsplit loss function itself
    np.testing.assert_allclose(loss, jax.jit(lambda p, b: loss_fn(p, b, None)[0])(params, batch), rtol=1e-5)
    for k in (2, 4):
        loss_k, aux_k, grads_k = accumulated(loss_fn, params, batch, denominators, k)
        np.testing.assert_allclose(loss_k, loss, rtol=1e-5, err_msg=f"loss, {k} micro-batches")
        assert set(aux_k) == set(aux)
        for name in aux:
            # a clip fraction counts tokens past a threshold: float rounding of a ratio right at it may move
            # one token across (seen on another host), so fractions agree to one token of the minibatch
            atol = 1.0 / float(denominators["tokens"]) + 1e-7 if name.endswith("fraction") and "tokens" in denominators else 1e-7
            np.testing.assert_allclose(aux_k[name], aux[name], rtol=1e-5, atol=atol, err_msg=f"{name}, {k}")
        scale = max(float(np.max(np.abs(g))) for g in jax.tree.leaves(grads))  # atol for exact zeros (PL's bias)
        for path, g1 in jax.tree_util.tree_leaves_with_path(grads):
            gk = np.asarray(dict(jax.tree_util.tree_leaves_with_path(grads_k))[path])
            np.testing.assert_allclose(gk, g1, rtol=1e-5, atol=1e-6 * scale, err_msg=f"grad {path}, {k}")
        assert optax.tree.norm(grads) > 0
    if old_behaviour_differs:
        old = per_micro_batch_mean_grads(loss_fn, params, batch, denominators_fn, 2)
        error = optax.tree.norm(jax.tree.map(jnp.subtract, old, grads)) / optax.tree.norm(grads)
        assert error > 0.05, float(error)
    return loss, aux


def actor_case(ppo: PPOConfig, params: dict, traj: Trajectory, ptx: dict | None = None):
    kl_coef = jnp.float32(0.1)

    def loss_fn(params, batch, denominators):
        return actor_loss(MODEL, ppo, params, {**batch, "kl_coef": kl_coef}, denominators)

    batch = {"traj": traj} if ptx is None else {"traj": traj, "ptx": ptx}
    return loss_fn, batch


@pytest.mark.slow
@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_actor_loss_independent_of_micro_batches(aggregation):
    ppo = dataclasses.replace(PPO, aggregation=aggregation, ptx_coef=0.2 if aggregation == "token-mean" else 0.0)
    params = random_params()
    loss_fn, batch = actor_case(ppo, params, trajectory(params),
                                demonstrations() if ppo.ptx_coef > 0 else None)
    _, aux = assert_same_objective(loss_fn, params, batch, update_denominators)
    assert {"kl_loss", "entropy", "clip_fraction", "max_abs_log_ratio"} <= set(aux)
    assert ("ptx_loss" in aux) == (ppo.ptx_coef > 0)
    assert 0 < float(aux["clip_fraction"]) < 1


@pytest.mark.slow
@pytest.mark.parametrize("policy_loss", ["clip", "gspo"])
def test_dynamic_sampling_loss_independent_of_micro_batches(policy_loss):
    """Dropped groups (loss_mask 0 on rows 2-3, one of them full length) with unequal lengths and an empty
    row: every micro-batch divides by the minibatch's kept tokens / rows, so the split changes nothing."""
    ppo = dataclasses.replace(PPO, estimator="grpo", group_size=2, dynamic_sampling=True, policy_loss=policy_loss)
    params = random_params()
    traj = trajectory(params)
    keep = jnp.asarray([1, 1, 0, 0, 1, 1, 1, 1], jnp.float32)
    traj = traj.replace(loss_mask=traj.response_mask * keep[:, None].astype(traj.response_mask.dtype))
    loss_fn, batch = actor_case(ppo, params, traj)
    _, aux = assert_same_objective(loss_fn, params, batch, update_denominators)
    assert float(update_denominators(batch)["tokens"]) == float(LENGTHS.sum() - LENGTHS[2:4].sum())


@pytest.mark.slow
def test_shared_critic_actor_loss_independent_of_micro_batches():
    ppo = dataclasses.replace(PPO, critic="shared")
    params = random_params()
    loss_fn, batch = actor_case(ppo, params, trajectory(params))
    _, aux = assert_same_objective(loss_fn, params, batch, update_denominators)
    assert {"value_loss", "value_clip_fraction"} <= set(aux)


@pytest.mark.slow
def test_separate_critic_value_loss_independent_of_micro_batches():
    params = random_params(3)
    traj = trajectory(params, seed=3)
    _, aux = assert_same_objective(functools.partial(critic_loss, MODEL, PPO), params, {"traj": traj},
                                   update_denominators)
    assert 0 < float(aux["value_clip_fraction"]) < 1


def test_sft_nll_independent_of_micro_batches():
    assert_same_objective(functools.partial(sft_nll, MODEL), random_params(4, ()), demonstrations(4),
                          sft_denominators)


@pytest.mark.slow
def test_lora_sft_nll_independent_of_micro_batches():
    """The LoRA SFT loss (adapters on a frozen base, non-zero B) and its gradient w.r.t. the adapters
    alone: 1, 2 and 4 micro-batches of unequal lengths agree."""
    from jaxppo.lora import init_adapters, scaling

    model = dataclasses.replace(MODEL, lora_scale=scaling(rank=2, alpha=4.0))
    lora = init_adapters(model, jax.random.key(5), rank=2, targets=("q", "v", "o", "up"))
    lora = jax.tree.map(lambda x: x + 0.1, lora)  # B ≠ 0: every adapter has a gradient
    loss_fn = functools.partial(sft_nll, model, base=random_params(4, ()))
    assert_same_objective(loss_fn, {"lora": lora}, demonstrations(4), sft_denominators)


def test_bradley_terry_independent_of_micro_batches():
    rng = np.random.default_rng(5)
    prompt, prompt_mask, chosen, chosen_mask = sequences(rng, LENGTHS)
    *_, rejected, rejected_mask = sequences(rng, LENGTHS[::-1])
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
             "rejected": rejected, "rejected_mask": rejected_mask, "margin": jnp.asarray(rng.uniform(size=B))}
    # equal-sized micro-batches of pairs: the old mean of means was already right for BT
    assert_same_objective(functools.partial(pair_loss, MODEL, use_margin=True), random_params(5, ("reward_head",)),
                          batch, preference_denominators, old_behaviour_differs=False)


@pytest.mark.slow
def test_plackett_luce_independent_of_micro_batches():
    rng = np.random.default_rng(6)
    prompt, prompt_mask, *_ = sequences(rng, LENGTHS)
    *_, responses, response_mask = sequences(rng, np.stack([LENGTHS, LENGTHS[::-1], np.roll(LENGTHS, 3)], axis=1))
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "responses": responses, "response_mask": response_mask}
    assert_same_objective(functools.partial(ranking_loss, MODEL), random_params(6, ("reward_head",)), batch,
                          lambda b: preference_denominators(b, objective="plackett_luce"), old_behaviour_differs=False)


@pytest.mark.slow
def test_make_update_gradients_and_metrics_independent_of_micro_batches():
    """The whole update step (actor with KL loss, entropy and ptx; separate critic) under plain SGD:
    the parameter change is −lr × gradient, so it must not depend on ``micro_batches``."""
    params = random_params(7)
    traj = trajectory(params, seed=7)
    ptx = demonstrations(7)
    results = []
    for k in (1, 4):
        ppo = dataclasses.replace(PPO, micro_batches=k, ptx_coef=0.2)
        actor = create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(1.0))
        critic = create_train_state(jax.tree.map(jnp.copy, params), optax.sgd(1.0))
        actor, critic, metrics = make_update(MODEL, ppo)(actor, critic, traj, jax.random.key(0), 0.1, ptx)
        results.append(jax.tree.map(np.asarray, (actor.params, critic.params, metrics)))
    (actor1, critic1, metrics1), (actor4, critic4, metrics4) = results
    for name in metrics1:
        np.testing.assert_allclose(metrics4[name], metrics1[name], rtol=1e-5, atol=1e-7, err_msg=name)
    for new1, new4 in ((actor1, actor4), (critic1, critic4)):
        for old, a, b in zip(jax.tree.leaves(params), jax.tree.leaves(new1), jax.tree.leaves(new4)):
            step = np.asarray(a) - np.asarray(old)
            np.testing.assert_allclose(np.asarray(b) - np.asarray(old), step, rtol=1e-4,
                                       atol=1e-5 * max(float(np.max(np.abs(step))), 1e-12))


def pair_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompt, prompt_mask, chosen, chosen_mask = sequences(rng, LENGTHS)
    *_, rejected, rejected_mask = sequences(rng, LENGTHS[::-1])
    return {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
            "rejected": rejected, "rejected_mask": rejected_mask}


def list_batch(seed: int) -> dict:
    rng = np.random.default_rng(seed)
    prompt, prompt_mask, *_ = sequences(rng, LENGTHS)
    *_, responses, response_mask = sequences(rng, np.stack([LENGTHS, LENGTHS[::-1], np.roll(LENGTHS, 3)], axis=1))
    return {"prompt": prompt, "prompt_mask": prompt_mask, "responses": responses, "response_mask": response_mask}


@pytest.mark.parametrize("stage", ["sft", "bradley_terry", "dpo", pytest.param("plackett_luce", marks=pytest.mark.slow)])
def test_lora_dropout_steps_independent_of_micro_batches(stage):
    """LoRA dropout (rate 0.3) in the SFT, reward-model and DPO steps: a row's masks come from its own key
    (the step's key split over the whole batch before micro-batching), so 1 and 4 micro-batches of
    unequal lengths take the same step; the same step without a key (no dropout) differs."""
    from jaxppo.dpo import reference_logprobs
    from jaxppo.lora import init_adapters, scaling
    from jaxppo.reward_model import make_reward_step
    from jaxppo.sft import make_sft_step

    model = dataclasses.replace(MODEL, lora_scale=scaling(rank=2, alpha=4.0), lora_dropout=0.3)
    lora = jax.tree.map(lambda x: x + 0.1, init_adapters(model, jax.random.key(5), rank=2))  # B ≠ 0
    full = random_params(4, ("reward_head",))
    base = {k: v for k, v in full.items() if k != "reward_head"}
    if stage == "sft":
        own, batch, make = {"lora": lora}, demonstrations(4), functools.partial(make_sft_step, model)
    elif stage == "dpo":
        from jaxppo.dpo import make_dpo_step
        from jaxppo.pipeline_config import DPOConfig

        reference = jax.jit(functools.partial(reference_logprobs, model))(base, pair_batch(5))
        own, batch = {"lora": lora}, {**pair_batch(5), **reference}
        make = functools.partial(make_dpo_step, model, DPOConfig(loss="dpo", beta=0.5))
    else:
        own = {"lora": lora, "reward_head": full["reward_head"]}
        batch = pair_batch(5) if stage == "bradley_terry" else list_batch(6)
        make = functools.partial(make_reward_step, model, objective=stage)

    def step(micro_batches, key):  # SGD with learning rate 1: the step is minus the gradient
        state = create_train_state(jax.tree.map(jnp.copy, own), optax.sgd(1.0))
        state, metrics = make(micro_batches=micro_batches)(state, batch, base, key)
        return jax.tree.map(np.asarray, state.params), float(metrics["loss"])

    key = jax.random.key(7)
    params_1, loss_1 = step(1, key)
    params_4, loss_4 = step(4, key)
    np.testing.assert_allclose(loss_4, loss_1, rtol=1e-5)
    moved = jax.tree.map(lambda new, old: new - np.asarray(old), params_1, own)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(moved))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * scale), params_4, params_1)
    _, loss_plain = step(1, None)
    assert abs(loss_plain - loss_1) > 1e-4, (loss_plain, loss_1)
    _, loss_other_key = step(1, jax.random.key(8))
    assert abs(loss_other_key - loss_1) > 1e-4


@pytest.mark.parametrize("loss", ["dpo", "orpo", *(pytest.param(loss, marks=pytest.mark.slow)
                                                   for loss in ("cdpo", "ipo", "simpo"))])
def test_dpo_family_independent_of_micro_batches(loss):
    """Every DPO-family objective (jaxppo.dpo.preference_objective: pair means, and ORPO's token-mean NLL
    of the chosen responses, whose per-micro-batch mean would re-weight short responses) is the same
    over 1, 2 and 4 micro-batches of unequal lengths (>= 1 token: ORPO's odds need log p < 0)."""
    from jaxppo.dpo import dpo_denominators, preference_objective
    from jaxppo.pipeline_config import DPOConfig

    rng = np.random.default_rng(9)
    lengths = np.maximum(LENGTHS, 1)
    prompt, prompt_mask, chosen, chosen_mask = sequences(rng, lengths)
    *_, rejected, rejected_mask = sequences(rng, lengths[::-1])
    batch = {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": chosen, "chosen_mask": chosen_mask,
             "rejected": rejected, "rejected_mask": rejected_mask,
             "ref_chosen": jnp.asarray(-rng.uniform(5, 20, B), jnp.float32),
             "ref_rejected": jnp.asarray(-rng.uniform(5, 20, B), jnp.float32)}
    hp = DPOConfig(loss=loss, beta=0.5, gamma=0.3, tau=0.2, lam=0.1, label_smoothing=0.2)
    assert_same_objective(functools.partial(preference_objective, MODEL, hp), random_params(9, ()), batch,
                          dpo_denominators, old_behaviour_differs=loss == "orpo")
