"""A nested learner: a tuple of levels, fastest first, run as nested ``lax.scan``s over a data schedule."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple, final

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float, Int, PyTree

from nestlearn.levels._level import Level, Stream, Tasks
from nestlearn.meta import plain_path
from nestlearn.optim import consolidate, level_clock
from nestlearn.tasks import TaskBatch

LossFn = Callable[[PyTree, Array, Array], Float[Array, ""]]
_MASKED = optax.MaskedNode()


def _is_masked(x) -> bool:
    return isinstance(x, optax.MaskedNode)


def _leaves(tree) -> list:
    """Leaves of a parameter-shaped tree, with ``MaskedNode`` standing in for the leaves a level does not own."""
    return jax.tree.leaves(tree, is_leaf=_is_masked)


class LevelState(NamedTuple):
    """What one level carries.

    Attributes:
      params: the level's copy of the parameters it owns: the model's parameter tree with
        ``optax.MaskedNode()`` in place of the parameters it does not own (as ``optax.masked`` does).
      opt_state: its optimizer's state over ``params`` (``()`` for a rate-only consolidating level).
      acc: the sum of the gradients of its current episode (``"gradient"`` levels that span more than one
        clock step), else ``()``; zero at every episode boundary.
      update_norm: float32, the global L2 norm of the level's latest update.
    """

    params: PyTree
    opt_state: optax.OptState
    acc: PyTree
    update_norm: Float[Array, ""]


class NestedState(flax.struct.PyTreeNode):
    """State of a :class:`Nested` program between top-level steps (a pytree: checkpoint, vmap, shard it).

    Attributes:
      levels: one :class:`LevelState` per level, fastest first.
      step: int32, clock steps done (a top-level step is ``P_top`` clock steps; under :class:`Tasks` the
        clock counts one task's steps per top-level step).
      treedef: the model parameters' tree structure (static).
      paths: the plain path of every parameter leaf, in tree order (static).
    """

    levels: tuple
    step: Int[Array, ""]
    treedef: Any = flax.struct.field(pytree_node=False)
    paths: tuple = flax.struct.field(pytree_node=False)


class Telemetry(NamedTuple):
    """Per-level telemetry of one top-level step (``Nested.run`` stacks them: a leading axis of steps).

    Attributes:
      num_updates: int32 ``[levels]``, updates each level has made so far, read off the level clock
        (:func:`nestlearn.optim.level_clock` of the periods at the last clock step done).
      update_norm: float32 ``[levels]``, global L2 norm of each level's latest update (for levels below
        the slowest under :class:`Tasks`, the mean over the tasks).
      loss: float32, mean data loss of the step's clock steps (and tasks), before each step's update.
      outer_loss: float32, under :class:`Tasks` the mean over tasks of the query loss at the end of the
        faster levels' episode (MAML's post-adaptation loss); under :class:`Stream` equal to ``loss``.
    """

    num_updates: Int[Array, " levels"]
    update_norm: Float[Array, " levels"]
    loss: Float[Array, ""]
    outer_loss: Float[Array, ""]


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static ownership structure, derived from the levels and the parameters' paths."""

    treedef: Any
    owned: tuple  # per level: sorted tuple of leaf indices
    fastest: tuple  # per leaf: index of the fastest level owning it
    below: tuple  # per level: {leaf: next faster level owning it}
    has_acc: tuple  # per level: whether it keeps a gradient accumulator

    def mask(self, leaves: list, level: int) -> PyTree:
        own = set(self.owned[level])
        return jax.tree.unflatten(self.treedef, [x if i in own else _MASKED for i, x in enumerate(leaves)])

    def effective(self, states) -> PyTree:
        """The parameters the data loss sees: every leaf from its fastest owner."""
        per_level = [_leaves(s.params) for s in states]
        return jax.tree.unflatten(self.treedef, [per_level[lv][i] for i, lv in enumerate(self.fastest)])


def _plan(levels: tuple[Level, ...], treedef, paths: tuple, schedule) -> _Plan:
    n = len(paths)
    owned = tuple(tuple(i for i, p in enumerate(paths) if lv.owns_path(p)) for lv in levels)
    for lv, own in zip(levels, owned):
        if not own:
            raise ValueError(f"level {lv.name!r}: owns selects no parameter (paths: {list(paths)})")
    orphans = [paths[i] for i in range(n) if not any(i in own for own in owned)]
    if orphans:
        raise ValueError(f"parameters owned by no level: {orphans}; every parameter needs an owner")
    fastest = tuple(next(lvl for lvl, own in enumerate(owned) if i in own) for i in range(n))
    below = []
    for lvl, (lv, own) in enumerate(zip(levels, owned)):
        nxt = {
            i: max(j for j in range(lvl) if i in owned[j])
            for i in own
            if any(i in owned[j] for j in range(lvl))
        }
        below.append(nxt)
        if lv.learns_by == "gradient" and nxt:
            j = next(iter(nxt.values()))
            raise ValueError(
                f"level {lv.name!r}: learns_by='gradient' but owns parameters that faster level "
                f"{levels[j].name!r} also owns ({[paths[i] for i in nxt]}); overlapping ownership needs "
                f"learns_by 'unroll', 'first_order' or 'consolidate'"
            )
        if lv.learns_from_below and not nxt:
            raise ValueError(
                f"level {lv.name!r}: learns_by={lv.learns_by!r} learns from the level below, but no faster "
                f"level owns any of its parameters"
            )
        if lv.learns_by == "consolidate" and len(nxt) != len(own):
            raise ValueError(
                f"level {lv.name!r}: learns_by='consolidate' moves toward a faster level, but no faster "
                f"level owns {[paths[i] for i in own if i not in nxt]}"
            )
    if isinstance(schedule, Tasks) and len(owned[-1]) != n:
        raise ValueError(
            f"level {levels[-1].name!r}: under schedule=Tasks() the slowest level must own every parameter "
            f"(it restarts the faster levels for every task), got owns={levels[-1].owns!r}"
        )
    has_acc = tuple(lv.learns_by == "gradient" and lv.period > 1 for lv in levels)
    return _Plan(treedef, owned, fastest, tuple(below), has_acc)


def _norm(tree) -> Float[Array, ""]:
    return jnp.asarray(optax.tree.norm(tree), jnp.float32)


@final
@flax.struct.dataclass
class Nested:
    r"""A nested learner: levels, fastest first, each updating at its own period from the level below.

    One *top-level step* is one episode of the slowest level :math:`L`: :math:`P_L` clock steps,
    structured as nested ``lax.scan``\ s (level :math:`\ell`'s episode scans :math:`P_\ell/P_{\ell-1}`
    episodes of level :math:`\ell-1`; level 0's scans its :math:`P_0` clock steps), each level's update
    at the end of its episode. A clock step evaluates the data loss at the *effective* parameters (each
    parameter from its fastest owner), and adds its gradient to the accumulators of the ``"gradient"``
    levels. Because every period divides the next, the nested scans realise exactly the level clock
    :math:`\text{active}_\ell(t) = [(t+1) \bmod P_\ell = 0]` of :func:`nestlearn.optim.level_clock`
    (which the telemetry reads), with no branch on traced values; and an ``"unroll"`` level is
    differentiable through the faster levels' scans, since they are a function of its parameters.
    The learning modes are described (with their math) in :class:`Level`.
    For many runs (seeds x level rates or optimizer hyperparameters) in chunks on the engine, with
    divergence tracked and progress shown, wrap the program in :class:`~nestlearn.levels.NestedTrainer`.

    Configurations of levels (``g`` an optimizer, ``k`` steps):

    - MAML: ``Level("task", optax.sgd(α))``, ``Level("init", optax.adam(β), period=k, learns_by="unroll")``,
      ``schedule=Tasks()``; ``learns_by="first_order"`` is FOMAML; ``owns=head`` on level 0 is ANIL.
    - Reptile: the same with ``Level("init", period=k, learns_by="consolidate", rate=ε)``.
    - Lookahead: ``Level("fast", g)``, ``Level("slow", period=k, learns_by="consolidate", rate=α)``,
      ``schedule=Stream()``; more consolidating levels give :func:`nestlearn.optim.consolidation`. A
      consolidating level at a rate moves by :func:`nestlearn.optim.consolidate`, the one rule.
    - CMS rule: ``"gradient"`` levels over disjoint parameter groups with periods :math:`P_\ell`, each
      applying the sum of its period's gradients (:func:`nestlearn.optim.period_schedule`).

    Attributes:
      levels: tuple of :class:`Level`, fastest first (a pytree: consolidation rates are leaves).
      loss_fn: ``loss_fn(params, x, y) -> scalar``, the data loss of every level (static).
      schedule: :class:`Stream` or :class:`Tasks`, what each level's step sees (static).

    Example:
      >>> loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)
      >>> prog = Nested((Level("fast", optax.sgd(0.25)),
      ...                Level("slow", period=2, learns_by="consolidate", rate=0.5)), loss, Stream())
      >>> state = prog.init(jnp.zeros(()))
      >>> state, tele = prog.run(state, (jnp.ones(4), jnp.ones(4)))   # 4 clock steps = 2 top steps
      >>> # fast 0 → .5 → .75, slow → 0 + .5 (.75 - 0) = .375; fast .375 → .6875 → .84375, slow → .609375
      >>> float(prog.params(state)), tele.num_updates.tolist()
      (0.609375, [[2, 1], [4, 2]])

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025.
    """

    levels: tuple
    loss_fn: LossFn = flax.struct.field(pytree_node=False)
    schedule: Stream | Tasks = flax.struct.field(pytree_node=False, default=Stream())

    def __post_init__(self):
        levels = self.levels
        if not isinstance(levels, tuple) or not levels or not all(isinstance(lv, Level) for lv in levels):
            raise ValueError(f"levels must be a non-empty tuple of Level, got {levels!r}")
        names = [lv.name for lv in levels]
        if len(set(names)) != len(names):
            raise ValueError(f"level names must be unique, got {names}")
        if not isinstance(self.schedule, (Stream, Tasks)):
            raise ValueError(f"schedule must be Stream() or Tasks(), got {self.schedule!r}")
        if levels[0].learns_by != "gradient":
            raise ValueError(
                f"level {levels[0].name!r}: the fastest level learns from the data, so learns_by must be "
                f"'gradient', got {levels[0].learns_by!r}"
            )
        for prev, lv in zip(levels, levels[1:]):
            if lv.period % prev.period:
                raise ValueError(
                    f"level {lv.name!r}: period {lv.period} must be a multiple of the period {prev.period} "
                    f"of the faster level {prev.name!r}"
                )
        for lv in levels:
            if isinstance(self.schedule, Stream) and lv.learns_by in ("unroll", "first_order"):
                raise ValueError(
                    f"level {lv.name!r}: learns_by={lv.learns_by!r} needs an outer (query) batch, which "
                    f"schedule=Stream() has not; use schedule=Tasks()"
                )
        if isinstance(self.schedule, Tasks) and len(levels) > 1 and not levels[-1].learns_from_below:
            raise ValueError(
                f"level {levels[-1].name!r}: under schedule=Tasks() the slowest level learns from the level "
                f"below, got learns_by={levels[-1].learns_by!r}"
            )

    # ------------------------------------------------------------------------------------- public API

    @property
    def periods(self) -> tuple[int, ...]:
        """The levels' clock periods, fastest first."""
        return tuple(lv.period for lv in self.levels)

    def init(self, params: PyTree) -> NestedState:
        """Every level starts with a copy of ``params`` (the leaves it owns) and a fresh optimizer state."""
        for lv in self.levels:
            lv.check_rate()
        flat, treedef = jax.tree_util.tree_flatten_with_path(params)
        paths = tuple(plain_path(kp) for kp, _ in flat)
        plan = self._plan(treedef, paths)
        leaves = [jnp.asarray(x) for _, x in flat]
        states = []
        for lvl, lv in enumerate(self.levels):
            p = plan.mask(leaves, lvl)
            opt = lv.optimizer.init(p) if lv.optimizer is not None else ()
            acc = optax.tree.zeros_like(p) if plan.has_acc[lvl] else ()
            states.append(LevelState(p, opt, acc, jnp.zeros((), jnp.float32)))
        return NestedState(tuple(states), jnp.zeros((), jnp.int32), treedef, paths)

    def params(self, state: NestedState, level: int = -1) -> PyTree:
        """The model parameters as level ``level`` (default the slowest) holds them.

        Each parameter comes from the slowest level at or below ``level`` that owns it: the consolidated
        weights (Lookahead's slow weights, MAML's initialisation), with the parameters only faster levels
        own taken from them (CMS groups, ANIL's head).
        """
        level = range(len(self.levels))[level]
        per_level = [_leaves(s.params) for s in state.levels]
        out = []
        for i in range(len(state.paths)):
            owners = [lvl for lvl in range(level + 1) if not _is_masked(per_level[lvl][i])]
            out.append(per_level[owners[-1]][i])
        return jax.tree.unflatten(state.treedef, out)

    def fast_params(self, state: NestedState) -> PyTree:
        """The parameters the data loss sees: each from its fastest owner."""
        return self._plan(state.treedef, state.paths).effective(state.levels)

    def step(self, state: NestedState, item) -> tuple[NestedState, Telemetry]:
        """One top-level step (one update of the slowest level). Pure and jittable.

        Args:
          state: the program's state.
          item: under :class:`Stream`, ``(x, y)`` with a leading axis of ``P_top`` clock steps; under
            :class:`Tasks`, a :class:`~nestlearn.tasks.TaskBatch` with a leading task axis.

        Returns:
          ``(state, telemetry)``.
        """
        for lv in self.levels:
            lv.check_rate()
        plan = self._plan(state.treedef, state.paths)
        top = len(self.levels) - 1
        p_top = self.levels[-1].period
        if isinstance(self.schedule, Tasks):
            if not isinstance(item, TaskBatch):
                raise ValueError(f"schedule=Tasks() takes a TaskBatch per step, got {type(item).__name__}")
            states, loss_sum, outer = self._tasks_step(plan, state.levels, item)
        else:
            item = self._nest(item)
            states, loss_sum, _ = self._episode(plan, top, state.levels, item, None)
            outer = None
        loss = loss_sum / p_top
        step = state.step + p_top
        telemetry = Telemetry(
            num_updates=level_clock(jnp.asarray(self.periods, jnp.int32), step - 1).num_updates,
            update_norm=jnp.stack([s.update_norm for s in states]),
            loss=loss,
            outer_loss=loss if outer is None else outer,
        )
        return state.replace(levels=tuple(states), step=step), telemetry

    def run(self, state: NestedState, data) -> tuple[NestedState, Telemetry]:
        """Top-level steps over ``data`` under one ``lax.scan``. Pure and jittable.

        Args:
          state: the program's state.
          data: under :class:`Stream`, ``(x, y)`` with a leading axis of clock steps, a multiple of the
            slowest period; under :class:`Tasks`, a :class:`~nestlearn.tasks.TaskBatch` with leading axes
            ``[steps, tasks]``.

        Returns:
          ``(state, telemetry)``, telemetry with a leading axis of top-level steps.
        """
        if isinstance(self.schedule, Stream):
            p_top = self.levels[-1].period
            n = jax.tree.leaves(data)[0].shape[0]
            if n % p_top:
                raise ValueError(
                    f"data has {n} clock steps, not a multiple of the slowest period {p_top} "
                    f"(level {self.levels[-1].name!r})"
                )
            data = jax.tree.map(lambda a: a.reshape((n // p_top, p_top) + a.shape[1:]), data)
        return jax.lax.scan(self.step, state, data)

    # ------------------------------------------------------------------------------------- internals

    def _plan(self, treedef, paths) -> _Plan:
        return _plan(self.levels, treedef, paths, self.schedule)

    def _nest(self, item):
        """``[P_top, ...]`` stream arrays as ``[P_L/P_{L-1}, ..., P_1/P_0, P_0, ...]`` (one axis per level)."""
        ps = self.periods
        counts = tuple(ps[lvl] // ps[lvl - 1] for lvl in range(len(ps) - 1, 0, -1)) + (ps[0],)

        def split(a):
            if a.shape[0] != ps[-1]:
                raise ValueError(f"a top-level step takes {ps[-1]} clock steps, got an axis of {a.shape[0]}")
            return a.reshape(counts + a.shape[1:])

        return jax.tree.map(split, item)

    def _clock(self, plan: _Plan, states: tuple, batch) -> tuple[tuple, Array, list]:
        """One clock step: the data gradient at the effective parameters, added to the accumulators."""
        loss, grads = jax.value_and_grad(self.loss_fn)(plan.effective(states), *batch)
        g = jax.tree.leaves(grads)
        out = list(states)
        for lvl, acc in enumerate(plan.has_acc):
            if acc:
                out[lvl] = states[lvl]._replace(acc=jax.tree.map(jnp.add, states[lvl].acc, plan.mask(g, lvl)))
        return tuple(out), jnp.asarray(loss, jnp.float32), g

    def _sub(self, plan: _Plan, lvl: int, states: tuple, item, outer) -> tuple[tuple, Array, list | None]:
        """The body of level ``lvl``'s episode: its ``P_lvl / P_{lvl-1}`` faster episodes (or clock steps)."""
        per_step = isinstance(self.schedule, Stream)
        ps = self.periods
        n = ps[lvl] // ps[lvl - 1] if lvl > 0 else ps[0]
        if lvl == 0 and n == 1:
            return self._clock(plan, states, jax.tree.map(lambda a: a[0], item) if per_step else item)

        def body(carry, it):
            st, total = carry
            it = it if per_step else item
            if lvl == 0:
                st, loss, _ = self._clock(plan, st, it)
            else:
                st, loss, _ = self._episode(plan, lvl - 1, st, it, outer)
            return (st, total + loss), None

        xs = item if per_step else None
        (states, total), _ = jax.lax.scan(body, (states, jnp.zeros((), jnp.float32)), xs, length=n)
        return states, total, None

    def _episode(self, plan: _Plan, lvl: int, states: tuple, item, outer) -> tuple[tuple, Array, None]:
        """Level ``lvl``'s episode and its update: ``(states, sum of the clock losses, None)``."""
        if self.levels[lvl].learns_by == "gradient":
            states, total, g = self._sub(plan, lvl, states, item, outer)
            signal = states[lvl].acc if plan.has_acc[lvl] else plan.mask(g, lvl)
            return self._apply(plan, lvl, states, signal), total, None
        signal, states, total, _ = self._from_below(plan, lvl, states, item, outer)
        return self._apply(plan, lvl, states, signal), total, None

    def _from_below(self, plan: _Plan, lvl: int, states: tuple, item, outer):
        """Run level ``lvl``'s faster episodes; return its signal (gradient or ``θ - φ``), end states, losses."""
        lv = self.levels[lvl]
        theta = states[lvl].params

        if lv.learns_by == "unroll":

            def f(th):
                # The faster copies of the shared parameters start from θ (equal values: they were reset
                # to θ at its last update); written as a function of θ so the gradient flows through them.
                th_leaves = _leaves(th)
                st = list(states)
                st[lvl] = st[lvl]._replace(params=th)
                for j in range(lvl):
                    shared = set(plan.owned[j]) & set(plan.owned[lvl])
                    if shared:
                        lj = _leaves(st[j].params)
                        st[j] = st[j]._replace(
                            params=plan.mask(
                                [th_leaves[i] if i in shared else x for i, x in enumerate(lj)], j
                            )
                        )
                end, total, _ = self._sub(plan, lvl, tuple(st), item, outer)
                loss = self.loss_fn(plan.effective(end), *outer)
                return loss, (end, total)

            (loss, (end, total)), grads = jax.value_and_grad(f, has_aux=True)(theta)
            return grads, end, total, jnp.asarray(loss, jnp.float32)

        end, total, _ = self._sub(plan, lvl, states, item, outer)
        loss = None
        if lv.learns_by == "first_order":
            loss, g = jax.value_and_grad(self.loss_fn)(plan.effective(end), *outer)
            signal = plan.mask(jax.tree.leaves(g), lvl)
        else:  # consolidate: toward φ, the next faster owner's copy
            th = _leaves(theta)
            per_level = [_leaves(s.params) for s in end]
            phi = [per_level[plan.below[lvl][i]][i] if i in plan.below[lvl] else x for i, x in enumerate(th)]
            if lv.optimizer is None:  # at a rate: the signal is φ itself (optim.consolidate moves θ to it)
                signal = plan.mask(phi, lvl)
            else:  # through an optimizer: the pseudo-gradient d = θ - φ
                signal = plan.mask([t - p for t, p in zip(th, phi)], lvl)
            if outer is not None:
                loss = self.loss_fn(plan.effective(end), *outer)
        return signal, end, total, None if loss is None else jnp.asarray(loss, jnp.float32)

    def _apply(self, plan: _Plan, lvl: int, states: tuple, signal) -> tuple:
        """Level ``lvl``'s update from its signal, then the restart of the faster levels it resets."""
        lv = self.levels[lvl]
        st = states[lvl]
        if lv.optimizer is None:  # consolidate at a rate: θ + α (φ - θ), the one rule (signal = φ)
            # The restart of the faster levels is below (a copy, for every way of learning from below).
            updates = consolidate((signal, st.params), None, (True,), (lv.rate,), reset_faster=False)[1]
            opt_state = st.opt_state
        else:
            updates, opt_state = lv.optimizer.update(signal, st.opt_state, st.params)
        params = optax.apply_updates(st.params, updates)
        acc = optax.tree.zeros_like(st.acc) if plan.has_acc[lvl] else ()
        out = list(states)
        out[lvl] = LevelState(params, opt_state, acc, _norm(updates))
        if lv.learns_from_below and lv.reset_faster:
            new = _leaves(params)
            for j in range(lvl):
                shared = set(plan.owned[j]) & set(plan.owned[lvl])
                if not shared:
                    continue
                lj = _leaves(out[j].params)
                pj = plan.mask([new[i] if i in shared else x for i, x in enumerate(lj)], j)
                oj = out[j].opt_state
                if lv.reset_state and self.levels[j].optimizer is not None:
                    oj = self.levels[j].optimizer.init(pj)
                out[j] = out[j]._replace(params=pj, opt_state=oj)
        return tuple(out)

    def _tasks_step(self, plan: _Plan, states: tuple, tasks: TaskBatch):
        """The slowest level's episode once per task (vmapped), its update from the mean signal."""
        top = len(self.levels) - 1

        def one(task: TaskBatch):
            support = (task.support_x, task.support_y)
            query = (task.query_x, task.query_y)
            if top == 0:  # a single level: multi-task training on the support sets
                end, total, g = self._sub(plan, 0, states, support, query)
                signal = end[0].acc if plan.has_acc[0] else plan.mask(g, 0)
                return signal, end, total, self.loss_fn(plan.effective(end), *query)
            return self._from_below(plan, top, states, support, query)

        signals, ends, totals, outers = jax.vmap(one)(tasks)
        signal = jax.tree.map(lambda s: jnp.mean(s, axis=0), signals)
        # Faster levels restart for every task: keep their pre-task state, report their mean update norm.
        kept = [
            s._replace(update_norm=jnp.mean(e.update_norm)) if lvl < top else s
            for lvl, (s, e) in enumerate(zip(states, ends))
        ]
        if top == 0:
            kept[0] = states[0]
        return self._apply(plan, top, tuple(kept), signal), jnp.mean(totals), jnp.mean(outers)
