"""N-level fast/slow consolidation: each slower copy of the parameters moves toward the next faster one.

One rule, :func:`consolidate`, in lookahead's merged-update form; :func:`consolidation` (levels as
params), :func:`consolidation_in_state` (slow levels in the optimizer state),
``nestlearn.continual.FastSlow`` (a strategy) and the ``"consolidate"`` levels of ``nestlearn.levels``
are its configurations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nestlearn.optim._clock import check_periods, level_clock


class LevelParams(NamedTuple):
    """Parameters of an N-level learner: ``levels[0]`` is the fastest copy, ``levels[-1]`` the slowest.

    Compute gradients at ``params.fastest``; evaluate (or deploy) ``params.slowest``. Updates returned by
    :func:`consolidation` have the same structure, so ``optax.apply_updates`` applies them.

    Attributes:
      levels: tuple of parameter pytrees of identical structure, fastest first.
    """

    levels: tuple

    @classmethod
    def init_synced(cls, params, num_levels: int) -> LevelParams:
        """``num_levels`` (>= 2) identical copies of ``params``."""
        if not isinstance(num_levels, int) or num_levels < 2:
            raise ValueError(f"num_levels must be an int >= 2, got {num_levels!r}")
        return cls(tuple(params for _ in range(num_levels)))

    @property
    def fastest(self):
        """Level 0, trained by the inner optimizer every step."""
        return self.levels[0]

    @property
    def slowest(self):
        """The last level, the most consolidated copy."""
        return self.levels[-1]


class ConsolidationState(NamedTuple):
    """State of :func:`consolidation`.

    Attributes:
      count: int32, steps taken.
      inner_state: state of the level-0 optimizer.
    """

    count: jax.Array
    inner_state: optax.OptState


def consolidation(
    inner: optax.GradientTransformation,
    sync_periods: Sequence[int] | jax.typing.ArrayLike,
    rates: Sequence[float] | jax.typing.ArrayLike,
    *,
    reset_faster: bool = True,
    reset_state: bool = False,
) -> optax.GradientTransformation:
    r"""N-level fast/slow consolidation: level k+1 moves toward level k every :math:`P_k` steps at rate :math:`\alpha_k`.

    Level 0 takes the inner optimizer's update :math:`u` every step. At step :math:`t` (from 0), let
    :math:`s_k = [(t+1) \bmod P_k = 0]` (the :func:`level_clock` of periods ``sync_periods``). For
    :math:`k = 0, \dots, N-2` in order (fast to slow, so a slower level sees the already-consolidated
    faster one, as nested lookahead loops do), with :math:`\tilde\theta_k` the new value of level k:

    .. math::
      \tilde\theta_0 = \theta_0 + u, \qquad
      \tilde\theta_{k+1} = \theta_{k+1} + s_k\,\alpha_k(\tilde\theta_k - \theta_{k+1}),

    and with ``reset_faster`` every level :math:`j \le k` is set to :math:`\tilde\theta_{k+1}` when
    :math:`s_k` (lookahead's "fast weights restart from the slow ones"). Written as masks
    (``u - s (1-α) d``), never a Python branch, so periods and rates may be traced arrays.

    The arithmetic is :func:`consolidate`, the one rule every fast/slow learner of nestlearn calls; two
    levels with ``reset_faster=True`` are ``optax.lookahead(inner, P_0, α_0, reset_state=...)`` bit for
    bit. This form carries all N levels as params, so the consolidation is differentiable in reverse
    mode (a meta-gradient over rates); :func:`consolidation_in_state` runs the same rule with the slow
    levels in the optimizer state, for training loops that own one copy of the parameters, and faster.

    Args:
      inner: optimizer of level 0.
      sync_periods: ``N-1`` ints >= 1; ``sync_periods[k]`` is how often level k+1 moves toward level k.
      rates: ``N-1`` floats; ``rates[k]`` is :math:`\alpha_k` (1 copies level k, 0 freezes level k+1).
      reset_faster: keyword-only; on a sync of level k+1, reset levels 0..k to it (default, lookahead).
      reset_state: keyword-only; re-initialise the inner optimizer's state whenever level 1 syncs.

    Returns:
      An :class:`optax.GradientTransformation` over :class:`LevelParams`. Its ``update`` takes
      gradients with the structure of one level (computed at ``params.fastest``) and returns
      :class:`LevelParams` updates.

    Example:
      >>> tx = consolidation(optax.sgd(0.5), [2], [0.5])
      >>> p = LevelParams.init_synced(jnp.zeros(1), 2); s = tx.init(p)
      >>> for _ in range(2):
      ...   u, s = tx.update(jnp.ones(1), s, p); p = optax.apply_updates(p, u)
      >>> p.fastest.tolist(), p.slowest.tolist()
      ([-0.5], [-0.5])

    References:
      Zhang et al., Lookahead Optimizer: k steps forward, 1 step back, 2019; Behrouz et al., Nested
      Learning, 2025 (levels consolidating toward faster ones).
    """
    periods, rates = _periods_and_rates(sync_periods, rates)
    num_syncs = periods.shape[0]

    def init_fn(params):
        fast = params.levels[0] if isinstance(params, LevelParams) else params
        return ConsolidationState(jnp.zeros([], jnp.int32), inner.init(fast))

    def update_fn(updates, state, params):
        if not isinstance(params, LevelParams) or len(params.levels) != num_syncs + 1:
            raise ValueError(
                f"params must be LevelParams with {num_syncs + 1} levels (one more than sync_periods), "
                f"got {type(params).__name__}"
                + (f" with {len(params.levels)} levels" if isinstance(params, LevelParams) else "")
            )
        theta = params.levels
        u0, inner_state = inner.update(updates, state.inner_state, theta[0])
        sync = level_clock(periods, state.count).active

        def synced(u0):
            return consolidate(theta, u0, sync, rates, reset_faster=reset_faster)

        def unsynced(u0):
            return (u0,) + tuple(optax.tree.zeros_like(u0) for _ in range(num_syncs))

        # Most steps sync nothing: lax.cond skips the level arithmetic then (a select under vmap).
        ups = jax.lax.cond(jnp.any(sync), synced, unsynced, u0)
        if reset_state:
            fresh = inner.init(theta[0])
            s0 = sync[0]
            inner_state = jax.tree.map(
                lambda c, i: (
                    (1 - s0.astype(c.dtype)) * c + s0.astype(c.dtype) * i
                    if jnp.issubdtype(c.dtype, jnp.inexact)
                    else jnp.where(s0, i, c)
                ),
                inner_state,
                fresh,
            )
        return LevelParams(tuple(ups)), ConsolidationState(optax.safe_increment(state.count), inner_state)

    return optax.GradientTransformation(init_fn, update_fn)


def consolidate(
    levels: Sequence[Any],
    updates: Any,
    sync: Sequence[Any],
    rates: Sequence[Any] | jax.typing.ArrayLike,
    *,
    reset_faster: bool = True,
) -> tuple:
    r"""The consolidation rule, once: the updates that move each slower level toward the next faster one.

    Every fast/slow learner in nestlearn is this rule: :func:`consolidation` (the levels as
    :class:`LevelParams`), :func:`consolidation_in_state` (the slow levels in the optimizer state),
    :class:`nestlearn.continual.FastSlow` (the slow copy in a strategy's state) and the
    ``"consolidate"`` levels of :class:`nestlearn.levels.Nested`.

    With levels :math:`\theta_0, \dots, \theta_{N-1}` (fastest first), level 0's update :math:`u`
    and sync masks :math:`s_k`, for :math:`k = 0, \dots, N-2` in order (so a slower level sees the
    already-consolidated faster one, as nested lookahead loops do), with :math:`U_k` level k's update so
    far (:math:`U_0 = u`) and :math:`d_k = \theta_k + U_k - \theta_{k+1}`:

    .. math::
      U_{k+1} = s_k\,\alpha_k\,d_k, \qquad
      U_k \leftarrow U_k - s_k (1 - \alpha_k)\, d_k \;\;(\text{with reset}), \qquad
      U_j \leftarrow U_j - s_k (\theta_j + U_j - \theta_{k+1} - \alpha_k d_k),\; j < k,

    so level k+1 lands on :math:`\theta_{k+1} + \alpha_k d_k` and, with ``reset_faster``, levels
    :math:`0..k` restart from it. This is ``optax/_src/lookahead.py``'s merged update (``u - s (1-α) d``,
    masks rather than branches), extended to N levels; two levels are ``optax.lookahead`` bit for bit.

    Args:
      levels: the N level values (pytrees of one structure), fastest first.
      updates: level 0's update this step (``None``: zero, when level 0 has already moved).
      sync: N-1 masks, ``sync[k]`` whether level k+1 syncs now: a bool scalar, or a pytree of bool
        scalars with the levels' structure (each parameter group at its own period).
      rates: N-1 rates :math:`\alpha_k` (may be traced).
      reset_faster: keyword-only; restart levels 0..k from level k+1 when it syncs (lookahead).

    Returns:
      The N updates (a tuple of pytrees; ``optax.apply_updates`` each to its level).

    Example:
      >>> ups = consolidate((jnp.ones(1), jnp.zeros(1)), jnp.ones(1), [jnp.array(True)], [0.5])
      >>> [u.tolist() for u in ups]  # d = 1 + 1 - 0 = 2: slow moves by 1, fast lands on it
      [[0.0], [1.0]]
    """
    n = len(levels)
    if len(sync) != n - 1:
        raise ValueError(f"consolidate: {n} levels need {n - 1} sync masks, got {len(sync)}")
    ups = [optax.tree.zeros_like(levels[0]) if updates is None else updates] + [None] * (n - 1)
    for k in range(n - 1):
        s, alpha = _masks(sync[k], levels[0]), jnp.asarray(rates[k])
        # d = (θ_k + U_k) - θ_{k+1}: the faster level's new value minus the slower level's old one.
        if updates is None and k == 0:
            d = jax.tree.map(jnp.subtract, levels[0], levels[1])
        else:
            d = jax.tree.map(lambda t, u, ts: t + u - ts, levels[k], ups[k], levels[k + 1])
        ups[k + 1] = jax.tree.map(lambda x, s, a=alpha: a.astype(x.dtype) * s.astype(x.dtype) * x, d, s)
        if reset_faster:
            # Level k lands on θ_{k+1} + α d: U_k - s (1 - α) d (lookahead's fast update, bit for bit).
            ups[k] = jax.tree.map(
                lambda u, x, s, a=alpha: u - s.astype(x.dtype) * (1 - a.astype(x.dtype)) * x, ups[k], d, s
            )
            # Faster levels j < k land on the same value: U_j - s (θ_j + U_j - θ_{k+1} - α d).
            for j in range(k):
                ups[j] = jax.tree.map(
                    lambda u, t, ts, x, s, a=alpha: (
                        u - s.astype(x.dtype) * (t + u - ts - a.astype(x.dtype) * x)
                    ),
                    ups[j],
                    levels[j],
                    levels[k + 1],
                    d,
                    s,
                )
    return tuple(ups)


def _masks(s, like):
    """A sync mask as a pytree of bool scalars with the structure of ``like`` (a scalar is broadcast)."""
    if jax.tree.structure(s) == jax.tree.structure(like):
        return jax.tree.map(jnp.asarray, s)
    s = jnp.asarray(s)
    return jax.tree.map(lambda _: s, like)


class SlowLevelsState(NamedTuple):
    """State of :func:`consolidation_in_state`: the inner optimizer's state and the slow levels.

    Attributes:
      count: int32, steps taken.
      inner_state: state of the level-0 optimizer.
      slow: tuple of ``N-1`` parameter pytrees, levels ``1 .. N-1`` (slowest last); level 0 is the
        model's own parameters.
    """

    count: jax.Array
    inner_state: optax.OptState
    slow: tuple

    @property
    def slowest(self):
        """Level ``N-1``, the most consolidated copy."""
        return self.slow[-1]


def consolidation_in_state(
    inner: optax.GradientTransformation,
    sync_periods: Sequence[int] | jax.typing.ArrayLike,
    rates: Sequence[float] | jax.typing.ArrayLike,
    *,
    reset_faster: bool = True,
    reset_state: bool = False,
) -> optax.GradientTransformation:
    r"""N-level consolidation over the model's own parameters, the slower levels kept in the optimizer state.

    The rule of :func:`consolidation`: level 0 takes the inner update :math:`u` every step; at step
    :math:`t` with :math:`s_k = [(t+1) \bmod P_k = 0]`, for :math:`k = 0, \dots, N-2` in order,

    .. math::
      \tilde\theta_0 = \theta_0 + u, \qquad
      \tilde\theta_{k+1} = \theta_{k+1} + s_k\,\alpha_k(\tilde\theta_k - \theta_{k+1}),

    and with ``reset_faster`` levels :math:`0..k` restart from :math:`\tilde\theta_{k+1}` when
    :math:`s_k`. Here the params are level 0 alone (the model's parameters, so the transform drops into
    any training loop, the continual engine included) and levels :math:`1..N-1` live in
    :attr:`SlowLevelsState.slow`. The slow levels move by :func:`consolidate` (the one rule), inside a
    ``lax.while_loop`` of ``any(s)`` (0 or 1) trips, which leaves them in place on steps without a sync (a
    ``lax.cond`` would copy them every step). With a reset, level 0 lands on the value of the slowest level
    that synced, :math:`U = \tilde\theta_{k+1} - \theta_0` chosen by ``where``, so that the inner update
    stays fused with the caller's ``apply_updates``: the rule's merged update up to rounding (a few ulps),
    so the trajectory is :func:`consolidation`'s, and for two levels ``optax.lookahead``'s, to rounding.
    (Carrying the merged update through the loop instead measured 1.5x the step time of SGD with momentum
    against 1.14x, on the MLP of ``benchmarks/optim_overhead.py``.) A step without a sync so costs the
    inner update, one fused pass and a few selects. :func:`consolidation` instead carries all N copies in
    the params and returns N updates every step (zeros for the slow levels): N times the parameter traffic.
    Periods and rates may be traced (swept under ``vmap``, injected); forward-mode differentiation works,
    reverse mode does not pass the while loop: to differentiate through the consolidation (a
    meta-gradient over rates), use :func:`consolidation`.

    A separate factory rather than a flag on :func:`consolidation`, because the params and the state
    have different types: the update's contract (one level in, one level out) is fixed by the factory.

    Args:
      inner: optimizer of level 0.
      sync_periods: ``N-1`` ints >= 1 (may be traced); ``sync_periods[k]`` is how often level k+1 moves
        toward level k.
      rates: ``N-1`` floats (may be traced); ``rates[k]`` is :math:`\alpha_k`.
      reset_faster: keyword-only; on a sync of level k+1, reset levels 0..k to it (default, lookahead).
      reset_state: keyword-only; re-initialise the inner optimizer's state whenever level 1 syncs.

    Returns:
      An :class:`optax.GradientTransformation` over the model's parameters whose state is a
      :class:`SlowLevelsState`; ``update`` needs ``params`` (the current level 0). Read the slow levels
      with :func:`consolidated_params`.

    Example:
      >>> tx = consolidation_in_state(optax.sgd(0.5), [2], [0.5])
      >>> p = jnp.zeros(1); s = tx.init(p)
      >>> for _ in range(2):
      ...   u, s = tx.update(jnp.ones(1), s, p); p = optax.apply_updates(p, u)
      >>> p.tolist(), consolidated_params(s).tolist()
      ([-0.5], [-0.5])

    References:
      Zhang et al., Lookahead Optimizer: k steps forward, 1 step back, 2019; Behrouz et al., Nested
      Learning, 2025 (levels consolidating toward faster ones).
    """
    periods, rates = _periods_and_rates(sync_periods, rates)
    num_syncs = periods.shape[0]

    def _check(params):
        if params is None or isinstance(params, LevelParams):
            raise ValueError(
                "consolidation_in_state needs params = the model's parameters (level 0), got "
                f"{type(params).__name__}; for LevelParams use consolidation"
            )

    def init_fn(params):
        _check(params)
        # Distinct buffers per level, so a jitted step may donate the whole state.
        slow = tuple(jax.tree.map(lambda x: jnp.array(x, copy=True), params) for _ in range(num_syncs))
        return SlowLevelsState(jnp.zeros([], jnp.int32), inner.init(params), slow)

    def update_fn(updates, state, params):
        _check(params)
        u0, inner_state = inner.update(updates, state.inner_state, params)
        sync = level_clock(periods, state.count).active

        # The slow levels move inside a while loop of any(sync) (0 or 1) trips: a while loop updates its
        # carry in place and, when it does not run, passes it through untouched, where lax.cond copies
        # every operand a branch returns unchanged (N-1 parameter copies on every step).
        def body(carry):
            i, slow = carry
            ups = consolidate((params, *slow), u0, sync, rates, reset_faster=reset_faster)
            new = tuple(jax.tree.map(lambda x, v: jnp.asarray(x + v).astype(x.dtype), s, v)
                        for s, v in zip(slow, ups[1:]))  # fmt: skip
            return i + 1, new

        run = jnp.any(sync).astype(jnp.int32)
        _, slow = jax.lax.while_loop(lambda c: c[0] < run, body, (jnp.zeros([], jnp.int32), state.slow))
        if reset_faster:
            # Level 0 restarts from the slowest level that synced: U = θ_{k+1} - θ0, which is the rule's
            # merged update up to rounding (a select, not a branch, so the inner update stays fused with
            # the caller's apply_updates).
            for k in range(num_syncs):
                u0 = jax.tree.map(
                    lambda u, t, p, s=sync[k]: jnp.where(s, (t - p).astype(u.dtype), u), u0, slow[k], params
                )
        if reset_state:
            fresh = inner.init(params)
            inner_state = jax.tree.map(lambda c, i: jnp.where(sync[0], i, c), inner_state, fresh)
        return u0, SlowLevelsState(optax.safe_increment(state.count), inner_state, tuple(slow))

    return optax.GradientTransformation(init_fn, update_fn)


def consolidated_params(state: optax.OptState, level: int = -1):
    """Level ``level`` (default the slowest) of the :class:`SlowLevelsState` found in ``state``.

    ``state`` may be the state of :func:`consolidation_in_state` itself or of any transform around it
    (``optax.chain``, ``inject_hyperparams``, ``MultiSteps``): it is searched for the one
    :class:`SlowLevelsState` it holds.

    Args:
      state: an optimizer state holding exactly one :class:`SlowLevelsState`.
      level: which level, ``1 .. N-1`` (level 0 is the params), or a negative index (``-1``: slowest).

    Returns:
      The parameter pytree of that level.

    Example:
      >>> tx = optax.chain(optax.clip(1.0), consolidation_in_state(optax.sgd(0.1), [2, 4], [0.5, 0.5]))
      >>> consolidated_params(tx.init(jnp.ones(2)), level=1).tolist()
      [1.0, 1.0]
    """
    found = [
        s
        for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, SlowLevelsState))
        if isinstance(s, SlowLevelsState)
    ]
    if len(found) != 1:
        raise ValueError(f"state must hold exactly one SlowLevelsState, found {len(found)}")
    slow = found[0].slow
    n = len(slow) + 1
    if not isinstance(level, int) or not (1 <= level < n or -n < level < 0):
        raise ValueError(f"level must be in 1..{n - 1} or a negative index, got {level!r}")
    return slow[level - 1] if level > 0 else slow[level]


def _periods_and_rates(sync_periods, rates) -> tuple[jax.Array, jax.Array]:
    """``sync_periods`` (checked >= 1) and ``rates`` as 1-D arrays of one length, the levels minus one."""
    periods = jnp.atleast_1d(check_periods(sync_periods, "sync_periods"))
    rates = jnp.atleast_1d(jnp.asarray(rates))
    if periods.shape != rates.shape or periods.ndim != 1:
        raise ValueError(
            f"sync_periods and rates must be 1-D of the same length (levels - 1), got shapes "
            f"{periods.shape} and {rates.shape}"
        )
    return periods, rates
