"""Flax Llama-family decoder vs transformers (PyTorch, fp32) through the export → from_pretrained path."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from conftest import count_traces
from jaxppo.models import (
    ModelConfig,
    RopeScaling,
    chosen_logprobs,
    decoder_hidden,
    init_params,
    init_scalar_head,
    lm_logits,
    scalar_head,
)
from jaxppo.sequences import response_scores
from jaxppo.weights.hf import load_pretrained, params_from_hf, save_pretrained

V = 97
CONFIGS = {
    "llama-untied-gqa": ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=3, num_heads=6,
                                    num_kv_heads=2, head_dim=8, rope_theta=1e4),
    "llama-tied-mha": ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=4,
                                  num_kv_heads=4, head_dim=12, tie_word_embeddings=True, rope_theta=1e5),
    "llama3-rope-scaling": ModelConfig(vocab_size=V, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                                       num_kv_heads=1, head_dim=16, rope_theta=5e5, max_position_embeddings=256,
                                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 16)),
    "qwen2-bias-gqa": ModelConfig(vocab_size=V, hidden_size=48, intermediate_size=80, num_layers=2, num_heads=6,
                                  num_kv_heads=2, head_dim=8, attention_bias=True, architecture="qwen2",
                                  rms_norm_eps=1e-6),
}


def random_params(config: ModelConfig, seed: int = 0) -> dict:
    """Random params with non-trivial norms and biases (init leaves them at 1 and 0)."""
    params = init_params(config, jax.random.key(seed))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def batch(seed: int = 0, length: int = 40):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, V, size=(3, length))
    mask = np.ones_like(tokens)
    mask[1, :7] = 0  # left padding of different lengths
    mask[2, : length - 5] = 0
    return tokens, mask


def causal_lm_logits(config: ModelConfig, params: dict, tokens, mask):
    """Full next-token logits ``[B, T, V]``: the production trunk and LM head, composed."""
    hidden, _ = decoder_hidden(config, params, tokens, mask)
    return lm_logits(config, params, hidden)


def hf_logits(model, tokens, mask):
    with torch.no_grad():
        return model(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask)).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers_after_export(tmp_path, name):
    config = CONFIGS[name]
    params = random_params(config)
    save_pretrained(tmp_path, config, params)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(reference).__name__ == {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[config.architecture]
    tokens, mask = batch()
    ours = np.asarray(causal_lm_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    theirs = hf_logits(reference, tokens, mask)
    assert np.abs(ours - theirs)[mask > 0].max() <= 1e-3
    assert np.abs(ours - theirs)[mask > 0].max() <= 1e-5  # in practice fp32 agrees to ~1e-6
    # ...and the export reads back to the same config and params.
    config2, params2, _ = load_pretrained(tmp_path)
    assert config2 == config
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), params, params2)


def test_import_of_a_transformers_checkpoint(tmp_path):
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=False)
    reference = LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path)
    config, params, tokenizer = load_pretrained(tmp_path)
    assert tokenizer is None and config.num_kv_heads == 2 and not config.tie_word_embeddings
    tokens, mask = batch(1, 24)
    ours = np.asarray(causal_lm_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - hf_logits(reference, tokens, mask))[mask > 0].max() <= 1e-5


def test_import_of_a_sharded_checkpoint(tmp_path):
    torch.manual_seed(1)
    hf_config = LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True)
    reference = LlamaForCausalLM(hf_config).eval()
    reference.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    config, params, _ = load_pretrained(tmp_path)
    tokens, mask = batch(2, 16)
    ours = np.asarray(causal_lm_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert np.abs(ours - hf_logits(reference, tokens, mask))[mask > 0].max() <= 1e-5


def test_left_padding_gives_the_unpadded_logits():
    config = CONFIGS["llama-untied-gqa"]
    params = random_params(config)
    tokens, mask = batch()
    padded = causal_lm_logits(config, params, jnp.asarray(tokens), jnp.asarray(mask))
    for row in (1, 2):
        start = int((mask[row] == 0).sum())
        alone = causal_lm_logits(config, params, jnp.asarray(tokens[row:row + 1, start:]), jnp.ones((1, 40 - start)))
        np.testing.assert_allclose(padded[row, start:], alone[0], atol=1e-5)


@pytest.mark.slow
def test_remat_and_dtypes():
    config = CONFIGS["llama-untied-gqa"]
    params = random_params(config)
    tokens, mask = (jnp.asarray(a) for a in batch())

    def loss(cfg, p):
        return jnp.mean(causal_lm_logits(cfg, p, tokens, mask)[..., 0])

    grad = jax.jit(jax.value_and_grad(loss, argnums=1), static_argnums=0)

    l1, g1 = grad(config, params)
    for policy in ("nothing", "dots"):
        remat = ModelConfig(**{**config.__dict__, "remat": True, "remat_policy": policy})
        l2, g2 = grad(remat, params)
        np.testing.assert_allclose(l1, l2, rtol=1e-5, atol=1e-7)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), g1, g2)
    with pytest.raises(ValueError, match="remat_policy"):
        ModelConfig(**{**config.__dict__, "remat_policy": "everything"})

    bf16 = ModelConfig(**{**config.__dict__, "param_dtype": "bfloat16", "dtype": "bfloat16"})
    bf16_params = init_params(bf16, jax.random.key(0))
    assert {x.dtype for x in jax.tree.leaves(bf16_params)} == {jnp.dtype("bfloat16")}
    forward = jax.jit(causal_lm_logits, static_argnums=0)
    full = forward(config, jax.tree.map(lambda x: x.astype(jnp.float32), bf16_params), tokens, mask)
    half = forward(bf16, bf16_params, tokens, mask)
    assert half.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(half - full))) < 0.05 * float(jnp.max(jnp.abs(full)))


def test_chunked_logprobs_equal_full_log_softmax_with_gradients():
    config = CONFIGS["llama-tied-mha"]
    params = random_params(config)
    tokens, mask = (jnp.asarray(a) for a in batch())
    hidden, _ = decoder_hidden(config, params, tokens, mask)
    targets = jnp.roll(tokens, -1, axis=1)

    def full(p, h):
        logp = jax.nn.log_softmax(lm_logits(config, p, h) / 0.7, axis=-1)
        return jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]

    def chunked(p, h):  # 40 tokens in chunks of 16: the last chunk is padded
        return chosen_logprobs(config, p, h, targets, temperature=0.7, chunk_size=16)

    np.testing.assert_allclose(chunked(params, hidden), full(params, hidden), atol=1e-5)
    g_full = jax.grad(lambda p, h: jnp.sum(full(p, h)), argnums=(0, 1))(params, hidden)
    g_chunk = jax.grad(lambda p, h: jnp.sum(chunked(p, h)), argnums=(0, 1))(params, hidden)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), g_full, g_chunk)
    _, ent = chosen_logprobs(config, params, hidden, targets, chunk_size=16, with_entropy=True)
    p = jax.nn.softmax(lm_logits(config, params, hidden), -1)
    np.testing.assert_allclose(ent, -jnp.sum(p * jnp.log(p), -1), rtol=1e-4, atol=1e-5)


def test_scalar_heads():
    config = CONFIGS["llama-untied-gqa"]
    params = init_params(config, jax.random.key(0), scalar_heads=("value_head", "reward_head"))
    assert not np.any(params["value_head"]["kernel"]) and not np.any(params["value_head"]["bias"])
    wide = ModelConfig(**{**config.__dict__, "hidden_size": 4096})
    reward_head = init_scalar_head(wide, jax.random.key(1), "reward_head")
    np.testing.assert_allclose(np.std(reward_head["kernel"]), 1 / np.sqrt(4096 + 1), rtol=0.05)
    # A sequence's score is the head at its last real token, whatever padding surrounds it.
    params["reward_head"]["bias"] = jnp.array([0.3])
    tokens = jnp.array([[0, 0, 5, 6, 7, 0, 0], [1, 2, 3, 4, 5, 6, 7]])
    mask = jnp.array([[0, 0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    hidden, _ = decoder_hidden(config, params, tokens, mask)
    per_token = scalar_head(params["reward_head"], hidden)
    scores = response_scores(config, params, tokens[:, :4], mask[:, :4], tokens[:, 4:], mask[:, 4:])
    np.testing.assert_allclose(scores, [per_token[0, 4], per_token[1, 6]], rtol=1e-6)


def test_errors_name_the_source(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"config.json: unsupported architecture \['GPT2LMHeadModel'\]"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json: invalid JSON at line 1"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(CONFIGS["llama-untied-gqa"].to_hf_dict()))
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="only pickle weights"):
        load_pretrained(tmp_path)
    config = CONFIGS["llama-untied-gqa"]
    with pytest.raises(ValueError, match="missing tensor 'model.embed_tokens.weight'"):
        params_from_hf(config, {}, source="ckpt")
    with pytest.raises(ValueError, match="config field `model.num_kv_heads`"):
        ModelConfig(vocab_size=8, hidden_size=8, intermediate_size=8, num_layers=1, num_heads=3, num_kv_heads=2, head_dim=4)


def test_forward_traced_once():
    config = CONFIGS["qwen2-bias-gqa"]
    params = random_params(config)
    jitted, calls = count_traces(lambda p, t, m: causal_lm_logits(config, p, t, m))
    for seed in range(3):
        tokens, mask = batch(seed)
        jax.block_until_ready(jitted(params, jnp.asarray(tokens), jnp.asarray(mask)))
    assert calls["traces"] == 1
