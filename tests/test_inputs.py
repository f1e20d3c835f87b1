"""Inputs a run can trust: every malformed input file or mismatched model / tokenizer is refused before any
compute, with one message naming the file and its line, key or config field.

Cases: a tokenizer with ids the model has no embedding for, deeply nested JSON, preference pairs / ranked
lists whose responses are the same tokens (dropped and counted), malformed Hugging Face ``config.json``,
safetensors, shard index and tokenizer files.
"""

from __future__ import annotations

import json
import logging

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from jaxppo.data import (
    DataError,
    TextFormat,
    load_preferences,
    load_rankings,
    read_records,
)
from jaxppo.models.config import ModelConfig
from jaxppo.tasks import TextTask, TextTaskConfig, check_tokenizer
from jaxppo.weights.hf import load_pretrained, read_model_config
from jaxppo.weights.tokenizer import Tokenizer

PLAIN = TextFormat(chat_template=False, max_prompt_tokens=4, max_response_tokens=3)


def word_tokenizer(words: int = 10, eos_last: bool = False) -> Tokenizer:
    """``<unk>`` 0, ``<eos>`` 1 and ``w<i>`` = 2 + i; with ``eos_last``: ``w<i>`` = 1 + i and ``<eos>`` = words + 1."""
    if eos_last:
        vocab = {"<unk>": 0, **{f"w{i}": 1 + i for i in range(words)}, "<eos>": words + 1}
    else:
        vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": 2 + i for i in range(words)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_token="<eos>", unk_token="<unk>", chat_template=None)


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------ model vs tokenizer


def test_a_tokenizer_larger_than_the_model_warns_and_a_record_using_an_id_past_it_is_refused(tmp_path, caplog):
    """Before: ids were checked against the tokenizer's size, so a model smaller than its tokenizer got
    NaN logits and the run died blaming `reward_model.num_prompts`."""
    tokenizer = word_tokenizer(words=10)  # ids 0..11
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "w0 w1"}, {"prompt": "w2 w3"}, {"prompt": "w9"}])
    config = TextTaskConfig(prompts=prompts, chat_template=False, eval_prompts=1)
    with caplog.at_level("WARNING", logger="jaxppo.tasks"):
        with pytest.raises(DataError, match=r"prompts\.jsonl:3: .*token id 11 .*outside the model's vocabulary "
                                            r"\[0, 10\)"):
            TextTask(config, tokenizer, seed=0, vocab_size=10)
    assert ("model.vocab_size: the model has 10 embedding rows but its tokenizer has 2 ids outside [0, 10) "
            "(the largest: 'w9' = 11)") in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="jaxppo.tasks"):
        check_tokenizer(tokenizer, 12)  # a model at least as large as its tokenizer is fine (Qwen2 pads its rows)
        check_tokenizer(tokenizer, 64)
    assert caplog.text == ""


def test_a_special_token_outside_the_model_is_named():
    tokenizer = word_tokenizer(words=10, eos_last=True)  # <eos> = 11
    with pytest.raises(ValueError, match=r"config field `model\.vocab_size`: the tokenizer's eos_token '<eos>' has "
                                         r"id 11, outside the model's vocabulary \[0, 11\)"):
        check_tokenizer(tokenizer, 11)
    with pytest.raises(ValueError, match=r"config field `pretrained`: .*no tokenizer"):
        check_tokenizer(None, 11)


def test_file_ids_are_checked_against_the_model_vocabulary_naming_the_line(tmp_path):
    tokenizer = word_tokenizer(words=10)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "w0", "chosen": "w1", "rejected": "w2"},
                                                   {"prompt": "w0", "chosen": "w1", "rejected": "w2 w9"}])
    with pytest.raises(DataError, match=r"pairs\.jsonl:2: 'rejected' token id 11 at position 1 is outside the "
                                        r"model's vocabulary \[0, 8\)$"):
        load_preferences(pairs, tokenizer, PLAIN, vocab_size=8)
    ranks = write_jsonl(tmp_path / "ranks.jsonl", [{"prompt": "w0", "responses": ["w1", "w2"]},
                                                   {"prompt": "w0", "responses": ["w1", "w2"]},
                                                   {"prompt": "w0", "responses": ["w1", "w8"]}])
    with pytest.raises(DataError, match=r"ranks\.jsonl:3: responses\[1\] token id 10 at position 0"):
        load_rankings(ranks, tokenizer, PLAIN, vocab_size=8)


# ------------------------------------------------------------------------------------- nesting


def test_deeply_nested_json_names_file_and_line(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    jsonl = tmp_path / "deep.jsonl"
    jsonl.write_text('{"prompt": "w1"}\n\n{"prompt": ' + deep + "}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.jsonl:3: JSON nested too deeply to read$"):
        read_records(jsonl)
    array = tmp_path / "deep.json"
    array.write_text('[\n {"prompt": "w1 [ { \\" ]"},\n {"prompt": ' + deep + "}\n]", encoding="utf-8")
    with pytest.raises(DataError, match=r"deep\.json:3: JSON nested too deeply to read$"):
        read_records(array)


# ------------------------------------------------------------------------------ identical responses


def test_pairs_with_identical_responses_are_dropped_and_counted(tmp_path, caplog):
    tokenizer = word_tokenizer(words=10)
    records = [{"prompt": "w0", "chosen": "w1", "rejected": "w2", "margin": 1.0},
               {"prompt": "w0", "chosen": "w3", "rejected": "w3", "margin": 2.0},  # same text
               {"prompt": "w4", "chosen": "w5", "rejected": "w6", "margin": 3.0},
               {"prompt": "w0", "chosen": "w1 w2 w3 w4", "rejected": "w1 w2 w3 w5", "margin": 4.0}]  # same once cut
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    with caplog.at_level(logging.WARNING, logger="jaxppo.data"):
        data = load_preferences(path, tokenizer, PLAIN)
    assert len(data) == 2 and data.num_identical == 2
    assert data.margin.tolist() == [1.0, 3.0]  # the kept rows, in file order
    assert data.chosen.tolist() == [[3, 1, 1], [7, 1, 1]] and data.rejected.tolist() == [[4, 1, 1], [8, 1, 1]]
    assert "dropped 2 of 4 records in which 'chosen' and 'rejected' are the same tokens" in caplog.text
    assert "pairs.jsonl:2, " in caplog.text and "pairs.jsonl:4)" in caplog.text

    task = TextTask(TextTaskConfig(prompts=write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w1"}] * 3),
                                   preferences=path, eval_prompts=1, chat_template=False, max_response_tokens=3),
                    tokenizer, seed=0, vocab_size=12)
    assert task.num_identical_preferences == 2 and task.preference_file()["chosen"].shape[0] == 2

    only = write_jsonl(tmp_path / "only.jsonl", [records[1]])
    with pytest.raises(DataError, match=r"only\.jsonl: in every record \(all 1\) 'chosen' and 'rejected' are "):
        load_preferences(only, tokenizer, PLAIN)


def test_ranked_lists_with_a_response_twice_are_dropped_and_counted(tmp_path):
    tokenizer = word_tokenizer(words=10)
    records = [{"prompt": "w0", "responses": ["w1", "w2", "w3"]},
               {"prompt": "w0", "responses": ["w1", "w2", "w1"]},
               {"prompt": "w0", "responses": ["w4", "w5", "w6"]}]
    data = load_rankings(write_jsonl(tmp_path / "ranks.jsonl", records), tokenizer, PLAIN)
    assert data.num_identical == 1 and len(data) == 2
    assert data.responses[:, :, 0].tolist() == [[3, 4, 5], [6, 7, 8]]


# ------------------------------------------------------------------------------ Hugging Face files


SMALL = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    head_dim=4, tie_word_embeddings=True)


def hf_dir(tmp_path, **changes):
    hf = SMALL.to_hf_dict()
    for key, value in changes.items():
        if value is KeyError:
            del hf[key]
        else:
            hf[key] = value
    (tmp_path / "config.json").write_text(json.dumps(hf))
    return tmp_path


@pytest.mark.parametrize("changes, message", [
    ({"hidden_size": KeyError}, r"missing key `hidden_size`$"),
    ({"num_hidden_layers": None}, r"missing key `num_hidden_layers`$"),
    ({"hidden_size": "8"}, r"key `hidden_size` must be an integer >= 1, got '8'$"),
    ({"vocab_size": 16.0}, r"key `vocab_size` must be an integer >= 1, got 16\.0$"),
    ({"num_attention_heads": 0, "head_dim": None}, r"key `num_attention_heads` must be an integer >= 1, got 0$"),
    ({"num_key_value_heads": 0}, r"key `num_key_value_heads` must be an integer >= 1, got 0$"),
    ({"num_key_value_heads": 3}, r"key `num_attention_heads`=2 must be a multiple of `num_key_value_heads`=3$"),
    ({"head_dim": None, "num_attention_heads": 16}, r"`hidden_size` // `num_attention_heads` = 0; .*even"),
    ({"head_dim": 3}, r"`head_dim` = 3; a head's width must be even"),
    ({"rms_norm_eps": "1e-5"}, r"key `rms_norm_eps` must be a finite number > 0, got '1e-5'$"),
    ({"tie_word_embeddings": "false"}, r"key `tie_word_embeddings` must be true or false, got 'false'$"),
    ({"eos_token_id": [2, "x"]}, r"key `eos_token_id` must be an integer token id, got 'x'$"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": "2"}},
     r"key `rope_parameters\.factor` must be a finite number > 0, got '2'$"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, r"missing key `rope_parameters\.factor`"),
    ({"rope_parameters": [1]}, r"key `rope_parameters` must be an object"),
    ({"architectures": "LlamaForCausalLM"}, r"key `architectures` must be a list"),
])
def test_malformed_config_json_names_the_file_and_key(tmp_path, changes, message):
    directory = hf_dir(tmp_path, **changes)
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        read_model_config(directory)
    with pytest.raises(ValueError, match=rf"config\.json: {message}"):
        load_pretrained(directory)  # fails on config.json: model.safetensors is never looked for


def test_config_json_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json: expected a JSON object, got list"):
        load_pretrained(tmp_path)


def test_a_range_error_of_the_model_config_names_the_file(tmp_path):
    directory = hf_dir(tmp_path, rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 0.5})
    with pytest.raises(ValueError, match=r"config\.json: .*rope_scaling\.factor"):
        read_model_config(directory)


def test_garbage_safetensors_names_the_file(tmp_path):
    directory = hf_dir(tmp_path)
    (directory / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(ValueError, match=r"model\.safetensors: not a readable safetensors file"):
        load_pretrained(directory)


@pytest.mark.parametrize("index, message", [
    ("{", r"model\.safetensors\.index\.json: invalid JSON at line 1"),
    ({"metadata": {}}, r"model\.safetensors\.index\.json: key `weight_map` must be a non-empty object"),
    ({"weight_map": {"model.norm.weight": "shard-1.safetensors"}},
     r"model\.safetensors\.index\.json: key `weight_map\.model\.norm\.weight` names shard-1\.safetensors, which "
     + r"is not in"),
    ({"weight_map": {"model.norm.weight": "../x.safetensors"}}, r"must be a file name in the same directory"),
])
def test_malformed_shard_index_names_the_file_and_key(tmp_path, index, message):
    directory = hf_dir(tmp_path)
    text = index if isinstance(index, str) else json.dumps(index)
    (directory / "model.safetensors.index.json").write_text(text)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        load_pretrained(directory)


def test_malformed_tokenizer_files_are_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("garbage")
    with pytest.raises(ValueError, match=r"tokenizer\.json: not a readable tokenizer"):
        Tokenizer.from_files(tmp_path)
    word_tokenizer().backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(ValueError, match=r"tokenizer_config\.json: not a readable JSON file"):
        Tokenizer.from_files(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "<end>"}')
    with pytest.raises(ValueError, match=r"eos_token '<end>' is not in the vocabulary .*tokenizer\.json"):
        Tokenizer.from_files(tmp_path)
