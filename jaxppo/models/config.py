"""Model configuration for the Llama family (Llama 2/3, SmolLM2, Qwen2), read from Hugging Face."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.config import require

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")
DTYPES = ("float32", "bfloat16", "float16")
# what a rematerialised decoder layer keeps from its forward pass: name -> jax.checkpoint policy
REMAT_POLICIES = {"nothing": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: ``linear`` (position interpolation) or Llama 3's ``llama3``."""

    rope_type: str  # "linear" (position interpolation) or "llama3" (Llama 3.1)
    factor: float  # context extension: frequencies are divided by it (llama3: the low ones only)
    low_freq_factor: float = 1.0  # llama3: wavelengths > original_max_position_embeddings / this are fully scaled
    high_freq_factor: float = 4.0  # llama3: wavelengths < original_max_position_embeddings / this are kept
    original_max_position_embeddings: int = 8192  # llama3: the pre-training context length, in tokens

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(f"rope scaling: `rope_type`={self.rope_type!r} is not one of {ROPE_TYPES}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder plus the dtypes and memory levers jaxppo runs it with.

    ``param_dtype`` is how weights are stored, ``dtype`` the matmul compute dtype; norms, softmax
    and logits are always float32. ``remat`` rematerialises each decoder layer in the backward pass;
    ``remat_policy`` says what it keeps: ``"nothing"`` (recompute the whole layer) or ``"dots"``
    (keep the outputs of the weight matmuls, recompute norms, RoPE, softmax and activations).
    """

    vocab_size: int  # tokens in the vocabulary (embedding and LM-head rows)
    hidden_size: int  # residual stream width
    intermediate_size: int  # SwiGLU MLP hidden width
    num_layers: int  # decoder layers
    num_heads: int  # query heads per layer
    num_kv_heads: int  # key/value heads (grouped-query attention); must divide num_heads
    head_dim: int  # width of one attention head; even (RoPE rotates pairs)
    rms_norm_eps: float = 1e-5  # ε added to the mean square in RMSNorm
    rope_theta: float = 10_000.0  # RoPE base θ: frequencies θ^(−2i / head_dim)
    rope_scaling: RopeScaling | None = None  # None: plain RoPE; else its frequency scaling
    max_position_embeddings: int = 2048  # context length: the longest prompt + response, in tokens
    tie_word_embeddings: bool = False  # the LM head reuses the embedding matrix
    attention_bias: bool = False  # q/k/v projection biases (Qwen2)
    architecture: str = "llama"  # "llama" or "qwen2"
    bos_token_id: int | None = None  # from config.json, for export; None: not set
    eos_token_id: int | tuple[int, ...] | None = None  # one id or several, from config.json, for export; None: not set
    pad_token_id: int | None = None  # from config.json, for export; None: not set
    param_dtype: str = "float32"  # dtype weights are stored in: float32, bfloat16 or float16
    dtype: str = "float32"  # matmul compute dtype: float32, bfloat16 or float16 (norms, softmax, logits: float32)
    remat: bool = False  # recompute each decoder layer in the backward pass: less memory, more compute
    remat_policy: str = "nothing"  # with remat, what each layer keeps: "nothing" or "dots" (matmul outputs)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
             f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
        require(self.architecture in SUPPORTED_ARCHITECTURES.values(), "model.architecture",
             f"{self.architecture!r} is not one of {sorted(SUPPORTED_ARCHITECTURES.values())}")
        require(self.param_dtype in DTYPES, "model.param_dtype", f"{self.param_dtype!r} is not one of {DTYPES}")
        require(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} is not one of {DTYPES}")
        require(self.remat_policy in REMAT_POLICIES, "model.remat_policy",
             f"{self.remat_policy!r} is not one of {tuple(REMAT_POLICIES)}")

    @property
    def jnp_param_dtype(self):
        return jnp.dtype(self.param_dtype)

    @property
    def jnp_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def num_params(self) -> int:
        """Parameter count of the LM (trunk + LM head), as Hugging Face counts it."""
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        attn = d * h * (self.num_heads * 2 + self.num_kv_heads * 2)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        layer = attn + 3 * d * f + 2 * d
        embed = self.vocab_size * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + embed + d

    def inv_frequencies(self) -> np.ndarray:
        """RoPE inverse frequencies ``[head_dim / 2]`` (float64), scaled as the config says."""
        exponents = np.arange(0, self.head_dim, 2, dtype=np.float64) / self.head_dim
        inv_freq = 1.0 / (self.rope_theta ** exponents)
        scaling = self.rope_scaling
        if scaling is None:
            return inv_freq
        if scaling.rope_type == "linear":
            return inv_freq / scaling.factor
        # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
        # smoothly interpolated (transformers' _compute_llama3_parameters).
        old_len = scaling.original_max_position_embeddings
        low_freq_wavelen = old_len / scaling.low_freq_factor
        high_freq_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled)

    # ----------------------------------------------------------------------------------------
    # Hugging Face config.json
    # ----------------------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: dict[str, Any], *, source: str = "config.json", **overrides) -> "ModelConfig":
        """Builds the config from a Hugging Face ``config.json`` dict (transformers 4 or 5 style)."""
        archs = hf.get("architectures") or []
        arch = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None and hf.get("model_type") in SUPPORTED_ARCHITECTURES.values():
            arch = hf["model_type"]
        if arch is None:
            raise ValueError(
                f"{source}: unsupported architecture {archs or hf.get('model_type')!r}; jaxppo supports "
                f"{sorted(SUPPORTED_ARCHITECTURES)}")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"{source}: `hidden_act`={hf['hidden_act']!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ValueError(f"{source}: `mlp_bias`=true is not supported")
        if arch == "qwen2" and hf.get("use_sliding_window"):
            raise ValueError(f"{source}: Qwen2 sliding-window attention is not supported")
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
        params = rope if rope.get("rope_type", "default") != "default" else dict(legacy)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not one of {ROPE_TYPES}")
        rope_scaling = None
        if rope_type != "default":
            fields = {f.name for f in dataclasses.fields(RopeScaling)} - {"rope_type"}
            rope_scaling = RopeScaling(rope_type=rope_type, **{k: v for k, v in params.items() if k in fields})
        num_heads = hf["num_attention_heads"]
        eos = hf.get("eos_token_id")
        kwargs = dict(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=True if arch == "qwen2" else bool(hf.get("attention_bias", False)),
            architecture=arch,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=tuple(eos) if isinstance(eos, list) else eos,
            pad_token_id=hf.get("pad_token_id"),
        )
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_hf_dict(self) -> dict[str, Any]:
        """A ``config.json`` dict that transformers' ``AutoConfig`` reads back to this architecture."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling is not None:
            rope.update(dataclasses.asdict(self.rope_scaling))
        cls_name = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.architecture]
        eos = list(self.eos_token_id) if isinstance(self.eos_token_id, tuple) else self.eos_token_id
        out = {
            "architectures": [cls_name],
            "model_type": self.architecture,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": rope,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32" if self.param_dtype == "float32" else self.param_dtype,
        }
        if self.architecture == "llama":
            out.update(attention_bias=self.attention_bias, mlp_bias=False)
        else:
            out.update(use_sliding_window=False)
        return out


def with_dtype(config: ModelConfig, dtype: str | None) -> ModelConfig:
    """``config`` storing and computing in ``dtype`` (a frozen role in bfloat16: half the memory);
    None: ``config`` as it is."""
    if dtype is None or (config.param_dtype == dtype and config.dtype == dtype):
        return config
    return dataclasses.replace(config, param_dtype=dtype, dtype=dtype)


def cast_params(params, dtype: str | None):
    """``params`` with every floating-point array in ``dtype`` (others, and arrays already in it, as
    they are); None: ``params`` as they are."""
    if dtype is None:
        return params
    target = jnp.dtype(dtype)

    def cast(x):
        return x.astype(target) if jnp.issubdtype(x.dtype, jnp.floating) and x.dtype != target else x

    return jax.tree.map(cast, params)
