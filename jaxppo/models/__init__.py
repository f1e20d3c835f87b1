"""Flax Llama-family decoder (Llama 2/3, SmolLM2, Qwen2), its heads, and helpers."""

from jaxppo.models.config import ModelConfig, RopeScaling
from jaxppo.models.heads import (
    causal_lm_logits,
    chosen_logprobs,
    init_params,
    init_scalar_head,
    last_real_index,
    lm_logits,
    scalar_head,
    scalar_outputs,
    sequence_scores,
)
from jaxppo.models.llama import KVCache, decoder_hidden, positions_from_mask

__all__ = [
    "KVCache", "ModelConfig", "RopeScaling", "causal_lm_logits", "chosen_logprobs", "decoder_hidden",
    "init_params", "init_scalar_head", "last_real_index", "lm_logits", "positions_from_mask",
    "scalar_head", "scalar_outputs", "sequence_scores",
]
