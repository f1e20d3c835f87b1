"""Config loading, validation and serialisation: a config is a Python file whose ``get_config()``
returns a frozen dataclass; every field check goes through :func:`require` (:func:`require_range` for a
number's range, :func:`require_finite` for every float of a config); :func:`to_json` is the one JSON form
of a config (``config.json``, checkpoint metadata, W&B, resume checks), never with NaN or ±inf."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import numbers
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from jaxppo.errors import InputError

# Adam moves every weight by up to about the learning rate per step; above 1 a step exceeds the scale of
# any weight of a trained network (and 1e30 or inf turns every parameter into ±inf).
MAX_LEARNING_RATE = 1


class ConfigError(InputError):
    """A config field with a value that cannot run; the message starts with ``config field `name`: ``."""


def load_config(path: str | Path):
    """Imports ``path`` and returns its ``get_config()`` (a frozen dataclass instance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxppo_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise InputError(f"{path}: a config file must define get_config()")
    config = module.get_config()
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise InputError(f"{path}: get_config() must return a frozen dataclass, got {type(config).__name__}")
    return config


def require(condition: bool, field: str, message: str) -> None:
    """Raises :class:`ConfigError` naming the config ``field`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(f"config field `{field}`: {message}")


def require_range(value, field: str, *, gt: float | None = None, ge: float | None = None,
                  lt: float | None = None, le: float | None = None) -> None:
    """Raises :class:`ConfigError` naming ``field`` unless ``value`` is a finite real number within the bounds.

    ``gt`` / ``ge`` are the lower bound (exclusive / inclusive), ``lt`` / ``le`` the upper one; the message
    states the range, e.g. ``must be in (0, 1], got 0.0`` or ``must be a finite number > 0, got inf``.
    NaN and ±inf are refused whatever the bounds.
    """
    low = f"({gt}" if gt is not None else f"[{ge}" if ge is not None else None
    high = f"{lt})" if lt is not None else f"{le}]" if le is not None else None
    if low and high:
        expected = f"in {low}, {high}"
    else:
        expected = ("> " if gt is not None else ">= " if ge is not None else "< " if lt is not None else "<= ")
        expected += str(next(b for b in (gt, ge, lt, le) if b is not None))
    shown = str(value) if isinstance(value, numbers.Real) else repr(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"config field `{field}`: must be a finite number {expected}, got {shown}")
    inside = ((gt is None or value > gt) and (ge is None or value >= ge)
              and (lt is None or value < lt) and (le is None or value <= le))
    require(inside, field, f"must be {expected}, got {shown}")


def _floats(value, prefix: str) -> Iterator[tuple[str, Any]]:
    """``(dotted field, float)`` for every float in ``value``: nested dataclasses, tuples, lists, dicts."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _floats(getattr(value, f.name), f"{prefix}.{f.name}" if prefix else f.name)
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _floats(item, f"{prefix}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _floats(item, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(value, numbers.Real) and not isinstance(value, numbers.Integral):
        yield prefix, value


def require_finite(config, prefix: str = "") -> None:
    """Raises :class:`ConfigError` naming the first float field of ``config`` (nested configs included)
    that is NaN or ±inf: no such value can train, and none can be written to ``config.json``."""
    for field, value in _floats(config, prefix):
        require(math.isfinite(value), field, f"must be a finite number, got {value}")


def to_json(config) -> dict:
    """The config as plain JSON values (tuples become lists), as stored and compared on resume.

    Strict JSON: a NaN or ±inf (which validation refuses) raises :class:`ConfigError` naming its field, so a
    saved config is always the one that ran (NaN would be written as ``null`` and could never be resumed).
    """
    require_finite(config)
    return json.loads(json.dumps(dataclasses.asdict(config), allow_nan=False))
