"""Strict JAX for every test: four fake CPU devices, strict dtype promotion, rank promotion raises.

XLA's backend (LLVM) optimisations are off unless ``XLA_FLAGS`` sets ``--xla_backend_optimization_level``
itself: the tests' programs are small and their time is mostly compilation, which this shortens (cold
cache: test_streaming.py 72 -> 57 s, test_optim_paper.py 38 -> 14 s, the whole suite 15:10 -> 12:15 min
on 2 cores; the notebooks' kernels run the same way). The HLO passes, fusion included, still run, so the
tests run the same HLO as everywhere else, compiled with less LLVM optimisation; benchmarks and ``make
run`` keep the default level (3), and ``XLA_FLAGS=--xla_backend_optimization_level=3 make test`` runs the
suite at it. (The ``compiler_options`` some tests pass to ``jax.jit`` set level 0 for their programs at
either level.)
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "--xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=4").strip()
_LEVEL = next(f for f in _flags.split() if f.startswith("--xla_backend_optimization_level"))


def xla_flags(devices: int = 1) -> str:
    """``XLA_FLAGS`` for a subprocess (a CLI run, a killed-and-resumed run) with ``devices`` fake CPU
    devices, at the suite's backend level."""
    return f"{_LEVEL} --xla_force_host_platform_device_count={devices}"


os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("MPLBACKEND", "Agg")
os.environ.setdefault("NESTLEARN_PROGRESS", "0")  # progress lines are tested where they are asked for

import jax  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")


import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from nestlearn.tasks import TaskStream  # noqa: E402


def make_tiny_stream(
    n_tasks: int = 3,
    n: int = 48,
    m: int = 20,
    d: int = 6,
    n_classes: int = 3,
    train_n=None,
    seed: int = 0,
    permute: bool = True,
) -> TaskStream:
    """A small learnable stream: labels are the argmax of a fixed linear map; each task permutes features.

    Feature 0 of pool row ``i`` is ``i / n`` before the task's permutation (task 0 is unpermuted), so a
    test can read off which rows a batch came from. ``train_n`` optionally limits each task's valid rows
    (the rest is padding).
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, n_classes))
    x = rng.normal(size=(n, d)).astype(np.float32)
    x[:, 0] = np.arange(n) / n
    xt = rng.normal(size=(m, d)).astype(np.float32)
    perms = [np.arange(d)] + [rng.permutation(d) if permute else np.arange(d) for _ in range(n_tasks - 1)]
    train_n = np.full(n_tasks, n) if train_n is None else np.asarray(train_n)
    idx = np.stack([np.where(np.arange(n) < k, np.arange(n), 0) for k in train_n])
    return TaskStream(
        train_x=jnp.asarray(x),
        train_y=jnp.asarray(np.argmax(x[:, 1:] @ w[1:], 1), jnp.int32),
        test_x=jnp.asarray(xt),
        test_y=jnp.asarray(np.argmax(xt[:, 1:] @ w[1:], 1), jnp.int32),
        train_idx=jnp.asarray(idx, jnp.int32),
        train_n=jnp.asarray(train_n, jnp.int32),
        test_idx=jnp.tile(jnp.arange(m, dtype=jnp.int32), (n_tasks, 1)),
        test_n=jnp.full((n_tasks,), m, jnp.int32),
        feature_idx=jnp.asarray(np.stack(perms)[:, :, None], jnp.int32),
        feature_w=jnp.ones((n_tasks, d, 1), jnp.float32),
        label_map=jnp.tile(jnp.arange(n_classes, dtype=jnp.int32), (n_tasks, 1)),
        class_mask=jnp.ones((n_tasks, n_classes), bool),
        name="tiny",
        task_names=tuple(f"t{i}" for i in range(n_tasks)),
        n_classes=n_classes,
    )


@pytest.fixture
def tiny_stream():
    return make_tiny_stream
