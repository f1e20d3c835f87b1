"""Command-line overrides of a loaded config: ``--set ppo.kl_coef=0.1 model.dtype=bfloat16``.

:func:`apply_overrides` turns dotted ``KEY=VALUE`` assignments into a new frozen config. tyro converts
each VALUE to its field's annotated type — numbers (``1e-4``), ``true``/``false``, ``None`` for
optional fields, ``Literal`` choices, comma-separated tuples (``2,5``; an empty VALUE is ``()``) — and
the config is rebuilt from the leaves up with ``dataclasses.replace``, so fields not named keep the
loaded config's values and every ``__post_init__`` check runs, its message reaching the user verbatim.
:func:`config_help` lists every field with its type, loaded value and documentation (the field's
``#`` comment, read by tyro); :func:`parse_args` is the whole command line of ``experiments/run.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import functools
import inspect
import io
import re
import textwrap
import types
import typing
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import tyro

from jaxppo.config import load_config
from jaxppo.errors import InputError

_NONE = type(None)


class ConfigField(NamedTuple):
    """One settable field of a loaded config, as :func:`config_fields` lists it."""

    key: str  # dotted, e.g. "ppo.kl_coef"
    type: Any  # the resolved annotation
    value: Any  # the loaded config's value (a nested dataclass for a nested config)
    doc: str  # the field's `#` comment or attribute docstring; "" if it has none
    required: bool  # no default (only shown for the fields of a nested config that is None)


# -------------------------------------------------------------------------------------------------
# Overrides
# -------------------------------------------------------------------------------------------------


def apply_overrides(config, assignments: Sequence[str], *, source: str = "--set"):
    """Returns a new frozen ``config`` with the dotted ``KEY=VALUE`` ``assignments`` applied.

    E.g. ``["ppo.kl_coef=0.1", "model.dtype=bfloat16", "ppo.stop_token_ids=2,5", "ppo.kl_target=None"]``.
    A later assignment to the same key wins. Fields of a nested config that is None in ``config``
    (``model.rope_scaling.factor=2``) create it from its class defaults, which needs every field
    without a default. ``source`` names the assignments' origin in error messages.

    Raises:
      ValueError: naming the key for an unknown key (with close field names) or a malformed
        assignment; naming the field and its type for a value tyro cannot convert; and the
        config's own ``__post_init__`` error, unchanged, for a value it rejects.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"apply_overrides: expected a dataclass instance, got {type(config).__name__}")
    tree: dict[str, Any] = {}
    for assignment in assignments:
        key, raw = _split(assignment, source)
        annotation = _locate(config, key, f"{source} {assignment}")
        _insert(tree, key, _parse_value(annotation, raw, key, f"{source} {assignment}"), f"{source} {assignment}")
    return _rebuild(config, type(config), tree, "") if tree else config


class _Node(dict):
    """An inner node of the override tree: field name → _Node or parsed value."""


def _split(assignment: str, source: str) -> tuple[str, str]:
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not all(part.isidentifier() for part in key.split(".")):
        raise ValueError(f"{source} {assignment!r}: expected KEY=VALUE with KEY a dotted field name, "
                         f"e.g. ppo.kl_coef=0.1")
    return key, raw


@functools.cache
def _field_types(cls) -> dict[str, Any]:
    """The resolved annotations of the ``init`` fields of dataclass ``cls`` (the settable ones)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _members(annotation) -> tuple:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def _is_nested(annotation) -> bool:
    """Whether ``annotation`` holds a nested config (a dataclass, possibly in a union)."""
    return any(isinstance(m, type) and dataclasses.is_dataclass(m) for m in _members(annotation))


def _nested_class(annotation):
    """The one dataclass of ``C`` or ``C | None``; None for other annotations (or several dataclasses)."""
    classes = [m for m in _members(annotation) if isinstance(m, type) and dataclasses.is_dataclass(m)]
    return classes[0] if len(classes) == 1 else None


def _default(cls, name: str):
    """The class default of field ``name`` (None if it has none): what a None parent is rebuilt from."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


def _child_class(value, annotation):
    """The class the fields of a nested value belong to: the loaded value's own, else the annotation's."""
    return type(value) if dataclasses.is_dataclass(value) else _nested_class(annotation)


def _locate(config, key: str, where: str):
    """The annotation of the field at dotted ``key``, walking the loaded values (for union-typed fields)."""
    parts = key.split(".")
    value, cls = config, type(config)
    for depth, name in enumerate(parts):
        field_types = _field_types(cls)
        if name not in field_types:
            raise ValueError(_unknown_key_message(config, key, where))
        annotation = field_types[name]
        if depth == len(parts) - 1:
            return annotation
        value = getattr(value, name) if value is not None else _default(cls, name)
        cls = _child_class(value, annotation)
        if cls is None:
            prefix = ".".join(parts[: depth + 1])
            raise ValueError(f"config field `{prefix}` ({_type_name(annotation)}) has no field "
                             f"`{parts[depth + 1]}`, in {where}")
    raise AssertionError("unreachable")


def _unknown_key_message(config, key: str, where: str) -> str:
    keys = [f.key for f in config_fields(config) if not key.startswith(f"{f.key}.")]
    close = difflib.get_close_matches(key, keys, n=3, cutoff=0.6)
    leaf = key.rsplit(".", 1)[-1]
    close += [k for k in keys if k.rsplit(".", 1)[-1] == leaf and k not in close]
    hint = ("did you mean " + " or ".join(f"`{k}`" for k in close) + "?") if close else "see --help for the fields"
    return f"unknown config key `{key}` in {where}; {hint}"


def _insert(tree: dict, key: str, value, where: str) -> None:
    *parents, leaf = key.split(".")
    node = tree
    for depth, name in enumerate(parents):
        child = node.setdefault(name, _Node())
        if not isinstance(child, _Node):
            raise ValueError(f"{where}: `{'.'.join(parents[: depth + 1])}` is also set as a whole; "
                             "set a nested config or its fields, not both")
        node = child
    if isinstance(node.get(leaf), _Node):
        raise ValueError(f"{where}: the fields of `{key}` are also set; set a nested config or its fields, not both")
    node[leaf] = value


def _rebuild(value, cls, tree: dict, prefix: str):
    """``value`` (an instance of ``cls``, or None: built from the class defaults) with ``tree`` applied."""
    changes = {}
    for name, sub in tree.items():
        if isinstance(sub, _Node):
            child = getattr(value, name) if value is not None else _default(cls, name)
            changes[name] = _rebuild(child, _child_class(child, _field_types(cls)[name]), sub, f"{prefix}{name}.")
        else:
            changes[name] = sub
    if value is not None:
        return dataclasses.replace(value, **changes)
    missing = [f"{prefix}{f.name}" for f in dataclasses.fields(cls) if f.init and f.name not in changes
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"config field `{prefix[:-1]}` is None in the loaded config; to create a {cls.__name__} "
                         f"also set {', '.join(missing)}")
    return cls(**changes)


# -------------------------------------------------------------------------------------------------
# Values: parsed by tyro, one field at a time
# -------------------------------------------------------------------------------------------------

_REGISTRY = tyro.constructors.ConstructorRegistry()


@_REGISTRY.primitive_rule
def _bool_rule(info: tyro.constructors.PrimitiveTypeInfo):
    """``true`` / ``false`` as well as ``True`` / ``False`` (tyro's own rule takes only the latter)."""
    if info.type is not bool:
        return None
    return tyro.constructors.PrimitiveConstructorSpec(
        nargs=1, metavar="{true,false}", choices=("true", "false", "True", "False"),
        instance_from_str=lambda args: args[0].lower() == "true", is_instance=lambda x: isinstance(x, bool),
        str_from_instance=lambda x: ["true" if x else "false"])


@functools.cache
def _holder(annotation):
    """A one-field dataclass ``value: annotation``: what tyro parses one assignment into (one class per
    annotation, so tyro's per-class caches stay small)."""
    return dataclasses.make_dataclass("ConfigValue", [("value", annotation)], frozen=True)


def _parse_value(annotation, raw: str, key: str, where: str):
    if _is_nested(annotation):
        if raw == "None" and _NONE in _members(annotation):
            return None
        alternative = " or set it to None" if _NONE in _members(annotation) else ""
        raise ValueError(f"config field `{key}` is a nested config ({_type_name(annotation)}): set its fields "
                         f"({key}.FIELD=VALUE){alternative}, in {where}")
    spec = tyro.constructors.ConstructorRegistry.get_primitive_spec(
        tyro.constructors.PrimitiveTypeInfo.make(annotation, set()))
    if getattr(spec, "nargs", 1) == 1:
        args = [f"--value={raw}"]  # the `=` form: a value may start with "-"
    else:  # a collection: comma-separated items, "" is empty
        args = ["--value", *(item.strip() for item in raw.split(","))] if raw.strip() else ["--value"]
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            return tyro.cli(_holder(annotation), args=args, prog=key, add_help=False, registry=_REGISTRY,
                            config=(tyro.conf.FlagConversionOff,)).value
    except SystemExit:
        reason = _tyro_reason(stderr.getvalue())
        raise ValueError(f"config field `{key}`: expected {_type_name(annotation)}, got {raw!r} in {where}"
                         + (f" ({reason})" if reason else "")) from None


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_RULE = set("─━-= ")


def _tyro_reason(text: str) -> str:
    """The message of tyro's boxed error, on one line, without tyro's name for the argument.

    tyro draws ``title / rule / message / rule / help``, in UTF-8 box characters (the title on the top
    edge) or, when stdout is not UTF-8 (as under redirection), in ASCII: the message is the paragraph
    after the title.
    """
    paragraphs: list[list[str]] = []
    current: list[str] = []
    for line in _ANSI.sub("", text).splitlines():
        body = line.strip().strip("│|╭╮╰╯").strip()
        if not body or set(body) <= _RULE:
            if current:
                paragraphs.append(current)
                current = []
        elif line.strip().startswith("╭"):  # "╭─ Value error ───╮"
            paragraphs.append([body.strip("─ ")])
        else:
            current.append(body)
    if current:
        paragraphs.append(current)
    if not paragraphs:
        return ""
    message = " ".join(paragraphs[1] if len(paragraphs) > 1 else paragraphs[0])
    return message.replace("Error parsing --value: ", "").replace(" for argument '--value'", "")


def _type_name(annotation) -> str:
    """``float | None``, ``tuple[int, ...]``, ``RopeScaling | None``: annotations as written in the source."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return " | ".join(_type_name(m) for m in typing.get_args(annotation))
    if annotation is _NONE:
        return "None"
    if isinstance(annotation, type) and not typing.get_args(annotation):
        return annotation.__name__
    return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", str(annotation))  # typing.Literal → Literal


# -------------------------------------------------------------------------------------------------
# Help
# -------------------------------------------------------------------------------------------------


def config_fields(config) -> list[ConfigField]:
    """Every settable field of ``config``, depth first; a nested config is listed before its fields.

    The fields of a nested config that is None are listed with their class defaults (``required``
    if they have none), since assignments to them create it.
    """
    return list(_walk(config, type(config), ""))


def _walk(value, cls, prefix: str) -> Iterator[ConfigField]:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    listed = []
    for name, annotation in _field_types(cls).items():
        field = fields[name]
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        child = getattr(value, name) if value is not None else (None if required else _default(cls, name))
        entry = ConfigField(prefix + name, annotation, child, _field_doc(cls, name), required and value is None)
        listed.append((entry, _child_class(child, annotation)))
    # a config's own values first, then each nested config followed by its fields
    yield from (entry for entry, child_cls in listed if child_cls is None)
    for entry, child_cls in listed:
        if child_cls is not None:
            yield entry
            yield from _walk(entry.value, child_cls, f"{entry.key}.")


def _field_doc(cls, name: str) -> str:
    """The field's documentation as tyro's own help reads it: a docstring, else its `#` comment."""
    try:
        from tyro import _docstrings  # tyro has no public accessor for one field's documentation

        return _docstrings.get_field_docstring(cls, name, ()) or ""
    except Exception:  # noqa: BLE001 -- a missing doc (or a tyro without this helper) must not break --help
        return ""


def _class_doc(cls) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses writes when there is no docstring
        return ""
    return " ".join(doc.split("\n\n")[0].split())


def _show(value) -> str:
    """A value as it is written after ``KEY=``."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (tuple, list)):
        return ",".join(_show(v) for v in value) if value else "(empty)"
    if isinstance(value, str):
        return value or "(empty)"
    return str(value)


def config_help(config, *, prog: str) -> str:
    """The help text listing every (nested) field of ``config``: type, loaded value and documentation."""
    width = 100
    cls = type(config)
    out = [f"config fields of {cls.__name__}"
           + (f": {_class_doc(cls)}" if _class_doc(cls) else ""),
           f"override any of them: {prog} --set KEY=VALUE [KEY=VALUE ...]",
           "VALUE: 1e-4, true/false, None (where the type allows it), comma-separated tuples (2,5; empty: KEY=)",
           ""]
    for field in config_fields(config):
        nested = _child_class(field.value, field.type)
        if nested is not None:
            if field.value is None:
                state = f"{_type_name(field.type)}, None: set its required fields to create one"
            elif nested is field.type:
                state = nested.__name__
            else:
                state = f"{_type_name(field.type)}, loaded: {nested.__name__}"
            doc = _class_doc(nested)
            out += ["", f"{field.key} ({state})" + (f": {doc}" if doc else "")]
            if field.doc:
                out += textwrap.wrap(field.doc, width, initial_indent="    ", subsequent_indent="    ")
            continue
        value = "required" if field.required else _show(field.value)
        out.append(f"  {field.key}: {_type_name(field.type)} = {value}")
        if field.doc:
            out += textwrap.wrap(field.doc, width, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(out) + "\n"


# -------------------------------------------------------------------------------------------------
# The command line of experiments/run.py
# -------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None, *, prog: str = "python -m experiments.run",
               description: str | None = None):
    """``[--config FILE] [--set KEY=VALUE ...] [--run-dir DIR]`` → ``(config, args)``.

    The config is loaded from ``--config`` and the ``--set`` assignments applied (``--set`` may repeat).
    ``-h``/``--help`` anywhere prints the flags and then :func:`config_help` of the ``--config`` and
    exits 0. A bad assignment or a missing config file exits 2 with the error, as argparse does.
    """
    parser = argparse.ArgumentParser(prog=prog, description=description, add_help=False,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-h", "--help", action="store_true",
                        help="show this help and the fields of the --config, then exit")
    parser.add_argument("--config", default="configs/default.py",
                        help="config file defining get_config() (default: %(default)s)")
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE",
                        help="override config fields, e.g. --set ppo.kl_coef=0.1 model.dtype=bfloat16")
    parser.add_argument("--run-dir", default=None, help="output directory (default: a fresh folder under runs/)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an input error (a config field, file or run directory) "
                             "instead of its one line")
    group = parser.add_argument_group("multi-process runs (jax.distributed; default: $JAX_COORDINATOR_ADDRESS, "
                                      "$JAX_NUM_PROCESSES, $JAX_PROCESS_ID; JAXPPO_DISTRIBUTED=auto on TPU pods)")
    group.add_argument("--coordinator", default=None, metavar="HOST:PORT", help="address of process 0")
    group.add_argument("--num-processes", type=int, default=None, help="number of processes")
    group.add_argument("--process-id", type=int, default=None, help="this process's index, 0 .. N-1")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except (FileNotFoundError, InputError) as exc:
        if args.help:
            print(parser.format_help())
        parser.error(str(exc))
    if args.help:
        print(parser.format_help())
        print(config_help(config, prog=f"{prog} --config {args.config}"), end="")
        parser.exit(0)
    try:
        config = apply_overrides(config, args.set, source="--set")
    except ValueError as exc:
        parser.error(str(exc))
    return config, args
