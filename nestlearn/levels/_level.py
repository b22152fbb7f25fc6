"""A level of a nested learner: the parameters it owns, its optimizer, its period, how it learns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, final

import flax.struct
import jax
import numpy as np
import optax

LEARNS_BY = ("gradient", "unroll", "first_order", "consolidate")
"""How a level learns: from the data (``"gradient"``) or from the faster level below it (the other three)."""

OwnsFn = Callable[[tuple], bool]


def _is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


@final
@flax.struct.dataclass
class Level:
    r"""One level of a nested learner: what it owns, its optimizer, its period, and how it learns.

    A nested program (:class:`~nestlearn.levels.Nested`) is a tuple of levels, fastest first. Level
    :math:`\ell` keeps its own copy :math:`\theta_\ell` of the parameters it owns and updates once every
    :math:`P_\ell` clock steps (one clock step = one gradient of the data loss). Periods are absolute
    clock periods, as in :func:`nestlearn.optim.level_clock`: level :math:`\ell`'s update closes an
    *episode* of :math:`P_\ell / P_{\ell-1}` episodes of the level below. Where several levels own the
    same parameter, the fastest owner's copy is the one the data loss sees; the slower copies learn
    from it. Let :math:`\varphi` be the faster level's copy of the shared parameters at the end of the
    episode, :math:`\mathcal{D}^{q}` the outer batch (a task's query set), and :math:`\mathrm{opt}` the
    level's optimizer (:math:`u = \mathrm{opt}(g)`, :math:`\theta_\ell \leftarrow \theta_\ell + u`):

    - ``"gradient"``: learn from the data, :math:`g = \sum_{s \in \text{episode}} \nabla_{\theta_\ell}
      L(\theta^{\text{eff}}_s; \mathcal{D}_s)`, the *sum* of the gradients of the :math:`P_\ell` clock
      steps at the parameters each step saw (the CMS rule; level 0 with :math:`P_0 = 1` is plain
      training). The level's parameters must not be owned by a faster level.
    - ``"unroll"``: :math:`g = \nabla_{\theta_\ell} L(\varphi(\theta_\ell); \mathcal{D}^{q})`, the
      gradient through the faster levels' unrolled updates, which start from :math:`\theta_\ell`
      (second order: with SGD below, :math:`\partial\varphi/\partial\theta = \prod_i (I - \alpha
      \nabla^2 L(\varphi_i))`). MAML's initialisation; owned parameters no faster level owns (ANIL's
      body) get their gradient through the same unroll.
    - ``"first_order"``: :math:`g = \nabla_{\varphi} L(\varphi; \mathcal{D}^{q})`, the gradient at the
      faster level's end point, no derivative through its updates (first-order MAML).
    - ``"consolidate"``: interpolation toward the faster level, through the pseudo-gradient
      :math:`d = \theta_\ell - \varphi`: with a ``rate`` :math:`\alpha`,
      :math:`\theta_\ell \leftarrow \theta_\ell - \alpha d = \theta_\ell + \alpha(\varphi - \theta_\ell)`
      (Lookahead's slow weights; Reptile with outer SGD; the arithmetic of
      :func:`nestlearn.optim.consolidate`, the one consolidation rule); with an ``optimizer`` instead,
      :math:`u = \mathrm{opt}(d)` (Reptile with, e.g., an Adam outer loop). Every owned parameter must
      be owned by a faster level.

    After every update of a level that learns from the one below (``unroll``, ``first_order``, or
    ``consolidate`` with ``reset_faster``), the faster levels' copies of the shared parameters restart
    from the new :math:`\theta_\ell` (MAML's "each task starts from θ", Lookahead's "fast weights restart
    from the slow ones"); ``reset_state`` also re-initialises their optimizers' states.

    Attributes:
      name: a unique name (used in errors and telemetry) (static).
      optimizer: an optax transform (static). Required except for ``"consolidate"`` with a ``rate``.
      period: update period in clock steps, an int >= 1; each level's period is a multiple of the one
        below (static).
      learns_by: one of :data:`LEARNS_BY` (static).
      owns: ``"all"`` or a predicate on a parameter's plain path (``('layers', 0, 'kernel')``, see
        :func:`nestlearn.meta.plain_path`) that is true for the parameters the level owns (static).
      rate: the interpolation rate :math:`\alpha` of ``"consolidate"`` (a pytree leaf, so a sweep can vmap
        over it); ``None`` otherwise.
      reset_faster: ``"consolidate"`` only: restart the faster copies from the new value after each
        update (default, Lookahead); False lets them run on (static).
      reset_state: re-initialise the faster levels' optimizer states when they restart (static).

    Example:
      >>> fast = Level("fast", optax.sgd(0.1))                          # every clock step
      >>> slow = Level("slow", period=5, learns_by="consolidate", rate=0.5)
      >>> slow.period, slow.learns_by
      (5, 'consolidate')

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025 (levels);
      Finn et al., MAML, 2017; Nichol et al., Reptile, 2018; Zhang et al., Lookahead, 2019.
    """

    name: str = flax.struct.field(pytree_node=False)
    optimizer: optax.GradientTransformation | None = flax.struct.field(pytree_node=False, default=None)
    period: int = flax.struct.field(pytree_node=False, default=1)
    learns_by: str = flax.struct.field(pytree_node=False, default="gradient")
    owns: Any = flax.struct.field(pytree_node=False, default="all")
    rate: Any = None
    reset_faster: bool = flax.struct.field(pytree_node=False, default=True)
    reset_state: bool = flax.struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Level name must be a non-empty str, got {self.name!r}")
        where = f"level {self.name!r}"
        if self.learns_by not in LEARNS_BY:
            raise ValueError(f"{where}: learns_by must be one of {LEARNS_BY}, got {self.learns_by!r}")
        if isinstance(self.period, bool) or not isinstance(self.period, (int, np.integer)) or self.period < 1:
            raise ValueError(f"{where}: period must be an int >= 1, got {self.period!r}")
        if not (self.owns == "all" if isinstance(self.owns, str) else callable(self.owns)):
            raise ValueError(
                f"{where}: owns must be 'all' or a predicate on parameter paths, got {self.owns!r}"
            )
        if self.optimizer is not None and not isinstance(self.optimizer, optax.GradientTransformation):
            raise ValueError(
                f"{where}: optimizer must be an optax.GradientTransformation, got {type(self.optimizer).__name__}"
            )
        if self.learns_by == "consolidate":
            # "Neither rate nor optimizer" is checked by check_rate() when a program runs: pytree
            # utilities rebuild levels with None leaves (jax.tree.map(lambda _: None, level)).
            if self.optimizer is not None and self.rate is not None:
                raise ValueError(
                    f"{where}: learns_by='consolidate' takes exactly one of rate (interpolation) or "
                    f"optimizer (applied to the pseudo-gradient θ - φ), got both"
                )
        else:
            if self.optimizer is None:
                raise ValueError(f"{where}: learns_by={self.learns_by!r} needs an optimizer, got None")
            if self.rate is not None:
                raise ValueError(
                    f"{where}: rate is the interpolation rate of learns_by='consolidate'; "
                    f"got rate={self.rate!r} with learns_by={self.learns_by!r}"
                )
            if self.reset_faster is not True:
                raise ValueError(
                    f"{where}: reset_faster=False applies to learns_by='consolidate' only "
                    f"(learns_by={self.learns_by!r})"
                )

    def check_rate(self) -> None:
        """Raise ValueError unless a consolidating level has a scalar rate or an optimizer."""
        if self.learns_by == "consolidate" and self.optimizer is None:
            if self.rate is None:
                raise ValueError(
                    f"level {self.name!r}: learns_by='consolidate' needs a rate (interpolation) or an "
                    f"optimizer (applied to the pseudo-gradient θ - φ), got neither"
                )
            if not _is_traced(self.rate) and np.ndim(self.rate) != 0:
                raise ValueError(f"level {self.name!r}: rate must be a scalar, got {self.rate!r}")

    @property
    def learns_from_below(self) -> bool:
        """Whether the level learns from the faster level below (not from the data)."""
        return self.learns_by != "gradient"

    def owns_path(self, path: tuple) -> bool:
        """Whether the level owns the parameter at plain path ``path``."""
        return True if isinstance(self.owns, str) else bool(self.owns(path))


@final
@flax.struct.dataclass
class Stream:
    """Data schedule of a stream of batches: clock step ``t`` sees batch ``t``.

    ``Nested.run`` takes ``data = (x, y)`` whose arrays have a leading axis of clock steps (a multiple of
    the slowest period); one top-level step consumes ``P_top`` consecutive batches. Levels can learn by
    ``"gradient"`` or ``"consolidate"`` (there is no outer batch for ``"unroll"``/``"first_order"``).
    Lookahead and the CMS schedule run on a stream.
    """


@final
@flax.struct.dataclass
class Tasks:
    """Data schedule of few-shot tasks: every clock step sees the task's support set, the outer loss its query.

    ``Nested.run`` takes a :class:`~nestlearn.tasks.TaskBatch` whose arrays have two leading axes,
    ``[top steps, tasks, ...]``. Each top-level step runs the slowest level's episode once per task (under
    ``vmap``, every task starting from the same state), feeds the mean over tasks of the slowest level's
    signal (gradient or pseudo-gradient) to its optimizer, and discards the faster levels' per-task
    states. The slowest level must own every parameter and learn from the level below. MAML, first-order
    MAML, ANIL and Reptile run on tasks.
    """
