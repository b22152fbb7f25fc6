"""The one engine every family runs on: runs (seeds x hyperparameters) vmapped and sharded, steps in
chunks under ``lax.scan``, one divergence policy, per-step telemetry, progress, checkpoints and the
persistent compilation cache.

A family (continual streams, online regression, meta-training, sequence training, nested levels)
supplies a per-run ``step``; :class:`Engine` compiles chunks of it for every run at once, and the host
regains control only between chunks.
"""

from nestlearn.engine import _distributed as distributed
from nestlearn.engine import _preempt as preemption
from nestlearn.engine import _storage as storage
from nestlearn.engine._cache import default_cache_dir, enable_compilation_cache
from nestlearn.engine._checkpoint import Checkpoints
from nestlearn.engine._loop import Engine, Guard, compile_once, nan_unless, norms, run_chunks
from nestlearn.engine._model import Functional
from nestlearn.engine._progress import Progress, progress_enabled
from nestlearn.engine._runs import (
    AXIS,
    check_seeds,
    optimizer_values,
    per_run_values,
    run_grid,
    run_keys,
    run_mesh,
    run_sharding,
    shard_runs,
    stack_values,
)

__all__ = [
    "AXIS",
    "Checkpoints",
    "Engine",
    "Functional",
    "Guard",
    "Progress",
    "check_seeds",
    "compile_once",
    "distributed",
    "default_cache_dir",
    "enable_compilation_cache",
    "nan_unless",
    "norms",
    "optimizer_values",
    "per_run_values",
    "preemption",
    "progress_enabled",
    "run_chunks",
    "run_grid",
    "run_keys",
    "run_mesh",
    "run_sharding",
    "shard_runs",
    "stack_values",
    "storage",
]
