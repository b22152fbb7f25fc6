"""Multi-host runs: ``jax.distributed``, global arrays from host data, results gathered to every host.

The same program runs on every host (process). :func:`initialize` starts ``jax.distributed`` when a run is
configured for several processes: automatically on a Cloud TPU VM (``jax.distributed.initialize()`` finds
the coordinator, the process count and id in the VM's metadata), explicitly elsewhere from arguments or
the environment variables ``NESTLEARN_COORDINATOR`` (``host:port`` of process 0),
``NESTLEARN_NUM_PROCESSES`` and ``NESTLEARN_PROCESS_ID`` (the command line's ``--coordinator``,
``--num-processes`` and ``--process-id``). On CPU, collectives between processes use gloo.

After it, ``jax.devices()`` lists every process's devices, so :func:`nestlearn.engine.run_mesh` shards the
runs over all of them. Host data becomes a global array through :func:`global_array` (each process
supplies the shards it holds), a global array comes back to the host whole through :func:`to_host`
(``process_allgather``), and only process 0 (:func:`is_primary`) writes files or prints progress.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from nestlearn._errors import ConfigError

_ENV = ("NESTLEARN_COORDINATOR", "NESTLEARN_NUM_PROCESSES", "NESTLEARN_PROCESS_ID")


def on_cloud_tpu_vm() -> bool:
    """Whether this is a Cloud TPU VM (where ``jax.distributed.initialize()`` needs no arguments).

    Detected from the variables a TPU VM's runtime sets (``TPU_ACCELERATOR_TYPE``, ``TPU_WORKER_ID``,
    ``TPU_WORKER_HOSTNAMES``, ``MEGASCALE_COORDINATOR_ADDRESS``) or its accelerator device ``/dev/accel0``;
    ``NESTLEARN_DISTRIBUTED=0`` turns the automatic start off.
    """
    if os.environ.get("NESTLEARN_DISTRIBUTED", "").strip().lower() in ("0", "false", "no", "off"):
        return False
    names = ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_ID", "TPU_WORKER_HOSTNAMES", "MEGASCALE_COORDINATOR_ADDRESS")
    return any(os.environ.get(n) for n in names) or os.path.exists("/dev/accel0")


def is_initialized() -> bool:
    """Whether ``jax.distributed`` has been started in this process."""
    from jax._src import distributed

    return distributed.global_state.client is not None


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Starts ``jax.distributed`` if this run is configured for it; returns whether it is running.

    Arguments win over the ``NESTLEARN_*`` environment variables (module docstring); all three must be
    given together. Without any, a Cloud TPU VM starts it without arguments and anything else runs as
    one process. Call it before anything touches a device. Calling it again is harmless.

    Raises:
      ConfigError: a partial or malformed setting (``host:port``, a count >= 1, an id in range).
    """
    if is_initialized():
        return True
    env = [os.environ.get(n) or None for n in _ENV]
    coordinator = coordinator if coordinator is not None else env[0]
    num_processes = num_processes if num_processes is not None else _int(env[1], _ENV[1])
    process_id = process_id if process_id is not None else _int(env[2], _ENV[2])
    given = [x is not None for x in (coordinator, num_processes, process_id)]
    if not any(given):
        if on_cloud_tpu_vm():
            jax.distributed.initialize()
            return True
        return False
    if not all(given):
        missing = [n for n, g in zip(("--coordinator", "--num-processes", "--process-id"), given) if not g]
        raise ConfigError(
            f"a multi-process run needs the coordinator, the process count and this process's id; "
            f"missing {', '.join(missing)} (or {', '.join(_ENV)})"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit():
        raise ConfigError(f"--coordinator must be HOST:PORT (process 0's address), got {coordinator!r}")
    if num_processes < 1:
        raise ConfigError(f"--num-processes must be at least 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id must be in [0, {num_processes - 1}], got {process_id}")
    if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms).split(","):
        # CPU devices of different processes talk through gloo (no effect on GPU or TPU collectives).
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    return True


def _int(text: str | None, name: str) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {text!r}") from None


def process_count() -> int:
    """How many processes run this program (1 without ``jax.distributed``)."""
    return jax.process_count() if is_initialized() else 1


def is_primary() -> bool:
    """Whether this is process 0, the one that writes files and prints (always true with one process)."""
    return not is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier ``name`` (nothing with one process)."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """Whether ``flag`` holds on any process (every process must call it; the flag itself with one)."""
    if process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray(bool(flag)))).any())


def broadcast(value: Any) -> Any:
    """Process 0's ``value`` (numpy-convertible) on every process."""
    if process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return multihost_utils.broadcast_one_to_all(np.asarray(value))


def global_array(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """The host value ``x`` (the same on every process) as a global array with ``sharding``.

    Every process supplies the shards its own devices hold, so this works where ``jax.device_put`` to
    another host's devices cannot. Typed PRNG keys are carried as their raw data and wrapped again.
    """
    x_is_key = hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)
    data = np.asarray(jax.random.key_data(x) if x_is_key else x)
    if x_is_key:
        key_sharding = jax.sharding.NamedSharding(
            sharding.mesh, jax.sharding.PartitionSpec(*sharding.spec, *([None] * (data.ndim - 1)))
        )
        out = jax.make_array_from_callback(data.shape, key_sharding, lambda index: data[index])
        return jax.random.wrap_key_data(out, impl=jax.random.key_impl(x))
    return jax.make_array_from_callback(data.shape, sharding, lambda index: data[index])


def to_host(x: Any) -> np.ndarray:
    """A (possibly global) array as a whole numpy array on this host; every process must call it."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
