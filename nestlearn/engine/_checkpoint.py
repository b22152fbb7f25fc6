"""Checkpoints of any family's run state at chunk boundaries: Orbax, typed keys stored as their raw data.

A checkpoint holds the run state (device arrays, restored into an abstract target with its sharding) and a
record (the host-side numpy arrays of results so far), so a killed run resumes exactly. Built on
``orbax.checkpoint.CheckpointManager``; PRNG keys, which Orbax does not store, are written as
``jax.random.key_data`` and wrapped again on restore.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp


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


class Checkpoints:
    """Saves and restores ``(state, record)`` pairs in ``directory``, keeping the last ``keep``.

    Args:
      directory: the checkpoint directory (created if needed).
      keep: how many checkpoints to keep.
    """

    def __init__(self, directory: str | Path, *, keep: int = 2) -> None:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(Path(directory).absolute(), options=options)

    def latest(self) -> int | None:
        """The newest checkpoint's step, ``None`` if there is none."""
        return self.manager.latest_step()

    def save(self, step: int, state: Any, record: dict[str, np.ndarray]) -> None:
        """Writes checkpoint ``step`` (replacing nothing: steps only grow)."""
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(_to_storable(state)), record=ocp.args.StandardSave(record)
            ),
        )

    def restore(self, step: int, abstract_state: Any, record: dict[str, np.ndarray]) -> tuple[Any, dict]:
        """``(state, record)`` of checkpoint ``step``; ``abstract_state`` gives shapes, dtypes, shardings."""
        restored = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(_abstract_storable(abstract_state)),
                record=ocp.args.StandardRestore(record),
            ),
        )
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
