"""The critic-free family in the loop: no critic or reference built when not needed, group sampling,
dynamic sampling's loss, host reward functions, and the addition task's verifiers."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo import addition_task as at
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params
from jaxppo.ppo import actor_loss, init_ppo, make_iteration, update_denominators
from jaxppo.ppo_config import PPOConfig
from jaxppo.rewards import RewardFunction, make_score_fn
from jaxppo.tasks import ADDITION_CODEC
from jaxppo.rollout import group_prompts, make_rollout
from jaxppo.toy_task import sample_prompts
from tiny import MODEL, ONE_DEVICE, PPO, TASK, gold_score


GRPO = dataclasses.replace(PPO, estimator="grpo", group_size=4, kl_in_reward=False, kl_estimator="k3")


def _leaves(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


def test_critic_free_estimators_build_no_critic_and_beta_zero_builds_no_reference():
    params = init_params(MODEL, jax.random.key(0))
    ppo_state, ppo_frozen = init_ppo(MODEL, PPO, ONE_DEVICE, sft_params=params, reward_params=None,
                                     key=jax.random.key(1))
    assert ppo_state.critic is not None and ppo_frozen.reference is not None
    for estimator in ("grpo", "dr_grpo", "rloo", "reinforce++", "reinforce++_baseline"):
        ppo = dataclasses.replace(GRPO, estimator=estimator)
        state, frozen = init_ppo(MODEL, ppo, ONE_DEVICE, sft_params=params, reward_params=None, key=jax.random.key(1))
        assert state.critic is None and "value_head" not in state.actor.params, estimator
        assert frozen.reference is not None  # β = 0.05 > 0: the KL anchor
        # the trained side holds the actor and its optimizer only: a PPO state less its critic
        assert _leaves(state) == _leaves(ppo_state) - _leaves(ppo_state.critic)
    no_kl = dataclasses.replace(GRPO, kl_coef=0.0)
    assert init_ppo(MODEL, no_kl, ONE_DEVICE, sft_params=params, reward_params=None, key=jax.random.key(1))[1].reference \
        is None
    watched = dataclasses.replace(no_kl, reference_model=True)  # β = 0, but the KL is still measured
    assert init_ppo(MODEL, watched, ONE_DEVICE, sft_params=params, reward_params=None,
                    key=jax.random.key(1))[1].reference is not None


def _rollout(ppo, score_fn, *, seed=0, params=None, prompts=None):
    params = init_params(MODEL, jax.random.key(seed)) if params is None else params
    state, frozen = init_ppo(MODEL, ppo, ONE_DEVICE, sft_params=params, reward_params=None, key=jax.random.key(1))
    if prompts is None:
        prompts = group_prompts(*sample_prompts(TASK, jax.random.key(seed + 1), ppo.prompts_per_batch),
                                group_size=ppo.group_size)
    rollout = make_rollout(MODEL, ppo, score_fn=score_fn)
    traj, metrics = rollout(state.actor.params, None, frozen.reference, None, *prompts, jax.random.key(seed + 2),
                            ppo.kl_coef)
    return state, frozen, traj, metrics


def test_a_run_without_reference_has_zero_kl_and_the_same_advantages():
    """β = 0 without a reference: no reference pass, KL 0; the advantages are those of the run that builds
    the reference and measures the KL (they do not depend on it at β = 0)."""
    no_ref = dataclasses.replace(GRPO, kl_coef=0.0, kl_in_reward=True, kl_estimator="k1")
    _, frozen, traj, metrics = _rollout(no_ref, gold_score)
    assert frozen.reference is None and float(metrics["kl"]) == 0.0
    _, _, watched, watched_metrics = _rollout(dataclasses.replace(no_ref, reference_model=True), gold_score)
    np.testing.assert_array_equal(traj.response, watched.response)
    np.testing.assert_allclose(traj.advantages, watched.advantages, atol=1e-6)
    np.testing.assert_array_equal(traj.ref_logprobs, traj.old_logprobs)


def test_groups_are_consecutive_rows_with_their_own_samples():
    _, _, traj, _ = _rollout(GRPO, gold_score)
    prompts = np.asarray(traj.prompt).reshape(-1, GRPO.group_size, traj.prompt.shape[1])
    assert (prompts == prompts[:, :1]).all()  # one prompt per group
    responses = np.asarray(traj.response).reshape(-1, GRPO.group_size, traj.response.shape[1])
    assert any(len({tuple(r) for r in group}) > 1 for group in responses)  # each row its own sample
    # GRPO: one advantage per response, on each of its tokens; zero-sum per group
    adv, mask = np.asarray(traj.advantages), np.asarray(traj.response_mask)
    per_row = adv[:, 0]
    np.testing.assert_allclose(adv, per_row[:, None] * mask, atol=1e-6)
    np.testing.assert_allclose(per_row.reshape(-1, GRPO.group_size).sum(1), 0, atol=1e-5)


def _half_constant(*args):
    """Scores whose first half of groups vary (response length) and second half are all 0 (no signal)."""
    response_mask = args[3]
    b = response_mask.shape[0]
    return jnp.where(jnp.arange(b) < b // 2, jnp.sum(response_mask, axis=1).astype(jnp.float32), 0.0)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_dynamic_sampling_gives_the_gradient_of_the_informative_groups_alone(aggregation):
    """Half the groups have equal scores: dropped from the loss, the gradient is that of the batch of only
    the informative groups (their tokens do not dilute the token mean, nor their rows the row mean)."""
    ppo = dataclasses.replace(GRPO, dynamic_sampling=True, aggregation=aggregation, entropy_coef=0.01,
                              missing_eos_penalty=0.0)  # a penalty would make constant groups informative
    state, _, traj, metrics = _rollout(ppo, _half_constant)
    b = ppo.batch_size
    informative = np.asarray(traj.response_mask)[: b // 2].sum(1).reshape(-1, ppo.group_size)
    kept = np.mean(np.ptp(informative, axis=1) > 0) / 2  # the varying half can hold equal-length groups too
    assert float(metrics["kept_fraction"]) == pytest.approx(kept)
    assert 0 < kept <= 0.5
    only = jax.tree.map(lambda x: x[: b // 2], traj)

    def grad(t):
        batch = {"traj": t, "kl_coef": jnp.float32(0.05)}
        return jax.grad(lambda p: actor_loss(MODEL, ppo, p, batch, update_denominators(batch))[0])(state.actor.params)

    full, half = grad(traj), grad(only)
    assert update_denominators({"traj": traj})["tokens"] == update_denominators({"traj": only})["tokens"]
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), full, half)
    assert _leaves(jax.tree.map(lambda x: jnp.abs(x).sum(), full)) > 0


def test_oversampling_keeps_informative_groups_first():
    """oversample = 2: twice the groups are sampled and scored; the batch keeps the informative ones first."""
    ppo = dataclasses.replace(GRPO, dynamic_sampling=True, oversample=2, missing_eos_penalty=0.0)
    _, _, traj, metrics = _rollout(ppo, _half_constant)
    assert traj.response.shape[0] == ppo.batch_size
    scores = np.asarray(traj.scores).reshape(-1, ppo.group_size)
    informative = np.ptp(scores, axis=1) > 0
    n = informative.sum()
    assert informative[:n].all() and not informative[n:].any()  # informative groups first
    assert float(metrics["kept_fraction"]) == pytest.approx(n / len(informative))
    assert float(metrics["kept_fraction"]) >= float(metrics["informative_sampled_fraction"])


# ----------------------------------------------------------------------------- reward functions

ADD = at.AdditionTaskConfig(digits=2)
ADD_MODEL = ModelConfig(vocab_size=ADD.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, head_dim=16, max_position_embeddings=16, tie_word_embeddings=True)
CODEC = ADDITION_CODEC


def test_exact_match_and_its_text_version_agree():
    prompt, mask = at.sample_prompts(ADD, jax.random.key(0), 512)
    right, right_mask = at.demonstrations(dataclasses.replace(ADD, demo_error_prob=0.0), jax.random.key(1), prompt, mask)
    wrong, wrong_mask = at.demonstrations(dataclasses.replace(ADD, demo_error_prob=1.0), jax.random.key(1), prompt, mask)
    noise = jax.random.randint(jax.random.key(2), right.shape, 0, ADD.vocab_size)
    noise_mask = (jnp.arange(right.shape[1])[None] < jax.random.randint(jax.random.key(3), (512, 1), 0, 7)).astype(int)
    for response, response_mask, expected in ((right, right_mask, 1.0), (wrong, wrong_mask, 0.0),
                                              (noise, noise_mask, None)):
        jit = np.asarray(at.exact_match(ADD, prompt, mask, response, response_mask))
        host = at.exact_match_text(*(CODEC.decode(np.asarray(t), np.asarray(m))
                                     for t, m in ((prompt, mask), (response, response_mask))))
        np.testing.assert_array_equal(jit, host)
        if expected is not None:
            assert (jit == expected).all()
    assert at.exact_match_text(["37+48="], ["580</s>"]).tolist() == [1.0]  # 085, least significant digit first
    assert at.exact_match_text(["37+48="], ["58</s>"]).tolist() == [0.0]  # the answer has 3 digits
    assert at.exact_match_text(["37+48="], ["580"]).tolist() == [0.0]  # no EOS
    # a PAD or BOS sampled inside a response is visible in its text: it never reads as the answer
    p, m = at.encode_prompts(ADD, jnp.array([37]), jnp.array([48]))
    d = at.DIGIT0
    for inner in (at.PAD, at.BOS):
        r = jnp.array([[d + 5, inner, d + 8, d + 0, at.EOS, at.PAD]])
        rm = jnp.array([[1, 1, 1, 1, 1, 0]])
        text = CODEC.decode(np.asarray(r), np.asarray(rm))
        assert at.exact_match_text(CODEC.decode(np.asarray(p), np.asarray(m)), text).tolist() == [0.0], text
        assert float(at.exact_match(ADD, p, m, r, rm)[0]) == 0.0


def test_a_host_reward_function_gives_the_same_trajectory_as_the_jittable_one():
    """exact_match inside the program vs exact_match_text through jax.pure_callback: two fused GRPO
    iterations give the same metrics and parameters. The policy first learns the task a little (SFT on
    right answers) so that rewards are not all 0."""
    from jaxppo.optim import create_train_state, make_optimizer
    from jaxppo.sft import make_sft_step

    task = at.AdditionTaskConfig(digits=1, demo_error_prob=0.0)  # 1-digit sums: learnt in a few SFT steps
    state = create_train_state(init_params(ADD_MODEL, jax.random.key(0)), make_optimizer(learning_rate=1e-2))
    step = make_sft_step(ADD_MODEL)
    for i in range(60):
        p, m = at.sample_prompts(task, jax.random.key(100 + i), 64)
        r, rm = at.demonstrations(task, jax.random.key(200 + i), p, m)
        state, _ = step(state, {"prompt": p, "prompt_mask": m, "response": r, "response_mask": rm})
    ppo = PPOConfig(estimator="grpo", group_size=4, batch_size=32, minibatches=2, epochs=1,
                    max_new_tokens=task.max_response_tokens, stop_token_ids=(at.EOS,), pad_token_id=at.PAD,
                    learning_rate=1e-3, kl_coef=0.01, kl_in_reward=False)
    prompts = group_prompts(*at.sample_prompts(task, jax.random.key(7), 2 * 8), group_size=4)
    prompts = jax.tree.map(lambda x: x.reshape(2, 32, -1), prompts)
    keys = jax.random.split(jax.random.key(8), 2)
    out = {}
    for kind, fn in (("jit", RewardFunction(functools.partial(at.exact_match, task))),
                     ("host", RewardFunction(at.exact_match_text, host=True))):
        score_fn = make_score_fn({"exact_match": fn}, codec=CODEC)
        s, frozen = init_ppo(ADD_MODEL, ppo, ONE_DEVICE, sft_params=state.params, reward_params=None,
                             key=jax.random.key(1))
        iterate = make_iteration(ADD_MODEL, ppo, score_fn=score_fn, gold_fn=functools.partial(at.exact_match, task))
        s, samples, metrics = iterate(s, frozen, *prompts, keys, keys)
        out[kind] = (s.actor.params, metrics)
    assert 0 < float(out["jit"][1]["reward_exact_match"][0]) < 1  # some right, some wrong: a signal
    np.testing.assert_array_equal(out["jit"][1]["reward_exact_match"], out["host"][1]["reward_exact_match"])
    for name in ("score", "policy_loss", "kl_loss", "gold_reward"):
        np.testing.assert_allclose(out["jit"][1][name], out["host"][1][name], rtol=1e-6, atol=1e-7)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out["jit"][0], out["host"][0])


def test_weighted_reward_functions_sum_and_report_each_part():
    prompt, mask = at.sample_prompts(ADD, jax.random.key(0), 64)
    response, response_mask = at.demonstrations(ADD, jax.random.key(1), prompt, mask)
    fns = {"exact_match": RewardFunction(functools.partial(at.exact_match, ADD)),
           "format": RewardFunction(functools.partial(at.format_reward, ADD))}
    total, parts = jax.jit(make_score_fn(fns, (1.0, 0.25)))(prompt, mask, response, response_mask)
    np.testing.assert_allclose(total, parts["exact_match"] + 0.25 * parts["format"])
    assert set(parts) == {"exact_match", "format"} and float(parts["format"].mean()) == 1.0
    with pytest.raises(ValueError, match="host reward function needs"):
        make_score_fn({"text": RewardFunction(at.exact_match_text, host=True)})


# ----------------------------------------------------------------------------- the addition task

def test_addition_task_data():
    prompt, mask = at.sample_prompts(ADD, jax.random.key(0), 4096)
    a, b = at.operands(ADD, prompt, mask)
    train, held = at._split(ADD)
    assert not np.isin(np.asarray(a * 100 + b), held).any()  # training never draws a held-out problem
    eval_prompt, eval_mask = at.eval_problems(ADD, 10_000)
    ea, eb = at.operands(ADD, eval_prompt, eval_mask)
    assert sorted(np.asarray(ea * 100 + eb).tolist()) == sorted(held.tolist())
    assert len(held) == pytest.approx(1000, rel=0.1)
    # 37 + 48 = 085: the answer's digits least significant first, then EOS
    p, m = at.encode_prompts(ADD, jnp.array([37]), jnp.array([48]))
    assert at.answers(ADD, p, m).tolist() == [[at.DIGIT0 + 5, at.DIGIT0 + 8, at.DIGIT0 + 0, at.EOS]]
    response, response_mask = at.demonstrations(ADD, jax.random.key(1), prompt, mask)
    accuracy = float(at.exact_match(ADD, prompt, mask, response, response_mask).mean())
    assert accuracy == pytest.approx(1 - ADD.demo_error_prob, abs=0.03)  # every wrong demonstration is wrong
    assert float(at.format_reward(ADD, prompt, mask, response, response_mask).mean()) == 1.0


def test_the_overlong_penalty_is_added_to_the_scores():
    """DAPO's soft overlong punishment: the same samples, scores lower by overlong_penalty of their lengths."""
    from jaxppo.losses import overlong_penalty

    _, _, plain, _ = _rollout(GRPO, gold_score)
    _, _, punished, _ = _rollout(dataclasses.replace(GRPO, overlong_cache_tokens=3), gold_score)
    np.testing.assert_array_equal(plain.response, punished.response)
    lengths = np.asarray(plain.response_mask).sum(1)
    expected = overlong_penalty(jnp.asarray(lengths), max_length=GRPO.max_new_tokens, cache_length=3)
    np.testing.assert_allclose(np.asarray(punished.scores) - np.asarray(plain.scores), expected, atol=1e-6)
    assert (np.asarray(expected) < 0).any()  # some responses ran into the last 3 tokens
