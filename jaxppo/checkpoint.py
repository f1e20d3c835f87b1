"""Checkpoints of a run with orbax: one ``CheckpointManager`` per pipeline stage.

Layout: ``run_dir/checkpoints/<stage>/<step>/`` holding named pytrees (train states, frozen params,
KL-controller state, stage outputs) plus a JSON ``meta`` item (step, config, stage results, and a
checksum of every array). Step ``k`` means "k steps done": a run resumed from it starts at step
``k``. Orbax writes each save to a temporary directory and renames it when complete, so a process
killed at any moment — including during a save — leaves only complete checkpoints behind. Only the
last ``keep`` checkpoints of a stage are kept.

A complete checkpoint can still be damaged afterwards (a flipped bit, a truncated or overwritten
file). Each array leaf is saved with the SHA-256 of its whole value (dtype name, shape and C-order
bytes; :func:`leaf_checksum`): computed on the host from the gathered value, so it does not depend
on the mesh the array was sharded over and a checkpoint restores onto any device count. (Gathering
and reading whole arrays on every process is fine at the sizes jaxppo trains; a checksum per shard
would be the next step for models that do not fit one host.) :meth:`StageCheckpoints.verify` reads
a checkpoint's arrays as host numpy and compares; :meth:`StageCheckpoints.latest_step` is the newest
checkpoint that verifies, skipping a damaged newer one with a one-line warning naming it (a resumed
run decides from it where to rewind ``metrics.jsonl``, so nothing is touched before a checkpoint has
verified), and raises one :class:`CheckpointError` naming the directory when none verifies.

Restoring checks, before any array is read, that the saved config equals the current one and that
every array's path, shape and dtype match the state it restores into, then checks the restored
values against the saved checksums; a mismatch or an unreadable checkpoint raises one
:class:`CheckpointError` naming the directory and what differs, in one line. Nothing is pickled:
arrays are stored as tensorstore/zarr, metadata as JSON.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxppo.errors import InputError
from jaxppo.sharding import to_host

META = "meta"
CHECKSUMS = "checksums"  # key of the meta item: {item name: {leaf path: leaf_checksum}}

_log = logging.getLogger(__name__)


class CheckpointError(InputError, RuntimeError):
    """A checkpoint that cannot be restored into the current run: names its path and the reason, in one line."""


def _key_name(entry) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _leaves(tree) -> dict[str, Any]:
    """``{"a/b/0": leaf}`` of a pytree (the same names for a state and for its orbax metadata tree)."""
    return {"/".join(_key_name(e) for e in path): x for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat(tree) -> dict[str, tuple[tuple[int, ...], str | None]]:
    """``{"a/b/0": (shape, dtype)}`` of a pytree of arrays (dtype None for Python scalars)."""
    return {key: (tuple(np.shape(x)), str(x.dtype) if hasattr(x, "dtype") and not isinstance(x, (int, float)) else None)
            for key, x in _leaves(tree).items()}


def leaf_checksum(x) -> str:
    """SHA-256 (hex) of one array's whole value: its dtype name, shape and C-order bytes.

    A sharded array is gathered to the host first (across processes too: every process must call
    it), so the checksum is the same whatever mesh the array lives on. Python scalars hash as the
    NumPy scalars orbax stores them as (``0.5`` as float64, ``3`` as int64).
    """
    value = np.asarray(to_host(x))
    digest = hashlib.sha256(f"{value.dtype.name}{value.shape}".encode())
    digest.update(np.ascontiguousarray(value).reshape(-1).view(np.uint8))
    return digest.hexdigest()


def _checksums(tree) -> dict[str, str]:
    return {key: leaf_checksum(x) for key, x in _leaves(tree).items()}


def _compare(name: str, saved: dict[str, str], values) -> str | None:
    """Why the arrays ``values`` of item ``name`` are not the ones saved with checksums ``saved`` (None if they are)."""
    got = _checksums(values)
    changed = [key for key in saved if key in got and got[key] != saved[key]]
    if changed:
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return (f"{name}: checksum mismatch in {changed[0]}{more} (saved sha256 {saved[changed[0]][:12]}..., "
                f"read {got[changed[0]][:12]}...)")
    missing, extra = sorted(set(saved) - set(got)), sorted(set(got) - set(saved))
    if missing or extra:
        return f"{name}: arrays differ from the saved list (missing: {missing[:3]}, unexpected: {extra[:3]})"
    return None


def _short(error: BaseException, limit: int = 200) -> str:
    """``Type: message`` of the innermost cause of ``error`` on one line, without TensorStore's spec dump."""
    while error.__cause__ is not None:
        error = error.__cause__
    text = str(error).strip().split("\n", 1)[0]
    for noise in (" [tensorstore_spec=", " See full TensorStore details"):
        text = text.split(noise, 1)[0]
    return f"{type(error).__name__}: {text[:limit - 3] + '...' if len(text) > limit else text}"


@functools.cache
def _drop_orbax_read_noise() -> None:
    """Drop, for the rest of the process, the noise orbax leaves behind when a read of a damaged
    checkpoint fails (installed once, by the first checkpoint read).

    Orbax reads the arrays of a checkpoint concurrently under ``asyncio.run``: when one read fails,
    the loop closes while TensorStore still completes the others, and each prints "Event loop is
    closed" (through ``sys.unraisablehook``), logs "exception was never retrieved" (the asyncio
    logger), or — once the exception that kept them alive is freed — "Exception ignored in
    <coroutine ...>": pages of tracebacks around the one error that matters, arriving whenever the
    stray reads finish (on a loaded machine, long after the read returned). Orbax also logs the
    content of a damaged step's ``_CHECKPOINT_METADATA`` when it lists the steps. Exactly those are
    dropped; every other unraisable exception and log record passes.
    """
    previous = sys.unraisablehook

    def hook(unraisable):
        closed_loop = isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(
            unraisable.exc_value)
        code = getattr(unraisable.object, "cr_code", None)  # a coroutine's code object
        stray_read = code is not None and "orbax" in code.co_filename
        if not (closed_loop or stray_read):
            previous(unraisable)

    def keep(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "exception was never retrieved" not in message and "Failed to json parse Metadata file" not in message

    sys.unraisablehook = hook
    for log in (logging.getLogger("asyncio"), logging.getLogger("absl")):
        log.addFilter(keep)


def _quietly(read: Callable[[], Any]) -> tuple[Any, str | None]:
    """``(read(), None)``, or ``(None, why)`` with a one-line reason when ``read`` raises, without the
    noise orbax leaves behind when a read fails (:func:`_drop_orbax_read_noise`)."""
    _drop_orbax_read_noise()
    try:
        return read(), None
    except Exception as e:  # noqa: BLE001 - damaged files surface as many exception types
        why = _short(e)
    gc.collect()  # free the failed read's exception and traceback (and the coroutines they hold) now
    return None, why


def _read_json(directory: Path) -> dict:
    return ocp.JsonCheckpointHandler().restore(epath.Path(directory))


def _tree_metadata(directory: Path):
    """The saved tree of an item, its leaves orbax's array / scalar metadata (reads no array data)."""
    handler = ocp.StandardCheckpointHandler()
    try:
        return handler.metadata(epath.Path(directory))
    finally:
        handler.close()


def _read_host(directory: Path):
    """The arrays of an item as saved, as host NumPy arrays: no device, no sharding, no cross-process barrier."""
    handler = ocp.PyTreeCheckpointHandler()
    try:
        tree = handler.metadata(epath.Path(directory)).tree
        args = jax.tree.map(lambda m: ocp.RestoreArgs(
            restore_type=np.ndarray if isinstance(m, ocp.metadata.ArrayMetadata) else None), tree)
        return handler.restore(epath.Path(directory), args=ocp.args.PyTreeRestore(restore_args=args))
    finally:
        handler.close()


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
        self._manager, why = _quietly(lambda: ocp.CheckpointManager(self.directory, options=options))
        if why is not None:
            raise CheckpointError(f"{self.directory}: cannot open checkpoints ({why})")
        self._problems: dict[int, str | None] = {}  # step → why it does not verify (None: it does); read once
        self._reported: set[int] = set()  # damaged steps already warned about

    def latest_step(self) -> int | None:
        """The newest checkpoint that verifies (:meth:`verify`), or None when the stage has none.

        A damaged newer checkpoint is skipped with a one-line warning naming it (the stage's next
        save replaces it); when checkpoints exist and none verifies, raises :class:`CheckpointError`
        naming the directory. Each checkpoint is read once per instance, into host memory, with no
        cross-process barrier (process 0 alone calls it to rewind ``metrics.jsonl``).
        """
        skipped = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            if step not in self._problems:
                self._problems[step] = self._problem(step)
            if self._problems[step] is None:
                for bad, why in skipped:
                    if bad not in self._reported:
                        self._reported.add(bad)
                        _warn(f"{self.directory / str(bad)}: damaged checkpoint skipped ({why}); using step {step}")
                return step
            skipped.append((step, self._problems[step]))
        if skipped:
            reasons = "; ".join(f"step {step}: {why}" for step, why in skipped)
            raise CheckpointError(f"{self.directory}: no checkpoint verifies ({reasons}); "
                                  "move the directory away to run the stage from the start")
        return None

    def verify(self, step: int) -> None:
        """Raises :class:`CheckpointError` unless every array of the checkpoint at ``step`` reads back
        with its saved checksum. Reads from disk into host memory only, so it may run on one process
        of a multi-process run. (A checkpoint saved before checksums existed only needs readable metadata.)"""
        problem = self._problem(step)
        self._problems[step] = problem
        if problem is not None:
            raise CheckpointError(f"{self.directory / str(step)}: {problem}")

    def _problem(self, step: int) -> str | None:
        path = self.directory / str(step)
        meta, why = _quietly(lambda: _read_json(path / META))
        if why is not None:
            return f"unreadable metadata ({why})"
        for name, saved in (meta.get(CHECKSUMS) or {}).items():
            values, why = _quietly(functools.partial(_read_host, path / name))
            if why is not None:
                return f"{name}: unreadable ({why})"
            problem = _compare(name, saved, values)
            if problem is not None:
                return problem
        return None

    def save(self, step: int, items: dict[str, Any], meta: dict | None = None) -> None:
        """Saves ``items`` (name → pytree of arrays; None values are skipped) and ``meta`` at ``step``,
        with the checksum of every array (gathered to the host: every process must call it).

        A checkpoint already at ``step`` or later can only be one :meth:`latest_step` skipped as
        damaged (a run resumes from the newest that verifies): it is deleted first, so that it
        neither blocks this save nor outlives it when only the last ``keep`` are kept.
        """
        step = int(step)
        items = {name: tree for name, tree in items.items() if tree is not None}
        meta = {"step": step, "config": self.config, **(meta or {}),
                CHECKSUMS: {name: _checksums(tree) for name, tree in items.items()}}
        for stale in [s for s in self._manager.all_steps() if s >= step]:
            _warn(f"{self.directory / str(stale)}: deleting this checkpoint: the run went on from an earlier one")
            self._manager.delete(stale)
            self._problems.pop(stale, None)
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(step, args=ocp.args.Composite(**args, **{META: ocp.args.JsonSave(meta)}), force=True)
        self._manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        """The JSON ``meta`` item of the checkpoint at ``step`` (read directly: no cross-process barrier)."""
        path = self.directory / str(step)
        meta, why = _quietly(lambda: _read_json(path / META))
        if why is not None:
            raise CheckpointError(f"{path}: unreadable checkpoint metadata ({why})")
        return meta

    def restore(self, step: int, targets: dict[str, Any]) -> tuple[dict[str, Any], dict]:
        """``(items, meta)`` of the checkpoint at ``step``, each item restored into its target's structure.

        ``targets`` maps names to pytrees shaped like what was saved (e.g. freshly initialised train
        states); None targets are skipped; an ``...`` target restores the item as saved (arrays of a
        flat dict, no structure check). The restored values are checked against the saved checksums
        (gathered to the host: every process must call it). Raises :class:`CheckpointError` on any
        mismatch or damage.
        """
        path = self.directory / str(step)
        meta = self.read_meta(step)
        diff = config_diff(meta.get("config"), self.config)
        if diff:
            raise CheckpointError(f"{path}: saved with a different config; mismatched fields: {'; '.join(diff)}")
        targets = {name: tree for name, tree in targets.items() if tree is not None}
        for name, target in targets.items():
            if not (path / name).is_dir():
                items = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name != META) if path.is_dir() else []
                raise CheckpointError(f"{path}: has no item {name!r} (items: {items})")
            if target is not ...:
                saved_meta, why = _quietly(functools.partial(_tree_metadata, path / name))
                if why is not None:
                    raise CheckpointError(f"{path / name}: unreadable checkpoint metadata ({why})")
                self._check_item(path / name, saved_meta, target)
        restored, why = _quietly(lambda: self._manager.restore(step, args=ocp.args.Composite(
            **{name: ocp.args.StandardRestore(None if t is ... else t) for name, t in targets.items()})))
        if why is not None:
            raise CheckpointError(f"{path}: cannot restore ({why})")
        items = {name: restored[name] for name in targets}
        for name, tree in items.items():
            saved = (meta.get(CHECKSUMS) or {}).get(name)
            problem = None if saved is None else _compare(name, saved, tree)
            if problem is not None:
                raise CheckpointError(f"{path}: {problem}")
        return items, meta

    @staticmethod
    def _check_item(path: Path, saved_meta, target) -> None:
        saved = _flat(saved_meta)
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


def _warn(message: str) -> None:
    if jax.process_index() == 0:  # every process reads the same files and decides the same
        _log.warning(message)
