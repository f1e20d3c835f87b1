"""Verifiers: pure host functions of decoded text that check a response against a known answer.

They are the *host* reward functions of :mod:`jaxppo.rewards` (``fn(prompts, responses, answers) ->
[B]``): the rollout decodes the sampled token ids, looks up each prompt's ground truth (the
``"answer"`` field of the prompt file, :attr:`jaxppo.data.Prompts.answers`) and calls the verifier.
Plain Python and numpy; nothing here is traced.

Reading a number
================
:func:`last_number` takes the *last* number written in the response, the convention of
GSM8K-style graders: a model that reasons, corrects itself or restates the question ends with its
answer (``"I think 84... no, 85"`` → ``"85"``). A number is

* digits with an optional decimal part: ``85``, ``3.14`` — a period that no digit follows ends the
  sentence, not the number (``"85."`` → ``"85"``; ``".5"`` is read as ``"5"``);
* or digits grouped by commas in threes: ``1,234,567`` → ``"1234567"`` (the commas are dropped);
  a comma not followed by exactly three digits separates numbers (``"3,4"`` → ``"4"``, a list);
* with a leading minus (``-`` or ``−``) when the sign is not glued to a word or a number before it:
  ``"-3"`` and ``"is -3"`` → ``"-3"``, but ``"10-3"`` → ``"3"`` (a subtraction or a range).

Not read: exponents (``1e5`` → ``"5"``), fractions (``1/2`` → ``"2"``), numbers in words
(``"eighty-five"`` → ``None``).

Comparing
=========
:func:`number_match` compares *values*, not strings: both sides become :class:`decimal.Decimal`, so
``"85.0"`` and ``"085"`` match an answer of ``"85"`` (and ``"1,234"`` matches ``1234``). Exact
decimal arithmetic, no float tolerance: ``"0.1"`` matches ``"0.10"`` but not ``"0.1000001"``. An
answer must itself be a number in this notation (``"85"``, ``"-3"``, ``"1,234"``, ``"2.5"``, spaces
around it ignored); anything else is a ``ValueError`` — a bad answer in the data file, not a wrong
response.
"""

from __future__ import annotations

import decimal
import re
from collections.abc import Sequence

import numpy as np

__all__ = ["last_number", "number_match"]

# Optional sign (not right after a letter, digit or underscore), then comma-grouped digits (three per
# group, not followed by a fourth digit) or plain digits, then an optional decimal part.
_NUMBER = re.compile(r"(?:(?<!\w)[-\u2212])?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
_ANSWER = re.compile(r"[-\u2212]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def _canonical(text: str) -> str:
    """``text`` of a matched number with the commas dropped and the minus written ``-``."""
    return text.replace(",", "").replace("\u2212", "-")


def last_number(text: str) -> str | None:
    """The last number written in ``text``, commas dropped, or None if there is none.

    See the module docstring for what counts as a number. The digits are returned as written
    (``"85.0"`` stays ``"85.0"``, ``"007"`` stays ``"007"``); :func:`number_match` compares values.

    Examples::

        >>> last_number("The answer is 85.")
        '85'
        >>> last_number("I think 84... no, 85")
        '85'
        >>> last_number("37 + 48 = 85.0")
        '85.0'
        >>> last_number("It is -3.")
        '-3'
        >>> last_number("10-3 = 7, so 7")
        '7'
        >>> last_number("That costs $1,234.")
        '1234'
        >>> last_number("I don't know.") is None
        True
    """
    if not isinstance(text, str):
        raise TypeError(f"last_number: text must be a str, got {type(text).__name__}")
    found = None
    for found in _NUMBER.finditer(text):
        pass
    return None if found is None else _canonical(found.group())


def _answer_value(answer: str) -> decimal.Decimal:
    if not isinstance(answer, str) or _ANSWER.fullmatch(answer.strip()) is None:
        raise ValueError(f"number_match: answer {answer!r} is not a number like '85', '-3', '1,234' or '2.5'")
    return decimal.Decimal(_canonical(answer.strip()))


def bad_answer(answers: Sequence[str | None]) -> int | None:
    """The index of the first answer that is neither None nor a number :func:`number_match` can read, or None."""
    for i, answer in enumerate(answers):
        if answer is not None and (not isinstance(answer, str) or _ANSWER.fullmatch(answer.strip()) is None):
            return i
    return None


def number_match(prompts: Sequence[str], responses: Sequence[str], answers: Sequence[str | None]) -> np.ndarray:
    """1.0 where the last number of the response equals the answer in value, else 0.0: float64 ``[B]``.

    ``score_i = 1[ value(last_number(responses[i])) == value(answers[i]) ]``, 0.0 where the response
    has no number or ``answers[i]`` is None. A host reward function of :mod:`jaxppo.rewards`.

    Args:
      prompts: ``[B]`` prompt texts (unused; part of the host reward signature).
      responses: ``[B]`` decoded responses.
      answers: ``[B]`` ground-truth numbers as strings (the prompt file's ``"answer"`` field), or None.

    Raises:
      ValueError: if the lengths differ, or an answer is not a number (see the module docstring).

    Examples::

        >>> number_match(["What is 37 + 48?"] * 4,
        ...              ["The answer is 85.", "85.0", "I think 85... no, 84", "Eighty-five."],
        ...              ["85"] * 4)
        array([1., 1., 0., 0.])
        >>> number_match(["q", "q"], ["1,234", "7"], ["1234", None])
        array([1., 0.])
    """
    if not len(prompts) == len(responses) == len(answers):
        raise ValueError(f"number_match: {len(prompts)} prompts, {len(responses)} responses and {len(answers)} "
                         "answers; expected one of each per row")
    scores = np.zeros(len(responses), np.float64)
    for i, (response, answer) in enumerate(zip(responses, answers)):
        if answer is None:
            continue
        target = _answer_value(answer)
        found = last_number(response)
        if found is not None:
            scores[i] = float(decimal.Decimal(found) == target)
    return scores
