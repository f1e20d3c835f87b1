"""LoRA for every trained role on one frozen base (jaxppo.lora.compose): the PPO roles, the reward-model
stage and a whole run — what each role holds, that the reference is the base, that only adapters and
heads train, micro-batching, the exports ``peft`` reads, and an interrupted run resumed bit for bit."""

from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.lora import compose, init_adapters, merge, scaling
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.ppo import init_ppo, make_iteration, make_update
from jaxppo.rollout import make_rollout
from jaxppo.sequences import response_logprobs
from jaxppo.toy_task import sample_prompts
from tiny import MODEL, ONE_DEVICE, PPO, TASK, gold_score

LORA_MODEL = dataclasses.replace(MODEL, lora_scale=scaling(rank=4, alpha=8.0))
RANK = 4


def nbytes(tree) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(tree))


def host(tree):
    return jax.tree.map(np.asarray, tree)


@pytest.fixture(scope="module")
def roles():
    """SFT params, and a reward model as LoRA adapters + head on them (as the reward stage makes it)."""
    sft = init_params(MODEL, jax.random.key(0))
    rm_lora = jax.tree.map(lambda x: x + 0.05, init_adapters(LORA_MODEL, jax.random.key(1), rank=RANK))
    reward = {**sft, "lora": rm_lora, "reward_head": init_scalar_head(MODEL, jax.random.key(2), "reward_head")}
    return sft, reward


def lora_ppo(ppo, roles):
    sft, reward = roles
    return init_ppo(LORA_MODEL, ppo, ONE_DEVICE, sft_params=sft, reward_params=reward, key=jax.random.key(3),
                    lora_rank=RANK)


def test_each_role_holds_only_its_adapters_and_head_over_one_base(roles):
    """The actor is adapters; a critic from the reward model is a copy of its adapters and head (own
    buffers: the critic is donated); the reward role is its adapters and head; the reference is the base
    itself; the base is the SFT params once; Adam moments exist for adapters and heads only."""
    sft, reward = roles
    ppo = dataclasses.replace(PPO, critic_init="reward_model")
    state, frozen = lora_ppo(ppo, roles)
    assert set(state.actor.params) == {"lora"} and set(state.critic.params) == {"lora", "value_head"}
    assert set(frozen.reward) == {"lora", "reward_head"} and frozen.reference == {}
    jax.tree.map(np.testing.assert_array_equal, host(frozen.base), host({k: v for k, v in sft.items()}))
    jax.tree.map(np.testing.assert_array_equal, host(state.critic.params["lora"]), host(reward["lora"]))
    jax.tree.map(np.testing.assert_array_equal, host(state.critic.params["value_head"]), host(reward["reward_head"]))
    critic_buffers = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(state.critic.params)}
    assert not critic_buffers & {x.unsafe_buffer_pointer() for x in jax.tree.leaves(frozen.reward)}
    for train_state in (state.actor, state.critic):  # AdamW: two moments per trained value, nothing for the base
        moments = nbytes(train_state.opt_state) - 8 * 16  # less a few scalar counters
        assert 2 * nbytes(train_state.params) <= moments + 8 * 16 < 2 * nbytes(train_state.params) + 1024
    assert nbytes(frozen.base) == nbytes(sft)


def test_the_reference_is_the_base_and_a_lora_iteration_trains_only_adapters(roles):
    """Two fused PPO iterations with LoRA roles: the reference ("base without adapters") gives the
    log-probs of a separately loaded base bit for bit; the first rollout's KL is exactly 0 (B = 0: the
    actor is the base); the base and the reward role come back untouched; the actor's adapters and the
    critic move; the fused program and the host loop agree; and the trained actor equals its merge."""
    ppo = dataclasses.replace(PPO, critic_init="sft", iterations_per_call=2)
    state, frozen = lora_ppo(ppo, roles)
    separately_loaded = init_params(MODEL, jax.random.key(0))
    prompts = sample_prompts(TASK, jax.random.key(5), ppo.batch_size)
    args = (prompts[0], prompts[1], jnp.full((ppo.batch_size, 3), 7, jnp.int32), jnp.ones((ppo.batch_size, 3), jnp.int32))
    ref = response_logprobs(LORA_MODEL, compose(frozen.base, frozen.reference), *args)[0]
    np.testing.assert_array_equal(np.asarray(ref), np.asarray(response_logprobs(MODEL, separately_loaded, *args)[0]))

    base_before, reward_before = host(frozen.base), host(frozen.reward)
    actor_before = host(state.actor.params)
    xs = (jnp.stack([prompts[0]] * 2), jnp.stack([prompts[1]] * 2), jax.random.split(jax.random.key(6), 2),
          jax.random.split(jax.random.key(7), 2))
    results = {}
    for fused in (True, False):
        state_k, frozen_k = lora_ppo(ppo, roles)
        iterate = make_iteration(LORA_MODEL, ppo, score_fn=gold_score, fused=fused)
        results[fused] = (*iterate(state_k, frozen_k, *xs), frozen_k)
    new_state, _, metrics, frozen = results[True]
    assert float(metrics["kl"][0]) == 0.0 and float(metrics["kl"][1]) != 0.0  # the sampled k1 estimate
    assert float(metrics["first_max_abs_log_ratio"][0]) < 1e-5
    jax.tree.map(np.testing.assert_array_equal, host(frozen.base), base_before)
    jax.tree.map(np.testing.assert_array_equal, host(frozen.reward), reward_before)
    moved = jax.tree.map(lambda a, b: float(np.max(np.abs(np.asarray(a) - b))), new_state.actor.params, actor_before)
    assert min(jax.tree.leaves(moved)) > 0  # every A and B trained
    unfused = results[False][0]
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6), host(jax.tree.leaves(new_state)),
                 host(jax.tree.leaves(unfused)))
    actor = compose(frozen.base, new_state.actor.params)
    merged = merge(LORA_MODEL, actor)
    np.testing.assert_allclose(np.asarray(response_logprobs(LORA_MODEL, actor, *args)[0]),
                               np.asarray(response_logprobs(LORA_MODEL, merged, *args)[0]), atol=1e-5)


@pytest.mark.parametrize("critic", ["separate", "shared"])
def test_lora_update_is_the_same_over_micro_batches_of_unequal_lengths(roles, critic):
    """The LoRA update (adapters and heads on the base) with 1 and 4 micro-batches per minibatch:
    the same adapters, heads and moments (responses of unequal lengths; every term divides by the
    whole minibatch's counts)."""
    ppo = dataclasses.replace(PPO, critic=critic, critic_init="sft")
    state, frozen = lora_ppo(ppo, roles)
    prompts = sample_prompts(TASK, jax.random.key(8), ppo.batch_size)
    rollout = make_rollout(LORA_MODEL, ppo, score_fn=gold_score)
    critic_params = None if state.critic is None else compose(frozen.base, state.critic.params)
    traj, _ = rollout(compose(frozen.base, state.actor.params), critic_params, compose(frozen.base, frozen.reference), None,
                      *prompts, jax.random.key(9), ppo.kl_coef)
    lengths = np.asarray(jnp.sum(traj.response_mask, axis=1))
    assert len(set(lengths.tolist())) > 1, lengths
    out = {}
    for micro in (1, 4):
        s, _ = lora_ppo(ppo, roles)
        update = make_update(LORA_MODEL, dataclasses.replace(ppo, micro_batches=micro))
        new_actor, new_critic, _ = update(s.actor, s.critic, traj, jax.random.key(10), ppo.kl_coef, None, frozen.base)
        out[micro] = host(jax.tree.leaves((new_actor, new_critic)))
    for micro in (4,):
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=2e-6), out[micro], out[1])


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_lora_update_on_a_quantized_base_is_the_update_on_its_dequantized_base(roles, kind):
    """QLoRA: the roles on a base stored as codes (dequantised layer by layer inside the model) take the
    same PPO update as on the float base those codes stand for (≤ 1e-5): the stored base only changes
    memory, and it comes back untouched."""
    from jaxppo.quant import dequantize_params, quantize_params

    sft, reward = roles
    quantized = quantize_params(LORA_MODEL, sft, kind=kind, block=16)
    ppo = dataclasses.replace(PPO, critic_init="reward_model")
    prompts = sample_prompts(TASK, jax.random.key(11), ppo.batch_size)
    out = {}
    for name, base in (("quantized", quantized), ("float", dequantize_params(LORA_MODEL, quantized))):
        state, frozen = init_ppo(LORA_MODEL, ppo, ONE_DEVICE, sft_params=base, reward_params={**base, **reward},
                                 key=jax.random.key(3), lora_rank=RANK)
        if name == "quantized":  # one trajectory, sampled on the quantised base, for both updates
            rollout = make_rollout(LORA_MODEL, ppo, score_fn=gold_score)
            traj, _ = rollout(compose(frozen.base, state.actor.params), compose(frozen.base, state.critic.params),
                              compose(frozen.base, frozen.reference), None, *prompts, jax.random.key(12), ppo.kl_coef)
            before = host(frozen.base)
        actor, critic, _ = make_update(LORA_MODEL, ppo)(state.actor, state.critic, traj, jax.random.key(13),
                                                        ppo.kl_coef, None, frozen.base)
        out[name] = host(jax.tree.leaves((actor.params, critic.params)))
        if name == "quantized":
            jax.tree.map(np.testing.assert_array_equal, host(frozen.base), before)
    jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5), out["quantized"], out["float"])


def test_lora_needs_its_scale_and_a_full_precision_base():
    from jaxppo.config import ConfigError

    sft = init_params(MODEL, jax.random.key(0))
    with pytest.raises(ConfigError, match="model.lora_scale"):
        init_ppo(MODEL, PPO, ONE_DEVICE, sft_params=sft, reward_params=None, key=jax.random.key(0), lora_rank=4)
    with pytest.raises(ConfigError, match="ppo.frozen_dtype"):
        init_ppo(LORA_MODEL, dataclasses.replace(PPO, frozen_dtype="bfloat16"), ONE_DEVICE, sft_params=sft,
                 reward_params=None, key=jax.random.key(0), lora_rank=4)


def lora_run_config(**checkpoint):
    """A short SFT → reward model → PPO run of the tiny task with LoRA (rank 4, dropout 0.1 in the SFT and
    reward-model steps) on every role: the critic starts from the reward model's adapters and head, and the
    reward model is refreshed online before PPO iteration 2."""
    from jaxppo.pipeline_config import CheckpointConfig, LoraConfig
    from tiny import tiny_config

    config = tiny_config(num_prompts=256, steps=40, learning_rate=3e-2, online_every=2, online_prompts=64,
                         online_steps=5)
    return dataclasses.replace(
        config, lora=LoraConfig(rank=RANK, alpha=8.0, dropout=0.1), sft=dataclasses.replace(config.sft, steps=30, learning_rate=3e-2),
        ppo=dataclasses.replace(config.ppo, critic_init="reward_model", learning_rate=1e-2),
        checkpoint=CheckpointConfig(enabled=bool(checkpoint), **checkpoint), num_samples=0, eval_batch_size=64)


def test_a_lora_run_exports_for_peft_and_resumes_bit_for_bit_on_its_base(tmp_path, monkeypatch):
    """``experiments.run``'s pipeline with LoRA on every role.

    * The run writes ``actor_hf/`` (merged), ``actor_adapter/`` (PEFT) and ``base_hf/`` (the SFT
      policy): ``peft`` puts the adapter on ``base_hf`` and gets ``actor_hf``'s logits (≤ 1e-4), and
      the adapter changed the model. The reward model's adapters and head learned (its loss fell).
    * The reward model is refreshed online on the same base (new pairs of the actor's samples).
    * Checkpoints hold adapters and heads only, with the base's digest: a run stopped in PPO after
      iteration 3 (checkpoints every 2) and re-run resumes at iteration 2, refreshes the reward model
      again, and ends with the uninterrupted run's metrics (SFT and reward model with LoRA dropout, the
      refresh's) and adapter bit for bit; a checkpoint whose recorded base differs
      from the one the run rebuilt stops the resume with an error naming both digests.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import jaxppo.pipeline.ppo as ppo_module
    from experiments.run import run_pipeline
    from jaxppo.checkpoint import _tree_metadata
    from jaxppo.errors import InputError
    from jaxppo.logging import read_metrics
    from safetensors.numpy import load_file

    config = lora_run_config(every_steps=20, every_iterations=2)
    summary = run_pipeline(config, tmp_path / "straight")
    run_dir = tmp_path / "straight"
    assert summary["actor_adapter"] == str(run_dir / "actor_adapter") and summary["base_hf"] == str(run_dir / "base_hf")
    tokens = np.random.default_rng(0).integers(0, MODEL.vocab_size, (2, 9))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(run_dir / "actor_hf", dtype=torch.float32).eval()
        expected = merged(input_ids=torch.tensor(tokens)).logits.numpy()
        base = AutoModelForCausalLM.from_pretrained(run_dir / "base_hf", dtype=torch.float32)
        model = PeftModel.from_pretrained(base, run_dir / "actor_adapter").eval()
        got = model(input_ids=torch.tensor(tokens)).logits.numpy()
        with model.disable_adapter():
            plain = model(input_ids=torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert np.abs(plain - expected).max() > 1e-3
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "reward_model"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05, rows
    assert set(saved_params(run_dir / "checkpoints" / "reward_model" / "40" / "state")) == {"lora", "reward_head"}
    [online] = [r for r in read_metrics(run_dir / "metrics.jsonl") if r["stage"] == "reward_model_online"]
    assert online["step"] == 2 and 0 < online["new_pairs"] <= 64 and online["num_train"] > online["new_pairs"]

    class Stop(Exception):
        pass

    original = ppo_module.iteration_prompts
    calls = {"n": 0}

    def stop_at_iteration_3(ctx, it):
        calls["n"] += 1
        if it == 3:
            raise Stop
        return original(ctx, it)

    monkeypatch.setattr(ppo_module, "iteration_prompts", stop_at_iteration_3)
    with pytest.raises(Stop):
        run_pipeline(config, tmp_path / "interrupted")
    ppo_dir = tmp_path / "interrupted" / "checkpoints" / "ppo"
    assert set(saved_params(ppo_dir / "2" / "actor")) == {"lora"}
    assert set(saved_params(ppo_dir / "2" / "critic")) == {"lora", "value_head"}
    # the online reward model checkpoints its adapters and head (trained and normalised), not the base
    assert set(saved_params(ppo_dir / "2" / "rm_state")) == {"lora", "reward_head"}
    assert set(_tree_metadata(ppo_dir / "2" / "rm_params").tree) == {"lora", "reward_head"}
    monkeypatch.setattr(ppo_module, "iteration_prompts", original)
    run_pipeline(config, tmp_path / "interrupted")
    assert read_metrics(tmp_path / "interrupted" / "metrics.jsonl") == read_metrics(tmp_path / "straight" / "metrics.jsonl")
    a, b = (load_file(tmp_path / run / "actor_adapter" / "adapter_model.safetensors") for run in ("straight", "interrupted"))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

    # the newest PPO checkpoint says it was trained on another base: the re-run stops before any compute
    meta_file = meta_file_of(ppo_dir / "4")
    meta = json.loads(meta_file.read_text())
    assert meta["base"]["digest"] == json.loads(meta_file_of(tmp_path / "straight/checkpoints/ppo/4").read_text())["base"]["digest"]
    meta["base"]["digest"] = "0" * 64
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(InputError, match="trained on a base with digest 0000000000000000"):
        run_pipeline(config, tmp_path / "interrupted")


def saved_params(item):
    """The params tree a checkpointed train state holds (its metadata: no array is read)."""
    from jaxppo.checkpoint import _tree_metadata

    return _tree_metadata(item).tree["params"]


def meta_file_of(checkpoint):
    """The JSON file of a checkpoint's ``meta`` item (orbax's JSON handler writes one file in its directory)."""
    from jaxppo.checkpoint import META

    [path] = [p for p in (checkpoint / META).iterdir() if p.is_file() and '"digest"' in p.read_text()]
    return path


def test_lora_config_errors_name_the_field():
    """What LoRA cannot combine with is refused when the config is built, naming the field."""
    from jaxppo.config import ConfigError
    from jaxppo.pipeline_config import LoraConfig
    from tiny import tiny_config

    config = tiny_config()
    lora = LoraConfig(rank=4)
    cases = {
        "reward_model.init": dict(reward_model=dataclasses.replace(config.reward_model, init="scratch")),
        "ppo.frozen_dtype": dict(ppo=dataclasses.replace(config.ppo, frozen_dtype="bfloat16")),
    }
    for field, change in cases.items():
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            dataclasses.replace(config, lora=lora, **change)
    for bad, field in ((dict(quantize_base="fp8"), "lora.quantize_base"), (dict(rank=0, quantize_base="nf4"),
                                                                         "lora.quantize_base"),
                       (dict(dropout=1.0), "lora.dropout"), (dict(rank=0, dropout=0.1), "lora.dropout")):
        with pytest.raises(ConfigError, match=field):
            LoraConfig(**{"rank": 4, **bad})
    resolved = dataclasses.replace(config, lora=LoraConfig(rank=4, alpha=8.0)).resolved(stop_token_ids=(1,),
                                                                                      pad_token_id=0)
    assert resolved.model.lora_dropout == 0.0
    assert resolved.model.lora_scale == 2.0 and config.resolved(stop_token_ids=(1,), pad_token_id=0).model.lora_scale is None
