"""Model configuration for the Llama family (Llama 2/3, SmolLM2, Qwen2), read from Hugging Face."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxppo.config import require, require_range

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
    factor: float  # context extension, >= 1: frequencies are divided by it (llama3: the low ones only)
    low_freq_factor: float = 1.0  # > 0; llama3: wavelengths > original_max_position_embeddings / this are fully scaled
    high_freq_factor: float = 4.0  # > low_freq_factor; llama3: wavelengths < original_max_position_embeddings / this are kept
    original_max_position_embeddings: int = 8192  # llama3: the pre-training context length, in tokens

    def __post_init__(self):
        require(self.rope_type in ("linear", "llama3"), "model.rope_scaling.rope_type",
                f"{self.rope_type!r} is not one of ('linear', 'llama3')")
        # as transformers validates it: a factor < 1 would shrink the context it extends
        require_range(self.factor, "model.rope_scaling.factor", ge=1)
        require_range(self.low_freq_factor, "model.rope_scaling.low_freq_factor", gt=0)
        require_range(self.high_freq_factor, "model.rope_scaling.high_freq_factor", gt=0)
        # llama3 interpolates between the two: equal factors divide by zero
        require(self.high_freq_factor > self.low_freq_factor, "model.rope_scaling.high_freq_factor",
                f"must be > low_freq_factor={self.low_freq_factor}, got {self.high_freq_factor}")
        require_range(self.original_max_position_embeddings, "model.rope_scaling.original_max_position_embeddings",
                      ge=1)


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
    rms_norm_eps: float = 1e-5  # ε > 0 added to the mean square in RMSNorm
    rope_theta: float = 10_000.0  # RoPE base θ > 0: frequencies θ^(−2i / head_dim)
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
    lora_scale: float | None = None  # LoRA's output scale s = α / r (jaxppo.lora.scaling); needed when params hold adapters
    lora_dropout: float = 0.0  # LoRA dropout on the adapters' inputs, in steps given per-row keys (SFT, reward model, DPO)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            require(getattr(self, name) >= 1, f"model.{name}", f"must be >= 1, got {getattr(self, name)}")
        require(self.num_heads % self.num_kv_heads == 0, "model.num_kv_heads",
             f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        require(self.head_dim % 2 == 0, "model.head_dim", f"must be even for RoPE, got {self.head_dim}")
        require_range(self.max_position_embeddings, "model.max_position_embeddings", ge=1)
        require_range(self.rms_norm_eps, "model.rms_norm_eps", gt=0)  # 0 divides a zero vector by 0
        require_range(self.rope_theta, "model.rope_theta", gt=0)  # θ <= 0 has no real θ^(−2i / head_dim)
        require(self.architecture in SUPPORTED_ARCHITECTURES.values(), "model.architecture",
             f"{self.architecture!r} is not one of {sorted(SUPPORTED_ARCHITECTURES.values())}")
        require(self.param_dtype in DTYPES, "model.param_dtype", f"{self.param_dtype!r} is not one of {DTYPES}")
        require(self.dtype in DTYPES, "model.dtype", f"{self.dtype!r} is not one of {DTYPES}")
        if self.lora_scale is not None:
            require_range(self.lora_scale, "model.lora_scale", gt=0)
        require(0.0 <= self.lora_dropout < 1.0, "model.lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
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
        """Builds the config from a Hugging Face ``config.json`` dict (transformers 4 or 5 style).

        A missing key, a value of the wrong type or out of range raises ``ValueError`` naming ``source``
        and the key (as written in ``config.json``) before anything is built.
        """
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")  # noqa: TRY004 (a bad file)
        archs = hf.get("architectures") or []
        if not isinstance(archs, list):
            raise ValueError(  # noqa: TRY004 (a bad file, like every error here)
                f"{source}: key `architectures` must be a list of class names, got {archs!r}")
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
        for key in ("rope_parameters", "rope_scaling"):
            if not isinstance(hf.get(key) or {}, dict):
                raise ValueError(f"{source}: key `{key}` must be an object, got {hf[key]!r}")  # noqa: TRY004
        rope = dict(hf.get("rope_parameters") or {})
        legacy = hf.get("rope_scaling") or {}
        if rope.get("rope_theta") is not None:
            rope_theta = _hf_field(rope, "rope_theta", "number", source=source, prefix="rope_parameters.")
        else:
            rope_theta = _hf_field(hf, "rope_theta", "number", source=source, default=10_000.0)
        params = rope if rope.get("rope_type", "default") != "default" else dict(legacy)
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type not in ROPE_TYPES:
            raise ValueError(f"{source}: rope type {rope_type!r} is not one of {ROPE_TYPES}")
        rope_scaling = None
        if rope_type != "default":
            prefix = "rope_parameters." if params is rope else "rope_scaling."
            kinds = {"factor": "number", "low_freq_factor": "number", "high_freq_factor": "number",
                     "original_max_position_embeddings": "int"}
            scaling = {k: _hf_field(params, k, kind, source=source, prefix=prefix)
                       for k, kind in kinds.items() if params.get(k) is not None}
            if "factor" not in scaling:
                raise ValueError(f"{source}: missing key `{prefix}factor` (rope type {rope_type!r})")
            rope_scaling = (rope_type, scaling)
        num_heads = _hf_field(hf, "num_attention_heads", "int", source=source)
        hidden_size = _hf_field(hf, "hidden_size", "int", source=source)
        num_kv_heads = _hf_field(hf, "num_key_value_heads", "int", source=source, default=num_heads)
        if num_heads % num_kv_heads:
            raise ValueError(f"{source}: key `num_attention_heads`={num_heads} must be a multiple of "
                             f"`num_key_value_heads`={num_kv_heads}")
        head_dim = _hf_field(hf, "head_dim", "int", source=source, default=hidden_size // num_heads)
        if head_dim < 1 or head_dim % 2:
            named = "`head_dim`" if hf.get("head_dim") is not None else "`hidden_size` // `num_attention_heads`"
            raise ValueError(f"{source}: {named} = {head_dim}; a head's width must be even and >= 2 (RoPE)")
        eos = hf.get("eos_token_id")
        if isinstance(eos, list):
            eos = tuple(_hf_field({"eos_token_id": e}, "eos_token_id", "id", source=source) for e in eos)
        else:
            eos = _hf_field(hf, "eos_token_id", "id", source=source, default=None)
        kwargs = dict(
            vocab_size=_hf_field(hf, "vocab_size", "int", source=source),
            hidden_size=hidden_size,
            intermediate_size=_hf_field(hf, "intermediate_size", "int", source=source),
            num_layers=_hf_field(hf, "num_hidden_layers", "int", source=source),
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=_hf_field(hf, "rms_norm_eps", "number", source=source, default=1e-6),
            rope_theta=float(rope_theta),
            max_position_embeddings=_hf_field(hf, "max_position_embeddings", "int", source=source, default=2048),
            tie_word_embeddings=_hf_field(hf, "tie_word_embeddings", "bool", source=source, default=False),
            attention_bias=True if arch == "qwen2" else _hf_field(hf, "attention_bias", "bool", source=source,
                                                                  default=False),
            architecture=arch,
            bos_token_id=_hf_field(hf, "bos_token_id", "id", source=source, default=None),
            eos_token_id=eos,
            pad_token_id=_hf_field(hf, "pad_token_id", "id", source=source, default=None),
        )
        kwargs.update(overrides)
        try:  # what ModelConfig / RopeScaling still refuse: named with the file
            if rope_scaling is not None:
                rope_scaling = RopeScaling(rope_type=rope_scaling[0], **rope_scaling[1])
            return cls(rope_scaling=rope_scaling, **kwargs)
        except ValueError as e:
            raise ValueError(f"{source}: {e}") from None

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


# ------------------------------------------------------------------------------------------------
# Hugging Face config.json fields
# ------------------------------------------------------------------------------------------------

_REQUIRED = object()
_HF_KINDS = {  # kind -> (test, what the message says it must be, Python type of the value returned)
    "int": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1, "an integer >= 1", int),
    "number": (lambda v: isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0,
               "a finite number > 0", float),
    "bool": (lambda v: isinstance(v, (bool, np.bool_)), "true or false", bool),
    "id": (lambda v: isinstance(v, numbers.Integral) and not isinstance(v, bool), "an integer token id", int),
}


def _hf_field(hf: dict, key: str, kind: str, *, source: str, default: Any = _REQUIRED, prefix: str = "") -> Any:
    """``hf[key]`` if it is of ``kind`` (a key of ``_HF_KINDS``), ``default`` when absent or null;
    otherwise ``ValueError`` naming ``source`` and the key (``prefix`` + ``key``, as in config.json)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ValueError(f"{source}: missing key `{prefix}{key}`")
        return default
    test, expected, python_type = _HF_KINDS[kind]
    if not test(value):
        raise ValueError(f"{source}: key `{prefix}{key}` must be {expected}, got {value!r}")
    return python_type(value)
