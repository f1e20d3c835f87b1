"""Checkpoints of a run with orbax: one ``CheckpointManager`` per pipeline stage.

Layout: ``run_dir/checkpoints/<stage>/<step>/`` holding named pytrees (train states, frozen params,
KL-controller state, stage outputs) plus a JSON ``meta`` item (step, config, stage results). Step
``k`` means "k steps done": a run resumed from it starts at step ``k``. Orbax writes each save to a
temporary directory and renames it when complete, so a process killed at any moment — including
during a save — leaves only complete checkpoints behind, and :meth:`StageCheckpoints.latest_step`
never sees a torn one. Only the last ``keep`` checkpoints of a stage are kept.

Restoring checks, before any array is read, that the saved config equals the current one and that
every array's path, shape and dtype match the state it restores into; a mismatch or an unreadable
checkpoint raises one :class:`CheckpointError` naming the directory and what differs. Nothing is
pickled: arrays are stored as tensorstore/zarr, metadata as JSON.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

META = "meta"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be restored into the current run: names its path and the reason."""


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """``{"a/b/0": (shape, dtype)}`` of a pytree of arrays (dtype None for Python scalars)."""
    out = {}
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
        dtype = str(x.dtype) if hasattr(x, "dtype") and not isinstance(x, (int, float)) else None
        out["/".join(_key_name(e) for e in path)] = (tuple(np.shape(x)), dtype)
    return out


def config_diff(saved: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted fields whose values differ between two configs in JSON form (:func:`jaxppo.config.to_json`)."""
    if isinstance(saved, dict) and isinstance(current, dict):
        out = []
        for key in sorted(set(saved) | set(current)):
            name = f"{prefix}.{key}" if prefix else str(key)
            if key not in saved or key not in current:
                out.append(f"{name} (only in {'the checkpoint' if key in saved else 'the current config'})")
            else:
                out.extend(config_diff(saved[key], current[key], name))
        return out
    return [] if saved == current else [f"{prefix}: checkpoint {saved!r} != current {current!r}"]


class StageCheckpoints:
    """Save / restore the named pytrees of one stage under ``directory``."""

    def __init__(self, directory: str | Path, *, keep: int, config: dict):
        self.directory = Path(directory).absolute()
        self.config = config  # the JSON form (jaxppo.config.to_json), as stored in each checkpoint's meta
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options)
        except Exception as e:  # noqa: BLE001 - orbax fails in many ways on a damaged directory
            raise CheckpointError(f"{self.directory}: cannot open checkpoints: {type(e).__name__}: {e}") from e

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step: int, items: dict[str, Any], meta: dict | None = None) -> None:
        """Saves ``items`` (name → pytree of arrays; None values are skipped) and ``meta`` at ``step``."""
        meta = {"step": int(step), "config": self.config, **(meta or {})}
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items() if tree is not None}
        self._manager.save(int(step), args=ocp.args.Composite(**args, **{META: ocp.args.JsonSave(meta)}), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The JSON ``meta`` item of the checkpoint at ``step``."""
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**{META: ocp.args.JsonRestore()}))[META]
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{self.directory / str(step)}: unreadable checkpoint metadata: "
                                  f"{type(e).__name__}: {e}") from e

    def restore(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """``(items, meta)`` of the checkpoint at ``step``, each item restored into its target's structure.

        ``targets`` maps names to pytrees shaped like what was saved (e.g. freshly initialised train
        states); None targets are skipped; an ``...`` target restores the item as saved (arrays of a
        flat dict, no structure check). Raises :class:`CheckpointError` on any mismatch.
        """
        path = self.directory / str(step)
        meta = self.read_meta(step)
        diff = config_diff(meta.get("config"), self.config)
        if diff:
            raise CheckpointError(f"{path}: saved with a different config; mismatched fields: {'; '.join(diff)}")
        targets = {name: tree for name, tree in targets.items() if tree is not None}
        try:
            stored = self._manager.item_metadata(step)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: unreadable checkpoint: {type(e).__name__}: {e}") from e
        for name, target in targets.items():
            if target is ...:
                continue
            saved_meta = stored.get(name) if hasattr(stored, "get") else None
            if saved_meta is None and (path / name).is_dir():
                # a fresh manager knows no handler for items it has not restored yet: read the tree's own
                saved_meta = self._tree_metadata(path / name)
            if saved_meta is None:
                items = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != META) if path.is_dir() else []
                raise CheckpointError(f"{path}: has no item {name!r} (items: {items})")
            self._check_item(path / name, saved_meta, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                **{name: ocp.args.StandardRestore(None if t is ... else t) for name, t in targets.items()}))
        except Exception as e:  # noqa: BLE001 - corrupt files surface as many exception types
            raise CheckpointError(f"{path}: cannot restore: {type(e).__name__}: {e}") from e
        return {name: restored[name] for name in targets}, meta

    @staticmethod
    def _tree_metadata(path: Path):
        try:
            return ocp.StandardCheckpointHandler().metadata(epath.Path(path))
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"{path}: unreadable checkpoint metadata: {type(e).__name__}: {e}") from e

    @staticmethod
    def _check_item(path: Path, saved_meta, target) -> None:
        saved = {k: v for k, v in _flat(saved_meta).items()}
        want = _flat(target)
        problems = []
        # params first: they name the model mismatch; optimizer moments repeat it
        for key in sorted(set(saved) | set(want), key=lambda k: (not k.startswith("params"), k)):
            if key not in saved:
                problems.append(f"{key} missing from the checkpoint")
            elif key not in want:
                problems.append(f"{key} is in the checkpoint but not in the current state")
            elif saved[key][0] != want[key][0]:
                problems.append(f"{key} shape {saved[key][0]} in the checkpoint, {want[key][0]} now")
            elif None not in (saved[key][1], want[key][1]) and saved[key][1] != want[key][1]:
                problems.append(f"{key} dtype {saved[key][1]} in the checkpoint, {want[key][1]} now")
        if problems:
            shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} in all)" if len(problems) > 5 else "")
            raise CheckpointError(f"{path}: does not match the current state: {shown}")

    def close(self) -> None:
        self._manager.close()
