"""LoRA adapters on the fused projections (jaxppo.lora): exact at initialisation, equal to the merged
weights after training, per Hugging Face projection as W + s·A·B in float64, and the sampler/engine
run the adapted model unchanged."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxppo.engine import generate
from jaxppo.lora import TARGETS, init_adapters, merge, scaling
from jaxppo.models import ModelConfig, decoder_hidden, init_params
from jaxppo.models.llama import split_projections
from jaxppo.sampling import SamplingParams, sample

# grouped-query attention with G = 2 query heads per KV head, 2 layers, Qwen2-style q/k/v biases
CONFIG = ModelConfig(vocab_size=40, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=8, attention_bias=True, lora_scale=scaling(rank=4, alpha=8.0))
RANK = 4


def tokens_and_mask(batch=3, length=7, seed=0):
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(1, CONFIG.vocab_size, (batch, length)), jnp.int32)
    mask = np.ones((batch, length), np.int32)
    mask[0, :3] = 0  # left padding
    return tokens, jnp.asarray(mask)


def trained(adapters: dict, key) -> dict:
    """Adapters as after some training: every B non-zero (and A moved)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def test_the_module_imports_on_its_own():
    """``jaxppo.models`` imports ``jaxppo.lora``: importing the latter first must not be circular."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", "import jaxppo.lora"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, jax.random.key(0))


@pytest.mark.parametrize("targets", [TARGETS, ("q", "v"), ("k", "o", "down"), ("up",)])
def test_adapted_model_is_the_base_model_at_initialisation(params, targets):
    """B = 0: the adapted forward equals the base forward bit for bit, whatever the targets."""
    lora = init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=targets)
    tokens, mask = tokens_and_mask()
    base, _ = decoder_hidden(CONFIG, params, tokens, mask)
    adapted, _ = decoder_hidden(CONFIG, {**params, "lora": lora}, tokens, mask)
    np.testing.assert_array_equal(adapted, base)


@pytest.mark.parametrize("targets", [TARGETS, ("q", "v"), ("gate", "o")])
def test_adapted_model_equals_the_merged_weights(params, targets):
    lora = trained(init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=targets), jax.random.key(2))
    tokens, mask = tokens_and_mask()
    adapted, kv = decoder_hidden(CONFIG, {**params, "lora": lora}, tokens, mask)
    merged_params = merge(CONFIG, {**params, "lora": lora})
    assert "lora" not in merged_params
    merged, merged_kv = decoder_hidden(CONFIG, merged_params, tokens, mask)
    base, _ = decoder_hidden(CONFIG, params, tokens, mask)
    assert float(jnp.max(jnp.abs(adapted - base))) > 1e-2  # the adapters do change the function
    np.testing.assert_allclose(adapted, merged, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv.k, merged_kv.k, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(kv.v, merged_kv.v, atol=1e-5, rtol=1e-5)


def test_merge_is_w_plus_s_a_b_per_hugging_face_projection(params):
    """Split back to q/k/v/o/gate/up/down, each merged kernel is W + s·A·B (float64, by hand), with
    A [in, r] and B reshaped to the projection's [r, out]."""
    lora = trained(init_adapters(CONFIG, jax.random.key(1), rank=RANK), jax.random.key(3))
    merged = merge(CONFIG, {**params, "lora": lora})
    split = lambda p: split_projections(CONFIG, p["layers"]["attn"], p["layers"]["mlp"])  # noqa: E731
    (base_attn, base_mlp), (new_attn, new_mlp) = split(params), split(merged)
    s = CONFIG.lora_scale
    for name in TARGETS:
        group = "attn" if name in ("q", "k", "v", "o") else "mlp"
        hf = f"{name}_proj"
        w = np.asarray((base_attn if group == "attn" else base_mlp)[hf]["kernel"], np.float64)
        got = np.asarray((new_attn if group == "attn" else new_mlp)[hf]["kernel"], np.float64)
        a = np.asarray(lora["layers"][group][f"{name}_a"], np.float64)
        b = np.asarray(lora["layers"][group][f"{name}_b"], np.float64).reshape(CONFIG.num_layers, RANK, -1)
        for layer in range(CONFIG.num_layers):
            np.testing.assert_allclose(got[layer], w[layer] + s * a[layer] @ b[layer], atol=1e-5, err_msg=hf)
    np.testing.assert_array_equal(merged["layers"]["attn"]["qkv_proj"]["bias"],
                                  params["layers"]["attn"]["qkv_proj"]["bias"])  # biases carry no adapter


def test_shapes_and_initialisation():
    lora = init_adapters(CONFIG, jax.random.key(1), rank=RANK)
    # by hand for L=2, D=32, H=4, H_kv=2 (G=2), Dh=8, F=48, r=4
    expected = {"q": ((2, 32, 4), (2, 4, 2, 2, 8)), "k": ((2, 32, 4), (2, 4, 2, 1, 8)),
                "v": ((2, 32, 4), (2, 4, 2, 1, 8)), "o": ((2, 32, 4), (2, 4, 32)),
                "gate": ((2, 32, 4), (2, 4, 1, 48)), "up": ((2, 32, 4), (2, 4, 1, 48)),
                "down": ((2, 48, 4), (2, 4, 32))}
    for name, (a_shape, b_shape) in expected.items():
        group = lora["layers"]["attn" if name in ("q", "k", "v", "o") else "mlp"]
        a, b = group[f"{name}_a"], group[f"{name}_b"]
        assert a.shape == a_shape and b.shape == b_shape, name
        assert np.all(np.asarray(b) == 0) and float(jnp.max(jnp.abs(a))) <= 1 / np.sqrt(a_shape[1])
        assert float(jnp.std(a)) > 0.5 / np.sqrt(3 * a_shape[1])  # U(±1/√in) has std 1/√(3·in)
    assert scaling(rank=4, alpha=8.0) == 2.0 and scaling(rank=4, alpha=8.0, rslora=True) == 4.0
    for bad in (("q_proj",), "qv", ()):
        with pytest.raises(ValueError, match="targets"):
            init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=bad)
    with pytest.raises(ValueError, match="rank"):
        init_adapters(CONFIG, jax.random.key(1), rank=0)


def test_a_malformed_adapter_tree_is_named_before_any_compute(params):
    """A misspelt leaf, a missing level, a wrong rank or layer count, or no model.lora_scale: one
    ValueError naming the leaf, never a silent run of the base model."""
    tokens, mask = tokens_and_mask()
    lora = init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=("q", "down"))
    attn, mlp = lora["layers"]["attn"], lora["layers"]["mlp"]
    cases = [
        ({"layers": {"attn": {"q_A": attn["q_a"], "q_b": attn["q_b"]}}}, CONFIG, "q_A"),
        (lora["layers"], CONFIG, "expected"),
        ({"layers": {"attn": attn, "mlp": {"down_a": mlp["down_a"][:, :, :2], "down_b": mlp["down_b"]}}}, CONFIG,
         "down_a"),
        ({"layers": {"attn": {k: v[:1] for k, v in attn.items()}}}, CONFIG, "q_a"),
        ({"layers": {"mlp": {"q_a": attn["q_a"], "q_b": attn["q_b"]}}}, CONFIG, "mlp/q_a"),
        (lora, dataclasses.replace(CONFIG, lora_scale=None), "lora_scale"),
    ]
    for tree, config, match in cases:
        with pytest.raises(ValueError, match=match):
            decoder_hidden(config, {**params, "lora": tree}, tokens, mask)
    with pytest.raises(ValueError, match="merge"):
        merge(CONFIG, {**params, "lora": cases[0][0]})
    from jaxppo.weights.hf import hf_from_params

    with pytest.raises(ValueError, match="merge them"):
        hf_from_params(CONFIG, {**params, "lora": lora})


def test_gradients_reach_every_adapter(params):
    """With the base closed over, the loss's gradient w.r.t. the adapter tree: B's is non-zero at
    initialisation (A's is zero there, as LoRA's B = 0 implies) and both are non-zero once B ≠ 0."""
    tokens, mask = tokens_and_mask()

    def loss(lora):
        hidden, _ = decoder_hidden(CONFIG, {**params, "lora": lora}, tokens, mask)
        return jnp.sum(jnp.sin(hidden))

    lora = init_adapters(CONFIG, jax.random.key(1), rank=RANK)
    grads = jax.grad(loss)(lora)
    for path, g in jax.tree_util.tree_leaves_with_path(grads):
        name = jax.tree_util.keystr(path)
        assert (float(jnp.max(jnp.abs(g))) > 0) == name.endswith("_b']"), name
    for path, g in jax.tree_util.tree_leaves_with_path(jax.grad(loss)(trained(lora, jax.random.key(4)))):
        assert float(jnp.max(jnp.abs(g))) > 0, jax.tree_util.keystr(path)


def test_sampler_and_engine_run_the_adapted_model(params):
    """The static sampler and the slot-refill engine with adapters give the merged model's samples."""
    lora = trained(init_adapters(CONFIG, jax.random.key(1), rank=RANK), jax.random.key(5))
    adapted, merged = {**params, "lora": lora}, merge(CONFIG, {**params, "lora": lora})
    tokens, mask = tokens_and_mask(batch=4)
    sampling = SamplingParams(max_new_tokens=5, temperature=0.0)
    config = dataclasses.replace(CONFIG, max_position_embeddings=16)
    reference = sample(config, merged, tokens, mask, jax.random.key(6), sampling=sampling)
    static = sample(config, adapted, tokens, mask, jax.random.key(6), sampling=sampling)
    engine, _ = generate(config, adapted, tokens, mask, jax.random.key(6), sampling=sampling, slots=2)
    for out in (static, engine):
        np.testing.assert_array_equal(out.tokens, reference.tokens)
        np.testing.assert_allclose(out.logprobs, reference.logprobs, atol=1e-5)


def peft_logits(model, tokens, *, adapter: bool = True):
    import torch

    with torch.no_grad():
        if adapter:
            return model(input_ids=torch.tensor(tokens)).logits.numpy()
        with model.disable_adapter():
            return model(input_ids=torch.tensor(tokens)).logits.numpy()


def jaxppo_logits(config, params, tokens):
    from jaxppo.models.heads import lm_logits

    hidden, _ = decoder_hidden(config, params, jnp.asarray(tokens), jnp.ones(tokens.shape, jnp.int32))
    return np.asarray(lm_logits(config, params, hidden))


@pytest.mark.parametrize(("targets", "rslora"), [(TARGETS, False), (("q", "v", "o", "up", "down"), True)])
def test_peft_loads_the_exported_adapter_and_gives_jaxppo_logits(tmp_path, targets, rslora):
    """``save_adapter`` → ``peft.PeftModel.from_pretrained`` on the transformers model of the exported
    base gives jaxppo's adapted logits (≤ 1e-4); ``load_adapter`` reads the adapter back bit for bit."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxppo.weights.hf import save_pretrained
    from jaxppo.weights.peft import load_adapter, save_adapter

    config = dataclasses.replace(CONFIG, attention_bias=False, lora_scale=scaling(rank=RANK, alpha=8.0, rslora=rslora))
    params = init_params(config, jax.random.key(7))
    lora = trained(init_adapters(config, jax.random.key(8), rank=RANK, targets=targets), jax.random.key(9))
    save_pretrained(tmp_path / "base", config, params)
    save_adapter(tmp_path / "adapter", config, lora, alpha=8.0, rslora=rslora, base_model=str(tmp_path / "base"))
    with pytest.raises(ValueError, match="lora_scale"):
        save_adapter(tmp_path / "bad", config, lora, alpha=8.0, rslora=not rslora)  # another scale than the model's

    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 9))
    ours = jaxppo_logits(config, {**params, "lora": lora}, tokens)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert np.abs(ours - peft_logits(model, tokens, adapter=False)).max() > 1e-2  # the adapter matters
    np.testing.assert_allclose(ours, peft_logits(model, tokens), atol=1e-4)

    loaded, info = load_adapter(tmp_path / "adapter", config)
    assert info == {"rank": RANK, "alpha": 8.0, "rslora": rslora, "scale": config.lora_scale, "targets": targets}
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, lora))


def test_an_adapter_saved_by_peft_loads_with_peft_logits(tmp_path):
    """The other direction: ``peft.get_peft_model`` with random (non-zero) A and B, saved by peft,
    read by ``load_adapter``: jaxppo's logits equal peft's (≤ 1e-4)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from jaxppo.weights.hf import save_pretrained
    from jaxppo.weights.peft import load_adapter

    config = dataclasses.replace(CONFIG, attention_bias=False)
    params = init_params(config, jax.random.key(10))
    save_pretrained(tmp_path / "base", config, params)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    peft_config = LoraConfig(r=RANK, lora_alpha=6, target_modules=["k_proj", "gate_proj", "o_proj"],
                             init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, peft_config).eval()
    model.save_pretrained(tmp_path / "adapter")
    lora, info = load_adapter(tmp_path / "adapter", config)
    assert info["targets"] == ("k", "o", "gate") and info["scale"] == 6 / RANK
    tokens = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9))
    ours = jaxppo_logits(dataclasses.replace(config, lora_scale=info["scale"]), {**params, "lora": lora}, tokens)
    assert np.abs(ours - peft_logits(model, tokens, adapter=False)).max() > 1e-2
    np.testing.assert_allclose(ours, peft_logits(model, tokens), atol=1e-4)


def test_load_adapter_names_what_it_cannot_load(tmp_path):
    from safetensors.numpy import load_file, save_file

    from jaxppo.weights.peft import load_adapter, save_adapter

    lora = init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=("q", "k"))
    save_adapter(tmp_path, CONFIG, lora, alpha=8.0)
    config_file, weights_file = tmp_path / "adapter_config.json", tmp_path / "adapter_model.safetensors"
    good = config_file.read_text()
    for change, match in (({"use_dora": True}, "'use_dora'"), ({"bias": "all"}, "'bias'"),
                          ({"lora_bias": True}, "'lora_bias'"), ({"rank_pattern": {"q_proj": 8}}, "'rank_pattern'"),
                          ({"layers_to_transform": [0]}, "'layers_to_transform'"),
                          ({"peft_type": "IA3"}, "'peft_type'"),
                          ({"target_modules": ["q_proj", "lm_head"]}, "'target_modules'"),
                          ({"target_modules": "q_proj"}, "'target_modules'"), ({"r": 0}, "'r'")):
        config_file.write_text(json.dumps({**json.loads(good), **change}))
        with pytest.raises(ValueError, match=r"adapter_config\.json: field " + match):
            load_adapter(tmp_path, CONFIG)
    config_file.write_text(good)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: tensor .* shape"):  # another model size
        load_adapter(tmp_path, dataclasses.replace(CONFIG, hidden_size=48))
    tensors = load_file(str(weights_file))
    extra = {**tensors, "base_model.model.lm_head.lora_A.weight": np.zeros((RANK, 32), np.float32)}
    save_file(extra, str(weights_file), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not load.*lm_head"):
        load_adapter(tmp_path, CONFIG)
    save_file({k: v for k, v in tensors.items() if ".1.self_attn.k_proj.lora_B" not in k}, str(weights_file),
              metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layers.1.self_attn.k_proj.lora_B.weight' missing"):
        load_adapter(tmp_path, CONFIG)
    weights_file.unlink()
    with pytest.raises(ValueError, match="adapter_model.safetensors: not found"):
        load_adapter(tmp_path, CONFIG)


def test_bf16_adapters_save_and_load(tmp_path):
    from jaxppo.weights.peft import load_adapter, save_adapter

    lora = jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                        trained(init_adapters(CONFIG, jax.random.key(1), rank=RANK, targets=("v",)), jax.random.key(2)))
    save_adapter(tmp_path, CONFIG, lora, alpha=8.0)
    loaded, _ = load_adapter(tmp_path, CONFIG)
    jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(lambda x: np.asarray(x, np.float32), lora))


def test_lora_sft_trains_adapters_on_the_frozen_base_and_returns_the_merged_policy(tmp_path):
    """``lora.rank > 0``: the SFT stage's train state holds only adapters (and their Adam moments), the
    base stays as it was, and the stage returns base + merged adapters, which fits the demonstrations
    better than the base (rank 4 of a random 32-wide base, 150 steps: measured 2.87 → 2.68 nats; the
    random embeddings, which LoRA leaves frozen, bound how far it gets)."""
    from jaxppo.lora import TARGETS as ALL
    from jaxppo.pipeline import open_run, sft_stage
    from jaxppo.pipeline_config import LoraConfig
    from jaxppo.sft import sft_nll
    from tiny import tiny_config

    config = tiny_config()  # LoRA's usual 10× the full fine-tuning learning rate
    config = dataclasses.replace(config, lora=LoraConfig(rank=4, alpha=8.0),
                                 sft=dataclasses.replace(config.sft, learning_rate=3e-2))
    with open_run(config, tmp_path) as (ctx, base):
        base = init_params(config.model, ctx.key("init")) if base is None else base
        sft = sft_stage(ctx, base)
        batch = ctx.task.demonstrations("sft_eval", 0, 64)
    assert "lora" not in sft
    for name in ("embed", "final_norm"):  # no adapters there: the base's arrays, bit for bit
        jax.tree.map(np.testing.assert_array_equal, sft[name], base[name])
    changed = [float(jnp.max(jnp.abs(sft["layers"][g][p]["kernel"] - base["layers"][g][p]["kernel"])))
               for g, p in (("attn", "qkv_proj"), ("attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))]
    assert min(changed) > 1e-3  # every targeted projection moved
    before, after = (float(sft_nll(config.model, p, batch)[0]) for p in (base, sft))
    assert after < before - 0.1, (before, after)
    rows = [r for r in read_metrics_of(tmp_path) if r["stage"] == "sft"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.1
    with pytest.raises(ValueError, match="lora.targets"):
        LoraConfig(rank=4, targets=("q_proj",))
    assert LoraConfig(rank=4, alpha=8.0).scale == 2.0 and LoraConfig().targets == ALL


def read_metrics_of(run_dir):
    from jaxppo.logging import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def test_lora_sft_interrupted_and_resumed_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    """Checkpoints of the adapter-only state: an SFT stage stopped after step 15 (checkpoints every 10)
    and re-run in the same directory resumes at step 10 and returns the uninterrupted run's merged
    policy bit for bit."""
    import jaxppo.pipeline.context as context
    from jaxppo.pipeline import open_run, sft_stage
    from jaxppo.pipeline_config import CheckpointConfig, LoraConfig
    from tiny import tiny_config

    config = tiny_config()
    config = dataclasses.replace(config, lora=LoraConfig(rank=2, alpha=4.0, targets=("q", "v", "down")),
                                 sft=dataclasses.replace(config.sft, steps=20, learning_rate=3e-2),
                                 checkpoint=CheckpointConfig(every_steps=10))

    def sft(run_dir):
        with open_run(config, run_dir) as (ctx, base):
            return jax.tree.map(np.asarray, sft_stage(ctx, base))

    expected = sft(tmp_path / "straight")

    class Stop(Exception):
        pass

    calls = {"n": 0}
    original = context.shard_batch

    def stop_after_15(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 15:
            raise Stop
        return original(*args, **kwargs)

    monkeypatch.setattr(context, "shard_batch", stop_after_15)
    with pytest.raises(Stop):
        sft(tmp_path / "interrupted")
    resumed = {"n": 0}

    def count(*args, **kwargs):
        resumed["n"] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(context, "shard_batch", count)
    got = sft(tmp_path / "interrupted")
    assert resumed["n"] == 10  # steps 10..19 only: it resumed from the step-10 checkpoint, not from scratch
    jax.tree.map(np.testing.assert_array_equal, got, expected)
    rows = [r for r in read_metrics_of(tmp_path / "interrupted") if r["stage"] == "sft"]
    assert [r["step"] for r in rows][-1] == 19


# ------------------------------------------------------------------------------------------ LoRA dropout


DROPOUT = 0.3
DROPOUT_CONFIG = dataclasses.replace(CONFIG, lora_dropout=DROPOUT)


def test_row_dropout_keeps_at_one_minus_its_rate_and_is_unbiased():
    """Inverted dropout: a fraction ``rate`` of entries is zeroed, the rest are ``x / (1 − rate)``; the
    LoRA delta averaged over many rows' masks is the delta without dropout (E[mask] = 1 − rate)."""
    from jaxppo.lora import fused_delta, row_dropout, step_dropout_keys

    rows, d, r, out = 4096, 8, 4, 6
    x = jnp.broadcast_to(jnp.arange(1.0, d + 1.0), (rows, 1, d))  # every row the same input
    keys = step_dropout_keys(jax.random.key(0), 3, rows)
    dropped = np.asarray(row_dropout(x, keys, rate=DROPOUT))
    zero = dropped == 0
    # Binomial(32768, 0.3): standard deviation 0.0025; 5 standard deviations
    assert abs(zero.mean() - DROPOUT) < 0.0127, zero.mean()
    np.testing.assert_allclose(dropped[~zero], np.asarray(x / (1 - DROPOUT))[~zero], rtol=1e-6)
    adapters = {"o_a": jax.random.normal(jax.random.key(1), (d, r)), "o_b": jax.random.normal(jax.random.key(2), (r, out))}
    plain = np.asarray(fused_delta(x, adapters, (("o", 1),), scale=2.0), np.float64)
    noisy = np.asarray(fused_delta(x, adapters, (("o", 1),), scale=2.0, dropout_keys=keys, dropout=DROPOUT), np.float64)
    assert not np.allclose(noisy[0], plain[0])
    standard_error = noisy.std(axis=0) / np.sqrt(rows)
    assert np.all(np.abs(noisy.mean(axis=0) - plain[0]) < 5 * standard_error + 1e-6)
    with pytest.raises(ValueError, match="one raw key per row"):
        row_dropout(x, keys[:10], rate=DROPOUT)


def test_each_projection_draws_its_own_mask():
    """As PEFT (one ``lora_dropout`` module per adapted projection): gate and up with identical adapters
    give identical deltas without dropout and different ones with it."""
    from jaxppo.lora import fused_delta, step_dropout_keys

    x = jax.random.normal(jax.random.key(0), (3, 5, 8))
    a, b = jax.random.normal(jax.random.key(1), (8, 4)), jax.random.normal(jax.random.key(2), (4, 1, 6))
    adapters = {"gate_a": a, "gate_b": b, "up_a": a, "up_b": b}
    parts = (("gate", 1), ("up", 1))
    plain = fused_delta(x, adapters, parts, scale=1.0)
    np.testing.assert_array_equal(plain[..., 0, :], plain[..., 1, :])
    noisy = fused_delta(x, adapters, parts, scale=1.0, dropout_keys=step_dropout_keys(jax.random.key(3), 0, 3),
                        dropout=DROPOUT)
    assert not np.allclose(noisy[..., 0, :], noisy[..., 1, :])


def test_dropout_is_on_the_adapter_path_only_and_only_with_keys(params):
    """With keys and ``lora_dropout > 0`` the adapted model changes; without keys (evaluation, sampling,
    RL) it is the model without dropout bit for bit, and so is a rate of 0 with keys; with ``B = 0`` the
    base path alone is left, so dropout changes nothing (PEFT drops the adapter's input, never ``x W``)."""
    from jaxppo.lora import step_dropout_keys

    tokens, mask = tokens_and_mask(batch=4)
    keys = step_dropout_keys(jax.random.key(0), 0, 4)
    fresh = init_adapters(CONFIG, jax.random.key(1), rank=RANK)
    lora = trained(fresh, jax.random.key(2))
    hidden = lambda config, adapters, **kw: np.asarray(decoder_hidden(config, {**params, "lora": adapters}, tokens,  # noqa: E731
                                                                      mask, **kw)[0])
    plain = hidden(CONFIG, lora)
    np.testing.assert_array_equal(hidden(DROPOUT_CONFIG, lora), plain)
    np.testing.assert_array_equal(hidden(CONFIG, lora, dropout_keys=keys), plain)
    noisy = hidden(DROPOUT_CONFIG, lora, dropout_keys=keys)
    valid = np.asarray(mask, bool)
    assert np.abs(noisy - plain)[valid].max() > 1e-2
    np.testing.assert_array_equal(hidden(DROPOUT_CONFIG, fresh, dropout_keys=keys), hidden(CONFIG, fresh))
    # a row's masks come from its own key: the same rows in a smaller batch give the same states
    np.testing.assert_allclose(noisy[1:3], np.asarray(decoder_hidden(
        DROPOUT_CONFIG, {**params, "lora": lora}, tokens[1:3], mask[1:3], dropout_keys=keys[1:3])[0]), atol=1e-5)
    with pytest.raises(ValueError, match="dropout_keys"):
        decoder_hidden(DROPOUT_CONFIG, {**params, "lora": lora}, tokens, mask, dropout_keys=keys[:2])
