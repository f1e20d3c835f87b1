"""Local dataset files for the RLHF stages: prompts (PPO), demonstrations (SFT), preference pairs and
ranked lists (reward model), read from JSONL / JSON / Parquet and turned into fixed-shape int32 arrays.

Files
=====
``FORMATS = (".jsonl", ".json", ".parquet")``, chosen by the file suffix:

* ``.jsonl`` — one JSON object per line (UTF-8); blank lines are skipped.
* ``.json`` — one array of objects, or an object ``{"data": [...]}``.
* ``.parquet`` — one row per record, read with ``pyarrow.parquet``; a null cell counts as an absent
  field (so a ``margin`` column may be partly null). Strings, lists of strings and lists of
  ``{role, content}`` structs map onto the fields below.

Nothing is ever unpickled. Every problem raises one :class:`DataError` whose message starts with
where it is: ``data.jsonl:7: ...`` (1-based line), ``data.json[item 3]: ...`` and
``data.parquet[row 3]: ...`` (0-based index into the array / table).

Records
=======
Every record has a prompt, given as exactly one of

* ``"prompt"``: a string, or
* ``"messages"``: a chat, ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``
  whose last turn is ``"user"`` (needs a tokenizer with a chat template).

and, by stage, its responses (fields not listed are ignored, e.g. ids or labels):

* :func:`load_prompts`: optional ``"answer"``: the ground truth a verifiable reward checks the
  response against (a string, or a number kept as ``str(number)``: ``85`` → ``"85"``); ``None``
  where a record has none (any of the files below also serves as a prompt file);
* :func:`load_demonstrations`: ``"response"``: str;
* :func:`load_preferences`: ``"chosen"``: str, ``"rejected"``: str, optional ``"margin"``: number
  (0 if absent);
* :func:`load_rankings`: ``"responses"``: ``[best, ..., worst]``, K >= 2 strings, the same K in the
  whole file.

Examples (JSONL)::

    {"prompt": "Write a haiku about rain."}
    {"prompt": "What is 37 + 48? Answer with the number.", "answer": "85"}
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]}
    {"prompt": "2+2?", "response": "4"}
    {"prompt": "Say hi.", "chosen": "Hi!", "rejected": "Go away.", "margin": 2.0}
    {"prompt": "Name a fruit.", "responses": ["Apple.", "A tomato, technically.", "Car."]}

Prompts and responses must not be empty or whitespace only.

A pair whose chosen and rejected responses are the same tokens (the same text, or two texts cut to the
same first ``max_response_tokens`` ids), or a ranked list with two such responses, is *dropped*: it
carries no preference the model can see (its Bradley–Terry / DPO gradient is exactly zero, a ranked
list with a response twice contradicts itself) yet it would count in the loss and accuracy means. The
dropped records are counted (``num_identical``) and logged as a warning naming their lines; a file
with nothing left raises.

Tokens
======
:class:`TextFormat` says how text becomes ids:

* prompt, ``chat_template=True`` (default): ``tokenizer.encode_chat(messages,
  add_generation_prompt=True)`` with ``messages = [system?] + [{"role": "user", "content": prompt}]``
  (``system_prompt`` is prepended to ``"messages"`` records that have no system turn of their own);
* prompt, ``chat_template=False``: ``tokenizer.encode(prompt)``, preceded by BOS only if the
  tokenizer is configured to add one (``add_bos_token``); ``"messages"`` records are then refused;
* response: ``tokenizer.encode(response)`` plus EOS (``append_eos``), never a chat template.

Prompts longer than ``max_prompt_tokens`` lose their *beginning* (``truncation="left"``, which keeps
the generation prompt) or raise (``truncation="error"``); responses longer than
``max_response_tokens`` (EOS included) lose their end, and with it their EOS. Both are counted
(``num_truncated``, ``num_response_truncated``) and logged as a warning on the ``jaxppo.data`` logger.
Every id at a real position must lie in ``[0, vocab_size)`` of the *model* (the loaders' ``vocab_size``):
JAX gathers turn an id without an embedding row into NaNs rather than an error, so one is refused
naming its record's line.

Arrays: prompts are left-padded ``[N, P]`` with ``P = max_prompt_tokens``, responses right-padded
``[N, R]`` (``[N, K, R]`` for rankings) with ``R = max_response_tokens``, int32, padded with the
tokenizer's pad id (else its EOS id, else 0). The masks (int32, 1 on real tokens) are the only record
of which positions are real: never derive them from the ids, since a pad id may equal EOS, which also
occurs inside chat prompts and ends every response. Row i is the i-th record of the file.

Batches
=======
:func:`batch_indices` gives the rows of global step ``step``: epoch e visits the rows in the order of
``np.random.default_rng([seed, e]).permutation(N)``, in whole batches (a last partial batch is dropped),
so a run resumed at any step sees the same data::

    data = load_preferences("prefs.jsonl", tokenizer, TextFormat(max_prompt_tokens=128))
    batch = data.take(batch_indices(len(data), 32, seed=0, step=step))   # dict of numpy arrays
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
from typing import Any, ClassVar, Sequence

import numpy as np

from jaxppo.errors import InputError

__all__ = [
    "FORMATS", "TRUNCATIONS", "DataError", "TextFormat", "Prompts", "Demonstrations", "Preferences", "Rankings",
    "read_records", "load_prompts", "load_demonstrations", "load_preferences", "load_rankings",
    "check_token_ids", "batch_indices",
]

FORMATS = (".jsonl", ".json", ".parquet")
TRUNCATIONS = ("left", "error")

_log = logging.getLogger(__name__)


class DataError(InputError):
    """A problem with a dataset file; the message starts with ``path:line: `` (or ``path[item i]: ``,
    ``path[row i]: ``, or ``path: `` for the file as a whole)."""


# ---------------------------------------------------------------------------------------------- reading


def _suffix(path: pathlib.Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise DataError(f"{path}: unknown dataset format {path.suffix or '(no suffix)'!r}; expected one of {FORMATS}")
    return suffix


def _read_jsonl(path: pathlib.Path) -> list[tuple[str, Any]]:
    located = []
    for number, raw in enumerate(path.read_bytes().split(b"\n"), start=1):
        where = f"{path}:{number}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{where}: not UTF-8 ({e})") from None
        if number == 1:
            line = line.removeprefix("\ufeff")
        if not line.strip():
            continue
        try:
            located.append((where, json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        except RecursionError:
            raise DataError(f"{where}: JSON nested too deeply to read") from None
    return located


def _deepest_line(text: str) -> int:
    """The 1-based line of ``text`` where its JSON arrays / objects are nested deepest (strings skipped)."""
    depth = deepest = 0
    line = at = 1
    in_string = escaped = False
    for char in text:
        if char == "\n":
            line += 1
        elif in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            if depth > deepest:
                deepest, at = depth, line
        elif char in "]}":
            depth -= 1
    return at


def _read_json(path: pathlib.Path) -> list[tuple[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 ({e})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{_deepest_line(text)}: JSON nested too deeply to read") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records or an object {{\"data\": [...]}}, "
                        f"got {type(data).__name__}")
    return [(f"{path}[item {i}]", item) for i, item in enumerate(data)]


def _read_parquet(path: pathlib.Path) -> list[tuple[str, Any]]:
    import pyarrow
    import pyarrow.parquet

    try:
        rows = pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as e:
        raise DataError(f"{path}: not a readable Parquet file ({e})") from None
    return [(f"{path}[row {i}]", row) for i, row in enumerate(rows)]


def _read_located(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``[(where, record), ...]`` in file order, ``where`` being ``path:line`` / ``path[item i]`` / ``path[row i]``."""
    path = pathlib.Path(os.fspath(path))
    suffix = _suffix(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file (dataset files are {', '.join(FORMATS)})")
    reader = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}[suffix]
    located = reader(path)
    for where, record in located:
        if not isinstance(record, dict):
            raise DataError(f"{where}: expected a JSON object (a record), got {type(record).__name__}")
    return located


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a ``.jsonl`` / ``.json`` / ``.parquet`` file as dicts, in file order.

    Raises :class:`DataError` for a missing file, an unknown suffix, a malformed JSON line or a record
    that is not an object, naming the file and line (item, row).
    """
    return [record for _, record in _read_located(path)]


# ---------------------------------------------------------------------------------------------- format


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How records' text fields become token ids (see the module docstring).

    Attributes:
      chat_template: prompts go through the tokenizer's chat template with a generation prompt;
        False: plain ``encode`` (and ``"messages"`` records are refused).
      system_prompt: system turn put before the user turn (chat only; a record's own system turn wins).
      max_prompt_tokens: P, the width of the left-padded prompt arrays.
      max_response_tokens: R, the width of the right-padded response arrays (EOS included).
      truncation: ``"left"`` keeps the last P ids of a longer prompt; ``"error"`` raises a DataError.
      append_eos: end every response with ``tokenizer.eos_token_id``.
    """

    chat_template: bool = True
    system_prompt: str | None = None
    max_prompt_tokens: int = 64
    max_response_tokens: int = 64
    truncation: str = "left"
    append_eos: bool = True

    def __post_init__(self):
        for name in ("max_prompt_tokens", "max_response_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TextFormat.{name} must be a positive int, got {value!r}")
        if self.truncation not in TRUNCATIONS:
            raise ValueError(f"TextFormat.truncation must be one of {TRUNCATIONS}, got {self.truncation!r}")
        if self.system_prompt is not None:
            if not isinstance(self.system_prompt, str) or not self.system_prompt.strip():
                raise ValueError(f"TextFormat.system_prompt must be None or a non-empty string, got {self.system_prompt!r}")
            if not self.chat_template:
                raise ValueError("TextFormat.system_prompt needs chat_template=True")


# ---------------------------------------------------------------------------------------------- datasets


class _Arrays:
    """Shared behaviour of the dataset classes: ``as_dict``, ``take``, ``len`` and shape checks."""

    _ARRAYS: ClassVar[tuple[str, ...]]
    _FLOAT: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        n = None
        for name in self._ARRAYS:
            value = getattr(self, name)
            dtype = np.float32 if name in self._FLOAT else np.int32
            if not isinstance(value, np.ndarray) or value.dtype != dtype:
                raise ValueError(f"{type(self).__name__}.{name} must be a numpy {np.dtype(dtype)} array, "
                                 f"got {type(value).__name__} {getattr(value, 'dtype', '')}")
            if n is None:
                n = value.shape[0]
            if value.ndim == 0 or value.shape[0] != n:
                raise ValueError(f"{type(self).__name__}.{name} has shape {value.shape}; expected {n} rows")
            mask = f"{name}_mask" if f"{name}_mask" in self._ARRAYS else None
            if name == "responses":
                mask = "response_mask"
            if mask is not None and getattr(self, mask).shape != value.shape:
                raise ValueError(f"{type(self).__name__}.{mask} has shape {getattr(self, mask).shape}, "
                                 f"{name} has {value.shape}")

    def as_dict(self) -> dict[str, np.ndarray]:
        """The arrays by name (the batch keys of :mod:`jaxppo.sft` / :mod:`jaxppo.reward_model`)."""
        return {name: getattr(self, name) for name in self._ARRAYS}

    def take(self, indices) -> dict[str, np.ndarray]:
        """``as_dict()`` restricted to the rows ``indices`` (e.g. from :func:`batch_indices`)."""
        indices = np.asarray(indices)
        return {name: array[indices] for name, array in self.as_dict().items()}

    def __len__(self) -> int:
        return int(getattr(self, self._ARRAYS[0]).shape[0])


@dataclasses.dataclass(frozen=True, eq=False)
class Prompts(_Arrays):
    """Prompts ``[N, P]`` (left-padded) with ``prompt_mask``; ``texts`` are the prompts as written
    (the ``"prompt"`` field, or the last user turn of ``"messages"``); ``answers`` the N ``"answer"``
    fields as strings (numbers as ``str(number)``), ``None`` for a record without one."""

    prompt: np.ndarray
    prompt_mask: np.ndarray
    texts: tuple[str, ...]
    num_truncated: int
    source: str
    answers: tuple[str | None, ...]

    _ARRAYS: ClassVar[tuple[str, ...]] = ("prompt", "prompt_mask")

    def __post_init__(self):
        super().__post_init__()
        for name in ("texts", "answers"):
            value = getattr(self, name)
            if not isinstance(value, tuple) or len(value) != len(self):
                raise ValueError(f"Prompts.{name} must be a tuple with one item per row ({len(self)}), "
                                 f"got {_describe(value)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Demonstrations(_Arrays):
    """SFT pairs: prompts ``[N, P]`` left-padded, responses ``[N, R]`` right-padded, with masks."""

    prompt: np.ndarray
    prompt_mask: np.ndarray
    response: np.ndarray
    response_mask: np.ndarray
    num_truncated: int
    num_response_truncated: int
    source: str

    _ARRAYS: ClassVar[tuple[str, ...]] = ("prompt", "prompt_mask", "response", "response_mask")


@dataclasses.dataclass(frozen=True, eq=False)
class Preferences(_Arrays):
    """Preference pairs: prompts ``[N, P]``, chosen / rejected ``[N, R]`` with masks, ``margin`` ``[N]``
    float32 (0 where absent). ``num_response_truncated`` counts chosen and rejected texts alike; the
    ``num_identical`` pairs with chosen equal to rejected are not among the N rows."""

    prompt: np.ndarray
    prompt_mask: np.ndarray
    chosen: np.ndarray
    chosen_mask: np.ndarray
    rejected: np.ndarray
    rejected_mask: np.ndarray
    margin: np.ndarray
    num_truncated: int
    num_response_truncated: int
    source: str
    num_identical: int = 0  # pairs dropped because chosen and rejected were the same tokens

    _ARRAYS: ClassVar[tuple[str, ...]] = (
        "prompt", "prompt_mask", "chosen", "chosen_mask", "rejected", "rejected_mask", "margin")
    _FLOAT: ClassVar[tuple[str, ...]] = ("margin",)


@dataclasses.dataclass(frozen=True, eq=False)
class Rankings(_Arrays):
    """Ranked lists: prompts ``[N, P]``, ``responses`` ``[N, K, R]`` best first with ``response_mask``.
    ``num_response_truncated`` counts truncated responses among the N·K; the ``num_identical`` lists with
    a response twice are not among the N rows."""

    prompt: np.ndarray
    prompt_mask: np.ndarray
    responses: np.ndarray
    response_mask: np.ndarray
    num_truncated: int
    num_response_truncated: int
    source: str
    num_identical: int = 0  # lists dropped because two of their responses were the same tokens

    _ARRAYS: ClassVar[tuple[str, ...]] = ("prompt", "prompt_mask", "responses", "response_mask")


# ---------------------------------------------------------------------------------------------- fields


def _describe(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:
        return f"{type(value).__name__} (nested too deeply to show)"
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def _text_field(record: dict, key: str, where: str, expected: str) -> str:
    value = record.get(key)
    if value is None:
        raise DataError(f"{where}: missing field {key!r}; expected {expected}")
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_describe(value)}")
    if not value.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return value


def _messages_field(record: dict, where: str) -> list[dict]:
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: field 'messages' must be a non-empty list of {{'role', 'content'}} objects, "
                        f"got {_describe(messages)}")
    turns = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: messages[{i}] must be an object with string 'role' and 'content', "
                            f"got {_describe(message)}")
        turns.append({"role": message["role"], "content": message["content"]})
    if turns[-1]["role"] != "user":
        raise DataError(f"{where}: the last turn of 'messages' must be 'user' (the prompt), "
                        f"got {turns[-1]['role']!r}")
    if not turns[-1]["content"].strip():
        raise DataError(f"{where}: the last user turn of 'messages' is empty")
    return turns


def _prompt_field(record: dict, where: str, expected: str) -> tuple[str, list[dict] | None]:
    """``(text, messages)``: the prompt as written and, for a ``"messages"`` record, the chat."""
    has_prompt, has_messages = record.get("prompt") is not None, record.get("messages") is not None
    if has_prompt and has_messages:
        raise DataError(f"{where}: give either 'prompt' or 'messages', not both")
    if has_messages:
        messages = _messages_field(record, where)
        return messages[-1]["content"], messages
    if not has_prompt:
        raise DataError(f"{where}: missing field 'prompt' (or 'messages'); expected {expected}")
    return _text_field(record, "prompt", where, expected), None


def _answer_field(record: dict, where: str) -> str | None:
    """The record's ``"answer"`` as a string (a number through ``str``), or None if it has none."""
    value = record.get("answer")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise DataError(f"{where}: field 'answer' must be a string or a number, got {_describe(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise DataError(f"{where}: field 'answer' must be a finite number, got {_describe(value)}")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: field 'answer' is empty")
    return str(value)


def _margin_field(record: dict, where: str) -> float:
    value = record.get("margin")
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{where}: field 'margin' must be a finite number, got {_describe(value)}")
    return float(value)


# ---------------------------------------------------------------------------------------------- tokens


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    return 0


def _encode_prompts(located: Sequence[tuple[str, dict]], prompts: Sequence[tuple[str, list[dict] | None]],
                    tokenizer, fmt: TextFormat) -> tuple[np.ndarray, np.ndarray, int]:
    """Left-padded ``(prompt [N, P], prompt_mask [N, P], num_truncated)``."""
    rendered = []
    for (where, _), (text, messages) in zip(located, prompts):
        if not fmt.chat_template:
            if messages is not None:
                raise DataError(f"{where}: a 'messages' record needs TextFormat(chat_template=True)")
            rendered.append(text)
            continue
        if messages is None:
            messages = [{"role": "user", "content": text}]
        if fmt.system_prompt is not None and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": fmt.system_prompt}, *messages]
        try:
            rendered.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except Exception as e:  # jinja2 templates raise TemplateError (or anything) on odd chats
            raise DataError(f"{where}: the chat template failed on this record ({e})") from None
    ids = tokenizer.encode_batch(rendered, add_special_tokens=False)
    bos = tokenizer.bos_token_id
    if not fmt.chat_template and tokenizer.add_bos_token and bos is not None:
        ids = [[bos, *row] for row in ids]
    width = fmt.max_prompt_tokens
    tokens = np.full((len(ids), width), _pad_id(tokenizer), np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    num_truncated = 0
    for i, ((where, _), row) in enumerate(zip(located, ids)):
        if len(row) > width:
            if fmt.truncation == "error":
                raise DataError(f"{where}: the prompt is {len(row)} tokens, longer than max_prompt_tokens={width} "
                                "(TextFormat.truncation='error')")
            row, num_truncated = row[-width:], num_truncated + 1
        if row:
            tokens[i, width - len(row):] = row
            mask[i, width - len(row):] = 1
    return tokens, mask, num_truncated


def _encode_responses(texts: Sequence[str], tokenizer, fmt: TextFormat) -> tuple[np.ndarray, np.ndarray, int]:
    """Right-padded ``(response [M, R], response_mask [M, R], num_truncated)`` of M texts."""
    eos = tokenizer.eos_token_id
    ids = tokenizer.encode_batch(list(texts), add_special_tokens=False)
    width = fmt.max_response_tokens
    tokens = np.full((len(ids), width), _pad_id(tokenizer), np.int32)
    mask = np.zeros((len(ids), width), np.int32)
    num_truncated = 0
    for i, row in enumerate(ids):
        if fmt.append_eos:
            row = [*row, eos]
        if len(row) > width:
            row, num_truncated = row[:width], num_truncated + 1
        tokens[i, :len(row)] = row
        mask[i, :len(row)] = 1
    return tokens, mask, num_truncated


def _outside_vocab(tokens: np.ndarray, mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """Where a valid (mask != 0) position holds an id outside ``[0, vocab_size)``: bool, ``tokens``' shape."""
    return (mask != 0) & ((tokens < 0) | (tokens >= vocab_size))


def check_token_ids(tokens, mask, vocab_size: int, *, where: str) -> None:
    """Raise :class:`DataError` if any id at a valid (mask != 0) position is outside ``[0, vocab_size)``.

    JAX clamps or NaN-fills out-of-range gathers instead of failing, so an id the embedding table does
    not have must be caught here. Shapes: ``tokens`` and ``mask`` ``[N, ...]``, equal; the message names
    the first bad id as ``where: token id 50000 at row 3, position 5 is outside the vocabulary [0, 49152)``.
    """
    tokens, mask = np.asarray(tokens), np.asarray(mask)
    if tokens.shape != mask.shape:
        raise ValueError(f"{where}: tokens {tokens.shape} and mask {mask.shape} differ in shape")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"check_token_ids: vocab_size must be a positive int, got {vocab_size!r}")
    if tokens.size == 0:
        return
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{where}: token ids must be integers, got dtype {tokens.dtype}")
    bad = _outside_vocab(tokens, mask, vocab_size)
    if not bad.any():
        return
    positions = np.argwhere(bad)
    first = tuple(int(i) for i in positions[0])
    if len(first) == 1:
        at = f"position {first[0]}"
    else:
        rest = first[1:]
        at = f"row {first[0]}, position {rest[0] if len(rest) == 1 else rest}"
    more = f" ({len(positions) - 1} more such ids)" if len(positions) > 1 else ""
    raise DataError(f"{where}: token id {int(tokens[first])} at {at} is outside the vocabulary "
                    f"[0, {int(vocab_size)}){more}")


# ---------------------------------------------------------------------------------------------- loaders


def _start(path, tokenizer, fmt: TextFormat) -> tuple[str, list[tuple[str, dict]]]:
    source = os.fspath(path)
    if not isinstance(fmt, TextFormat):
        raise TypeError(f"fmt must be a TextFormat, got {type(fmt).__name__}")
    if fmt.chat_template and tokenizer.chat_template is None:
        raise DataError(f"{source}: TextFormat(chat_template=True) but the tokenizer has no chat template; "
                        "use TextFormat(chat_template=False)")
    located = _read_located(source)
    if not located:
        raise DataError(f"{source}: no records")
    return source, located


def _check_eos(source: str, tokenizer, fmt: TextFormat) -> None:
    if fmt.append_eos and tokenizer.eos_token_id is None:
        raise DataError(f"{source}: TextFormat(append_eos=True) but the tokenizer has no EOS token")


def _report(source: str, kind: str, n: int, fmt: TextFormat, num_truncated: int, num_response_truncated: int = 0,
            num_responses: int = 0) -> None:
    if num_truncated:
        _log.warning("%s: %d of %d prompts are longer than max_prompt_tokens=%d and lost their beginning",
                     source, num_truncated, n, fmt.max_prompt_tokens)
    if num_response_truncated:
        _log.warning("%s: %d of %d %s are longer than max_response_tokens=%d and were cut (no EOS)",
                     source, num_response_truncated, num_responses, kind, fmt.max_response_tokens)


def _vocab(tokenizer, vocab_size: int | None) -> tuple[int, str]:
    """``(vocab_size, whose)``: the model's when given, else the tokenizer's."""
    if vocab_size is None:
        return int(tokenizer.vocab_size), "the tokenizer's vocabulary"
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    return int(vocab_size), "the model's vocabulary"


def _check_ids(located: Sequence[tuple[str, dict]], tokens: np.ndarray, mask: np.ndarray, vocab: tuple[int, str],
               *, what: str) -> None:
    """Like :func:`check_token_ids` on ``tokens [N, L]`` (row i from record i), naming the record's line."""
    vocab_size, whose = vocab
    bad = _outside_vocab(tokens, mask, vocab_size)
    if not bad.any():
        return
    rows = np.flatnonzero(bad.any(axis=1))
    row = int(rows[0])
    position = int(np.argmax(bad[row]))
    more = f" ({len(rows) - 1} more records have such ids)" if len(rows) > 1 else ""
    raise DataError(f"{located[row][0]}: {what} token id {int(tokens[row, position])} at position {position} is "
                    f"outside {whose} [0, {vocab_size}){more}")


def _drop_identical(source: str, kind: str, located: Sequence[tuple[str, dict]], same: np.ndarray,
                    arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], int]:
    """``(arrays without the rows where same [N] is True, how many)``, logged with their lines."""
    num_identical = int(same.sum())
    if not num_identical:
        return arrays, 0
    if num_identical == len(same):
        raise DataError(f"{source}: in every record (all {num_identical}) {kind}; no preference is left to learn")
    lines = [located[i][0] for i in np.flatnonzero(same)[:3]]
    _log.warning("%s: dropped %d of %d records in which %s (e.g. %s)", source, num_identical, len(same), kind,
                 ", ".join(lines))
    return {name: array[~same] for name, array in arrays.items()}, num_identical


def _same_tokens(a: np.ndarray, a_mask: np.ndarray, b: np.ndarray, b_mask: np.ndarray) -> np.ndarray:
    """``[N]``: rows ``[N, R]`` of ``a`` and ``b`` with the same real tokens (padding ignored)."""
    return np.all(a_mask == b_mask, axis=-1) & np.all(np.where(a_mask != 0, a == b, True), axis=-1)


def load_prompts(path: str | os.PathLike, tokenizer, fmt: TextFormat, *, vocab_size: int | None = None) -> Prompts:
    """Prompts of a file of records with ``"prompt"`` or ``"messages"`` and an optional ``"answer"``
    (other fields are ignored).

    ``answers[i]`` is record i's answer as a string (``{"answer": 85}`` gives ``"85"``, ``85.0`` gives
    ``"85.0"``), or None where it has none; an answer that is not a string or a finite number, or an
    empty string, is a :class:`DataError` naming its line. ``vocab_size`` (default
    ``tokenizer.vocab_size``) is the model's: ids at or above it are refused.
    """
    expected = "'prompt' (a string) or 'messages' (a chat ending with a user turn)"
    source, located = _start(path, tokenizer, fmt)
    prompts = [_prompt_field(record, where, expected) for where, record in located]
    answers = tuple(_answer_field(record, where) for where, record in located)
    prompt, prompt_mask, num_truncated = _encode_prompts(located, prompts, tokenizer, fmt)
    _check_ids(located, prompt, prompt_mask, _vocab(tokenizer, vocab_size), what="prompt")
    _report(source, "prompts", len(located), fmt, num_truncated)
    return Prompts(prompt, prompt_mask, tuple(text for text, _ in prompts), num_truncated, source, answers)


def load_demonstrations(path: str | os.PathLike, tokenizer, fmt: TextFormat, *,
                        vocab_size: int | None = None) -> Demonstrations:
    """SFT demonstrations: records with a prompt and ``"response"``."""
    expected = "'prompt' (or 'messages') and 'response'"
    source, located = _start(path, tokenizer, fmt)
    _check_eos(source, tokenizer, fmt)
    prompts, responses = [], []
    for where, record in located:
        prompts.append(_prompt_field(record, where, expected))
        responses.append(_text_field(record, "response", where, expected))
    prompt, prompt_mask, num_truncated = _encode_prompts(located, prompts, tokenizer, fmt)
    response, response_mask, num_response_truncated = _encode_responses(responses, tokenizer, fmt)
    vocab = _vocab(tokenizer, vocab_size)
    _check_ids(located, prompt, prompt_mask, vocab, what="prompt")
    _check_ids(located, response, response_mask, vocab, what="response")
    _report(source, "responses", len(located), fmt, num_truncated, num_response_truncated, len(located))
    return Demonstrations(prompt, prompt_mask, response, response_mask, num_truncated, num_response_truncated,
                          source)


def load_preferences(path: str | os.PathLike, tokenizer, fmt: TextFormat, *,
                     vocab_size: int | None = None) -> Preferences:
    """Preference pairs: records with a prompt, ``"chosen"``, ``"rejected"`` and optional ``"margin"``.

    Pairs whose chosen and rejected responses are the same tokens are dropped and counted
    (``num_identical``, a warning names their lines); ``vocab_size`` is the model's, as for
    :func:`load_prompts`.
    """
    expected = "'prompt' (or 'messages'), 'chosen', 'rejected' and optionally 'margin'"
    source, located = _start(path, tokenizer, fmt)
    _check_eos(source, tokenizer, fmt)
    prompts, chosen_texts, rejected_texts, margins = [], [], [], []
    for where, record in located:
        prompts.append(_prompt_field(record, where, expected))
        chosen_texts.append(_text_field(record, "chosen", where, expected))
        rejected_texts.append(_text_field(record, "rejected", where, expected))
        margins.append(_margin_field(record, where))
    n = len(located)
    prompt, prompt_mask, num_truncated = _encode_prompts(located, prompts, tokenizer, fmt)
    responses, masks, num_response_truncated = _encode_responses(chosen_texts + rejected_texts, tokenizer, fmt)
    arrays = {"prompt": prompt, "prompt_mask": prompt_mask, "chosen": responses[:n], "chosen_mask": masks[:n],
              "rejected": responses[n:], "rejected_mask": masks[n:], "margin": np.asarray(margins, np.float32)}
    vocab = _vocab(tokenizer, vocab_size)
    _check_ids(located, prompt, prompt_mask, vocab, what="prompt")
    for name in ("chosen", "rejected"):
        _check_ids(located, arrays[name], arrays[f"{name}_mask"], vocab, what=f"'{name}'")
    _report(source, "chosen/rejected responses", n, fmt, num_truncated, num_response_truncated, 2 * n)
    same = _same_tokens(arrays["chosen"], arrays["chosen_mask"], arrays["rejected"], arrays["rejected_mask"])
    arrays, num_identical = _drop_identical(source, "'chosen' and 'rejected' are the same tokens", located, same,
                                            arrays)
    return Preferences(**arrays, num_truncated=num_truncated, num_response_truncated=num_response_truncated,
                       source=source, num_identical=num_identical)


def load_rankings(path: str | os.PathLike, tokenizer, fmt: TextFormat, *, vocab_size: int | None = None) -> Rankings:
    """Ranked lists: records with a prompt and ``"responses"`` ``[best, ..., worst]``, the same K >= 2 in
    every record. Lists with two responses of the same tokens are dropped and counted (``num_identical``)."""
    expected = "'prompt' (or 'messages') and 'responses' (a list of K >= 2 strings, best first)"
    source, located = _start(path, tokenizer, fmt)
    _check_eos(source, tokenizer, fmt)
    prompts, texts = [], []
    first_k = None  # (K, where) of the first record
    for where, record in located:
        prompts.append(_prompt_field(record, where, expected))
        ranked = record.get("responses")
        if ranked is None:
            raise DataError(f"{where}: missing field 'responses'; expected {expected}")
        if not isinstance(ranked, list):
            raise DataError(f"{where}: field 'responses' must be a list of strings, got {_describe(ranked)}")
        if len(ranked) < 2:
            raise DataError(f"{where}: field 'responses' has {len(ranked)} responses; a ranking needs at least 2")
        if first_k is None:
            first_k = (len(ranked), where)
        elif len(ranked) != first_k[0]:
            raise DataError(f"{where}: field 'responses' has {len(ranked)} responses but the first record "
                            f"({first_k[1]}) has {first_k[0]}; every list in a file must have the same K")
        for k, text in enumerate(ranked):
            if not isinstance(text, str):
                raise DataError(f"{where}: responses[{k}] must be a string, got {_describe(text)}")
            if not text.strip():
                raise DataError(f"{where}: responses[{k}] is empty")
        texts.extend(ranked)
    n, k = len(located), first_k[0]
    prompt, prompt_mask, num_truncated = _encode_prompts(located, prompts, tokenizer, fmt)
    flat, flat_mask, num_response_truncated = _encode_responses(texts, tokenizer, fmt)
    responses = flat.reshape(n, k, fmt.max_response_tokens)
    response_mask = flat_mask.reshape(n, k, fmt.max_response_tokens)
    vocab = _vocab(tokenizer, vocab_size)
    _check_ids(located, prompt, prompt_mask, vocab, what="prompt")
    for i in range(k):
        _check_ids(located, responses[:, i], response_mask[:, i], vocab, what=f"responses[{i}]")
    _report(source, "ranked responses", n, fmt, num_truncated, num_response_truncated, n * k)
    same = np.zeros(n, bool)
    for i in range(k):
        for j in range(i + 1, k):
            same |= _same_tokens(responses[:, i], response_mask[:, i], responses[:, j], response_mask[:, j])
    arrays = {"prompt": prompt, "prompt_mask": prompt_mask, "responses": responses, "response_mask": response_mask}
    arrays, num_identical = _drop_identical(source, "'responses' hold the same tokens twice", located, same, arrays)
    return Rankings(**arrays, num_truncated=num_truncated, num_response_truncated=num_response_truncated,
                    source=source, num_identical=num_identical)


# ---------------------------------------------------------------------------------------------- batches


def batch_indices(num_rows: int, batch_size: int, *, seed: int, step: int) -> np.ndarray:
    """Row indices ``[batch_size]`` (int64) of global step ``step``.

    With ``b = num_rows // batch_size`` batches per epoch, step s is batch ``s % b`` of epoch ``e = s // b``,
    whose order is ``np.random.default_rng([seed, e]).permutation(num_rows)``; the ``num_rows % batch_size``
    rows left over at the end of an epoch are skipped for that epoch. A pure function of its arguments,
    so step s of a resumed run equals step s of an uninterrupted one.
    """
    for name, value, low in (("num_rows", num_rows, 1), ("batch_size", batch_size, 1), ("seed", seed, 0),
                             ("step", step, 0)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"batch_indices: {name} must be an int >= {low}, got {value!r}")
    if batch_size > num_rows:
        raise ValueError(f"batch_indices: batch_size={batch_size} is larger than the dataset ({num_rows} rows)")
    per_epoch = num_rows // batch_size
    epoch, batch = divmod(int(step), per_epoch)
    order = np.random.default_rng([int(seed), epoch]).permutation(num_rows)
    return order[batch * batch_size:(batch + 1) * batch_size]
