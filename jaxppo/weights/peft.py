"""LoRA adapters in and out in the PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

``peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)`` loads
what :func:`save_adapter` writes onto the transformers model of the same base, and
:func:`load_adapter` reads such an adapter back (from jaxppo or from ``peft``'s ``save_pretrained``).

PEFT's tensors, per layer ``i`` and projection ``p`` (``self_attn.{q,k,v,o}_proj``,
``mlp.{gate,up,down}_proj``): ``base_model.model.model.layers.{i}.<p>.lora_A.weight`` ``[r, in]`` and
``….lora_B.weight`` ``[out, r]`` (torch's ``[out, in]`` convention), output
``y + s · B(A x)`` with ``s = lora_alpha / r`` (``/ √r`` with ``use_rslora``). jaxppo's adapters
(:mod:`jaxppo.lora`) are ``A [in, r]`` and ``B [r, out…]`` in the fused layout: export transposes
and flattens, import the inverse; both are exact.
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from jaxppo.lora import TARGETS, check_adapters, group_of, scaling, shapes
from jaxppo.models.config import ModelConfig
from jaxppo.weights.hf import (
    _LAYER_LINEARS, _read_json_file, read_safetensors_file, write_directory, write_safetensors_file,
)

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
# target → the HF layer module it adapts (q → self_attn.q_proj), and that module's own name (q → q_proj)
_MODULE = {module.split(".")[1].removesuffix("_proj"): module for module in _LAYER_LINEARS}
_HF_NAME = {t: m.split(".")[1] for t, m in _MODULE.items()}
_PREFIX = "base_model.model.model.layers"
# adapter_config.json fields naming a PEFT feature plain LoRA lacks: each must be absent or falsy
_UNSUPPORTED = ("use_dora", "rank_pattern", "alpha_pattern", "layers_to_transform", "layers_pattern",
                "modules_to_save", "lora_bias", "target_parameters", "layer_replication", "use_qalora")


def save_adapter(out_dir: str | os.PathLike, config: ModelConfig, lora: dict, *, alpha: float, rslora: bool = False,
                 base_model: str | None = None) -> pathlib.Path:
    """Writes ``lora`` (a :func:`jaxppo.lora.init_adapters` tree, checked against ``config``) as a PEFT
    LoRA adapter of a ``*ForCausalLM``, in the adapters' dtype; ``alpha`` and ``rslora`` give PEFT
    the scale (``config.lora_scale`` must equal it); ``base_model``: the base's directory or hub
    name, recorded for ``peft``."""
    rank = check_adapters(config, lora, where="save_adapter: lora")
    scale = scaling(rank=rank, alpha=alpha, rslora=rslora)
    if not np.isclose(scale, config.lora_scale, rtol=1e-6):
        raise ValueError(f"save_adapter: alpha={alpha}, rank={rank}{' (rsLoRA)' if rslora else ''} give the scale "
                         f"{scale}, but model.lora_scale is {config.lora_scale}")
    layers = lora["layers"]
    targets = [t for t in TARGETS if f"{t}_a" in layers.get(group_of(t), {})]
    tensors = {}
    for t in targets:
        a, b = np.asarray(layers[group_of(t)][f"{t}_a"]), np.asarray(layers[group_of(t)][f"{t}_b"])
        for i in range(config.num_layers):
            tensors[f"{_PREFIX}.{i}.{_MODULE[t]}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{_PREFIX}.{i}.{_MODULE[t]}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": config.lora_dropout,
        "target_modules": sorted(_HF_NAME[t] for t in targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "base_model_name_or_path": base_model, "revision": None,
    }

    def write(tmp: pathlib.Path) -> None:
        write_safetensors_file(tensors, tmp / WEIGHTS_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")

    return write_directory(out_dir, write)


def load_adapter(path: str | os.PathLike, config: ModelConfig) -> tuple[dict, dict]:
    """A PEFT LoRA adapter directory → ``(lora tree, {"rank", "alpha", "rslora", "scale", "targets"})``
    (float32 adapters). ``ValueError`` naming the file and field or tensor for anything jaxppo cannot
    load exactly: DoRA, biases, per-module ranks, layer subsets, other tensors (embedding or LM-head
    adapters, LoRA biases), a module jaxppo does not adapt, a shape that does not fit ``config``."""
    path = pathlib.Path(path)
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    for file in (config_file, weights_file):
        if not file.is_file():
            raise ValueError(f"{file}: not found (a PEFT adapter directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    meta = _read_json_file(config_file)

    def field_error(name, why):
        return ValueError(f"{config_file}: field {name!r} {why}")

    if meta.get("peft_type") != "LORA":
        raise field_error("peft_type", f"must be 'LORA', got {meta.get('peft_type')!r}")
    if meta.get("bias", "none") != "none":
        raise field_error("bias", f"= {meta['bias']!r} is not supported (jaxppo loads plain LoRA)")
    for name in _UNSUPPORTED:
        if meta.get(name):
            raise field_error(name, f"= {meta[name]!r} is not supported (jaxppo loads plain LoRA)")
    rank, alpha = meta.get("r"), meta.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise field_error("r", f"must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise field_error("lora_alpha", f"must be a number, got {alpha!r}")
    modules = meta.get("target_modules")
    if not isinstance(modules, list):
        raise field_error("target_modules", f"must be a list of module names, got {modules!r}")
    unknown = [m for m in modules if m not in _HF_NAME.values()]
    if unknown:
        raise field_error("target_modules", f"has {unknown}: jaxppo adapts {sorted(_HF_NAME.values())}")
    targets = [t for t in TARGETS if _HF_NAME[t] in modules]
    tensors = read_safetensors_file(weights_file)
    used = set()
    lora: dict = {"attn": {}, "mlp": {}}
    for t in targets:
        a_shape, b_shape = shapes(config, rank)[t]
        a_layers, b_layers = [], []
        for i in range(config.num_layers):
            stem = f"{_PREFIX}.{i}.{_MODULE[t]}"
            for suffix, shape in (("lora_A", (rank, a_shape[0])), ("lora_B", (int(np.prod(b_shape[1:])), rank))):
                key = f"{stem}.{suffix}.weight"
                if key not in tensors:
                    raise ValueError(f"{weights_file}: tensor {key!r} missing")
                if tensors[key].shape != shape:
                    raise ValueError(f"{weights_file}: tensor {key!r} has shape {tensors[key].shape}, expected {shape}")
                used.add(key)
            a_layers.append(tensors[f"{stem}.lora_A.weight"].T)
            b_layers.append(tensors[f"{stem}.lora_B.weight"].T.reshape(b_shape))
        lora[group_of(t)][f"{t}_a"] = np.stack(a_layers).astype(np.float32)
        lora[group_of(t)][f"{t}_b"] = np.stack(b_layers).astype(np.float32)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ValueError(f"{weights_file}: tensors jaxppo does not load (not LoRA A/B of {modules} in "
                         f"{config.num_layers} layers): {extra[:5]}{' …' if len(extra) > 5 else ''}")
    rslora = bool(meta.get("use_rslora", False))
    info = {"rank": rank, "alpha": float(alpha), "rslora": rslora,
            "scale": scaling(rank=rank, alpha=alpha, rslora=rslora), "targets": tuple(targets)}
    return {"layers": {k: v for k, v in lora.items() if v}}, info
