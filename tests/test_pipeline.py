"""SFT, reward models and PPO on tiny models: behaviour of the update, critics, RMs, end to end."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxppo.advantages import explained_variance
from jaxppo.logging import RunLogger, read_metrics
from jaxppo.losses import policy_loss
from jaxppo.models.config import ModelConfig
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.pipeline_config import PipelineConfig, RewardModelConfig, SFTConfig
from jaxppo.ppo import make_update
from jaxppo.ppo_config import PPOConfig
from jaxppo.rollout import make_rollout
from jaxppo.sequences import response_logprobs, response_values
from jaxppo.toy_task import EOS, PAD, ToyTaskConfig, gold_reward, sample_prompts
from jaxppo.train import Pipeline, run_pipeline

TASK = ToyTaskConfig(num_topics=1, words_per_topic=4, context_words=1, max_response_tokens=6,
                     demo_min_words=1, demo_max_words=4, demo_liked_prob=0.4)
MODEL = ModelConfig(vocab_size=TASK.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                    num_kv_heads=1, head_dim=16, max_position_embeddings=32, tie_word_embeddings=True)
PPO = PPOConfig(batch_size=16, minibatches=2, epochs=2, max_new_tokens=TASK.max_response_tokens, stop_token_ids=(EOS,),
                pad_token_id=PAD, learning_rate=1e-3, kl_coef=0.05)


def gold_score(*args):
    return gold_reward(TASK, *args)


def setup(ppo: PPOConfig = PPO, seed: int = 0, actor_tx=None):
    """Actor/critic states, reference params and one trajectory scored by the gold reward."""
    key = jax.random.key(seed)
    base = init_params(MODEL, key)
    actor_params = jax.tree.map(jnp.copy, base)
    critic_state = None
    if ppo.critic == "shared":
        actor_params["value_head"] = init_scalar_head(MODEL, key, "value_head")
    else:
        critic_params = {**jax.tree.map(jnp.copy, base), "value_head": init_scalar_head(MODEL, key, "value_head")}
        critic_state = create_train_state(critic_params, make_optimizer(learning_rate=ppo.critic_learning_rate
                                                                        or ppo.learning_rate))
    actor = create_train_state(actor_params, actor_tx or make_optimizer(learning_rate=ppo.learning_rate))
    rollout = make_rollout(MODEL, ppo, score_fn=gold_score)
    prompts = sample_prompts(TASK, jax.random.key(seed + 1), ppo.batch_size)
    traj, metrics = rollout(actor.params, None if critic_state is None else critic_state.params, base, None,
                            *prompts, jax.random.key(seed + 2), ppo.kl_coef)
    return actor, critic_state, base, traj, rollout, make_update(MODEL, ppo)


def surrogate(params, traj, ppo=PPO):
    logprobs, _, _ = response_logprobs(MODEL, params, traj.prompt, traj.prompt_mask, traj.response,
                                       traj.response_mask, temperature=ppo.temperature)
    return float(policy_loss(logprobs, traj.old_logprobs, traj.advantages, traj.response_mask,
                             clip_eps=ppo.clip_eps)[0]), logprobs


def test_update_recomputes_old_logprobs_and_decreases_the_surrogate():
    actor, critic, _, traj, _, update = setup()
    before, old = surrogate(actor.params, traj)
    assert before == pytest.approx(0.0, abs=1e-6)  # ratio 1 and whitened advantages: the surrogate is 0
    np.testing.assert_allclose(old, traj.old_logprobs, atol=1e-5)
    actor, critic, metrics = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
    assert float(metrics["first_max_abs_log_ratio"]) <= 1e-5  # ratio = 1 on the first minibatch
    after, _ = surrogate(actor.params, traj)
    assert after < before - 1e-3


def test_sampler_logprobs_replace_the_actor_pass_up_to_rounding():
    """``ppo.sampler_logprobs``: one forward pass fewer in the compiled rollout, same tokens, old
    log-probs within float rounding of the forward pass, and everything downstream follows them."""
    actor, critic, ref, traj, rollout, _ = setup()
    _, _, _, fast, fast_rollout, _ = setup(dataclasses.replace(PPO, sampler_logprobs=True))
    args = (actor.params, critic.params, ref, None, traj.prompt, traj.prompt_mask, jax.random.key(0), 0.05)
    passes = [r.lower(*args).as_text().count("stablehlo.while") for r in (rollout, fast_rollout)]
    assert passes[1] == passes[0] - 2, passes  # the actor pass: its layer scan and its chunked log-softmax
    np.testing.assert_array_equal(np.asarray(fast.response), np.asarray(traj.response))
    mask = np.asarray(traj.response_mask) > 0
    gap = np.abs(np.asarray(fast.old_logprobs) - np.asarray(traj.old_logprobs))[mask]
    assert gap.max() < 1e-5, gap.max()
    assert np.all(np.asarray(fast.old_logprobs)[~mask] == 0)
    for name in ("ref_logprobs", "old_values", "scores"):
        np.testing.assert_array_equal(np.asarray(getattr(fast, name)), np.asarray(getattr(traj, name)), err_msg=name)
    np.testing.assert_allclose(np.asarray(fast.kl), np.asarray(traj.kl), atol=1e-5)
    np.testing.assert_allclose(np.asarray(fast.advantages), np.asarray(traj.advantages), atol=1e-4)


def test_micro_batched_scoring_gives_the_same_trajectory_in_less_memory():
    actor, critic, ref, traj, rollout, _ = setup()
    ppo = dataclasses.replace(PPO, score_micro_batches=4)
    _, _, _, micro, micro_rollout, _ = setup(ppo)
    for name in ("response", "response_mask", "old_logprobs", "ref_logprobs", "old_values", "scores", "advantages"):
        np.testing.assert_allclose(np.asarray(getattr(micro, name)), np.asarray(getattr(traj, name)), atol=1e-5,
                                   err_msg=name)
    args = (actor.params, critic.params, ref, None, traj.prompt, traj.prompt_mask, jax.random.key(0), 0.05)
    temp = [r.lower(*args).compile().memory_analysis().temp_size_in_bytes for r in (rollout, micro_rollout)]
    assert temp[1] < temp[0], temp
    with pytest.raises(ValueError, match="ppo.score_micro_batches"):
        dataclasses.replace(PPO, score_micro_batches=3)


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


def test_zero_advantages_leave_the_actor_unchanged():
    actor, critic, _, traj, _, update = setup()
    traj = traj.replace(advantages=jnp.zeros_like(traj.advantages))
    before = jax.tree.map(np.asarray, actor.params)
    actor, critic, _ = update(actor, critic, traj, jax.random.key(9), PPO.kl_coef, None)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.asarray, actor.params))


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
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    for i in range(3):
        prompts = sample_prompts(TASK, jax.random.key(100 + i), ppo.batch_size)
        traj, _ = rollout(actor.params, None, ref, None, *prompts, jax.random.key(i), 0.1)
        actor, critic, metrics = update(actor, critic, traj, jax.random.key(i), 0.1, ptx)
        if i == 0:
            compiles.clear()  # the first iteration compiles; later ones must not
    assert compiles == []
    assert {"kl_loss", "ptx_loss", "value_loss"} <= set(metrics)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_fused_iterations_equal_the_two_function_loop(critic):
    """make_iteration: three iterations folded into one XLA program (lax.scan) = rollout then update
    three times with the same keys, adaptive-KL controller included; traced once per K."""
    from jaxppo.kl_control import init_kl_control, update_kl_control
    from jaxppo.ppo import make_iteration

    ppo = dataclasses.replace(PPO, critic=critic, kl_target=0.5, kl_horizon=100.0)
    actor, critic_state, ref, _, rollout, update = setup(ppo)
    fused = make_iteration(MODEL, ppo, score_fn=gold_score)
    prompts = [sample_prompts(TASK, jax.random.key(10 + i), ppo.batch_size) for i in range(3)]
    sample_keys = jnp.stack([jax.random.key(20 + i) for i in range(3)])
    update_keys = jnp.stack([jax.random.key(30 + i) for i in range(3)])
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # noqa: E731  (both paths donate their states)
    a, c, kl = copy(actor), copy(critic_state), init_kl_control(kl_coef=ppo.kl_coef)
    loop_metrics = []
    for i in range(3):
        traj, m = rollout(a.params, None if c is None else c.params, ref, None, *prompts[i], sample_keys[i],
                          kl.kl_coef)
        a, c, um = update(a, c, traj, update_keys[i], kl.kl_coef, None)
        kl = update_kl_control(kl, m["kl"], n_steps=ppo.batch_size, target=ppo.kl_target, horizon=ppo.kl_horizon)
        loop_metrics.append({**m, **um})
    stacked = [jnp.stack(x) for x in zip(*prompts)]
    fa, fc, fkl, samples, metrics = fused(copy(actor), copy(critic_state), ref, None,
                                          init_kl_control(kl_coef=ppo.kl_coef), *stacked, sample_keys, update_keys)
    np.testing.assert_array_equal(np.asarray(samples["response"][2]), np.asarray(traj.response))
    close = functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6)
    jax.tree.map(lambda x, y: close(np.asarray(x), np.asarray(y)), fa.params, a.params)
    if c is not None:
        jax.tree.map(lambda x, y: close(np.asarray(x), np.asarray(y)), fc.params, c.params)
    close(float(fkl.kl_coef), float(kl.kl_coef))
    assert float(kl.kl_coef) != ppo.kl_coef  # the controller moved
    for i in range(3):
        for name in ("policy_loss", "kl", "score", "value_loss", "approx_kl"):
            close(float(metrics[name][i]), float(loop_metrics[i][name]), atol=1e-5)
    # a second call with the same K compiles nothing
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, *_a, **_k: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    fused(fa, fc, ref, None, fkl, *stacked, sample_keys, update_keys)
    assert compiles == []


def test_bfloat16_frozen_roles_halve_their_memory_and_stay_close():
    from jaxppo.models.config import cast_params

    actor, _, ref, _, _, _ = setup()
    reward = {**ref, "reward_head": init_scalar_head(MODEL, jax.random.key(5), "reward_head")}
    prompts = sample_prompts(TASK, jax.random.key(7), PPO.batch_size)
    ppo = dataclasses.replace(PPO, critic="shared")
    actor_params = {**actor.params, "value_head": init_scalar_head(MODEL, jax.random.key(6), "value_head")}
    runs = {}
    for dtype in (None, "bfloat16"):
        frozen = cast_params((ref, reward), dtype)
        rollout = make_rollout(MODEL, dataclasses.replace(ppo, frozen_dtype=dtype))
        runs[dtype], _ = rollout(actor_params, None, *frozen, *prompts, jax.random.key(8), 0.05)
        if dtype:
            nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
            assert nbytes(frozen) == nbytes((ref, reward)) // 2
    fp32, bf16 = runs[None], runs["bfloat16"]
    np.testing.assert_array_equal(np.asarray(bf16.response), np.asarray(fp32.response))  # the actor is fp32
    np.testing.assert_array_equal(np.asarray(bf16.old_logprobs), np.asarray(fp32.old_logprobs))
    mask = np.asarray(fp32.response_mask) > 0
    gap = np.abs(np.asarray(bf16.ref_logprobs) - np.asarray(fp32.ref_logprobs))[mask]
    assert 0 < gap.max() < 0.1, gap.max()  # bfloat16 rounding: visible, small
    np.testing.assert_allclose(np.asarray(bf16.scores), np.asarray(fp32.scores), atol=0.05)


def test_reward_model_check_fails_on_mismatched_config():
    with pytest.raises(ValueError, match="ppo.minibatches"):
        PPOConfig(batch_size=10, minibatches=4)
    with pytest.raises(ValueError, match="model.vocab_size"):
        PipelineConfig(model=dataclasses.replace(MODEL, vocab_size=99), task=TASK,
                       ppo=dataclasses.replace(PPO, max_new_tokens=TASK.max_response_tokens))


def tiny_config(**rm) -> PipelineConfig:
    rm = {"num_prompts": 1024, "steps": 300, "learning_rate": 3e-3, **rm}
    return PipelineConfig(
        model=MODEL, task=TASK, sft=SFTConfig(steps=150, batch_size=32, learning_rate=3e-3, warmup_steps=10),
        reward_model=RewardModelConfig(batch_size=32, **rm),
        ppo=dataclasses.replace(PPO, iterations=4), seed=1)


@pytest.mark.parametrize("objective", ["bradley_terry", "plackett_luce"])
def test_reward_models_reach_90_percent_pairwise_accuracy(tmp_path, objective):
    config = tiny_config(objective=objective, list_size=3, num_prompts=4096, steps=600, learning_rate=1e-3)
    config = dataclasses.replace(config, task=dataclasses.replace(TASK, preference_beta=20.0))  # near-noiseless labels
    with RunLogger(tmp_path, echo=None) as logger:
        pipe = Pipeline(config, logger)
        result = pipe.reward_model(pipe.sft()).result
    # pairwise accuracy on the held-out preferences that the (near-noiseless) labels strictly order
    assert result["gold_accuracy"] > 0.9, result


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_linear_probe_reward_model_on_cached_features(tmp_path, pooling):
    """train_trunk=False: the head trains on standardised features computed once, folded back into a
    head that scores raw features: the trunk is bit-for-bit the SFT trunk and the held-out pairs
    (scored by full forward passes) are ranked well — a wrong fold would rank them at chance."""
    config = tiny_config(num_prompts=2048, steps=300, learning_rate=1e-3, train_trunk=False, pooling=pooling)
    config = dataclasses.replace(config, task=dataclasses.replace(TASK, preference_beta=20.0))
    with RunLogger(tmp_path, echo=None) as logger:
        pipe = Pipeline(config, logger)
        sft = pipe.sft()
        reward = pipe.reward_model(sft)
    for name in ("embed", "layers", "final_norm"):
        jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, reward.state.params[name]),
                     jax.tree.map(np.asarray, sft[name]))
    assert int(reward.state.step) == 300
    # measured 0.91-0.92 held-out label accuracy for both poolings (a linear probe of the SFT trunk)
    assert reward.result["gold_accuracy"] > 0.85 and reward.result["eval_accuracy"] > 0.85, reward.result


def test_online_refresh_labels_policy_samples_and_retrains_the_reward_model(tmp_path):
    config = tiny_config(num_prompts=512, steps=50, online_every=2, online_prompts=128, online_steps=10)
    config = dataclasses.replace(config, ppo=dataclasses.replace(config.ppo, iterations=5))
    with RunLogger(tmp_path, echo=None) as logger:
        pipe = Pipeline(config, logger)
        sft = pipe.sft()
        reward = pipe.reward_model(sft)
        first = jax.tree.map(np.asarray, reward.params)
        n_first = reward.train["prompt"].shape[0]
        _, final = pipe.ppo(sft, reward)
    online = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "reward_model_online"]
    assert [r["step"] for r in online] == [2, 4]  # before the rollouts of iterations 2 and 4
    assert all({"pre_accuracy", "pre_gold_accuracy", "pre_loss", "loss"} <= set(r) for r in online)
    # every refresh adds its usable (untied) pairs to the data the reward model trains on
    assert online[0]["num_train"] == n_first + online[0]["new_pairs"]
    assert online[1]["num_train"] == online[0]["num_train"] + online[1]["new_pairs"]
    assert final.train["prompt"].shape[0] == online[1]["num_train"]
    assert 0 < online[0]["new_pairs"] <= 128
    # the reward model moved, and is re-normalised on the same SFT samples: mean 0, std 1
    assert not np.allclose(first["layers"]["attn"]["q_proj"]["kernel"],
                           np.asarray(final.params["layers"]["attn"]["q_proj"]["kernel"]))
    scores = np.asarray(pipe.score(final.params, *pipe._norm_samples))
    np.testing.assert_allclose([scores.mean(), scores.std()], [0.0, 1.0], atol=1e-4)
    assert pipe._reward_step._cache_size() == 1  # the stage and both refreshes share one trace


def test_end_to_end_sft_rm_ppo(tmp_path):
    summary = run_pipeline(tiny_config(), tmp_path)
    assert set(summary) >= {"sft_gold_reward", "final_gold_reward", "optimal_gold_reward", "wall_seconds"}
    assert summary["optimal_gold_reward"] == 4.0
    assert json.loads((tmp_path / "summary.json").read_text())["final_gold_reward"] == summary["final_gold_reward"]
    ppo_rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "ppo"]
    assert [r["iteration"] for r in ppo_rows] == [0, 1, 2, 3]
    assert all({"gold_reward", "proxy_reward", "kl"} <= set(r) for r in ppo_rows)
    for png in ("ppo.png", "sft.png", "reward_model.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert any((tmp_path / "tensorboard").iterdir())
    # the final actor is exported as a Hugging Face directory that transformers loads, with equal logits
    import torch
    from transformers import AutoModelForCausalLM

    from jaxppo.models.heads import causal_lm_logits
    from jaxppo.weights.hf import load_pretrained

    config, params, _ = load_pretrained(tmp_path / "actor_hf")
    tokens = np.asarray(sample_prompts(TASK, jax.random.key(5), 4)[0])
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "actor_hf", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(input_ids=torch.tensor(tokens)).logits.numpy()
    got = np.asarray(causal_lm_logits(config, params, jnp.asarray(tokens), jnp.ones_like(jnp.asarray(tokens))))
    np.testing.assert_allclose(got, expected, atol=1e-4)


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
    assert not np.allclose(np.asarray(state.params["layers"]["mlp"]["up_proj"]["kernel"]),
                           before["layers"]["mlp"]["up_proj"]["kernel"])


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


def demonstrations_of(prompts, mask, seed):
    from jaxppo.toy_task import demonstrations

    return demonstrations(TASK, jax.random.key(seed), prompts, mask)


def test_pipeline_rollout_stops_at_the_task_eos_when_ppo_names_no_stop_token(tmp_path):
    config = tiny_config(num_prompts=256, steps=10)
    config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, steps=20),
                                 ppo=dataclasses.replace(config.ppo, iterations=1, stop_token_ids=(), pad_token_id=0))
    with RunLogger(tmp_path, echo=None) as logger:
        pipe = Pipeline(config, logger)
        sft = pipe.sft()
        pipe.ppo(sft, pipe.reward_model(sft))
    row = [r for r in read_metrics(tmp_path / "metrics.jsonl") if r["stage"] == "ppo"][0]
    assert row["stopped_fraction"] > 0.5 and row["response_length"] < TASK.max_response_tokens


def test_fused_folded_and_two_function_pipelines_log_the_same_ppo_run(tmp_path):
    """ppo.fused (one program per iteration), iterations_per_call=3 (folded between checkpoints,
    every 2 iterations here: calls of 2) and the two-function form give the same PPO metrics."""
    config = tiny_config(num_prompts=256, steps=10)
    config = dataclasses.replace(config, sft=dataclasses.replace(config.sft, steps=20),
                                 checkpoint=dataclasses.replace(config.checkpoint, every_iterations=2))
    runs = {}
    for name, fused, per_call in (("split", False, 1), ("fused", True, 1), ("folded", True, 3)):
        ppo = dataclasses.replace(config.ppo, iterations=4, fused=fused, iterations_per_call=per_call)
        with RunLogger(tmp_path / name, echo=None) as logger:
            pipe = Pipeline(dataclasses.replace(config, ppo=ppo), logger)
            sft = pipe.sft()
            pipe.ppo(sft, pipe.reward_model(sft))
            assert pipe._iterations_in_call(0) == (2 if per_call == 3 else 1)
        runs[name] = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["stage"] == "ppo"]
    for name in ("fused", "folded"):
        assert [r["iteration"] for r in runs[name]] == [0, 1, 2, 3]
        for a, b in zip(runs["split"], runs[name]):
            assert a["gold_reward"] == b["gold_reward"]  # the same samples
            for key in ("policy_loss", "value_loss", "kl", "score", "approx_kl"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=f"{name} {key}")


def test_configs_that_cannot_fit_fail_before_any_compute():
    with pytest.raises(ValueError, match="ppo.minibatches"):
        PPOConfig(batch_size=64, minibatches=3)
    with pytest.raises(ValueError, match="ppo.micro_batches"):
        PPOConfig(batch_size=64, minibatches=4, micro_batches=3)
    with pytest.raises(ValueError, match="sft.micro_batches"):
        SFTConfig(batch_size=10, micro_batches=4)
    long_task = dataclasses.replace(TASK, max_response_tokens=40, demo_max_words=4)
    with pytest.raises(ValueError, match=r"task.max_response_tokens.*exceed the model's context of 32"):
        PipelineConfig(model=MODEL, task=long_task, ppo=dataclasses.replace(PPO, max_new_tokens=40))
    with pytest.raises(ValueError, match="sft.steps"):
        PipelineConfig(model=MODEL, task=TASK, ppo=PPO, sft=SFTConfig(steps=0))


def test_mean_pooled_score_is_the_mean_of_last_token_scores_of_the_response_prefixes():
    """A causal model's head at response token t is the last-token score of the response cut after t."""
    from jaxppo.sequences import response_scores

    params = {**{k: v for k, v in init_params(MODEL, jax.random.key(0)).items() if k != "lm_head"},
              "reward_head": init_scalar_head(MODEL, jax.random.key(1), "reward_head")}
    prompts, mask = sample_prompts(TASK, jax.random.key(2), 4)
    response, response_mask = demonstrations_of(prompts, mask, seed=3)
    response_mask = response_mask.at[0].set(0)  # an empty response scores the head's bias
    pooled = np.asarray(response_scores(MODEL, params, prompts, mask, response, response_mask, pooling="mean"))
    n = response.shape[1]
    for b in range(4):
        length = int(response_mask[b].sum())
        if length == 0:
            np.testing.assert_allclose(pooled[b], float(params["reward_head"]["bias"][0]), rtol=1e-6)
            continue
        prefix_scores = []
        for t in range(length):
            prefix_mask = (jnp.arange(n) <= t).astype(jnp.int32)[None]
            prefix_scores.append(float(response_scores(MODEL, params, prompts[b:b + 1], mask[b:b + 1],
                                                       response[b:b + 1], prefix_mask)[0]))
        np.testing.assert_allclose(pooled[b], np.mean(prefix_scores), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        response_scores(MODEL, params, prompts, mask, response, response_mask, pooling="max")
