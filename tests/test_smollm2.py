"""The real SmolLM2-135M-Instruct from its GGUF: logits and greedy completions equal transformers'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxppo.models import decoder_hidden, lm_logits
from jaxppo.sampling import SamplingParams, make_sampler
from jaxppo.weights import save_pretrained

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a poet."}, {"role": "user", "content": "Write one line about the sea."}],
    [{"role": "user", "content": "List three colours."}],
]
NEW_TOKENS = 24


def left_pad(rows, pad_id):
    length = max(map(len, rows))
    tokens = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        tokens[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return tokens, mask


def test_config_and_tokenizer(smollm2):
    config, params, tokenizer = smollm2
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert config.vocab_size == 49152 and config.tie_word_embeddings and config.rope_theta == 1e5
    assert "lm_head" not in params and params["layers"]["attn"]["qkv_proj"]["kernel"].shape == (30, 576, 3, 5, 64)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id == tokenizer.eos_token_id
    assert 100e6 < config.num_params < 170e6


def test_logits_match_transformers(smollm2, smollm2_hf):
    config, params, tokenizer = smollm2
    tokens, mask = left_pad([tokenizer.encode_chat(c) for c in CHATS], tokenizer.pad_token_id)
    @jax.jit
    def logits(params, tokens, mask):  # the production trunk and LM head
        return lm_logits(config, params, decoder_hidden(config, params, tokens, mask)[0])

    ours = np.asarray(logits(params, jnp.asarray(tokens), jnp.asarray(mask)))
    with torch.no_grad():
        theirs = smollm2_hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                            attention_mask=torch.tensor(mask, dtype=torch.long)).logits.numpy()
    diff = np.abs(ours - theirs)[mask > 0]
    assert diff.max() <= 1e-3, diff.max()


def test_greedy_completions_match_transformers_generate(smollm2, smollm2_hf):
    config, params, tokenizer = smollm2
    prompts = [tokenizer.encode_chat(c) for c in CHATS]
    tokens, mask = left_pad(prompts, tokenizer.pad_token_id)
    sampling = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.0, stop_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id)
    out = make_sampler(config, sampling)(params, jnp.asarray(tokens), jnp.asarray(mask), jax.random.key(0))
    for row, prompt in enumerate(prompts):  # transformers runs each prompt unpadded
        with torch.no_grad():
            generated = smollm2_hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                                            do_sample=False, max_new_tokens=NEW_TOKENS,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        expected = generated[0, len(prompt):].tolist()
        length = int(np.asarray(out.mask[row]).sum())
        got = np.asarray(out.tokens[row, :length]).tolist()
        assert got == expected, (tokenizer.decode(got), tokenizer.decode(expected))
        assert len(tokenizer.decode(got).split()) >= 2  # a real answer, not an empty string


def test_export_loads_in_transformers_with_tokenizer(smollm2, smollm2_hf, tmp_path):
    config, params, tokenizer = smollm2
    save_pretrained(tmp_path, config, params, tokenizer)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for chat in CHATS:
        text = hf_tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert text == tokenizer.apply_chat_template(chat)
        assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokenizer.encode_chat(chat)
    ids = torch.tensor([tokenizer.encode_chat(CHATS[0])])
    with torch.no_grad():
        np.testing.assert_array_equal(exported(ids).logits.numpy(), smollm2_hf(ids).logits.numpy())
