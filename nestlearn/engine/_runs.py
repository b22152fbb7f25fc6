"""Runs: seeds times hyperparameter values, their keys, their stacked values, and the mesh they shard over.

Every family describes its runs the same way: a list of seeds and a sweep ``{name: values}``; the runs are
the product of the value lists and the seeds, sweep-major. Each run gets one PRNG key, ``jax.random.key``
of its seed (a typed key; :mod:`nestlearn.engine._checkpoint` stores its raw data), and the runs form a
leading axis that ``vmap`` maps and a one-axis :class:`~jax.sharding.Mesh` named ``"runs"`` shards.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import Array, PRNGKeyArray

from nestlearn._errors import ConfigError

AXIS = "runs"  # the name of the mesh axis the runs are sharded over
MAX_SEED = 2**32 - 1  # threefry seeds are 32-bit


def check_seeds(seeds: Sequence[int], where: str = "seeds") -> list[int]:
    """The seeds as Python ints; a :class:`ConfigError` for an empty list or a seed the PRNG cannot take."""
    try:
        seeds = list(seeds)
    except TypeError:
        raise ConfigError(f"{where} must be a sequence of integers, got {seeds!r}") from None
    if not seeds:
        raise ConfigError(f"{where} must name at least one run, got an empty list")
    out = []
    for s in seeds:
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ConfigError(f"{where}: seed {s!r} is not an integer")
        if not 0 <= int(s) <= MAX_SEED:
            raise ConfigError(f"{where}: seed {int(s)} is outside the PRNG's range [0, 2**32 - 1]")
        out.append(int(s))
    return out


def _value(name: str, v: Any) -> float | tuple:
    """One swept value: a finite number, or a list of them (a list-valued hyperparameter)."""
    if isinstance(v, (list, tuple, np.ndarray)):
        items = tuple(_value(name, x) for x in np.asarray(v, dtype=object).ravel().tolist())
        if any(isinstance(x, tuple) for x in items):
            raise ConfigError(f"sweep {name!r}: nested lists are not supported, got {v!r}")
        return items
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise ConfigError(f"sweep {name!r}: {v!r} is not a number")
    v = float(v)
    if not math.isfinite(v):
        raise ConfigError(f"sweep {name!r}: {v!r} is not finite")
    return v


def run_grid(seeds: Sequence[int], sweep: Mapping[str, Sequence[Any]] | None = None) -> list[dict[str, Any]]:
    """The runs of a sweep: every combination of the values (in order), times every seed.

    A value may be a number or a list of numbers (a list-valued hyperparameter such as per-level rates).

    Example:
      >>> run_grid([0, 1], {"lam": [1.0, 10.0]})
      [{'lam': 1.0, 'seed': 0}, {'lam': 1.0, 'seed': 1}, {'lam': 10.0, 'seed': 0}, {'lam': 10.0, 'seed': 1}]
    """
    seeds = check_seeds(seeds)
    sweep = dict(sweep or {})
    values = {}
    for name, vals in sweep.items():
        if isinstance(vals, (str, bytes)) or not isinstance(vals, (Sequence, np.ndarray)):
            raise ConfigError(f"sweep {name!r} must be a list of values, got {vals!r}")
        if len(vals) == 0:
            raise ConfigError(f"sweep {name!r} has no values")
        values[name] = [_value(name, v) for v in vals]
        shapes = {np.shape(v) for v in values[name]}
        if len(shapes) > 1:
            raise ConfigError(f"sweep {name!r}: every value must have the same length, got {vals!r}")
    names = list(values)
    return [
        {**dict(zip(names, combo)), "seed": s} for combo in itertools.product(*values.values()) for s in seeds
    ]


def run_keys(seeds: Sequence[int]) -> PRNGKeyArray:
    """One typed key per run, ``jax.random.key(seed)``, stacked (the same bits as ``PRNGKey(seed)``)."""
    seeds = check_seeds(seeds)
    return jax.vmap(jax.random.key)(jnp.asarray(np.asarray(seeds, np.uint32)))


def stack_values(runs: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Array]:
    """Per-run values of ``names`` as float32 arrays with a leading run axis (``[runs]`` or ``[runs, k]``)."""
    return {name: jnp.asarray(np.asarray([r[name] for r in runs], np.float32)) for name in names}


def run_mesh(n_runs: int, devices: Sequence[jax.Device] | None = None, *, strict: bool = False) -> Mesh:
    """A one-axis mesh named ``"runs"`` over as many devices as evenly divide ``n_runs``.

    Every device gets the same number of runs. With ``strict`` a count that does not divide over every
    device is a :class:`ConfigError` naming the counts; otherwise the mesh uses fewer devices (warned).
    """
    devices = list(jax.devices() if devices is None else devices)
    if n_runs < 1:
        raise ConfigError(f"a mesh needs at least one run, got {n_runs}")
    k = max(d for d in range(1, len(devices) + 1) if n_runs % d == 0)
    if k < len(devices):
        message = (
            f"{n_runs} runs do not divide over {len(devices)} devices (they shard evenly over {k}); "
            f"use a multiple of {len(devices)} runs"
        )
        if strict:
            raise ConfigError(message)
        warnings.warn(message + " to use them all", stacklevel=2)
    return Mesh(np.array(devices[:k]), (AXIS,))


def run_sharding(mesh: Mesh) -> NamedSharding:
    """Shards the leading (run) axis over the mesh's first axis."""
    return NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))


def shard_runs(tree: Any, mesh: Mesh | None) -> Any:
    """Places a pytree with a leading run axis on ``mesh`` (unchanged without a mesh).

    A mesh that spans several processes' devices (a multi-host run) gets global arrays, each process
    supplying its own shards from the (identical) host value.

    A run count that the mesh's devices do not divide is a :class:`ConfigError`, not an XLA error.
    """
    if mesh is None:
        return tree
    leaves = jax.tree.leaves(tree)
    n = leaves[0].shape[0] if leaves else 0
    size = mesh.devices.size
    if n % size:
        raise ConfigError(
            f"{n} runs do not divide over the mesh's {size} devices; use a multiple of {size} runs "
            "(or nestlearn.engine.run_mesh(n_runs) for a mesh that fits)"
        )
    sharding = run_sharding(mesh)
    if not all(d.process_index == jax.process_index() for d in mesh.devices.flat):
        # Devices of other processes: each process supplies its own shards (device_put cannot reach them).
        from nestlearn.engine._distributed import global_array

        return jax.tree.map(lambda x: global_array(x, sharding), tree)
    return jax.device_put(tree, sharding)


def per_run_values(name: str, values: Any, n: int) -> np.ndarray:
    """One finite float32 value (or list of values) per run, checked: ``[n]`` or ``[n, k]``."""
    try:
        values = np.asarray(values, np.float32)
    except (TypeError, ValueError):
        raise ConfigError(f"hyperparameter {name!r}: values must be numbers, got {values!r}") from None
    if values.shape[:1] != (n,):
        raise ConfigError(f"hyperparameter {name!r} needs one value per run ({n}), got shape {values.shape}")
    if not np.isfinite(values).all():
        raise ConfigError(f"hyperparameter {name!r} has a value that is not finite: {values.tolist()}")
    return values


def optimizer_values(
    optimizer: Any, abstract_params: Any, values: Mapping[str, Any], n: int
) -> dict[str, Array]:
    """Per-run values of ``optax.inject_hyperparams`` hyperparameters, checked against the optimizer.

    Every name must be a hyperparameter the optimizer's state holds, once or in several places (by
    ``optax.tree_utils.tree_get_all_with_path``; ``tree_set`` then sets every one of them),
    and every value must have its shape; the result is ``{name: [n, ...] float32}``, to set in each run's
    state with ``optax.tree_utils.tree_set``.
    """
    if not values:
        return {}
    import optax

    probe = jax.eval_shape(optimizer.init, abstract_params)
    out = {}
    for name, vals in values.items():
        vals = per_run_values(name, vals, n)
        # Every place that holds it (an optimizer per parameter group may hold it several times).
        found = optax.tree_utils.tree_get_all_with_path(probe, name)
        if not found:
            raise ConfigError(
                f"optimizer has no hyperparameter {name!r}; wrap it in optax.inject_hyperparams to sweep it"
            )
        held = found[0][1]
        if tuple(vals.shape[1:]) != tuple(np.shape(held)):
            raise ConfigError(
                f"optimizer hyperparameter {name!r} has shape {tuple(np.shape(held))}; each swept value has "
                f"shape {tuple(vals.shape[1:])}"
            )
        out[name] = jnp.asarray(vals)
    return out
