"""Live logs: per-chunk metrics appended to ``<rundir>/live.jsonl`` as a run goes, and to TensorBoard.

A long run reports after every chunk (the host regains control there anyway): one JSON object per line,
written and flushed at once, so ``tail -f live.jsonl``, another process or a notebook
(:func:`nestlearn.plot.live_curves`) can follow the run while it trains. When ``tensorboardX`` is
installed (the ``tensorboard`` extra), the same scalars also go to TensorBoard event files under
``<rundir>/tb/`` (``tensorboard --logdir <rundir>/tb``). The JSON lines are the record; TensorBoard is a
view of them.

Two kinds of line (every line also has ``"time"``, Unix seconds, and ``"wall"``, seconds since the log was
opened):

* ``{"kind": "chunk", "section", "runs", "step", "loss", "acc", "diverged", ...}``: after a chunk of
  training steps, per run (lists in the order of ``runs``), ``step`` the global step at the chunk's end;
* ``{"kind": "eval", "section", "runs", "step", "task", "acc": [[run][task]]}``: accuracies on every task
  of a stream at an evaluation point (a task's end; ``task`` the task just trained, ``-1`` before
  training), for forgetting curves;
* ``{"kind": "end"}``: the log was closed (the run finished or stopped cleanly).

NaN and infinities are written as ``null`` (strict JSON, readable by ``jq``) and read back as NaN.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from nestlearn._errors import ConfigError, DataError, OperatingError

LIVE_FILE = "live.jsonl"
TB_DIR = "tb"


def _plain(value: Any) -> Any:
    """``value`` as JSON-ready Python: arrays to (nested) lists, numpy scalars to numbers, NaN/inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "__array__") and not isinstance(value, np.generic):
        arr = np.asarray(value)
        return [_plain(a) for a in arr] if arr.ndim else _plain(arr[()])
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return None
        # A float32 as its shortest decimal (0.1, not 0.10000000149011612).
        return float(str(value)) if isinstance(value, np.floating) else float(value)
    return value


def run_label(run: Mapping[str, Any] | str | int) -> str:
    """A short id of one run: ``"seed=0,lam=10"`` for a :func:`nestlearn.engine.run_grid` entry."""
    if isinstance(run, Mapping):
        return ",".join(f"{k}={v}" for k, v in run.items())
    return str(run)


def _tensorboard_writer(logdir: Path):
    """A ``SummaryWriter`` of ``tensorboardX`` (or of ``torch.utils.tensorboard``), or ``None``."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(logdir))


class LiveLog:
    """Appends one JSON line per chunk of a run to ``<rundir>/live.jsonl`` (and TensorBoard, if installed).

    Each line is flushed as it is written, so a reader sees whole lines while the run goes. Opening a log
    that exists appends to it (a resumed run continues its log); if a killed writer left a partial last
    line, it is ended first so the next line stays readable.

    Args:
      rundir: the run directory (created if missing).
      runs: the runs of the chunks that follow, in the order of the metrics' run axis (e.g. the entries
        of :func:`nestlearn.engine.run_grid`, or seeds); can be set per section with :meth:`section`.
      tensorboard: ``None`` writes TensorBoard event files under ``<rundir>/tb/`` when ``tensorboardX``
        is installed; ``True`` requires it (an error if missing); ``False`` never.
      filename: the JSONL file's name inside ``rundir``.

    Example:
      >>> import tempfile
      >>> with LiveLog(tempfile.mkdtemp(), runs=[0, 1], tensorboard=False) as live:
      ...     _ = live.chunk(step=100, loss=[0.7, 0.9], acc=[0.8, 0.6])
      ...     [r["loss"] for r in read_live(live.path)]
      [[0.7, 0.9]]
    """

    def __init__(
        self,
        rundir: str | os.PathLike,
        *,
        runs: Sequence[Mapping[str, Any] | str | int] = (),
        tensorboard: bool | None = None,
        filename: str = LIVE_FILE,
    ) -> None:
        self.dir = Path(rundir)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OperatingError(
                f"cannot create the run directory {self.dir} for the live log: {e}"
            ) from None
        self.path = self.dir / filename
        self.runs = [run_label(r) for r in runs]
        self.section_name: str | None = None
        self.start = time.time()
        try:
            self._file = open(self.path, "a+b")  # noqa: SIM115 - held open for the run, closed in close()
        except OSError as e:
            raise OperatingError(f"cannot open the live log {self.path}: {e}") from None
        self._end_partial_line()
        self.tb = None
        if tensorboard or tensorboard is None:
            self.tb = _tensorboard_writer(self.dir / TB_DIR)
            if self.tb is None and tensorboard:
                raise ConfigError(
                    "tensorboard=True needs tensorboardX (pip install 'nestlearn[tensorboard]' or "
                    "tensorboardX); pass tensorboard=None to write TensorBoard files only when installed"
                )

    def _end_partial_line(self) -> None:
        f = self._file
        f.seek(0, os.SEEK_END)
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
                f.flush()

    # -- writing ---------------------------------------------------------------------------------

    def section(
        self, name: str | None, runs: Sequence[Mapping[str, Any] | str | int] | None = None
    ) -> LiveLog:
        """Labels the following lines with ``name`` (a strategy, a variant) and, if given, their runs."""
        self.section_name = name
        if runs is not None:
            self.runs = [run_label(r) for r in runs]
        return self

    def write(self, record: Mapping[str, Any]) -> dict:
        """Appends ``record`` (plus ``time`` and ``wall``) as one line, flushed; returns what was written."""
        now = time.time()
        line = {**_plain(dict(record)), "time": round(now, 3), "wall": round(now - self.start, 3)}
        data = (json.dumps(line, allow_nan=False, separators=(",", ":")) + "\n").encode()
        try:
            self._file.write(data)
            self._file.flush()
        except OSError as e:
            raise OperatingError(f"cannot append to the live log {self.path}: {e}") from None
        return line

    def _common(self, kind: str, step: int, runs, section) -> dict:
        section = self.section_name if section is None else section
        runs = self.runs if runs is None else [run_label(r) for r in runs]
        return {"kind": kind, "section": section, "runs": runs, "step": int(step)}

    def chunk(
        self,
        *,
        step: int,
        loss: Any,
        acc: Any = None,
        diverged: Any = None,
        section: str | None = None,
        runs: Sequence | None = None,
        **extra: Any,
    ) -> dict:
        """One chunk's metrics, per run: ``loss`` and ``acc`` are ``[runs]`` chunk means.

        Args:
          step: the global step at the end of the chunk.
          loss: the mean training loss of the chunk, per run.
          acc: the mean training accuracy, per run (optional).
          diverged: whether each run has diverged (optional).
          section: overrides the current :meth:`section` for this line.
          runs: overrides the current runs for this line.
          extra: more fields (``task``, ``chunk``, norms), written as they are.
        """
        rec = self._common("chunk", step, runs, section)
        rec["loss"] = np.atleast_1d(np.asarray(loss))
        if acc is not None:
            rec["acc"] = np.atleast_1d(np.asarray(acc))
        if diverged is not None:
            rec["diverged"] = np.atleast_1d(np.asarray(diverged, bool))
        rec.update(extra)
        line = self.write(rec)
        if self.tb is not None:
            self._tb_scalars(line, {"loss": line["loss"], "acc": line.get("acc")})
        return line

    def evaluation(
        self, *, step: int, acc: Any, task: int | None = None, section: str | None = None, runs=None, **extra
    ) -> dict:
        """Accuracy of every run on every task, ``acc[run, task]``, at global step ``step``."""
        rec = self._common("eval", step, runs, section)
        acc = np.asarray(acc)
        if acc.ndim != 2:
            raise ValueError(f"evaluation acc must be [runs, tasks], got shape {acc.shape}")
        rec["acc"] = acc
        if task is not None:
            rec["task"] = int(task)
        rec.update(extra)
        line = self.write(rec)
        if self.tb is not None:
            per_task = np.asarray(acc).T  # [task, run]
            self._tb_scalars(line, {f"eval_acc/task{j}": per_task[j] for j in range(per_task.shape[0])})
        return line

    def _tb_scalars(self, line: dict, values: dict) -> None:
        prefix = f"{line['section']}/" if line["section"] else ""
        runs = line["runs"]
        for name, per_run in values.items():
            if per_run is None:
                continue
            arr = np.asarray([np.nan if v is None else v for v in per_run], np.float64)
            if np.isfinite(arr).any():
                self.tb.add_scalar(f"{prefix}{name}/mean", float(np.nanmean(arr)), line["step"], line["time"])
            for i, v in enumerate(arr):
                if np.isfinite(v):
                    label = runs[i] if i < len(runs) else f"run{i}"
                    self.tb.add_scalar(f"{prefix}{name}/{label}", float(v), line["step"], line["time"])
        self.tb.flush()

    # -- callbacks for the run loops -------------------------------------------------------------

    def engine_log(self, section: str | None = None) -> Callable[[dict], None]:
        """The ``log`` callback of :func:`nestlearn.engine.run_chunks`: one line per chunk.

        Example: ``run_chunks(engine, state, ..., log=live.engine_log("maml"))``.
        """

        def log(info: dict) -> None:
            info = dict(info)
            self.chunk(
                step=info.pop("step"),
                loss=info.pop("loss", np.nan),
                acc=info.pop("acc", None),
                diverged=info.pop("diverged", None),
                section=section,
                **info,
            )

        return log

    def task_chunks(self, task: int, steps_per_task: int, section: str | None = None) -> Callable:
        """The ``on_chunk`` callback of :meth:`nestlearn.continual.Learner.run_task` for task ``task``.

        ``on_chunk(done, total, metrics)`` becomes a line at global step ``task * steps_per_task + done``
        with the chunk's per-run loss and accuracy and the task index. Combine it with progress with
        :func:`both`.
        """

        def on_chunk(done: int, total: int, metrics: Mapping[str, Any]) -> None:
            self.chunk(
                step=task * steps_per_task + done,
                loss=metrics["loss"],
                acc=metrics.get("acc"),
                section=section,
                task=task,
            )

        return on_chunk

    # -- closing ---------------------------------------------------------------------------------

    def close(self) -> None:
        """Writes the ``{"kind": "end"}`` line that tells watchers the run is over and closes; idempotent."""
        if not self._file.closed:
            self.write({"kind": "end"})
            self._file.close()
        if self.tb is not None:
            self.tb.close()
            self.tb = None

    def __enter__(self) -> LiveLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def both(*callbacks: Callable | None) -> Callable:
    """One callback that calls each of ``callbacks`` (``None`` entries skipped) with the same arguments."""
    calls = [c for c in callbacks if c is not None]

    def call(*args, **kwargs) -> None:
        for c in calls:
            c(*args, **kwargs)

    return call


def _none_to_nan(value: Any) -> Any:
    if isinstance(value, list):
        return [_none_to_nan(v) for v in value]
    return np.nan if value is None else value


def _restore_nan(record: dict) -> dict:
    """``loss`` and ``acc`` as float arrays, ``null`` back to NaN."""
    for key in ("loss", "acc"):
        if isinstance(record.get(key), list):
            record[key] = np.asarray(_none_to_nan(record[key]), np.float64)
    return record


def tail_live(path: str | os.PathLike, offset: int = 0, *, arrays: bool = False) -> tuple[list[dict], int]:
    """The whole lines of a live log from byte ``offset`` on, and the offset after the last whole line.

    A last line without its newline is being written (or was cut by a kill): it is left for the next call.
    A damaged line in the middle is skipped with a warning naming the file and the line's byte offset.

    Args:
      path: the ``live.jsonl`` file.
      offset: where the previous call stopped (0: the start).
      arrays: return ``loss`` and ``acc`` as float arrays with NaN for ``null`` (else plain lists).

    Returns:
      ``(records, next_offset)``.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        raise DataError(
            f"no live log at {path} (a run writes <rundir>/{LIVE_FILE} once its first chunk ends)"
        ) from None
    end = data.rfind(b"\n") + 1  # whole lines only
    records, pos = [], offset
    for raw in data[:end].split(b"\n")[:-1]:
        if raw.strip():
            try:
                rec = json.loads(raw)
                if not isinstance(rec, dict):
                    raise ValueError("not an object")
                records.append(_restore_nan(rec) if arrays else rec)
            except ValueError:
                warnings.warn(f"{path}: skipped a damaged line at byte {pos}", stacklevel=2)
        pos += len(raw) + 1
    return records, offset + end


def read_live(path: str | os.PathLike, *, arrays: bool = False) -> list[dict]:
    """Every whole line of a live log (see :func:`tail_live`), e.g. while the run is still writing it.

    Example:
      >>> import tempfile
      >>> d = tempfile.mkdtemp()
      >>> with LiveLog(d, runs=["a"], tensorboard=False) as live:
      ...     _ = live.chunk(step=10, loss=[float("nan")])
      >>> read_live(live.path, arrays=True)[0]["loss"]
      array([nan])
    """
    return tail_live(path, 0, arrays=arrays)[0]
