"""Dataset files -> arrays: formats agree, chat templates, padding and masks, truncation, errors, batches.

Expected ids come either from a hand-made word-level tokenizer (``w<i>`` has id ``3 + i``, EOS 1, BOS 2)
or from calling the SmolLM2 tokenizer directly, never from `jaxppo.data` itself.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from jaxppo.data import (
    FORMATS,
    DataError,
    TextFormat,
    batch_indices,
    check_token_ids,
    load_demonstrations,
    load_preferences,
    load_prompts,
    load_rankings,
    read_records,
)
from jaxppo.weights.tokenizer import Tokenizer

EOS, BOS = 1, 2
PLAIN = TextFormat(chat_template=False, max_prompt_tokens=5, max_response_tokens=4)


def w(*ids: int) -> str:
    """Text of words whose tiny-tokenizer ids are ``ids`` (``w<i>`` is id ``3 + i``)."""
    return " ".join(f"w{i - 3}" for i in ids)


def make_tiny(**kwargs) -> Tokenizer:
    vocab = {"<unk>": 0, "<eos>": EOS, "<bos>": BOS, **{f"w{i}": 3 + i for i in range(40)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_token="<eos>", bos_token="<bos>", chat_template=None, **kwargs)


@pytest.fixture(scope="module")
def tiny():
    return make_tiny()


@pytest.fixture(scope="module")
def smol():
    from jaxppo.weights.gguf import smollm2_gguf_path

    return Tokenizer.from_gguf(smollm2_gguf_path())  # installed by `make setup`: missing is a failure


def write(path, records) -> str:
    """Write ``records`` as .jsonl / .json / .parquet by the suffix of ``path``."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif path.suffix == ".json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    else:
        keys = list(dict.fromkeys(k for r in records for k in r))  # from_pylist would use row 0's keys only
        pq.write_table(pa.table({k: [r.get(k) for r in records] for k in keys}), path)
    return str(path)


def write_lines(path, lines) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------------ formats


PAIRS = [
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "margin": 1.5},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
     "chosen": "Blue.", "rejected": "Seven."},
    {"prompt": "What is 2+2?", "chosen": "4", "rejected": "5", "margin": 3, "id": "extra fields are ignored"},
]


def test_read_records_is_the_same_for_every_format(tmp_path):
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"data": PAIRS}), encoding="utf-8")
    paths = [write(tmp_path / f"pairs{suffix}", PAIRS) for suffix in FORMATS] + [str(wrapped)]
    for path in paths:
        # Parquet has a column per field, so absent fields come back as None.
        records = [{k: v for k, v in r.items() if v is not None} for r in read_records(path)]
        assert records == PAIRS, path


def test_every_format_gives_the_same_arrays(tmp_path, smol):
    fmt = TextFormat(max_prompt_tokens=40, max_response_tokens=6)
    loaded = [load_preferences(write(tmp_path / f"pairs{suffix}", PAIRS), smol, fmt) for suffix in FORMATS]
    first = loaded[0].as_dict()
    for data in loaded[1:]:
        assert data.as_dict().keys() == first.keys()
        for key, array in data.as_dict().items():
            np.testing.assert_array_equal(array, first[key], err_msg=f"{data.source} {key}")
        assert (data.num_truncated, data.num_response_truncated) == (loaded[0].num_truncated, 0)
    np.testing.assert_array_equal(first["margin"], np.array([1.5, 0.0, 3.0], np.float32))
    # The messages record keeps its own system turn.
    ids = smol.encode_chat(PAIRS[1]["messages"])
    np.testing.assert_array_equal(first["prompt"][1, 40 - len(ids):], ids)


# ------------------------------------------------------------------------------------------ prompts


def left_padded(ids, width, pad):
    return [pad] * (width - len(ids)) + list(ids), [0] * (width - len(ids)) + [1] * len(ids)


def test_chat_template_prompts_equal_encode_chat_left_padded(tmp_path, smol):
    texts = ["Hi", "Write a haiku about rain, please.", "  spaces around  "]
    records = [{"prompt": t} for t in texts] + [{"messages": [
        {"role": "user", "content": "Count to 2."}, {"role": "assistant", "content": "1 2"},
        {"role": "user", "content": "Now to 3."}]}]
    data = load_prompts(write(tmp_path / "p.jsonl", records), smol, TextFormat(max_prompt_tokens=64))
    chats = [[{"role": "user", "content": t}] for t in texts] + [records[-1]["messages"]]
    assert smol.pad_token_id == smol.eos_token_id == 2  # so the mask cannot be read off the ids
    for row, chat in enumerate(chats):
        ids = smol.encode_chat(chat, add_generation_prompt=True)
        expected, expected_mask = left_padded(ids, 64, smol.pad_token_id)
        assert data.prompt[row].tolist() == expected
        assert data.prompt_mask[row].tolist() == expected_mask
        # EOS (<|im_end|>) closes the default system turn inside the prompt: a real, unmasked token.
        assert 2 in ids and (data.prompt[row][data.prompt_mask[row] == 1] == 2).any()
    assert data.texts == (*texts, "Now to 3.")
    assert data.num_truncated == 0 and len(data) == 4
    assert data.prompt.dtype == data.prompt_mask.dtype == np.int32
    assert data.as_dict().keys() == {"prompt", "prompt_mask"}


def test_system_prompt(tmp_path, smol):
    records = [{"prompt": "Hi"},
               {"messages": [{"role": "system", "content": "Own."}, {"role": "user", "content": "Hi"}]}]
    fmt = TextFormat(system_prompt="Be terse.", max_prompt_tokens=32)
    data = load_prompts(write(tmp_path / "p.jsonl", records), smol, fmt)
    ids = smol.encode_chat([{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi"}])
    assert data.prompt[0].tolist() == left_padded(ids, 32, 2)[0]
    ids = smol.encode_chat(records[1]["messages"])
    assert data.prompt[1].tolist() == left_padded(ids, 32, 2)[0]


def test_plain_prompts_hand_computed(tmp_path, tiny):
    path = write(tmp_path / "p.jsonl", [{"prompt": "w1 w2 w3"}, {"prompt": "w0"}])
    data = load_prompts(path, tiny, PLAIN)
    assert data.prompt.tolist() == [[EOS, EOS, 4, 5, 6], [EOS, EOS, EOS, EOS, 3]]
    assert data.prompt_mask.tolist() == [[0, 0, 1, 1, 1], [0, 0, 0, 0, 1]]
    with_bos = load_prompts(path, make_tiny(add_bos_token=True), PLAIN)
    assert with_bos.prompt.tolist() == [[EOS, BOS, 4, 5, 6], [EOS, EOS, EOS, BOS, 3]]
    assert with_bos.prompt_mask.tolist() == [[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]]


def test_plain_prompts_equal_encode(tmp_path, smol):
    texts = ["Hello, world!", "Tell me a joke about <|im_end|> tokens."]
    fmt = TextFormat(chat_template=False, max_prompt_tokens=20)
    data = load_prompts(write(tmp_path / "p.json", [{"prompt": t} for t in texts]), smol, fmt)
    for row, text in enumerate(texts):
        expected, expected_mask = left_padded(smol.encode(text), 20, 2)
        assert data.prompt[row].tolist() == expected
        assert data.prompt_mask[row].tolist() == expected_mask


def test_long_prompt_keeps_its_end(tmp_path, tiny, caplog):
    path = write(tmp_path / "p.jsonl", [{"prompt": w(*range(3, 13))}, {"prompt": "w1"}])
    with caplog.at_level(logging.WARNING, logger="jaxppo.data"):
        data = load_prompts(path, tiny, TextFormat(chat_template=False, max_prompt_tokens=4))
    assert data.prompt.tolist() == [[9, 10, 11, 12], [EOS, EOS, EOS, 4]]
    assert data.prompt_mask.tolist() == [[1, 1, 1, 1], [0, 0, 0, 1]]
    assert data.num_truncated == 1
    assert "1 of 2 prompts" in caplog.text and "p.jsonl" in caplog.text


def test_long_chat_prompt_keeps_the_generation_prompt(tmp_path, smol):
    text = "Please summarise the following long story for me. " * 4
    data = load_prompts(write(tmp_path / "p.jsonl", [{"prompt": text}]), smol, TextFormat(max_prompt_tokens=16))
    ids = smol.encode_chat([{"role": "user", "content": text}])
    assert len(ids) > 16 and data.num_truncated == 1
    assert data.prompt[0].tolist() == ids[-16:] and data.prompt_mask[0].tolist() == [1] * 16
    assert smol.decode(data.prompt[0]).endswith("<|im_start|>assistant\n")


def test_long_prompt_error_names_the_line(tmp_path, tiny):
    path = write_lines(tmp_path / "long.jsonl", ['{"prompt": "w1"}', "", json.dumps({"prompt": w(*range(3, 13))})])
    fmt = TextFormat(chat_template=False, max_prompt_tokens=4, truncation="error")
    with pytest.raises(DataError, match=r"long\.jsonl:3: the prompt is 10 tokens, longer than max_prompt_tokens=4"):
        load_prompts(path, tiny, fmt)


# ------------------------------------------------------------------------------------------ responses


def test_responses_end_with_eos_in_the_mask(tmp_path, smol):
    records = [{"prompt": "2+2?", "response": "4"}, {"prompt": "Greet me.", "response": "Hello there, friend!"}]
    data = load_demonstrations(write(tmp_path / "sft.jsonl", records), smol, TextFormat(max_response_tokens=10))
    for row, record in enumerate(records):
        ids = smol.encode(record["response"])
        n = len(ids) + 1
        assert data.response[row].tolist() == ids + [2] * (10 - len(ids))  # EOS then pads, all id 2
        assert data.response_mask[row].tolist() == [1] * n + [0] * (10 - n)
    assert data.num_response_truncated == 0
    assert data.as_dict().keys() == {"prompt", "prompt_mask", "response", "response_mask"}


def test_long_response_is_cut_and_loses_its_eos(tmp_path, tiny):
    records = [{"prompt": "w0", "response": "w1 w2"}, {"prompt": "w0", "response": "w1 w2 w3"},
               {"prompt": "w0", "response": "w1"}, {"prompt": "w0", "response": "w1 w2 w3 w4 w5"}]
    path = write(tmp_path / "sft.jsonl", records)
    data = load_demonstrations(path, tiny, TextFormat(chat_template=False, max_response_tokens=3))
    assert data.response.tolist() == [[4, 5, EOS], [4, 5, 6], [4, EOS, EOS], [4, 5, 6]]
    assert data.response_mask.tolist() == [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
    assert data.num_response_truncated == 2
    raw = load_demonstrations(path, tiny, TextFormat(chat_template=False, max_response_tokens=3, append_eos=False))
    assert raw.response.tolist() == [[4, 5, EOS], [4, 5, 6], [4, EOS, EOS], [4, 5, 6]]
    assert raw.response_mask.tolist() == [[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]]
    assert raw.num_response_truncated == 1


def test_preferences_hand_computed(tmp_path, tiny):
    records = [{"prompt": "w0", "chosen": "w1 w2", "rejected": "w3", "margin": 2},
               {"prompt": "w4 w5", "chosen": "w6", "rejected": "w7 w8 w9 w10"}]
    data = load_preferences(write(tmp_path / "pairs.parquet", records), tiny, PLAIN)
    assert data.prompt.tolist() == [[EOS, EOS, EOS, EOS, 3], [EOS, EOS, EOS, 7, 8]]
    assert data.chosen.tolist() == [[4, 5, EOS, EOS], [9, EOS, EOS, EOS]]
    assert data.chosen_mask.tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert data.rejected.tolist() == [[6, EOS, EOS, EOS], [10, 11, 12, 13]]
    assert data.rejected_mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert data.margin.dtype == np.float32 and data.margin.tolist() == [2.0, 0.0]
    assert data.num_response_truncated == 1 and len(data) == 2
    assert list(data.as_dict()) == ["prompt", "prompt_mask", "chosen", "chosen_mask", "rejected",
                                    "rejected_mask", "margin"]
    batch = data.take(np.array([1]))
    assert batch["rejected"].tolist() == [[10, 11, 12, 13]] and batch["margin"].tolist() == [0.0]


def test_rankings_hand_computed(tmp_path, tiny):
    records = [{"prompt": "w0", "responses": ["w1", "w2 w3", "w4"]},
               {"prompt": "w5", "responses": ["w6 w7 w8", "w9", "w10 w11"]}]
    data = load_rankings(write(tmp_path / "ranks.json", records), tiny, PLAIN)
    assert data.responses.shape == data.response_mask.shape == (2, 3, 4)
    assert data.responses.tolist() == [
        [[4, EOS, EOS, EOS], [5, 6, EOS, EOS], [7, EOS, EOS, EOS]],
        [[9, 10, 11, EOS], [12, EOS, EOS, EOS], [13, 14, EOS, EOS]],
    ]
    assert data.response_mask.sum(-1).tolist() == [[2, 3, 2], [4, 2, 3]]
    assert list(data.as_dict()) == ["prompt", "prompt_mask", "responses", "response_mask"]


# ------------------------------------------------------------------------------------------ errors


OK = '{"prompt": "w1", "response": "w2"}'
BAD_LINES = [
    (load_demonstrations, [OK, OK, '{"prompt": "w1", "response": }'], r"bad\.jsonl:3: invalid JSON"),
    (load_demonstrations, [OK, "[1, 2]"], r"bad\.jsonl:2: expected a JSON object"),
    (load_demonstrations, [OK, '{"prompt": "w1", "answer": "w2"}'],
     r"bad\.jsonl:2: missing field 'response'; expected 'prompt' \(or 'messages'\) and 'response'"),
    (load_demonstrations, ['{"question": "w1", "response": "w2"}'], r"bad\.jsonl:1: missing field 'prompt'"),
    (load_demonstrations, [OK, "", '{"prompt": "  \\n ", "response": "w2"}'], r"bad\.jsonl:3: field 'prompt' is empty"),
    (load_demonstrations, [OK, '{"prompt": "w1", "response": ""}'], r"bad\.jsonl:2: field 'response' is empty"),
    (load_demonstrations, ['{"prompt": 3, "response": "w2"}'],
     r"bad\.jsonl:1: field 'prompt' must be a string, got int 3"),
    (load_demonstrations, ['{"prompt": "w1", "messages": [{"role": "user", "content": "w1"}], "response": "w2"}'],
     r"bad\.jsonl:1: give either 'prompt' or 'messages'"),
    (load_demonstrations, ['{"messages": [{"role": "user", "content": "w1"}], "response": "w2"}'],
     r"bad\.jsonl:1: a 'messages' record needs TextFormat\(chat_template=True\)"),
    (load_prompts, ['{"messages": [{"role": "user", "content": "w1"}, {"role": "assistant", "content": "w2"}]}'],
     r"bad\.jsonl:1: the last turn of 'messages' must be 'user'"),
    (load_prompts, ['{"messages": [{"role": "user"}]}'], r"bad\.jsonl:1: messages\[0\] must be an object"),
    (load_preferences, ['{"prompt": "w1", "chosen": "w2", "rejected": " "}'], r"bad\.jsonl:1: field 'rejected' is empty"),
    (load_preferences, ['{"prompt": "w1", "chosen": "", "rejected": "w3"}'], r"bad\.jsonl:1: field 'chosen' is empty"),
    (load_preferences, ['{"prompt": "w1", "chosen": "w2", "rejected": "w3", "margin": "big"}'],
     r"bad\.jsonl:1: field 'margin' must be a finite number"),
    (load_rankings, ['{"prompt": "w1", "responses": ["w2", "w3"]}', '{"prompt": "w1", "responses": ["w2", "w3"]}',
                     '{"prompt": "w1", "responses": ["w2", "w3", "w4"]}'],
     r"bad\.jsonl:3: field 'responses' has 3 responses but the first record \(.*bad\.jsonl:1\) has 2"),
    (load_rankings, ['{"prompt": "w1", "responses": ["w2"]}'], r"bad\.jsonl:1: .*at least 2"),
    (load_rankings, ['{"prompt": "w1", "responses": ["w2", ""]}'], r"bad\.jsonl:1: responses\[1\] is empty"),
]


@pytest.mark.parametrize("loader, lines, message", BAD_LINES)
def test_bad_records_name_file_and_line(tmp_path, tiny, loader, lines, message):
    path = write_lines(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError, match=message):
        loader(path, tiny, PLAIN)


def test_bad_items_and_rows_are_located(tmp_path, tiny):
    records = [{"prompt": "w1", "response": "w2"}, {"prompt": "w1", "response": ""}]
    with pytest.raises(DataError, match=r"bad\.json\[item 1\]: field 'response' is empty"):
        load_demonstrations(write(tmp_path / "bad.json", records), tiny, PLAIN)
    with pytest.raises(DataError, match=r"bad\.parquet\[row 1\]: field 'response' is empty"):
        load_demonstrations(write(tmp_path / "bad.parquet", records), tiny, PLAIN)
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "w1"},\n {"prompt": }\n]', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.json:3: invalid JSON"):
        read_records(broken)


def test_file_level_errors(tmp_path, tiny):
    with pytest.raises(DataError, match=r"data\.csv: unknown dataset format '\.csv'.*\.jsonl.*\.parquet"):
        read_records(tmp_path / "data.csv")
    with pytest.raises(DataError, match=r"missing\.jsonl: no such file.*\.jsonl, \.json, \.parquet"):
        read_records(tmp_path / "missing.jsonl")
    with pytest.raises(DataError, match=r"empty\.jsonl: no records"):
        load_prompts(write_lines(tmp_path / "empty.jsonl", [""]), tiny, PLAIN)
    with pytest.raises(DataError, match=r"p\.jsonl: .*no chat template"):
        load_prompts(write_lines(tmp_path / "p.jsonl", [OK]), tiny, TextFormat())


@pytest.mark.parametrize("kwargs, field", [
    ({"max_prompt_tokens": 0}, "max_prompt_tokens"), ({"max_response_tokens": 2.5}, "max_response_tokens"),
    ({"truncation": "right"}, "truncation"), ({"chat_template": False, "system_prompt": "x"}, "system_prompt"),
])
def test_text_format_validation(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TextFormat(**kwargs)


def test_check_token_ids():
    tokens = np.array([[1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12], [0, 0, 0, 0, 0, 0], [1, 2, 3, 4, 5, 50000]])
    mask = np.ones_like(tokens)
    with pytest.raises(DataError, match=r"^x\.jsonl: token id 50000 at row 3, position 5 is outside the "
                                        r"vocabulary \[0, 49152\)$"):
        check_token_ids(tokens, mask, 49152, where="x.jsonl")
    mask[3, 5] = 0
    check_token_ids(tokens, mask, 49152, where="x.jsonl")  # a masked-out id is never looked up
    tokens[1, 0] = -1
    with pytest.raises(DataError, match=r"token id -1 at row 1, position 0"):
        check_token_ids(tokens, mask, 49152, where="x.jsonl")
    with pytest.raises(DataError, match=r"token id 12 at row 1, position 5 .* \[0, 12\)"):
        check_token_ids(np.abs(tokens), mask, 12, where="x.jsonl")


def test_loaders_check_ids_against_the_model_vocabulary(tmp_path, tiny):
    path = write(tmp_path / "p.jsonl", [{"prompt": "w1"}, {"prompt": "w0 w9"}])
    with pytest.raises(DataError, match=r"p\.jsonl:2: prompt token id 12 at position 4 is outside the model's "
                                        r"vocabulary \[0, 10\)$"):
        load_prompts(path, tiny, PLAIN, vocab_size=10)


# ------------------------------------------------------------------------------------------ batches


def test_batch_indices_epochs_are_permutations():
    walk = [batch_indices(12, 4, seed=7, step=s) for s in range(9)]
    for epoch in range(3):
        rows = np.concatenate(walk[3 * epoch:3 * epoch + 3])
        assert sorted(rows.tolist()) == list(range(12))
        expected = np.random.default_rng([7, epoch]).permutation(12)
        np.testing.assert_array_equal(rows, expected)
    assert not np.array_equal(np.concatenate(walk[0:3]), np.concatenate(walk[3:6]))


def test_batch_indices_is_a_pure_function_of_its_arguments():
    walk = [batch_indices(10, 3, seed=1, step=s) for s in range(12)]
    for step in (0, 2, 3, 7, 11):  # a resumed run asks for one step directly
        np.testing.assert_array_equal(batch_indices(10, 3, seed=1, step=step), walk[step])
    for epoch in range(4):  # 3 batches an epoch, the 10th row left out: 9 distinct rows
        rows = np.concatenate(walk[3 * epoch:3 * epoch + 3])
        assert len(set(rows.tolist())) == 9
        np.testing.assert_array_equal(rows, np.random.default_rng([1, epoch]).permutation(10)[:9])
    other = [batch_indices(10, 3, seed=2, step=s) for s in range(12)]
    assert not np.array_equal(np.concatenate(walk), np.concatenate(other))
    assert all(b.shape == (3,) for b in walk)


def test_batch_indices_validation():
    with pytest.raises(ValueError, match="batch_size=5 is larger than the dataset"):
        batch_indices(4, 5, seed=0, step=0)
    with pytest.raises(ValueError, match="step"):
        batch_indices(4, 2, seed=0, step=-1)


def test_text_task_prompts_repeat_whole_epochs_when_asked_for_more_than_the_file(tmp_path, tiny):
    from jaxppo.tasks import TextTask, TextTaskConfig

    path = tmp_path / "prompts.jsonl"
    write(path, [{"prompt": w(3 + i)} for i in range(10)])  # prompt i is the single token 3 + i
    config = TextTaskConfig(prompts=str(path), eval_prompts=2, chat_template=False, max_prompt_tokens=3)
    task = TextTask(config, tiny, seed=0, vocab_size=64)
    train_ids = sorted(set(range(3, 13)) - {int(t[-1]) for t in np.asarray(task.eval_prompts()[0])})
    prompt, mask = task.prompts("rm", 0, 20)
    ids = np.asarray(prompt)[:, -1]
    assert prompt.shape == (20, 3) and np.asarray(mask)[:, -1].all()
    # 8 training prompts: two whole reshuffled epochs, then the first 4 of a third
    assert sorted(ids[:8]) == train_ids and sorted(ids[8:16]) == train_ids
    assert set(ids[16:]) <= set(train_ids) and len(set(ids[16:])) == 4
    np.testing.assert_array_equal(np.asarray(task.prompts("rm", 0, 20)[0]), np.asarray(prompt))  # deterministic
    assert not np.array_equal(np.asarray(task.prompts("rm", 1, 20)[0]), np.asarray(prompt))
