"""Verifiable rewards: reading the last number of a response, comparing it with the prompt file's answer,
the ``"answer"`` field of prompt files, and the shipped arithmetic prompts.

Expected values are written by hand, never computed by `jaxppo.verifiers` itself.
"""

from __future__ import annotations

import doctest
import json
import pathlib

import numpy as np
import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import models, pre_tokenizers

from experiments.make_arithmetic_data import make_records
from jaxppo.data import DataError, TextFormat, load_prompts
from jaxppo import verifiers
from jaxppo.verifiers import last_number, number_match
from jaxppo.weights.tokenizer import Tokenizer

ARITHMETIC = pathlib.Path(__file__).resolve().parent.parent / "data" / "arithmetic_prompts.jsonl"
PLAIN = TextFormat(chat_template=False, max_prompt_tokens=4)


def word_tokenizer() -> Tokenizer:
    vocab = {"<unk>": 0, "<eos>": 1, **{f"w{i}": 2 + i for i in range(10)}}
    backend = BackendTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return Tokenizer(backend, eos_token="<eos>", unk_token="<unk>", chat_template=None)


def write_jsonl(path, lines) -> str:
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines),
                    encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------ last_number


@pytest.mark.parametrize("text, expected", [
    ("85", "85"),
    ("The answer is 85.", "85"),           # the sentence's period is not a decimal point
    ("I think 84... no, 85", "85"),         # the last number wins
    ("37 + 48 = 85", "85"),
    ("-3", "-3"),
    ("The result is -3.", "-3"),
    ("x = −3", "-3"),                       # U+2212 minus sign
    ("10-3 = 7", "7"),
    ("10-3", "3"),                          # a minus glued to a number is subtraction, not a sign
    ("1,234", "1234"),
    ("It costs $1,234,567.", "1234567"),
    ("1,234.5", "1234.5"),
    ("3,4", "4"),                           # not a thousands group: a list
    ("1,2345", "2345"),
    ("85.0", "85.0"),                       # returned as written; number_match compares values
    ("pi is 3.14", "3.14"),
    ("085", "085"),
    ("", None),
    ("I don't know.", None),
    ("eighty-five", None),
])
def test_last_number(text, expected):
    assert last_number(text) == expected


def test_docstring_examples_hold():
    result = doctest.testmod(verifiers)
    assert result.attempted >= 9 and result.failed == 0


def test_last_number_refuses_non_strings():
    with pytest.raises(TypeError, match="must be a str"):
        last_number(85)


# ------------------------------------------------------------------------------ number_match


def test_number_match_by_hand():
    responses = ["The answer is 85.", "85", "I think 84... no, 85", "I think 85... no, 84", "85.0", "085",
                 "No idea.", "-3", "3", "1,234", "85", "8 5"]
    answers = ["85", "85", "85", "85", "85", "85", "85", "-3", "-3", "1234", None, "85"]
    expected = [1, 1, 1, 0, 1, 1, 0, 1, 0, 1, 0, 0]
    scores = number_match(["q"] * len(responses), responses, answers)
    assert scores.dtype == np.float64 and scores.shape == (len(responses),)
    np.testing.assert_array_equal(scores, expected)


def test_number_match_reads_answers_as_numbers():
    responses = ["1234", "2.5", "2.50", "0.1000001", "-0", "7"]
    answers = ["1,234", "2.50", "2.5", "0.1", "0", " 7 "]
    np.testing.assert_array_equal(number_match([""] * 6, responses, answers), [1, 1, 1, 0, 1, 1])


def test_number_match_empty_batch():
    scores = number_match([], [], [])
    assert scores.dtype == np.float64 and scores.shape == (0,)


@pytest.mark.parametrize("answer", ["eighty-five", "", "85 apples", "1e5", "--3"])
def test_number_match_refuses_an_answer_that_is_not_a_number(answer):
    with pytest.raises(ValueError, match="is not a number"):
        number_match(["q"], ["85"], [answer])


def test_number_match_refuses_unequal_lengths():
    with pytest.raises(ValueError, match="2 prompts, 1 responses and 2 answers"):
        number_match(["a", "b"], ["1"], ["1", "2"])


# ------------------------------------------------------------------------------ answers in prompt files


def test_load_prompts_keeps_answers(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "w0", "answer": "85"},
        {"prompt": "w1"},                       # no answer
        {"prompt": "w2", "answer": 85},         # numbers become strings
        {"prompt": "w3", "answer": -2.5},
        {"prompt": "w4", "answer": None},       # null counts as absent
    ])
    data = load_prompts(path, word_tokenizer(), PLAIN)
    assert data.answers == ("85", None, "85", "-2.5", None)
    assert data.texts == ("w0", "w1", "w2", "w3", "w4")
    np.testing.assert_array_equal(number_match(list(data.texts), ["85", "85", "85.0", "-2.50", "0"],
                                               list(data.answers)), [1, 0, 1, 1, 0])


def test_load_prompts_without_answers_gives_nones(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "w0"}, {"prompt": "w1"}])
    data = load_prompts(path, word_tokenizer(), PLAIN)
    assert data.answers == (None, None)


@pytest.mark.parametrize("bad, message", [
    ("[85]", r"field 'answer' must be a string or a number, got list \[85\]"),
    ("true", r"field 'answer' must be a string or a number, got bool True"),
    ('{"value": 85}', r"field 'answer' must be a string or a number, got dict"),
    ("NaN", r"field 'answer' must be a finite number, got float nan"),
    ('"  "', r"field 'answer' is empty"),
])
def test_a_bad_answer_is_refused_naming_its_line(tmp_path, bad, message):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "w0", "answer": "1"},
        {"prompt": "w1"},
        f'{{"prompt": "w2", "answer": {bad}}}',
    ])
    with pytest.raises(DataError, match=r"p\.jsonl:3: " + message):
        load_prompts(path, word_tokenizer(), PLAIN)


# ------------------------------------------------------------------------------ the shipped arithmetic prompts


def test_arithmetic_prompts_are_correct_distinct_and_regenerate():
    lines = ARITHMETIC.read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == 1200
    pairs = set()
    for record in records:
        words = record["prompt"].split()  # "Calculate 37 + 48. Reply with just the number."
        assert words[0] == "Calculate" and words[2] == "+" and words[4:] == ["Reply", "with", "just", "the", "number."]
        a, b = int(words[1]), int(words[3].rstrip("."))
        assert 10 <= a <= 99 and 10 <= b <= 99 and record["answer"] == str(a + b) and a + b <= 99
        pairs.add((min(a, b), max(a, b)))
    assert len(pairs) == 1200  # not even a swapped pair repeats
    assert make_records(1200, 0) == records  # `python -m experiments.make_arithmetic_data` writes this file
