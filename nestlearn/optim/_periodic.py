"""The CMS update rule: each parameter group updates once per period, by the sum of its period's gradients."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nestlearn.optim._clock import check_periods, level_clock


class PeriodicState(NamedTuple):
    """State of :func:`periodic`.

    Attributes:
      count: int32, steps taken (calls of ``update``).
      acc: the gradients accumulated since the last update (their sum, or their running sum for the mean).
      inner_state: the inner optimizer's state; it changes only on update steps.
    """

    count: jax.Array
    acc: optax.Updates
    inner_state: optax.OptState


def periodic(
    inner: optax.GradientTransformation,
    period: jax.typing.ArrayLike,
    *,
    use_grad_mean: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Accumulate gradients for ``period`` steps, then pass their sum (or mean) through ``inner`` once.

    With step counter :math:`t` (from 0), accumulator :math:`a` and period :math:`P`:

    .. math::
      a \leftarrow a + g_t, \qquad
      u_t = \begin{cases} \mathrm{inner}(a / P^{[\text{mean}]}),\ a \leftarrow 0 & (t+1) \bmod P = 0 \\
      0 & \text{otherwise} \end{cases}

    The inner optimizer's state advances only on update steps; off-period updates are zeros.

    Why not ``optax.MultiSteps(inner, every_k_schedule=P, use_grad_mean=False)``: it has the same rule,
    but in optax 0.2.8 it multiplies bool by int32 and fails under ``jax_numpy_dtype_promotion="strict"``
    (which nestlearn's tests use), wraps its step in a ``lax.cond`` that vmap turns into a select of both
    branches, and keeps a float32 accumulator whatever the parameters' dtype. This transform keeps the
    gradients' dtype, skips the inner update off-period with one ``lax.cond`` (a select under vmap),
    and takes ``period`` as a traced array (so a sweep over periods can be vmapped). A concrete
    ``period = 1`` is ``inner`` itself, bit for bit and without an accumulator.

    Args:
      inner: the optimizer applied once per period.
      period: int >= 1 (Python or array; a traced array is accepted unchecked).
      use_grad_mean: keyword-only; if True pass the mean of the period's gradients, else (default, the
        Nested Learning paper's CMS rule) their sum.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; extra args are forwarded to ``inner``.

    Example:
      >>> tx = periodic(optax.sgd(0.5), 2)
      >>> p = jnp.ones(2); s = tx.init(p)
      >>> u, s = tx.update(jnp.ones(2), s, p); bool(jnp.all(u == 0))
      True
      >>> u, s = tx.update(jnp.ones(2), s, p); u.tolist()   # -0.5 * (1 + 1)
      [-1.0, -1.0]

    References:
      Behrouz et al., Nested Learning, 2025, the Continuum Memory System update rule.
    """
    every_step = not isinstance(period, jax.core.Tracer) and np.asarray(period).tolist() == 1
    period = check_periods(period, "period")
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        acc = () if every_step else optax.tree.zeros_like(params)
        return PeriodicState(jnp.zeros([], jnp.int32), acc, inner.init(params))

    def every_step_update(updates, state, params=None, **extra_args):
        # A concrete period of 1: no accumulator, the inner optimizer itself (bit for bit, no overhead).
        new_updates, inner_state = inner.update(updates, state.inner_state, params, **extra_args)
        return new_updates, PeriodicState(optax.safe_increment(state.count), (), inner_state)

    def update_fn(updates, state, params=None, **extra_args):
        emit = level_clock(period, state.count).active
        acc = jax.tree.map(lambda a, g: a + g, state.acc, updates)

        def apply(acc, inner_state):
            fed = jax.tree.map(lambda a: a / period.astype(a.dtype), acc) if use_grad_mean else acc
            return inner.update(fed, inner_state, params, **extra_args)

        def hold(acc, inner_state):
            zeros = optax.tree.zeros_like(jax.eval_shape(apply, acc, inner_state)[0])
            return zeros, inner_state

        # lax.cond skips the inner update off-period (under vmap with a batched counter it becomes a
        # select of both branches, the arithmetic-mask form of optax.lookahead).
        new_updates, inner_state = jax.lax.cond(emit, apply, hold, acc, state.inner_state)
        acc = jax.tree.map(lambda a: (1 - emit.astype(a.dtype)) * a, acc)
        return new_updates, PeriodicState(optax.safe_increment(state.count), acc, inner_state)

    return optax.GradientTransformationExtraArgs(init_fn, every_step_update if every_step else update_fn)


def period_schedule(
    transforms: Mapping[Hashable, optax.GradientTransformation],
    periods: Mapping[Hashable, jax.typing.ArrayLike],
    param_labels: Any | Callable[[Any], Any],
    *,
    use_grad_mean: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Per-group update periods (the CMS schedule): group g runs its own optimizer once every :math:`P_g` steps.

    For each group :math:`g` with parameters :math:`\theta_g`, inner optimizer :math:`\mathrm{opt}_g` and
    period :math:`P_g`:

    .. math::
      \theta_g \leftarrow \theta_g + \mathrm{opt}_g\Big(\sum_{s=t-P_g+1}^{t} g_s\Big)
      \quad\text{when } (t+1) \bmod P_g = 0,

    and :math:`\theta_g` is unchanged otherwise (``use_grad_mean=True`` divides the sum by :math:`P_g`).
    Built as ``optax.partition`` over one :func:`periodic` per group (see there why not ``MultiSteps``).
    One group with period 1 reduces exactly to its optimizer.

    Args:
      transforms: label -> inner optimizer of that group.
      periods: label -> update period (int >= 1; arrays and traced values allowed). Same keys as
        ``transforms``.
      param_labels: a pytree of labels with the structure of the parameters (a bool mask works, with
        labels ``True``/``False``), or a function from parameters to such a pytree, as ``optax.partition``.
      use_grad_mean: keyword-only; apply the mean instead of the sum (the paper's rule) of each period.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> params = {"fast": jnp.ones(2), "slow": jnp.ones(2)}
      >>> tx = period_schedule({"f": optax.sgd(0.5), "s": optax.sgd(0.5)}, {"f": 1, "s": 4},
      ...                      lambda p: {"fast": "f", "slow": "s"})
      >>> u, _ = tx.update(params, tx.init(params), params)
      >>> u["fast"].tolist(), bool(jnp.all(u["slow"] == 0))
      ([-0.5, -0.5], True)

    References:
      Behrouz et al., Nested Learning, 2025 (CMS: block l changes every C(l) steps by the sum of the
      gradients of its chunk).
    """
    if set(transforms) != set(periods):
        raise ValueError(
            f"periods must have the same labels as transforms: got {sorted(map(str, periods))} "
            f"for transforms {sorted(map(str, transforms))}"
        )
    groups = {
        label: periodic(tx, periods[label], use_grad_mean=use_grad_mean) for label, tx in transforms.items()
    }
    return optax.with_extra_args_support(optax.partition(groups, param_labels))
