"""Fast/slow consolidation as a continual learner, and the nested CMS rule built on it.

The engine's optimizer sees one copy of the parameters; this strategy keeps the slow copy in its own
state and, from ``after_step``, moves it toward the fast weights every ``P`` steps (and restarts the
fast weights from it), so any optax optimizer, model and stream runs with consolidation unchanged. The
arithmetic is ``nestlearn.optim.consolidate``, the one consolidation rule, which
``optim.consolidation_in_state`` (the same rule as an optimizer, tested equal to this strategy in the
engine), ``optim.consolidation`` and the ``"consolidate"`` levels of ``nestlearn.levels`` also run;
the strategy form composes with any optimizer and exposes period and rate as strategy fields to sweep.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import PyTree

from nestlearn.continual._strategy import Batch, Context, Params, Strategy
from nestlearn.optim import consolidate
from nestlearn.tasks._stream import TaskStream


@flax.struct.dataclass
class FastSlowState:
    """State of :class:`FastSlow`.

    Attributes:
      slow: the slow weights, a pytree with the structure of the parameters.
    """

    slow: Params


@final
@flax.struct.dataclass
class FastSlow(Strategy):
    r"""Fast/slow consolidation (lookahead as a continual learner): every ``P`` steps the slow weights move
    a fraction ``α`` toward the fast ones, and the fast weights restart from them.

    With fast weights :math:`\theta` (those the optimizer trains and the engine evaluates), slow weights
    :math:`\phi` (this strategy's state, :math:`\phi = \theta` at the start of a run), global step
    :math:`t` (from 0) and :math:`s_t = [(t+1) \bmod P = 0]`, after the optimizer's step:

    .. math::
      \phi \leftarrow \phi + s_t\,\alpha\,(\theta - \phi), \qquad
      \theta \leftarrow \theta - s_t\,(1 - \alpha)\,(\theta - \phi) \quad (\text{with } \texttt{reset}),

    written as masks (no Python branch), so ``period`` and ``rate`` may be swept (they are the
    strategy's pytree leaves). The step counter is global: consolidation runs across task boundaries
    as it would in a deployed learner. ``α = 1`` is plain training; ``α = 0`` with ``reset`` pins the
    weights to the start every ``P`` steps. With ``reset`` and a task length divisible by ``P``, the
    engine's end-of-task evaluation sees the slow weights (fast = slow right after a sync).

    With ``labels`` (e.g. ``nn.cms_labels``), each parameter group consolidates at its own period
    ``group_periods[label]`` (0, or a label not listed: never) and ``period`` is unused; this is how
    :func:`nested_cms` expresses the nested CMS. The arithmetic is :func:`nestlearn.optim.consolidate`
    with two levels (``optax.lookahead``'s merged update: after a sync the fast weights land on the
    slow ones), which the tests reproduce step for step.

    Attributes:
      period: :math:`P`, steps between syncs (a pytree leaf; rounded to an int >= 1 when used).
      rate: :math:`\alpha`, the slow weights' step toward the fast ones (a pytree leaf).
      reset: static; restart the fast weights from the slow ones at every sync (lookahead, default).
      labels: static; ``params -> pytree of labels`` to consolidate groups at their own periods.
      group_periods: static; ``((label, period), ...)`` used with ``labels``.

    Example:
      >>> strategy = FastSlow(period=10.0, rate=0.5)  # continual.Learner(model, opt, strategy, config)

    References:
      Zhang et al., Lookahead Optimizer: k steps forward, 1 step back, 2019; Behrouz et al., Nested
      Learning, 2025 (slow levels consolidating the faster ones).
    """

    period: float = 10.0
    rate: float = 0.5
    reset: bool = flax.struct.field(pytree_node=False, default=True)
    labels: Callable | None = flax.struct.field(pytree_node=False, default=None)
    group_periods: tuple[tuple[str, int], ...] = flax.struct.field(pytree_node=False, default=())

    def __post_init__(self):
        # Only plain numbers are checked: the engine rebuilds strategies with arrays and tracers.
        if isinstance(self.period, (int, float)) and self.labels is None and self.period < 1:
            raise ValueError(f"FastSlow period must be >= 1, got {self.period!r}")
        for label, p in self.group_periods:
            if not isinstance(p, int) or p < 0:
                raise ValueError(f"FastSlow group_periods[{label!r}] must be an int >= 0, got {p!r}")

    def init(self, params: Params, stream: TaskStream) -> FastSlowState:
        del stream
        return FastSlowState(slow=jax.tree.map(jnp.asarray, params))

    def _sync_masks(self, params: Params, step) -> PyTree:
        """Per leaf, whether it syncs after step ``step`` (a bool scalar)."""
        t = jnp.asarray(step, jnp.int32) + 1
        if self.labels is None:
            p = jnp.maximum(jnp.round(jnp.asarray(self.period, jnp.float32)).astype(jnp.int32), 1)
            s = t % p == 0
            return jax.tree.map(lambda _: s, params)
        table = dict(self.group_periods)

        def mask(label):
            p = table.get(label, 0)
            return (t % p == 0) if p > 0 else jnp.zeros((), bool)

        return jax.tree.map(mask, self.labels(params))

    def after_step(
        self, state: FastSlowState, params: Params, grads: Params, batch: Batch, ctx: Context
    ) -> tuple[FastSlowState, Params]:
        del grads, batch
        # The optimizer has moved the fast weights already (level 0's update is zero here).
        sync = self._sync_masks(params, ctx.step)
        fast_up, slow_up = consolidate(
            (params, state.slow), None, (sync,), (self.rate,), reset_faster=self.reset
        )
        return FastSlowState(slow=optax.apply_updates(state.slow, slow_up)), optax.apply_updates(
            params, fast_up
        )


def nested_cms(periods: Sequence[int], meta_rate: float = 1.0) -> FastSlow:
    r"""The nested CMS rule: each block's initial state is meta-learned by the next slower block, and the
    block restarts from it after each of its contexts.

    For a :class:`nestlearn.nn.CMSMLP` trained by ``nn.cms_optimizer(inner, periods)``, block
    :math:`\ell < L-1` lives in contexts of :math:`C(\ell+1)` steps (one period of the level above). At the
    end of each context, level :math:`\ell+1` updates block :math:`\ell`'s initial state
    :math:`\theta^0_\ell` first-order (a Reptile step toward where the block went),
    :math:`\theta^0_\ell \leftarrow \theta^0_\ell + \beta(\theta_\ell - \theta^0_\ell)`, and block
    :math:`\ell` restarts from it: :math:`\theta_\ell \leftarrow \theta^0_\ell`. The slowest block and the
    ``io`` parameters are never reset. This is :class:`FastSlow` per block with period
    :math:`C(\ell+1)` and rate :math:`\beta`. The paper meta-learns the initial state by gradient through
    the context; this is the first-order (Reptile) form of that rule, chosen because it runs inside the
    engine at the cost of one parameter copy (REFERENCES.md: no official code).

    Args:
      periods: the blocks' periods (as given to ``nn.cms_optimizer``), fastest first, ints >= 1.
      meta_rate: :math:`\beta`; 1 copies the block's end state (no reset at all: plain CMS), smaller
        values keep the initial state slower.

    Returns:
      A :class:`FastSlow` strategy.

    Example:
      >>> strategy = nested_cms((1, 4, 16), meta_rate=0.5)
      >>> strategy.group_periods
      (('block0', 4), ('block1', 16))

    References:
      Behrouz et al., Nested Learning, 2025 (nested CMS); Nichol et al., On First-Order Meta-Learning
      Algorithms (Reptile), 2018.
    """
    from nestlearn.nn._cms import block_label, cms_labels

    periods = tuple(periods)
    if not periods or any(not isinstance(p, int) or p < 1 for p in periods):
        raise ValueError(f"periods must be ints >= 1, one per block, got {periods!r}")
    return FastSlow(
        period=1.0,
        rate=meta_rate,
        reset=True,
        labels=cms_labels,
        group_periods=tuple((block_label(i), periods[i + 1]) for i in range(len(periods) - 1)),
    )
