"""Text tokenizer for checkpoints: built from a GGUF file's metadata or a Hugging Face directory.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust fast tokenizer) and adds what a chat model
needs on top: the special-token ids, and the chat template rendered the way transformers renders it
(a sandboxed jinja2 environment with `trim_blocks`/`lstrip_blocks` and `raise_exception`).

Only numpy-free dependencies here: `tokenizers`, `jinja2` and, for GGUF input, `gguf`.
"""

from __future__ import annotations

import json
import os
import pathlib
from datetime import datetime
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _BackendTokenizer

__all__ = ["Tokenizer"]

# GGUF token types (llama.cpp's llama_token_type).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Split regexes for `tokenizer.ggml.pre` values, exactly as transformers' GGUF loader
# (integrations/gguf/gguf_tokenizer_mapping.py) uses them. Any other value (e.g. "smollm", "gpt-2",
# "default") gets the plain GPT-2 ByteLevel pre-tokenizer there, so it does here too.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(
        ["llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
         "jina-v5-nano", "dbrx", "smaug-bpe"],
        _LLAMA3_SPLIT,
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}
# `tokenizer.ggml.pre` values whose llama.cpp pre-tokenizer is the plain GPT-2 regex.
_GPT2_PRES = {None, "default", "gpt-2", "gpt2"}

_SPECIAL_ROLES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by byte-level BPE vocabularies."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token_content(value: Any) -> str | None:
    """A special token as stored in tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(value, Mapping):
        return value.get("content")
    return value


def _compile_chat_template(template: str):
    """Compile a chat template with the jinja2 environment transformers uses."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        # transformers' AssistantTracker: `{% generation %}...{% endgeneration %}` renders its body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(template)


class Tokenizer:
    """A fast tokenizer plus special tokens and a chat template.

    Build it with `Tokenizer.from_gguf(path_or_reader)` or `Tokenizer.from_files(directory)`.
    Special tokens are stored by content (e.g. `eos_token == "<|im_end|>"`); the `*_token_id`
    properties look them up in the vocabulary.
    """

    __slots__ = (
        "_backend", "bos_token", "eos_token", "unk_token", "pad_token", "chat_template",
        "add_bos_token", "add_eos_token", "model_max_length", "_compiled_template",
    )

    def __init__(
        self,
        backend: _BackendTokenizer,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
        model_max_length: int | None = None,
    ):
        self._backend = backend
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.unk_token = unk_token
        self.pad_token = pad_token
        self.chat_template = chat_template
        self.add_bos_token = bool(add_bos_token)
        self.add_eos_token = bool(add_eos_token)
        self.model_max_length = model_max_length
        self._compiled_template = None
        for role in _SPECIAL_ROLES:
            token = getattr(self, role)
            if token is not None and backend.token_to_id(token) is None:
                raise ValueError(f"{role} {token!r} is not in the vocabulary")

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_gguf(cls, source: Any, *, match: str = "transformers") -> "Tokenizer":
        """Build the tokenizer from a GGUF file's `tokenizer.*` metadata.

        `source` is a path or an open `gguf.GGUFReader`. Only `tokenizer.ggml.model == "gpt2"`
        (byte-level BPE) is supported. `match` picks the pre-tokenizer:

        * `"transformers"` (default): exactly what `AutoTokenizer.from_pretrained(dir, gguf_file=...)`
          builds. For `tokenizer.ggml.pre == "smollm"` that is the plain GPT-2 ByteLevel regex.
        * `"llama.cpp"`: llama.cpp's pre-tokenizer for the file. It differs only for "smollm", which
          isolates every digit first (as SmolLM2's original tokenizer.json does); the two disagree
          on e.g. `"a  1"` (a whitespace run followed by a digit).
        """
        if match not in ("transformers", "llama.cpp"):
            raise ValueError(f"match must be 'transformers' or 'llama.cpp', got {match!r}")
        from .gguf import _field, _open_reader

        reader, path = _open_reader(source)
        model = _field(reader, "tokenizer.ggml.model")
        if model != "gpt2":
            raise ValueError(
                f"{path}: unsupported GGUF tokenizer model {model!r} (only 'gpt2' byte-level BPE is supported)"
            )
        tokens = _field(reader, "tokenizer.ggml.tokens")
        merges = _field(reader, "tokenizer.ggml.merges")
        if tokens is None or merges is None:
            raise ValueError(f"{path}: GGUF file lacks tokenizer.ggml.tokens / tokenizer.ggml.merges")
        token_types = _field(reader, "tokenizer.ggml.token_type") or []
        pre = _field(reader, "tokenizer.ggml.pre")

        spelling = _bytes_to_unicode()
        alphabet = set(spelling.values())
        spelled = [
            t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
        ]
        vocab = {t: i for i, t in enumerate(spelled)}
        try:
            bpe = models.BPE(
                vocab=vocab,
                merges=[tuple(m.split(" ", 1)) for m in merges],
                dropout=None,
                continuing_subword_prefix="",
                end_of_word_suffix="",
                fuse_unk=False,
            )
        except Exception as e:  # tokenizers raises a bare Exception for inconsistent merges
            raise ValueError(f"{path}: invalid BPE vocabulary/merges: {e}") from e
        backend = _BackendTokenizer(bpe)
        split = _PRE_SPLITS.get(pre)
        if split is not None:
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(split), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        elif match == "llama.cpp" and pre == "smollm":
            backend.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Digits(individual_digits=True),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
                ]
            )
        elif match == "llama.cpp" and pre not in _GPT2_PRES:
            raise ValueError(f"{path}: no llama.cpp pre-tokenizer known for tokenizer.ggml.pre={pre!r}")
        else:
            backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()

        # Control tokens become special added tokens, user-defined ones plain added tokens
        # (transformers does the same; a "control" token outside the byte alphabet is a mislabel).
        control = [
            AddedToken(t, normalized=False, special=True)
            for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_CONTROL and set(t) <= alphabet
        ]
        user = [
            AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, token_types)
            if ty == _TOKEN_TYPE_USER_DEFINED and t in vocab
        ]

        def token_at(key: str) -> str | None:
            idx = _field(reader, f"tokenizer.ggml.{key}")
            return spelled[int(idx)] if idx is not None and 0 <= int(idx) < len(spelled) else None

        special = {
            "bos_token": token_at("bos_token_id"),
            "eos_token": token_at("eos_token_id"),
            "unk_token": token_at("unknown_token_id"),
            "pad_token": token_at("padding_token_id"),
        }
        have = {t.content for t in control}
        control += [AddedToken(t, normalized=False, special=True) for t in special.values() if t and t not in have]
        if control:
            backend.add_special_tokens(list({t.content: t for t in control}.values()))
        if user:
            backend.add_tokens(user)

        add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token") or False)
        add_eos = bool(_field(reader, "tokenizer.ggml.add_eos_token") or False)
        _set_post_processor(backend, special["bos_token"] if add_bos else None,
                            special["eos_token"] if add_eos else None)
        context = None
        arch = _field(reader, "general.architecture")
        if arch is not None:
            context = _field(reader, f"{arch}.context_length")
        return cls(
            backend,
            **special,
            chat_template=_field(reader, "tokenizer.chat_template"),
            add_bos_token=add_bos,
            add_eos_token=add_eos,
            model_max_length=int(context) if context is not None else None,
        )

    @classmethod
    def from_files(cls, directory: str | os.PathLike) -> "Tokenizer":
        """Load a Hugging Face tokenizer directory (`tokenizer.json` + optional `tokenizer_config.json`,
        `special_tokens_map.json`, `chat_template.jinja`)."""
        directory = pathlib.Path(directory)
        tokenizer_json = directory / "tokenizer.json"
        if not tokenizer_json.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}")
        try:
            backend = _BackendTokenizer.from_file(str(tokenizer_json))
        except Exception as e:  # noqa: BLE001 (tokenizers raises a bare Exception for a malformed file)
            raise ValueError(f"{tokenizer_json}: not a readable tokenizer ({e})") from None
        config: dict[str, Any] = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # later file wins
            file = directory / name
            if file.is_file():
                try:
                    values = json.loads(file.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
                    raise ValueError(f"{file}: not a readable JSON file ({e})") from None
                if not isinstance(values, dict):
                    raise ValueError(f"{file}: expected a JSON object, got {type(values).__name__}")
                config.update(values)
        chat_template = config.get("chat_template")
        if isinstance(chat_template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in chat_template}
            chat_template = named.get("default", next(iter(named.values()), None))
        jinja_file = directory / "chat_template.jinja"
        if chat_template is None and jinja_file.is_file():
            chat_template = jinja_file.read_text(encoding="utf-8")
        max_len = config.get("model_max_length")
        try:
            return cls(
                backend,
                **{role: _token_content(config.get(role)) for role in _SPECIAL_ROLES},
                chat_template=chat_template,
                add_bos_token=bool(config.get("add_bos_token", False)),
                add_eos_token=bool(config.get("add_eos_token", False)),
                model_max_length=int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None,
            )
        except ValueError as e:  # a special token that tokenizer.json does not have
            raise ValueError(f"{directory}: {e} (the special tokens of tokenizer_config.json / "
                             "special_tokens_map.json must be in tokenizer.json)") from None

    # ------------------------------------------------------------------ properties

    @property
    def backend(self) -> _BackendTokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(int(token_id))

    def _id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id(self.unk_token)

    @property
    def special_tokens(self) -> dict[str, int]:
        """Every special token's content -> id (e.g. `{"<|im_start|>": 1, ...}`), sorted by id."""
        decoder = self._backend.get_added_tokens_decoder()
        return {t.content: i for i, t in sorted(decoder.items()) if t.special}

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Role -> content for the roles that are set (`bos_token`, `eos_token`, ...)."""
        return {role: getattr(self, role) for role in _SPECIAL_ROLES if getattr(self, role) is not None}

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`. Special tokens written in the text are always matched whole;
        `add_special_tokens` adds BOS/EOS only if the tokenizer is configured to."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], *, add_special_tokens: bool = False) -> list[list[int]]:
        return [e.ids for e in self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (accepts lists, tuples and integer numpy/jax arrays)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """Render `messages` (`[{"role": ..., "content": ...}, ...]`) with the chat template, as
        transformers' `apply_chat_template(messages, tokenize=False)` does. Extra keyword arguments
        are passed to the template."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        if self._compiled_template is None:
            self._compiled_template = _compile_chat_template(self.chat_template)
        variables = dict(self.special_tokens_map)
        variables.update(kwargs)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        return self._compiled_template.render(
            messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt, **variables
        )

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True, **kwargs: Any
    ) -> list[int]:
        """Ids of the rendered chat (no BOS/EOS added beyond what the template writes)."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    # ------------------------------------------------------------------ save

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` so that
        `transformers.AutoTokenizer.from_pretrained(directory)` (and `Tokenizer.from_files`) load it."""
        directory = pathlib.Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._backend.save(str(directory / "tokenizer.json"))
        added = {
            str(i): {
                "content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special,
            }
            for i, t in sorted(self._backend.get_added_tokens_decoder().items())
        }
        roles = self.special_tokens_map
        extra = [t for t in self.special_tokens if t not in roles.values()]
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "add_bos_token": self.add_bos_token,
            "add_eos_token": self.add_eos_token,
            "added_tokens_decoder": added,
            **{role: getattr(self, role) for role in _SPECIAL_ROLES},
            "clean_up_tokenization_spaces": False,
            "model_max_length": self.model_max_length if self.model_max_length is not None else int(1e30),
        }
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        special_map: dict[str, Any] = dict(roles)
        if extra:
            special_map["additional_special_tokens"] = extra
        (directory / "tokenizer_config.json").write_text(
            json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        (directory / "special_tokens_map.json").write_text(
            json.dumps(special_map, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        return directory

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
            f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})"
        )


def _set_post_processor(backend: _BackendTokenizer, bos: str | None, eos: str | None) -> None:
    """transformers' `update_post_processor`: optional BOS before and EOS after each sequence."""
    single = f"{bos + ':0 ' if bos else ''}$A:0{' ' + eos + ':0' if eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if bos else ''} $B:1{' ' + eos + ':1' if eos else ''}"
    special = [(t, backend.token_to_id(t)) for t in dict.fromkeys(x for x in (bos, eos) if x)]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
