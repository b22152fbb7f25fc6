"""Checkpoints of any family's run state at chunk boundaries: Orbax, typed keys stored as their raw data.

A checkpoint holds the run state (device arrays, restored into an abstract target with its sharding) and a
record (the host-side numpy arrays of results so far), so a killed run resumes exactly. Built on
``orbax.checkpoint.CheckpointManager``; PRNG keys, which Orbax does not store, are written as
``jax.random.key_data`` and wrapped again on restore.

Every checkpoint is verified. After Orbax has finalised step ``N`` (its atomic rename), a manifest
``N/nestlearn-manifest.json`` records the SHA-256 and size of every file in the step directory, written
atomically (a temporary file, then a rename). Opening a checkpoint directory checks the newest step against
its manifest: a flipped bit anywhere (array data, metadata), a truncated, deleted or added file, an empty
step directory or a missing manifest (a kill between Orbax's rename and the manifest) makes it *damaged*.
A damaged step is reported in one line and moved aside to ``damaged/<N>-<reason>`` (kept, never deleted),
and the next newest is checked, so a run resumes from the newest good checkpoint; if every one is
damaged, :class:`~nestlearn.CheckpointError` refuses in one line and nothing is moved. The last ``keep``
checkpoints are kept so there is something to fall back to. Orbax has no checksum of its own over array
data (TensorStore's chunks carry none by default), hence the manifest.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nestlearn._errors import CheckpointError, OperatingError

MANIFEST = "nestlearn-manifest.json"
_CHUNK = 1 << 20


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _abstract_storable(tree: Any) -> Any:
    def one(x):
        if _is_key(x):
            data = jax.eval_shape(jax.random.key_data, x)
            return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=getattr(x, "sharding", None))
        return x

    return jax.tree.map(one, tree)


def _from_storable(restored: Any, like: Any) -> Any:
    def one(r, x):
        if getattr(x, "sharding", None) is None:
            # Orbax returns arrays committed to one device, while a fresh run's are uncommitted: jit
            # would compile every program again for them. Without a sharding to keep, upload afresh.
            r = jnp.asarray(np.asarray(jax.random.key_data(r) if _is_key(r) else r))
        if _is_key(x):
            return jax.random.wrap_key_data(r)  # the default implementation, the one that made the key
        return r

    return jax.tree.map(one, restored, like)


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            h.update(block)
    return h.hexdigest()


def _files(step_dir: Path) -> dict[str, Path]:
    return {
        p.relative_to(step_dir).as_posix(): p
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_manifest(step_dir: Path) -> None:
    """Records the SHA-256 and size of every file of a finalised step directory (atomic write)."""
    files = {name: {"sha256": _digest(p), "bytes": p.stat().st_size} for name, p in _files(step_dir).items()}
    tmp = step_dir / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"version": 1, "files": files}, indent=0, sort_keys=True))
    os.replace(tmp, step_dir / MANIFEST)


def verify(step_dir: Path) -> str | None:
    """``None`` if ``step_dir`` matches its manifest, else why not (one phrase)."""
    try:
        manifest = json.loads((step_dir / MANIFEST).read_text())
        expected = manifest["files"]
    except FileNotFoundError:
        return "no manifest (unfinished write, or written before checkpoints were verified)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable manifest ({type(e).__name__})"
    found = _files(step_dir)
    if not expected:
        return "empty manifest"
    missing = sorted(set(expected) - set(found))
    if missing:
        return f"missing file {missing[0]}"
    extra = sorted(set(found) - set(expected))
    if extra:
        return f"unexpected file {extra[0]}"
    for name, meta in expected.items():
        try:
            if found[name].stat().st_size != meta["bytes"]:
                return f"{name} has {found[name].stat().st_size} bytes, expected {meta['bytes']}"
            if _digest(found[name]) != meta["sha256"]:
                return f"checksum mismatch in {name}"
        except OSError as e:
            return f"unreadable file {name} ({e.strerror or type(e).__name__})"
    return None


def _steps(directory: Path) -> list[int]:
    if not directory.is_dir():
        return []
    return sorted((int(p.name) for p in directory.iterdir() if p.is_dir() and p.name.isdigit()), reverse=True)


def _warn(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def select_good(directory: str | Path, *, report: Callable[[str], None] = _warn) -> int | None:
    """Checks the newest checkpoint of ``directory`` and falls back past damaged ones (module docstring).

    Returns the newest good step, or ``None`` if the directory holds no checkpoint. Damaged steps newer
    than it are moved to ``damaged/``; if every step is damaged, raises :class:`CheckpointError`.
    """
    directory = Path(directory)
    steps = _steps(directory)
    damaged: list[tuple[int, str]] = []
    for step in steps:
        reason = verify(directory / str(step))
        if reason is None:
            break
        damaged.append((step, reason))
    else:
        if damaged:
            newest, reason = damaged[0]
            raise CheckpointError(
                f"no good checkpoint in {directory}: all {len(damaged)} are damaged (newest, {newest}: "
                f"{reason}); start afresh with --force, or restore the directory from a backup"
            )
        return None
    good = steps[len(damaged)]
    for step, reason in damaged:
        aside = directory / "damaged" / f"{step}"
        n = 1
        while aside.exists():
            aside, n = directory / "damaged" / f"{step}.{n}", n + 1
        aside.parent.mkdir(exist_ok=True)
        shutil.move(str(directory / str(step)), str(aside))
        report(
            f"checkpoint {step} in {directory} is damaged ({reason}); moved to {aside}, resuming from "
            f"checkpoint {good}"
        )
    return good


class Checkpoints:
    """Saves and restores ``(state, record)`` pairs in ``directory``, keeping the last ``keep``, verified.

    Opening the directory selects the newest *good* checkpoint (:func:`select_good`: damaged ones are
    reported and moved aside, or every one damaged is refused), so :meth:`latest` never names a damaged
    checkpoint.

    Args:
      directory: the checkpoint directory (created if needed).
      keep: how many checkpoints to keep (>= 1): what a damaged newest one falls back to (default
        ``$NESTLEARN_KEEP_CHECKPOINTS``, else 3; the command line's ``--keep-checkpoints`` sets it).
      report: keyword-only; where the one-line reports of damaged checkpoints go (default: stderr).
    """

    def __init__(
        self, directory: str | Path, *, keep: int | None = None, report: Callable[[str], None] = _warn
    ) -> None:
        if keep is None:
            text = os.environ.get("NESTLEARN_KEEP_CHECKPOINTS", "3")
            try:
                keep = int(text)
            except ValueError:
                raise ValueError(f"NESTLEARN_KEEP_CHECKPOINTS must be a positive int, got {text!r}") from None
        if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
            raise ValueError(f"keep must be a positive int (checkpoints kept), got {keep!r}")
        import orbax.checkpoint as ocp  # here, not at import: orbax takes 0.2 s to import

        self.directory = Path(directory).absolute()
        select_good(self.directory, report=report)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest(self) -> int | None:
        """The newest checkpoint's step, ``None`` if there is none."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict[str, np.ndarray]) -> None:
        """Writes checkpoint ``step`` (replacing nothing: steps only grow), then its manifest.

        A disk without room for it is refused before Orbax writes anything
        (:class:`~nestlearn.OperatingError`, ``ENOSPC``), and so is a write that fails for lack of room.
        """
        import orbax.checkpoint as ocp

        need = sum(int(getattr(x, "nbytes", 0)) for x in jax.tree.leaves((state, record)))
        self._check_room(need)
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(_to_storable(state)), record=ocp.args.StandardSave(record)
                ),
            )
            self.manager.wait_until_finished()
        except Exception as e:
            if "RESOURCE_EXHAUSTED" in str(e) or "No space left" in str(e):
                raise OperatingError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory)) from e
            raise
        write_manifest(self.directory / str(step))

    def _check_room(self, need: int) -> None:
        free = shutil.disk_usage(self.directory if self.directory.exists() else self.directory.parent).free
        if free < 1.25 * need + (1 << 20):
            raise OperatingError(
                errno.ENOSPC,
                f"{os.strerror(errno.ENOSPC)} (a checkpoint needs about {need / 2**20:.1f} MiB, "
                f"{free / 2**20:.1f} MiB free)",
                str(self.directory),
            )

    def restore(self, step: int, abstract_state: Any, record: dict[str, np.ndarray]) -> tuple[Any, dict]:
        """``(state, record)`` of checkpoint ``step``; ``abstract_state`` gives shapes, dtypes, shardings.

        The step is verified again first (it may have been damaged since the directory was opened).
        """
        import orbax.checkpoint as ocp

        reason = verify(self.directory / str(step))
        if reason is not None:
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} is damaged ({reason}); rerun to fall back"
            )
        try:
            restored = self.manager.restore(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract_storable(abstract_state)),
                    record=ocp.args.StandardRestore(record),
                ),
            )
        except (ValueError, KeyError, TypeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise CheckpointError(
                f"checkpoint {step} in {self.directory} does not fit this run ({first[:200]}); "
                "was it written by a different config or version? start afresh with --force"
            ) from e
        state = _from_storable(restored["state"], abstract_state)
        return state, {k: np.asarray(v) for k, v in restored["record"].items()}

    def wait(self) -> None:
        """Blocks until every save has reached the disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self.manager.close()

    def __enter__(self) -> Checkpoints:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
