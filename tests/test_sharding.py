"""Sharded train states on a device mesh: the one rules table, layouts agree with one device,
FSDP memory, checkpoints across meshes and the sampler's KV cache.

Runs on the 8 CPU devices that ``conftest.py`` asks XLA for (the subprocess runs, two processes on
localhost and the command line on a mesh, are in tests/e2e/test_multi_device.py).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxppo.checkpoint import StageCheckpoints
from jaxppo.models.heads import init_params, init_scalar_head
from jaxppo.optim import create_train_state, make_optimizer
from jaxppo.ppo import init_ppo, make_update
from jaxppo.rollout import make_rollout
from jaxppo.sharding import (
    MeshConfig, batch_spec, init_sharded, make_mesh, param_bytes_per_device, shard_batch, shard_tree, spec_for,
    tree_shardings,
)
from jaxppo.toy_task import EOS, PAD, gold_reward, sample_prompts

from distributed_worker import MODEL, PPO, TASK  # the two-process worker runs the same tiny setup

LAYOUTS = {
    "data": MeshConfig(data=8, fsdp=1, tensor=1),
    "fsdp": MeshConfig(data=1, fsdp=8, tensor=1),
    "fsdp_x_tensor": MeshConfig(data=1, fsdp=4, tensor=2),
    "data_x_tensor": MeshConfig(data=4, fsdp=1, tensor=2),
}


def test_eight_devices():
    assert len(jax.devices()) == 8, "conftest.py must give the suite 8 CPU devices"


def test_mesh_config_resolves_and_rejects():
    assert MeshConfig(data=-1, fsdp=2, tensor=1).shape(8) == (4, 2, 1)
    assert MeshConfig(data=2, fsdp=2, tensor=2).shape(8) == (2, 2, 2)
    with pytest.raises(ValueError, match=r"config field `mesh\.data`: axis sizes .* multiply to 4, but there are 8"):
        make_mesh(MeshConfig(data=2, fsdp=2, tensor=1))
    with pytest.raises(ValueError, match="mesh.fsdp"):
        MeshConfig(fsdp=0)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        MeshConfig(data=-1, fsdp=-1)


def test_one_rules_table_for_params_and_optimizer_states():
    mesh = make_mesh(LAYOUTS["fsdp_x_tensor"])
    params = {**init_params(MODEL, jax.random.key(0)), "value_head": init_scalar_head(MODEL, jax.random.key(1), "value_head")}
    state = init_sharded(lambda p: create_train_state(p, make_optimizer(learning_rate=1e-3)), mesh, params)
    q = state.params["layers"]["attn"]["qkv_proj"]["kernel"]  # [L, D, H_kv, G + 2, Dh]: KV heads over tensor
    assert q.sharding.spec == P(None, "fsdp", "tensor")  # (trailing unsplit dimensions are left out)
    gate_up = state.params["layers"]["mlp"]["gate_up_proj"]["kernel"]  # [L, D, 2, F]: F over tensor
    assert gate_up.sharding.spec == P(None, "fsdp", None, "tensor")
    assert state.params["layers"]["attn"]["o_proj"]["kernel"].sharding.spec == P(None, "tensor", "fsdp")
    assert state.params["embed"]["embedding"].sharding.spec == P("tensor", "fsdp")
    assert state.params["layers"]["input_norm"]["scale"].sharding.spec == P()
    # optimizer moments take the layout of their parameter from the same table
    mu = jax.tree.leaves(state.opt_state, is_leaf=lambda x: hasattr(x, "mu"))
    adam = [s for s in mu if hasattr(s, "mu")][0]
    assert adam.mu["layers"]["attn"]["qkv_proj"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    # a dimension the axis does not divide stays whole: vocab 22 over tensor=4
    assert spec_for("embed/embedding", (22, 32), make_mesh(MeshConfig(data=1, fsdp=2, tensor=4))) == P(None, "fsdp")


def assert_sharded_forward_is_the_one_device_forward(config, params, mesh):
    from jaxppo.models import decoder_hidden

    tokens = jax.random.randint(jax.random.key(2), (4, 6), 0, config.vocab_size)
    mask = np.ones((4, 6), np.int32)
    forward = jax.jit(lambda p, t, m: decoder_hidden(config, p, t, m)[0])
    one = forward(params, tokens, mask)
    with jax.set_mesh(mesh):
        sharded = forward(shard_tree(params, mesh), tokens, mask)
    np.testing.assert_allclose(sharded, one, atol=1e-5)


def test_lora_adapters_are_laid_out_like_their_kernels_and_give_the_one_device_forward():
    """A follows its kernel's input split, B its output split (the rank is never split); the adapted
    forward pass sharded over fsdp × tensor equals the one-device one."""
    from jaxppo.lora import init_adapters, scaling

    config = dataclasses.replace(MODEL, lora_scale=scaling(rank=4, alpha=8.0))
    mesh = make_mesh(LAYOUTS["fsdp_x_tensor"])
    lora = jax.tree.map(lambda x: x + 0.1, init_adapters(config, jax.random.key(1), rank=4))  # B ≠ 0
    params = {**init_params(config, jax.random.key(0)), "lora": lora}
    specs = jax.tree.map(lambda s: s.spec, tree_shardings(params, mesh))["lora"]["layers"]
    # MODEL: D 32, H_kv 2, H·Dh 32, F 64; fsdp = tensor = 2
    assert specs["attn"]["q_a"] == P(None, "fsdp") and specs["attn"]["q_b"] == P(None, None, "tensor")
    assert specs["attn"]["v_b"] == P(None, None, "tensor")
    assert specs["attn"]["o_a"] == P(None, "tensor") and specs["attn"]["o_b"] == P(None, None, "fsdp")
    assert specs["mlp"]["gate_a"] == P(None, "fsdp") and specs["mlp"]["up_b"] == P(None, None, None, "tensor")
    assert specs["mlp"]["down_a"] == P(None, "tensor") and specs["mlp"]["down_b"] == P(None, None, "fsdp")
    assert_sharded_forward_is_the_one_device_forward(config, params, mesh)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_a_quantized_base_is_laid_out_like_its_kernels_and_gives_the_one_device_forward(kind):
    """QLoRA's codes follow their kernel's layout (NF4's halved input axis too), the scales its output
    split; the forward pass of base + adapters sharded over fsdp × tensor equals the one-device one."""
    from jaxppo.lora import init_adapters, scaling
    from jaxppo.quant import quantize_params

    config = dataclasses.replace(MODEL, lora_scale=scaling(rank=4, alpha=8.0))
    mesh = make_mesh(LAYOUTS["fsdp_x_tensor"])
    lora = jax.tree.map(lambda x: x + 0.1, init_adapters(config, jax.random.key(1), rank=4))
    params = {**quantize_params(config, init_params(config, jax.random.key(0)), kind=kind, block=16), "lora": lora}
    specs = jax.tree.map(lambda s: s.spec, tree_shardings(params, mesh))["layers"]
    assert specs["attn"]["qkv_proj"][f"kernel_{kind}"] == P(None, "fsdp", "tensor")
    assert specs["attn"]["qkv_proj"]["kernel_scale"] == P(None, None, "tensor")
    assert specs["mlp"]["down_proj"][f"kernel_{kind}"] == P(None, "tensor", "fsdp")
    assert specs["mlp"]["down_proj"]["kernel_scale"] == P(None, None, "fsdp")
    assert_sharded_forward_is_the_one_device_forward(config, params, mesh)


def test_fsdp_keeps_an_eighth_of_the_parameters_per_device():
    mesh = make_mesh(LAYOUTS["fsdp"])
    params = init_params(MODEL, jax.random.key(0))
    total = sum(x.nbytes for x in jax.tree.leaves(params))
    # RMSNorm scales are the small replicated tensors
    small = sum(x.nbytes for path, x in jax.tree_util.tree_leaves_with_path(params) if "norm" in jax.tree_util.keystr(path))
    per_device = param_bytes_per_device(shard_tree(params, mesh))
    assert len(per_device) == 8
    for nbytes in per_device.values():
        assert nbytes <= total / 8 + small, (nbytes, total, small)


def _gold(*args):
    return gold_reward(TASK, *args)


def _iteration(mesh=None, ppo=PPO):
    """One PPO iteration (rollout → update) from fixed keys, the roles from ``init_ppo``, on ``mesh``
    or on one device."""
    key = jax.random.key(0)
    base = init_params(MODEL, key)
    prompts = sample_prompts(TASK, jax.random.key(1), ppo.batch_size)
    ppo = dataclasses.replace(ppo, critic_init="sft")  # critic: the trunk with a zero value head
    rollout, update = make_rollout(MODEL, ppo, score_fn=_gold), make_update(MODEL, ppo)
    mesh = mesh or make_mesh(MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    with jax.set_mesh(mesh):
        state, frozen = init_ppo(MODEL, ppo, mesh, sft_params=base, reward_params=None, key=key)
        traj, _ = rollout(state.actor.params, state.critic.params, frozen.reference, None,
                          *shard_batch(prompts, mesh), jax.random.key(2), 0.05)
        actor_state, critic_state, metrics = update(state.actor, state.critic, traj, jax.random.key(3), 0.05, None)
        return traj, actor_state, critic_state, metrics


@pytest.fixture(scope="module")
def one_device():
    return jax.tree.map(np.asarray, _iteration())


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_ppo_iteration_matches_one_device(one_device, layout):
    mesh = make_mesh(LAYOUTS[layout])
    traj, actor, critic, metrics = _iteration(mesh)
    ref_traj, ref_actor, ref_critic, ref_metrics = one_device
    assert traj.response.sharding.is_equivalent_to(NamedSharding(mesh, batch_spec(2)), 2)  # batch over data × fsdp
    np.testing.assert_array_equal(np.asarray(traj.response), ref_traj.response)  # the same samples
    for name in ref_metrics:
        np.testing.assert_allclose(np.asarray(metrics[name]), ref_metrics[name], rtol=1e-5, atol=1e-6, err_msg=name)
    # Adam divides each gradient by its own magnitude: where a gradient is ~0, float32 summation-order noise
    # moves that element's step by a fraction of the learning rate (0.12 % of it seen on one host), so the
    # params agree to 1e-5 of their scale plus 1 % of one step
    for got, want in ((actor.params, ref_actor.params), (critic.params, ref_critic.params)):
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
            scale = np.max(np.abs(b)) + 1e-12
            assert np.max(np.abs(np.asarray(a) - b)) <= 1e-5 * scale + 0.01 * PPO.learning_rate, \
                jax.tree_util.keystr(path)
    # the donated states come back in the layout of the rules table
    q = actor.params["layers"]["attn"]["qkv_proj"]["kernel"]
    assert q.sharding.spec == spec_for("layers/attn/qkv_proj/kernel", q.shape, mesh)


def test_sampler_kv_cache_is_sharded_like_the_batch_and_heads():
    from jaxppo.sampling import SamplingParams, sample

    mesh = make_mesh(LAYOUTS["fsdp_x_tensor"])  # data=1, so the cache's batch goes over fsdp alone
    sampling = SamplingParams(max_new_tokens=4, stop_token_ids=(EOS,), pad_token_id=PAD)
    params = shard_tree(init_params(MODEL, jax.random.key(0)), mesh)
    prompts = shard_batch(sample_prompts(TASK, jax.random.key(1), 8), mesh)
    with jax.set_mesh(mesh):
        hlo = jax.jit(lambda p, t, m, k: sample(MODEL, p, t, m, k, sampling=sampling)).lower(
            params, *prompts, jax.random.key(2)).as_text()
    # Two sharding_constraint ops (K and V) on the [L, B, H_kv, S, D_h] cache reach the compiler with batch
    # over fsdp and KV heads over tensor. Inputs carry sdy.sharding annotations anyway, so look for the op.
    cache = (MODEL.num_layers, 8, MODEL.num_kv_heads, prompts[0].shape[1] + sampling.max_new_tokens, MODEL.head_dim)
    wanted = '[{}, {"fsdp"}, {"tensor"}, {}, {}]> : tensor<' + "x".join(map(str, cache)) + "xf32>"
    constraints = [line.strip() for line in hlo.splitlines() if "sdy.sharding_constraint" in line]
    assert sum(wanted in line for line in constraints) == 2, constraints


def _state(params):
    return create_train_state(params, make_optimizer(learning_rate=1e-3))


def test_checkpoint_saved_on_8_devices_restores_on_1_and_4_and_back(tmp_path):
    params = init_params(MODEL, jax.random.key(0))
    mesh8 = make_mesh(LAYOUTS["fsdp_x_tensor"])
    state8 = init_sharded(_state, mesh8, params)
    ckpt = StageCheckpoints(tmp_path / "ppo", keep=2, config={})
    ckpt.save(1, {"actor": state8})
    expected = jax.tree.map(np.asarray, state8)
    targets = {
        "1 device": _state(params),
        "4 devices": init_sharded(_state, make_mesh(MeshConfig(data=1, fsdp=2, tensor=2), jax.devices()[:4]), params),
        "8 devices, other layout": init_sharded(_state, make_mesh(LAYOUTS["data_x_tensor"]), params),
    }
    for name, target in targets.items():
        items, _ = StageCheckpoints(tmp_path / "ppo", keep=2, config={}).restore(1, {"actor": target})
        restored = items["actor"]
        for got, want, tgt in zip(jax.tree.leaves(restored), jax.tree.leaves(expected), jax.tree.leaves(target)):
            np.testing.assert_array_equal(np.asarray(got), want, err_msg=name)
            assert got.sharding.is_equivalent_to(tgt.sharding, got.ndim), name
        if name == "4 devices":  # and back: save from 4 devices, restore on the 8-device mesh
            ckpt4 = StageCheckpoints(tmp_path / "ppo4", keep=2, config={})
            ckpt4.save(1, {"actor": restored})
            back, _ = ckpt4.restore(1, {"actor": init_sharded(_state, mesh8, params)})
            for got, want, saved in zip(jax.tree.leaves(back["actor"]), jax.tree.leaves(expected),
                                        jax.tree.leaves(state8)):
                np.testing.assert_array_equal(np.asarray(got), want)
                assert got.sharding.is_equivalent_to(saved.sharding, got.ndim)  # the 8-device layout it began in


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_slot_refill_engine_under_a_mesh_gives_the_single_device_samples(temperature):
    """Slot-refill decoding with a queue and a draining compaction (down to one row per batch shard)
    on 8 devices (fsdp 4 × tensor 2): the tokens of one device, log-probs to float rounding."""
    from jaxppo.engine import generate
    from jaxppo.sampling import SamplingParams

    mesh = make_mesh(LAYOUTS["fsdp_x_tensor"])
    sampling = SamplingParams(max_new_tokens=6, temperature=temperature, stop_token_ids=(EOS,), pad_token_id=PAD)
    params = init_params(MODEL, jax.random.key(0))
    prompts = sample_prompts(TASK, jax.random.key(1), 24)
    caps = jax.random.randint(jax.random.key(2), (24,), 1, 7)
    fn = jax.jit(lambda p, t, m, k, c: generate(MODEL, p, t, m, k, sampling=sampling, slots=8, max_lengths=c))
    single, single_stats = fn(params, *prompts, jax.random.key(3), caps)
    with jax.set_mesh(mesh):
        sharded, stats = fn(shard_tree(params, mesh), *shard_batch(prompts, mesh), jax.random.key(3), caps)
    np.testing.assert_array_equal(sharded.tokens, single.tokens)
    np.testing.assert_array_equal(sharded.mask, single.mask)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)
    assert int(stats.refills) == 16 and int(stats.useful_tokens) == int(np.asarray(single.mask).sum())
    # without a mesh the drain compacts to 1 row; on it, to one row per batch shard (fsdp 4)
    assert int(stats.slot_steps) >= int(single_stats.slot_steps)
