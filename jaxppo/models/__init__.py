"""Flax Llama-family decoder (Llama 2/3, SmolLM2, Qwen2), its heads, and helpers."""

from jaxppo.models.config import ModelConfig, RopeScaling
from jaxppo.models.heads import chosen_logprobs, init_params, init_scalar_head, lm_logits, scalar_head
from jaxppo.models.llama import KVCache, decoder_hidden, positions_from_mask

__all__ = [
    "KVCache", "ModelConfig", "RopeScaling", "chosen_logprobs", "decoder_hidden", "init_params",
    "init_scalar_head", "lm_logits", "positions_from_mask", "scalar_head",
]
