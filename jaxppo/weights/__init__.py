"""Weights and tokenizers in and out: Hugging Face safetensors directories and GGUF files."""

from jaxppo.weights.hf import hf_from_params, load_pretrained, params_from_hf, save_pretrained
from jaxppo.weights.tokenizer import Tokenizer

__all__ = ["Tokenizer", "hf_from_params", "load_pretrained", "params_from_hf", "save_pretrained"]
