"""The level clock: which levels of a multi-timescale learner update at a given step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class LevelClock(NamedTuple):
    """What the clock says about every level at step ``t`` (all arrays have one entry per level).

    Attributes:
      active: bool, whether the level updates at step ``t``.
      num_updates: int32, how many updates the level has had after step ``t`` (step ``t`` included).
      next_update: int32, the first step ``>= t`` at which the level updates (``t`` itself when active).
    """

    active: jax.Array
    num_updates: jax.Array
    next_update: jax.Array


def check_periods(periods, name: str = "periods") -> jax.Array:
    """``periods`` as an int32 array; a concrete value must be >= 1 (a traced one is taken on trust)."""
    if isinstance(periods, jax.core.Tracer):
        return jnp.asarray(periods, jnp.int32)
    arr = np.asarray(periods)
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ValueError(f"{name} must be integers, got {periods!r}")
    if np.any(arr < 1):
        raise ValueError(f"{name} must be >= 1, got {periods!r}")
    return jnp.asarray(arr, jnp.int32)


def level_clock(periods: jax.typing.ArrayLike, step: jax.typing.ArrayLike) -> LevelClock:
    r"""Which levels update at step ``t``, how often each has updated, and when each updates next.

    Steps count from 0 (``t`` is the number of updates made before this one, as optax's ``count``).
    Level :math:`\ell` with period :math:`P_\ell` updates at the *end* of each block of
    :math:`P_\ell` steps, so that its update sees the :math:`P_\ell` gradients of that block:

    .. math::
      \text{active}_\ell(t) = [(t + 1) \bmod P_\ell = 0], \quad
      \text{num\_updates}_\ell(t) = \lfloor (t + 1) / P_\ell \rfloor, \quad
      \text{next\_update}_\ell(t) = (\lfloor t / P_\ell \rfloor + 1) P_\ell - 1.

    A level with :math:`P_0 = 1` is active at every step. Pure integer arithmetic: jit-safe, vmappable
    over ``step`` or ``periods``, no Python branch on traced values. Built by hand: optax has no clock.

    Args:
      periods: int array ``[levels]`` of update periods (conventionally ``1 = P_0 < P_1 < ...``), each >= 1.
      step: int scalar, the step ``t`` (>= 0).

    Returns:
      A :class:`LevelClock` of ``[levels]`` arrays.

    Example:
      >>> c = level_clock(jnp.array([1, 2, 4]), 3)
      >>> c.active.tolist(), c.num_updates.tolist(), c.next_update.tolist()
      ([True, True, True], [4, 2, 1], [3, 3, 3])

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025 (levels and
      their update frequencies; the Continuum Memory System).
    """
    p = check_periods(periods)
    t = jnp.asarray(step, jnp.int32)
    return LevelClock(
        active=(t + 1) % p == 0,
        num_updates=(t + 1) // p,
        next_update=(t // p + 1) * p - 1,
    )


def clock_timeline(periods: jax.typing.ArrayLike, num_steps: int) -> jax.Array:
    """The clock drawn as a ``[levels, num_steps]`` int32 array of 0/1: entry ``[l, t]`` is 1 iff level l updates at t.

    Ready for ``plt.imshow`` (levels as rows, steps as columns).

    Args:
      periods: int array ``[levels]`` of update periods.
      num_steps: number of steps (columns), a Python int >= 0.

    Returns:
      int32 array of shape ``[levels, num_steps]``.

    Example:
      >>> clock_timeline([1, 3], 6).tolist()
      [[1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 0, 1]]
    """
    if not isinstance(num_steps, (int, np.integer)) or num_steps < 0:
        raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
    active = jax.vmap(lambda t: level_clock(periods, t).active)(jnp.arange(num_steps, dtype=jnp.int32))
    return jnp.asarray(active, jnp.int32).reshape(num_steps, -1).T
