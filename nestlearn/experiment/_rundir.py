"""Run directories: atomic writes, the resolved config, and results as tidy tables.

Every write goes through one path layer (:mod:`nestlearn.engine._storage`), so a run directory may be
local or on any store ``etils.epath`` reaches (``gs://bucket/run``); in a multi-process run only
process 0 writes.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from nestlearn import metrics
from nestlearn.continual import StreamResult
from nestlearn.engine import _storage

if TYPE_CHECKING:
    import pandas as pd


def atomic_write(path: str | os.PathLike, write: Any, mode: str = "w") -> Path:
    """Writes ``path`` atomically where the filesystem allows (:func:`nestlearn.engine._storage.write`).

    ``write`` is a string/bytes, or a callable taking the open file. On a local disk the file goes
    through a temporary file in the same directory and ``os.replace``: a reader never sees a
    half-written file, a failure leaves any previous version untouched, and the file's mode follows the
    umask, as ``open()``'s does. On an object store (``gs://``) the object is written directly, which
    is atomic there (an object appears only once its upload completes). Only process 0 of a
    multi-process run writes.
    """
    return _storage.write(path, write, mode)


def _npz(arrays: dict[str, Any]) -> bytes:
    """``np.savez`` of ``arrays`` in memory (an object store's file may not be seekable)."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz(path: str | os.PathLike) -> Any:
    """``np.load`` of a local or remote ``.npz``."""
    path = _storage.path(path)
    return np.load(path if not _storage.is_uri(path) else io.BytesIO(path.read_bytes()))


def write_json(path: Path, data: Any) -> Path:
    return atomic_write(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def save_result(path: Path, result: StreamResult) -> Path:
    """Saves a :class:`StreamResult` as an ``.npz`` of its arrays (atomically)."""
    arrays = {
        "acc_matrix": result.acc_matrix,
        "acc_init": result.acc_init,
        "curve_steps": result.curve_steps,
        "curve_task": result.curve_task,
        "curve_acc": result.curve_acc,
        "train_loss": result.train_loss,
        **({"train_acc": result.train_acc} if result.train_acc is not None else {}),
        "diverged_step": result.diverged_step,
        "steps_per_task": np.asarray(result.steps_per_task),
        "task_names": np.asarray(result.task_names),
        "runs": np.asarray(json.dumps(list(result.runs))),
        **{f"norm/{k}": v for k, v in (result.norms or {}).items()},
    }
    return atomic_write(path, _npz(arrays), mode="wb")


def load_result(path: str | os.PathLike) -> StreamResult:
    """Reads a result written by :func:`save_result`."""
    with _load_npz(path) as z:
        return StreamResult(
            acc_matrix=z["acc_matrix"],
            acc_init=z["acc_init"],
            curve_steps=z["curve_steps"],
            curve_task=z["curve_task"],
            curve_acc=z["curve_acc"],
            train_loss=z["train_loss"],
            train_acc=z["train_acc"] if "train_acc" in z.files else None,
            diverged_step=z["diverged_step"],
            steps_per_task=int(z["steps_per_task"]),
            task_names=tuple(str(n) for n in z["task_names"]),
            runs=tuple(json.loads(str(z["runs"]))) if "runs" in z.files else (),
            norms={k.removeprefix("norm/"): z[k] for k in z.files if k.startswith("norm/")} or None,
        )


def tidy_tables(results: dict[str, StreamResult]) -> dict[str, pd.DataFrame]:
    """Long-format tables of every strategy's results: one row per observation, named columns.

    Every table has a column per key of ``result.runs`` (the seed, and in a sweep the hyperparameters).

    Returns:
      ``accuracy_matrix`` (strategy, seed, trained_task, eval_task, accuracy, diverged_step), ``curves``
      (strategy, seed, point, step, trained_task, eval_task, accuracy, diverged, diverged_step), ``summary`` (strategy, seed, one
      column per metric of :func:`nestlearn.metrics.summary`, diverged_step). A diverged seed keeps its rows
      with ``diverged`` and the step it diverged at (``diverged_step``, -1 for none), its accuracies after
      that step are NaN (empty in the CSV), and its summary metrics are NaN, so no average can silently include it.
    """
    import pandas as pd  # here, not at import: pandas takes 0.4 s to import

    acc_rows, curve_frames, summary_rows = [], [], []
    for name, r in results.items():
        s, t = r.acc_matrix.shape[:2]
        run_cols = pd.DataFrame(list(r.runs))
        si, ti, tj = np.meshgrid(np.arange(s), np.arange(t), np.arange(t), indexing="ij")
        acc_rows.append(
            pd.DataFrame(
                {
                    "strategy": name,
                    **{c: run_cols[c].to_numpy()[si.ravel()] for c in run_cols},
                    "trained_task": ti.ravel(),
                    "eval_task": tj.ravel(),
                    "accuracy": r.acc_matrix.ravel(),
                    "diverged_step": r.diverged_step[si.ravel()],
                }
            )
        )
        p = r.curve_steps.shape[0]
        si, pi, tj = np.meshgrid(np.arange(s), np.arange(p), np.arange(t), indexing="ij")
        curve_frames.append(
            pd.DataFrame(
                {
                    "strategy": name,
                    **{c: run_cols[c].to_numpy()[si.ravel()] for c in run_cols},
                    "point": pi.ravel(),
                    "step": r.curve_steps[pi.ravel()],
                    "trained_task": r.curve_task[pi.ravel()],
                    "eval_task": tj.ravel(),
                    "accuracy": r.curve_acc.ravel(),
                    "diverged": r.diverged[si.ravel()],
                    "diverged_step": r.diverged_step[si.ravel()],
                }
            )
        )
        if t >= 2:
            summ = metrics.summary(r.acc_matrix, r.acc_init)
        else:
            summ = {"average_accuracy": metrics.average_accuracy(r.acc_matrix)}
        for k in range(s):
            row = {"strategy": name, **r.runs[k], "diverged_step": int(r.diverged_step[k])}
            row.update({m: (np.nan if r.diverged[k] else float(v[k])) for m, v in summ.items()})
            summary_rows.append(row)
    return {
        "accuracy_matrix": pd.concat(acc_rows, ignore_index=True),
        "curves": pd.concat(curve_frames, ignore_index=True),
        "summary": pd.DataFrame(summary_rows),
    }


def write_tables(directory: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Writes each table as CSV (atomically); pandas reads them back with ``pd.read_csv``."""
    return [
        atomic_write(_storage.path(directory) / f"{name}.csv", df.to_csv(index=False))
        for name, df in tables.items()
    ]


def _differences(now: dict, then: dict, prefix: str = "") -> list[str]:
    """``key (stored, now)`` for every leaf where two nested config dicts differ."""
    out = []
    for k in sorted(set(now) | set(then)):
        a, b = now.get(k), then.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, prefix + k + ".")
        elif a != b:
            out.append(f"{prefix}{k} ({b!r} stored, {a!r} now)")
    return out


def _jsonable(config: Any) -> dict[str, Any]:
    """A config as JSON reads it back (tuples become lists), so stored and fresh configs compare equal."""
    from nestlearn.experiment._config import to_dict

    return json.loads(json.dumps(to_dict(config)))


def versions() -> dict[str, str]:
    """Versions of the libraries that produce results, stored with every run."""
    from importlib.metadata import PackageNotFoundError, version

    import flax
    import jax
    import optax

    try:
        own = version("nestlearn")
    except PackageNotFoundError:  # run from a source tree that is not installed
        own = "unknown"
    return {"nestlearn": own, "jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__}


def _is_primary() -> bool:
    from nestlearn.engine._distributed import is_primary

    return is_primary()


def save_figure(fig: Any, stem: str | os.PathLike, formats: tuple[str, ...] = ("pdf", "png")) -> list[Any]:
    """:func:`nestlearn.plot.save_figure` through the path layer: local stems go to it unchanged, a
    remote stem (``gs://...``) is rendered locally into a temporary directory and each file uploaded as
    one object; only process 0 writes."""
    import tempfile

    from nestlearn import plot

    stem = _storage.path(stem)
    if not _is_primary():
        return [stem.parent / f"{stem.name}.{fmt}" for fmt in formats]
    if not _storage.is_uri(stem):
        return plot.save_figure(fig, stem, formats)
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for local in plot.save_figure(fig, Path(tmp) / stem.name, formats):
            out.append(atomic_write(stem.parent / local.name, local.read_bytes(), mode="wb"))
    return out


class RunDir:
    """A run directory, the one layout every run writes, from the CLI or from a study in Python.

    Layout::

        config.json        {"experiment", "config" (the resolved typed config), "quick", "versions"}
        results/           tables (CSV), arrays (.npz) and stream results, all written atomically
        figures/           PDF and PNG figures
        checkpoints/       Orbax checkpoints (engine.Checkpoints), one sub-folder per part if wanted
        status.json        {"complete", "quick", "parts" (finished parts), ...}

    A run that is not complete can be continued with ``resume=True``: the stored config must equal the
    given one (differences are named), finished parts (:meth:`done`) are skipped by the code that
    checks them, and :meth:`checkpoints` resumes within a part. ``paper/make_figures.py`` reads only
    complete runs, and refuses a run marked ``quick`` unless told ``--allow-quick``.

    Args:
      path: the directory.

    Example:
      >>> import dataclasses, tempfile, pandas as pd
      >>> @dataclasses.dataclass(frozen=True)
      ... class Config:
      ...     lr: float = 0.1
      >>> rd = RunDir.create(tempfile.mkdtemp() + "/run", Config(), experiment="mine")
      >>> _ = rd.write_table("losses", pd.DataFrame({"step": [1, 2], "loss": [0.5, 0.25]}))
      >>> rd.mark_done("losses")
      >>> _ = rd.mark_complete()
      >>> RunDir(rd.path).complete, rd.read_table("losses")["loss"].tolist()
      (True, [0.5, 0.25])
    """

    def __init__(self, path: str | os.PathLike, *, log: Any = None) -> None:
        self.path = _storage.path(path)
        self._log = log

    @classmethod
    def create(
        cls,
        path: str | Path,
        config: Any,
        *,
        experiment: str | None = None,
        quick: bool = False,
        resume: bool = False,
        force: bool = False,
        log: Any = None,
    ) -> RunDir:
        """Checks ``path`` against ``resume`` / ``force``, then writes ``config.json`` (a new run).

        Args:
          path: the run directory, local or a URI (``gs://bucket/run``).
          config: the run's typed frozen dataclass config (stored resolved, checked again on resume).
          experiment: the experiment's name, stored with the config ("study" if None); on resume, a name
            that differs from the stored one is refused (None accepts the stored one).
          quick: the run is a shrunk, quick version (stored; paper figures refuse it by default).
          resume: continue the run in ``path``; its stored config must equal ``config``.
          force: replace an existing ``path`` (without it an existing, non-empty one is an error).
          log: where :meth:`log` messages go (default: stderr).

        Raises:
          ConfigError: naming the problem; nothing has been written then.
        """
        from nestlearn._errors import ConfigError
        from nestlearn.experiment._config import from_dict

        rd = cls(path, log=log)
        out = rd.path
        if out.exists() and not out.is_dir():
            raise ConfigError(f"output path {out} exists and is not a directory")
        if resume:
            cfg_file = out / "config.json"
            if not cfg_file.exists():
                raise ConfigError(f"--resume: {cfg_file} not found; nothing to resume in {out}")
            try:
                stored = json.loads(cfg_file.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"--resume: {cfg_file} is not valid JSON ({e})") from None
            if experiment is not None and stored.get("experiment", experiment) != experiment:
                raise ConfigError(
                    f"--resume: {out} holds a run of {stored.get('experiment')!r}, not {experiment!r}; choose "
                    "another --out"
                )
            theirs = stored.get("versions", {}).get("nestlearn")
            ours = versions()["nestlearn"]
            if theirs is not None and theirs != ours:
                raise ConfigError(
                    f"--resume: the run in {out} was written by nestlearn {theirs}, this is {ours}; its "
                    f"checkpoints may not fit: rerun with --force (or install nestlearn {theirs} to finish it)"
                )
            stored_cfg = from_dict(type(config), stored.get("config", {}))
            if stored_cfg != config:
                diff = _differences(_jsonable(config), _jsonable(stored_cfg))
                raise ConfigError(
                    f"--resume: the config differs from the stored run in {out}: {', '.join(diff)}"
                )
            if bool(stored.get("quick", False)) != quick:
                raise ConfigError(
                    f"--resume: the run in {out} was {'' if stored.get('quick') else 'not '}a --quick run"
                )
            return rd
        if out.exists() and any(out.iterdir()):
            if not force:
                raise ConfigError(
                    f"output directory {out} already exists; pass --resume to continue it or --force to replace it"
                )
        from nestlearn.engine._distributed import barrier

        barrier("nestlearn-rundir-checked")  # every process has seen the directory as it was
        if out.exists() and any(out.iterdir()):
            _storage.rmtree(out)
        rd.write_json(
            "config.json",
            {
                "experiment": experiment or "study",
                "config": _jsonable(config),
                "quick": quick,
                "versions": versions(),
            },
        )
        barrier("nestlearn-rundir-created")  # process 0 has replaced and written it before anyone goes on
        return rd

    # -- what is stored ------------------------------------------------------------------------------
    @property
    def results(self) -> Path:
        """The ``results/`` folder."""
        return self.path / "results"

    @property
    def figures(self) -> Path:
        """The ``figures/`` folder."""
        return self.path / "figures"

    def read_json(self, name: str) -> dict[str, Any]:
        """A JSON file of the directory (``{}`` if it does not exist)."""
        file = self.path / name
        return json.loads(file.read_text()) if file.exists() else {}

    @property
    def config(self) -> dict[str, Any]:
        """The stored config, as a dict (rebuild a typed one with :func:`from_dict`)."""
        return self.read_json("config.json").get("config", {})

    @property
    def experiment(self) -> str | None:
        return self.read_json("config.json").get("experiment")

    @property
    def quick(self) -> bool:
        """Whether the run is a ``--quick`` run (from ``config.json``, else ``status.json``)."""
        stored = self.read_json("config.json")
        return bool(
            stored["quick"] if "quick" in stored else self.read_json("status.json").get("quick", False)
        )

    @property
    def complete(self) -> bool:
        """Whether the run finished (:meth:`mark_complete` was called)."""
        return bool(self.read_json("status.json").get("complete", False))

    # -- writing ---------------------------------------------------------------------------------------
    def log(self, message: str) -> None:
        """A progress message (to stderr unless the directory was opened with another ``log``)."""
        if self._log is not None:
            self._log(message)
        elif _is_primary():
            import sys

            print(message, file=sys.stderr, flush=True)

    def write_json(self, name: str, data: Any) -> Path:
        """Writes ``name`` (relative to the directory) as JSON, atomically."""
        return write_json(self.path / name, data)

    def write_table(self, name: str, frame: pd.DataFrame) -> Path:
        """Writes ``results/<name>.csv`` atomically; :meth:`read_table` reads it back."""
        return atomic_write(self.results / f"{name}.csv", frame.to_csv(index=False))

    def read_table(self, name: str) -> pd.DataFrame:
        import pandas as pd

        with (self.results / f"{name}.csv").open("r") as f:
            return pd.read_csv(f)

    def write_arrays(self, name: str, arrays: dict[str, Any]) -> Path:
        """Writes ``results/<name>.npz`` (named numpy arrays) atomically."""
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        return atomic_write(self.results / f"{name}.npz", _npz(arrays), mode="wb")

    def read_arrays(self, name: str) -> dict[str, np.ndarray]:
        with _load_npz(self.results / f"{name}.npz") as z:
            return {k: z[k] for k in z.files}

    def save_result(self, name: str, result: StreamResult) -> Path:
        """Writes a stream result as ``results/<name>.npz`` (:func:`save_result`)."""
        return save_result(self.results / f"{name}.npz", result)

    def load_result(self, name: str) -> StreamResult:
        return load_result(self.results / f"{name}.npz")

    def write_tidy_tables(self, results: dict[str, StreamResult]) -> dict[str, Path]:
        """Writes :func:`tidy_tables` of stream results (accuracy_matrix, curves, summary) to ``results/``."""
        tables = tidy_tables(results)
        return dict(zip(tables, write_tables(self.results, tables)))

    def save_figure(self, fig: Any, name: str, formats: tuple[str, ...] = ("pdf", "png")) -> list[Any]:
        """Writes ``figures/<name>.<fmt>`` for each format through the path layer (local or ``gs://``).

        Locally this is :func:`nestlearn.plot.save_figure` (reproducible PDFs, atomic writes); on an
        object store each format is rendered to memory with the same settings and written as one object.
        """
        return save_figure(fig, self.figures / name, formats)

    def checkpoints(self, part: str = "", *, keep: int | None = None):
        """An :class:`nestlearn.engine.Checkpoints` under ``checkpoints/`` (``checkpoints/<part>``).

        Use it as a context manager; ``latest()`` is ``None`` in a fresh run and the last saved chunk in
        a resumed one.
        """
        from nestlearn import engine

        return engine.Checkpoints(
            self.path / "checkpoints" / part if part else self.path / "checkpoints", keep=keep
        )

    # -- progress --------------------------------------------------------------------------------------
    def done(self, part: str) -> bool:
        """Whether ``part`` was marked finished (:meth:`mark_done`): a resumed run skips it."""
        return part in self.read_json("status.json").get("parts", [])

    def mark_done(self, part: str) -> None:
        """Records that ``part`` finished; write its results first, so a kill between the two only redoes it."""
        status = self.read_json("status.json")
        parts = status.get("parts", [])
        if part not in parts:
            self.write_json("status.json", {**status, "parts": [*parts, part], "complete": False})

    def mark_complete(self, **info: Any) -> Path:
        """Marks the run finished (``status.json``: ``complete``, ``quick``, finished parts, ``info``)."""
        status = self.read_json("status.json")
        return self.write_json("status.json", {**status, **info, "complete": True, "quick": self.quick})
