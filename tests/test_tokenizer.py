"""The GGUF-built Tokenizer against transformers' tokenizer for the same GGUF (the reference)."""

import json

import gguf
import numpy as np
import pytest
import transformers

from jaxppo.weights.gguf import smollm2_gguf_path
from jaxppo.weights.tokenizer import Tokenizer

TEXTS = [
    "",
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    " leading space and trailing space ",
    "I'm sure they'll say it's fine, don't you think? We've seen it.",
    "12345 and 3.14159, 1,000,000 and 2024-06-01; x=42",
    "a  1 b   22\t3\n4",
    "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "multiple   internal    spaces\t\ttabs\r\nwindows newline\n\n\n",
    "Café naïve résumé façade Ångström",
    "emoji 🙂👍🏽 and flags 🇫🇷 done",
    "你好，世界！这是一个测试。",
    "日本語のテキスト、한국어 텍스트, Русский текст, العربية",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "text<|im_end|>glued<|im_start|>to<|endoftext|>specials",
    "<|im_start |> is not special, nor <im_end>",
    "\u200b zero width \u00a0 nbsp \u3000 ideographic space",
]

ONE_TURN = [{"role": "user", "content": "What is the capital of France?"}]
MULTI_TURN = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Hi!"},
    {"role": "assistant", "content": "Hello. How can I help?"},
    {"role": "user", "content": "Count to 3 in French:\n1 2 3"},
]


@pytest.fixture(scope="module")
def ours():
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def reference():
    path = smollm2_gguf_path()
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def saved(ours, tmp_path_factory):
    return ours.save(tmp_path_factory.mktemp("tokenizer"))


def test_special_tokens(ours, reference):
    assert ours.vocab_size == len(reference) == 49152
    assert (ours.bos_token, ours.eos_token, ours.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 2)
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id, ours.unk_token_id) == (
        reference.bos_token_id, reference.eos_token_id, reference.pad_token_id, reference.unk_token_id,
    )
    assert ours.special_tokens["<|im_start|>"] == 1 and ours.special_tokens["<|endoftext|>"] == 0
    assert set(ours.special_tokens) == set(reference.all_special_tokens) | {
        t.content for t in reference.added_tokens_decoder.values() if t.special
    }
    assert ours.add_bos_token is False


@pytest.mark.parametrize("add_special_tokens", [False, True])
def test_encode_matches_transformers(ours, reference, add_special_tokens):
    for text in TEXTS:
        expected = reference.encode(text, add_special_tokens=add_special_tokens)
        assert ours.encode(text, add_special_tokens=add_special_tokens) == expected, text
    assert ours.encode("<|im_start|>user")[0] == 1  # special tokens in text are matched whole


def test_decode_round_trip(ours, reference):
    for text in TEXTS:
        ids = ours.encode(text)
        assert ours.decode(ids) == text
        assert ours.decode(np.asarray(ids, dtype=np.int32)) == text
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    assert ours.decode([1, 4093, 198, 2], skip_special_tokens=True) == "user\n"


@pytest.mark.parametrize("messages", [ONE_TURN, MULTI_TURN], ids=["one_turn", "multi_turn"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(ours, reference, messages, add_generation_prompt):
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    expected_ids = reference.apply_chat_template(
        messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.encode_chat(messages, add_generation_prompt=add_generation_prompt) == list(expected_ids)


def test_chat_template_shape(ours):
    text = ours.apply_chat_template(ONE_TURN)
    # No system message given: SmolLM2's template injects its default one.
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    assert ours.apply_chat_template(MULTI_TURN).count("<|im_start|>system") == 1


def test_save_loads_in_transformers(ours, reference, saved):
    loaded = transformers.AutoTokenizer.from_pretrained(str(saved))
    for text in TEXTS:
        assert loaded.encode(text, add_special_tokens=True) == reference.encode(text, add_special_tokens=True), text
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text), text
    assert (loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id, loaded.unk_token_id) == (1, 2, 2, 0)
    assert loaded.apply_chat_template(MULTI_TURN, tokenize=False, add_generation_prompt=True) == (
        ours.apply_chat_template(MULTI_TURN)
    )
    config = json.loads((saved / "tokenizer_config.json").read_text())
    assert config["chat_template"] == ours.chat_template
    assert json.loads((saved / "special_tokens_map.json").read_text())["eos_token"] == "<|im_end|>"


def test_from_files_round_trip(ours, saved):
    again = Tokenizer.from_files(saved)
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text), text
    assert again.special_tokens == ours.special_tokens
    assert again.chat_template == ours.chat_template
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (1, 2, 2)
    assert again.encode_chat(MULTI_TURN) == ours.encode_chat(MULTI_TURN)
    assert again.model_max_length == ours.model_max_length == 8192


def test_from_files_reads_transformers_save(ours, reference, tmp_path):
    # transformers 5 writes the template to chat_template.jinja instead of tokenizer_config.json.
    reference.save_pretrained(tmp_path)
    loaded = Tokenizer.from_files(tmp_path)
    assert loaded.encode(TEXTS[5]) == ours.encode(TEXTS[5])
    assert loaded.special_tokens_map == ours.special_tokens_map
    assert loaded.apply_chat_template(MULTI_TURN) == ours.apply_chat_template(MULTI_TURN)


def test_llama_cpp_pre_tokenizer(ours):
    """llama.cpp's "smollm" pre-tokenizer (also SmolLM2's original tokenizer.json) isolates digits;
    transformers' GGUF loader does not. They differ only on whitespace runs followed by a digit."""
    strict = Tokenizer.from_gguf(smollm2_gguf_path(), match="llama.cpp")
    assert ours.encode("a  1") == [81, 216, 216, 33]
    assert strict.encode("a  1") == [81, 256, 33]  # "ĠĠ" then "1"
    for text in TEXTS:
        if not any(a.isspace() and b.isdigit() for a, b in zip(text, text[1:])):
            assert strict.encode(text) == ours.encode(text), text
        assert strict.decode(strict.encode(text)) == text


def test_errors(tmp_path, ours):
    bad = tmp_path / "not.gguf"
    bad.write_text("hello")
    with pytest.raises(ValueError, match="not.gguf"):
        Tokenizer.from_gguf(bad)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_files(tmp_path)
    with pytest.raises(ValueError, match="match"):
        Tokenizer.from_gguf(smollm2_gguf_path(), match="sentencepiece")
    with pytest.raises(ValueError, match="chat template"):
        Tokenizer(ours.backend).apply_chat_template(ONE_TURN)
    spm = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(str(spm), "llama")
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"spm\.gguf.*'llama'"):
        Tokenizer.from_gguf(spm)
