"""Config loading, validation and serialisation: a config is a Python file whose ``get_config()``
returns a frozen dataclass; every field check goes through :func:`require`; :func:`to_json` is the
one JSON form of a config (``config.json``, checkpoint metadata, W&B, resume checks)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path


def load_config(path: str | Path):
    """Imports ``path`` and returns its ``get_config()`` (a frozen dataclass instance)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"jaxppo_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path}: a config file must define get_config()")
    config = module.get_config()
    if not dataclasses.is_dataclass(config) or not config.__dataclass_params__.frozen:
        raise ValueError(f"{path}: get_config() must return a frozen dataclass, got {type(config).__name__}")
    return config


def require(condition: bool, field: str, message: str) -> None:
    """Raises ``ValueError`` naming the config ``field`` unless ``condition`` holds."""
    if not condition:
        raise ValueError(f"config field `{field}`: {message}")


def to_json(config) -> dict:
    """The config as plain JSON values (tuples become lists), as stored and compared on resume."""
    return json.loads(json.dumps(dataclasses.asdict(config)))
