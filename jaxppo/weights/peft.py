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
import tempfile

import numpy as np

from jaxppo.lora import ATTN_TARGETS, TARGETS, shapes
from jaxppo.models.config import ModelConfig
from jaxppo.weights.hf import _read_json_file

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_MODULE = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}
_PREFIX = "base_model.model.model.layers"


def _targets(lora: dict) -> list[str]:
    layers = lora["layers"]
    return [t for t in TARGETS if f"{t}_a" in layers.get("attn" if t in ATTN_TARGETS else "mlp", {})]


def save_adapter(out_dir: str | os.PathLike, config: ModelConfig, lora: dict, *, alpha: float, rslora: bool = False,
                 base_model: str | None = None) -> pathlib.Path:
    """Writes ``lora`` (a :func:`jaxppo.lora.init_adapters` tree) as a PEFT LoRA adapter of a
    ``*ForCausalLM``; ``alpha`` and ``rslora`` give PEFT the scale (``config.lora_scale`` must equal
    it); ``base_model``: the base's directory or hub name, recorded for ``peft``."""
    from safetensors.numpy import save_file

    targets = _targets(lora)
    if not targets:
        raise ValueError("save_adapter: `lora` holds no adapters")
    layers = lora["layers"]
    rank = int(np.shape(layers["attn" if targets[0] in ATTN_TARGETS else "mlp"][f"{targets[0]}_a"])[-1])
    scale = alpha / np.sqrt(rank) if rslora else alpha / rank
    if not np.isclose(scale, config.lora_scale, rtol=1e-6):
        raise ValueError(f"save_adapter: alpha={alpha}, rank={rank}{' (rsLoRA)' if rslora else ''} give the scale "
                         f"{scale}, but model.lora_scale is {config.lora_scale}")
    tensors = {}
    for t in targets:
        group = layers["attn" if t in ATTN_TARGETS else "mlp"]
        a, b = np.asarray(group[f"{t}_a"]), np.asarray(group[f"{t}_b"])
        for i in range(config.num_layers):
            tensors[f"{_PREFIX}.{i}.{_MODULE[t]}.lora_A.weight"] = np.ascontiguousarray(a[i].T)
            tensors[f"{_PREFIX}.{i}.{_MODULE[t]}.lora_B.weight"] = np.ascontiguousarray(b[i].reshape(rank, -1).T)
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(_MODULE[t].split(".")[1] for t in targets), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": rslora, "use_dora": False, "init_lora_weights": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
        "inference_mode": True, "base_model_name_or_path": base_model, "revision": None,
    }
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:  # written whole, then renamed: never a torn file
        tmp = pathlib.Path(tmp)
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        for file in tmp.iterdir():
            os.replace(file, out_dir / file.name)
    return out_dir


def load_adapter(path: str | os.PathLike, config: ModelConfig) -> tuple[dict, dict]:
    """A PEFT LoRA adapter directory → ``(lora tree, {"rank", "alpha", "rslora", "scale", "targets"})``.
    ``ValueError`` naming the file and field or tensor for anything jaxppo cannot load exactly (DoRA,
    biases, per-module ranks, a regex ``target_modules``, layer subsets, a shape that does not fit ``config``)."""
    from safetensors.numpy import load_file

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
    for name, ok in (("use_dora", not meta.get("use_dora")), ("bias", meta.get("bias", "none") == "none"),
                     ("rank_pattern", not meta.get("rank_pattern")), ("alpha_pattern", not meta.get("alpha_pattern")),
                     ("layers_to_transform", meta.get("layers_to_transform") is None),
                     ("modules_to_save", not meta.get("modules_to_save"))):
        if not ok:
            raise field_error(name, f"= {meta.get(name)!r} is not supported (jaxppo loads plain LoRA)")
    rank, alpha = meta.get("r"), meta.get("lora_alpha")
    if not isinstance(rank, int) or rank < 1:
        raise field_error("r", f"must be an integer >= 1, got {rank!r}")
    if not isinstance(alpha, (int, float)):
        raise field_error("lora_alpha", f"must be a number, got {alpha!r}")
    modules = meta.get("target_modules")
    if not isinstance(modules, list):
        raise field_error("target_modules", f"must be a list of module names, got {modules!r}")
    by_name = {m.split(".")[1]: t for t, m in _MODULE.items()}
    unknown = [m for m in modules if m not in by_name]
    if unknown:
        raise field_error("target_modules", f"has {unknown}: jaxppo adapts {sorted(by_name)}")
    targets = [t for t in TARGETS if _MODULE[t].split(".")[1] in modules]
    tensors = load_file(str(weights_file))
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
            a_layers.append(tensors[f"{stem}.lora_A.weight"].T)
            b_layers.append(tensors[f"{stem}.lora_B.weight"].T.reshape(b_shape))
        group = lora["attn" if t in ATTN_TARGETS else "mlp"]
        group[f"{t}_a"] = np.stack(a_layers).astype(np.float32)
        group[f"{t}_b"] = np.stack(b_layers).astype(np.float32)
    rslora = bool(meta.get("use_rslora", False))
    scale = alpha / np.sqrt(rank) if rslora else alpha / rank
    info = {"rank": rank, "alpha": float(alpha), "rslora": rslora, "scale": float(scale), "targets": tuple(targets)}
    return {"layers": {k: v for k, v in lora.items() if v}}, info
