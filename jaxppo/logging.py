"""Run logging: a run directory with ``metrics.jsonl``, TensorBoard events, JSON files and plots.

:class:`RunLogger` is the one place a training run writes to disk::

    with RunLogger("runs/ppo-001") as run:
        run.write_json("config.json", asdict(config))
        bar = run.progress(num_steps, desc="ppo")
        for step in range(num_steps):
            ...
            row = run.log("ppo", step, {"loss": loss, "kl": kl})   # jax/numpy scalars are fine
            bar.set_postfix(loss=row["loss"], kl=row["kl"]); bar.update()
        run.plot("ppo", ["loss", "kl"], filename="ppo.png")

Layout of ``run_dir``:

* ``metrics.jsonl`` — one JSON object per :meth:`RunLogger.log` call,
  ``{"stage": ..., "step": ..., <metric>: <float or null>}``, flushed line by line so a killed
  run leaves only whole lines (plus at most one partial last line, which :func:`read_metrics`
  skips and the next :class:`RunLogger` on the same directory cuts off before appending).
* ``tensorboard/`` — tensorboardX events, tag ``"<stage>/<metric>"``.
* whatever :meth:`RunLogger.write_json` and :meth:`RunLogger.plot` were asked to write.

NaN and ±inf are written as JSON ``null``: every file here is strict JSON.
"""

from __future__ import annotations

import json
import math
import numbers
import operator
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

__all__ = ["RunLogger", "read_metrics", "rewind_metrics"]

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_RESERVED = ("stage", "step")


def _to_float(key: str, value: Any) -> float:
    """``value`` (Python number, numpy or jax scalar) as a Python float; ValueError otherwise."""
    if isinstance(value, numbers.Real):  # bool, int, float, numpy scalars
        return float(value)
    try:
        arr = np.asarray(value)  # jax.Array -> host numpy array
    except Exception as e:  # noqa: BLE001 - anything unconvertible is a bad metric
        raise ValueError(f"metric {key!r}: cannot convert {type(value).__name__} to a float") from e
    if arr.ndim != 0:
        raise ValueError(f"metric {key!r} must be a scalar, got shape {arr.shape}")
    if arr.dtype.kind in "USOcMm":  # strings, objects, complex, datetimes
        raise ValueError(f"metric {key!r}: expected a real number, got dtype {arr.dtype}")
    try:
        return float(arr.astype(np.float64))  # astype also handles bfloat16 & co.
    except (TypeError, ValueError) as e:
        raise ValueError(f"metric {key!r}: cannot convert dtype {arr.dtype} to a float") from e


def _jsonable(obj: Any) -> Any:
    """``obj`` with non-finite floats as None and numpy/jax values as plain Python values."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (str, bool, int)):
        return obj
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, np.generic) or hasattr(obj, "__array__"):
        arr = np.asarray(obj)
        if arr.dtype.kind in "biuf":
            return _jsonable(arr.tolist())
        if arr.dtype.kind == "V":  # bfloat16 and other ml_dtypes floats
            return _jsonable(arr.astype(np.float64).tolist())
        return _jsonable(arr.tolist())
    if isinstance(obj, numbers.Real):
        return _jsonable(float(obj))
    raise TypeError(f"cannot write {type(obj).__name__} as JSON")


def _dumps(obj: Any, **kwargs) -> str:
    return json.dumps(_jsonable(obj), allow_nan=False, **kwargs)


def _format_row(stage: str, step: int, row: Mapping[str, float]) -> str:
    items = ", ".join(f"{k}={v:.4g}" for k, v in row.items())
    return f"[{stage}] step {step}: {items}" if items else f"[{stage}] step {step}"


def _repair_tail(path: Path) -> None:
    """Make an existing jsonl end in a newline: cut a partial last line left by a killed run."""
    if not path.exists():
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        start = data.rfind(b"\n") + 1
        try:
            json.loads(data[start:])
        except ValueError:
            f.truncate(start)  # partial line: drop it
        else:
            f.seek(0, os.SEEK_END)
            f.write(b"\n")  # complete object that only lost its newline: keep it


class RunLogger:
    """Writes one run directory: ``metrics.jsonl``, TensorBoard events, JSON files and plots.

    Args:
      run_dir: created if missing (parents too); an existing ``metrics.jsonl`` is appended to.
      tensorboard: also write TensorBoard events under ``run_dir/tensorboard``.
      echo: called with a one-line summary of every :meth:`log` call; ``None`` for silence.
        The default ``print`` goes through ``tqdm.write`` so it does not tear progress bars.
      wandb_project: also log every row to Weights & Biases under this project (``wandb`` must be
        installed; a clear error otherwise). ``wandb_config`` is recorded as the run's config.
    """

    def __init__(
        self,
        run_dir: str | Path,
        *,
        tensorboard: bool = True,
        echo: Callable[[str], None] | None = print,
        wandb_project: str | None = None,
        wandb_config: Mapping | None = None,
    ):
        wandb = None
        if wandb_project:  # checked first: a missing package must not leave files open
            try:
                import wandb
            except ImportError:
                raise ValueError("config field `wandb_project` is set but wandb is not installed "
                                 "(pip install wandb), or set it to \"\"") from None
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / METRICS_FILE
        self.echo = tqdm.write if echo is print else echo
        self._lock = threading.Lock()
        _repair_tail(self.metrics_path)
        self._jsonl = open(self.metrics_path, "a", encoding="utf-8")  # noqa: SIM115
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter  # lazy: imports torch when it is installed

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), flush_secs=10)
        self._wandb = None
        if wandb is not None:
            self._wandb = wandb.init(project=wandb_project, dir=str(self.run_dir), name=self.run_dir.name,
                                     config=_jsonable(dict(wandb_config or {})), resume="allow")
        self._closed = False

    # -- metrics ------------------------------------------------------------------------------
    def log(
        self, stage: str, step: int, metrics: Mapping[str, float | np.ndarray | Any]
    ) -> dict[str, float]:
        """Append one row to ``metrics.jsonl`` and TensorBoard; return the metrics as floats."""
        if not isinstance(stage, str) or not stage:
            raise ValueError(f"stage must be a non-empty string, got {stage!r}")
        try:
            step = operator.index(step)  # int, numpy or jax integer scalar
        except TypeError as e:
            raise ValueError(f"step must be an integer, got {step!r}") from e
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if not isinstance(key, str):
                raise ValueError(f"metric names must be strings, got {key!r}")
            if key in _RESERVED:
                raise ValueError(f"metric name {key!r} is reserved for the row's {key}")
            row[key] = _to_float(key, value)
        line = _dumps({"stage": stage, "step": step, **row})
        with self._lock:
            if self._closed:
                raise RuntimeError(f"RunLogger({str(self.run_dir)!r}) is closed")
            self._jsonl.write(line + "\n")
            self._jsonl.flush()
            if self._tb is not None:
                for key, value in row.items():
                    self._tb.add_scalar(f"{stage}/{key}", value, global_step=step)
            if self._wandb is not None:
                self._wandb.log({f"{stage}/{key}": value for key, value in row.items()} | {f"{stage}/step": step})
        if self.echo is not None:
            self.echo(_format_row(stage, step, row))
        return row

    def progress(self, iterable_or_total: Iterable | int, *, desc: str) -> tqdm:
        """A tqdm bar over an iterable, or with ``total`` steps if given an int (update it yourself)."""
        kwargs = dict(desc=desc, dynamic_ncols=True, mininterval=1.0)
        if isinstance(iterable_or_total, numbers.Integral):
            return tqdm(total=int(iterable_or_total), **kwargs)
        return tqdm(iterable_or_total, **kwargs)

    # -- files --------------------------------------------------------------------------------
    def write_json(self, name: str, data: Mapping) -> Path:
        """Write ``run_dir/name`` atomically as pretty-printed strict JSON (NaN/inf -> null)."""
        path = self.run_dir / name
        text = _dumps(data, indent=2) + "\n"
        _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
        return path

    def plot(
        self,
        stage: str,
        keys: Sequence[str],
        *,
        filename: str,
        title: str | None = None,
        ylabel_by_key: Mapping[str, str] | None = None,
    ) -> Path:
        """Plot ``keys`` of ``stage`` against step (one subplot each) to ``run_dir/filename`` (PNG)."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        if isinstance(keys, str):
            keys = [keys]
        if not keys:
            raise ValueError("plot needs at least one key")
        with self._lock:
            if not self._closed:
                self._jsonl.flush()
        rows = [r for r in read_metrics(self.metrics_path) if r.get("stage") == stage]
        if not rows:
            raise ValueError(f"no rows with stage {stage!r} in {self.metrics_path}")
        ylabel_by_key = ylabel_by_key or {}

        fig = Figure(figsize=(8.0, 0.8 + 2.2 * len(keys)), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(len(keys), 1, sharex=True, squeeze=False)[:, 0]
        for ax, key in zip(axes, keys):
            pts = [(r["step"], r[key]) for r in rows if key in r]
            xs = [s for s, _ in pts]
            ys = [math.nan if v is None else v for _, v in pts]  # null (NaN/inf) -> gap
            if pts:
                ax.plot(xs, ys, marker="o" if len(pts) <= 50 else None, markersize=3, linewidth=1.2)
            else:
                ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
            ax.set_ylabel(ylabel_by_key.get(key, key))
            ax.grid(True, alpha=0.3)
        axes[-1].set_xlabel("step")
        fig.suptitle(title if title is not None else stage)

        path = self.run_dir / filename
        _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
        return path

    # -- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Flush and close TensorBoard and ``metrics.jsonl``; safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()
            if self._wandb is not None:
                self._wandb.finish()

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RunLogger({str(self.run_dir)!r})"


class NullLogger:
    """:class:`RunLogger`'s interface writing nothing: what every process but process 0 logs with in
    a multi-process run (the metrics are the same on every process; one copy is written)."""

    def log(self, stage: str, step: int, metrics: Mapping[str, Any]) -> dict[str, float]:
        return {key: _to_float(key, value) for key, value in metrics.items()}

    def progress(self, iterable_or_total: Iterable | int, *, desc: str) -> tqdm:
        if isinstance(iterable_or_total, numbers.Integral):
            return tqdm(total=int(iterable_or_total), desc=desc, disable=True)
        return tqdm(iterable_or_total, desc=desc, disable=True)

    def write_json(self, name: str, data: Mapping) -> None:
        return None

    def plot(self, *args, **kwargs) -> None:
        return None

    def close(self) -> None:
        return None

    def __enter__(self) -> NullLogger:
        return self

    def __exit__(self, *exc) -> None:
        return None


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Call ``write(binary_file)`` on a temp file next to ``path``, then ``os.replace`` it there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl``; a partial last line (run killed mid-write) is skipped.

    Blank lines are ignored; any other line that is not a JSON object raises ValueError
    naming ``path:line``.
    """
    path = Path(path)
    data = path.read_bytes()
    lines = data.split(b"\n")
    rows: list[dict] = []
    for i, raw in enumerate(lines, start=1):
        last = i == len(lines)  # text after the final newline (empty when the file is whole)
        if not raw.strip():
            continue
        try:
            row = json.loads(raw.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            if last:
                break  # cut mid-write
            raise ValueError(f"{path}:{i}: malformed metrics line: {e}") from e
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(row).__name__}")
        rows.append(row)
    return rows


def rewind_metrics(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite ``metrics.jsonl`` at ``path`` (atomically) with only the rows for which ``keep(row)``
    holds; returns how many rows were cut. A resumed run calls it to drop the rows logged after the
    checkpoint it restarts from, so the finished file equals an uninterrupted run's."""
    path = Path(path)
    if not path.exists():
        return 0
    rows = read_metrics(path)
    kept = [row for row in rows if keep(row)]
    if len(kept) != len(rows):
        text = "".join(_dumps(row) + "\n" for row in kept)
        _atomic_write(path, lambda f: f.write(text.encode("utf-8")))
    return len(rows) - len(kept)
