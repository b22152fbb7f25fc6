"""A nested program for many runs on the engine: one top-level step per engine step, runs vmapped."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh
from jaxtyping import Array, Int, PRNGKeyArray, PyTree

from nestlearn._errors import ConfigError
from nestlearn.engine import (
    Checkpoints,
    Engine,
    Guard,
    compile_once,
    norms,
    optimizer_values,
    per_run_values,
    run_chunks,
    run_grid,
    run_keys,
    shard_runs,
)
from nestlearn.levels._nested import Nested, NestedState


class NestedTrainState(flax.struct.PyTreeNode):
    """What one run of a :class:`NestedTrainer` carries between top-level steps (and chunks).

    Attributes:
      nested: the program's :class:`~nestlearn.levels.NestedState` (its ``step`` counts clock steps).
      step: int32, top-level steps done; step ``i`` trains on ``sample(key, i)``.
      diverged_step: int32, the first top-level step whose loss or update was not finite, ``-1`` while
        none was; from then on the run is frozen (the engine's policy, :class:`nestlearn.engine.Guard`).
    """

    nested: NestedState
    step: Int[Array, ""]
    diverged_step: Int[Array, ""]


class NestedTrainer:
    r"""Runs a :class:`~nestlearn.levels.Nested` program for many runs (seeds x hyperparameters) in chunks.

    The per-run step is one top-level :meth:`Nested.step` (one update of the slowest level, ``P_top``
    clock steps under :class:`~nestlearn.levels.Stream`) on ``sample(key, i)``, the data of top-level
    step ``i``; :class:`nestlearn.engine.Engine` runs ``chunk`` of them under ``lax.scan`` in one
    ``jit`` for every run at once (runs vmapped, the state donated, a diverged run frozen with its
    step recorded), and the host regains control only between chunks (progress, ``log``).

    Runs are the engine's: ``run_grid(seeds, sweep)``, one key ``jax.random.key(seed)`` each. A sweep
    names ``"<level>.rate"`` (the rate of a level that consolidates at a rate: a pytree leaf of the
    program, so every value runs in the same program) or ``"<level>.<hyperparameter>"`` (set in that
    level's ``optax.inject_hyperparams`` state, e.g. ``"fast.learning_rate"``).

    Args:
      program: the nested program (levels, loss, schedule).
      init_params: ``init_params(key) -> params``, a run's initial parameters (jittable).
      sample: ``sample(key, i) -> item``, the data of top-level step ``i`` (jittable, ``i`` an int32
        scalar): under ``Stream()`` an ``(x, y)`` with a leading axis of ``P_top`` clock steps, under
        ``Tasks()`` a :class:`~nestlearn.tasks.TaskBatch` with a leading task axis.
      steps: keyword-only; top-level steps per run.
      chunk: keyword-only; top-level steps per compiled call (default ``min(steps, 100)``), dividing
        ``steps``.
      evaluate: keyword-only; ``evaluate(params, key) -> {name: array}`` run after every top-level step
        at the slowest level's parameters (:meth:`Nested.params`), e.g. test losses (jittable).
      guard: keyword-only; the divergence policy (default: on the step's mean data ``loss``).
      compiler_options: keyword-only; passed to ``jax.jit`` for the chunk.

    The keys passed to ``init_params``, ``sample`` and ``evaluate`` are the run's key itself: fold in
    distinct streams (``jax.random.fold_in``) where they must not share randomness.

    Example:
      >>> from nestlearn.levels import Level, Stream
      >>> loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)
      >>> prog = Nested((Level("fast", optax.sgd(0.25)),
      ...                Level("slow", period=2, learns_by="consolidate", rate=0.5)), loss, Stream())
      >>> trainer = NestedTrainer(prog, lambda key: jnp.zeros(()),
      ...                         lambda key, i: (jnp.ones(2), jnp.ones(2)), steps=2, chunk=2)
      >>> res = trainer.run([0], sweep={"slow.rate": [0.5, 0.7]}, progress=False)
      >>> [round(float(p), 6) for p in res["params"]]   # the hand-derived .609375 and .774375
      [0.609375, 0.774375]

    References:
      Behrouz et al., Nested Learning: The Illusion of Deep Learning Architectures, 2025.
    """

    def __init__(
        self,
        program: Nested,
        init_params: Callable[[PRNGKeyArray], PyTree],
        sample: Callable[[PRNGKeyArray, Array], Any],
        *,
        steps: int,
        chunk: int | None = None,
        evaluate: Callable[[PyTree, PRNGKeyArray], dict[str, Array]] | None = None,
        guard: Guard | None = None,
        compiler_options: dict | None = None,
    ) -> None:
        if not isinstance(program, Nested):
            raise ConfigError(f"program must be a levels.Nested, got {type(program).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"steps must be a positive int, got {steps!r}")
        chunk = min(steps, 100) if chunk is None else chunk
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1 or steps % chunk:
            raise ConfigError(f"chunk must be a positive int dividing steps={steps}, got {chunk!r}")
        self.program = program
        self.init_params = init_params
        self.sample = sample
        self.steps = steps
        self.chunk = chunk
        self.evaluate = evaluate
        self.engine = Engine(
            self.step, length=chunk, in_axes=(0, 0), guard=guard, compiler_options=compiler_options
        )
        self._init = compile_once(self.init_one)
        self._params = jax.jit(jax.vmap(lambda s, hp: self.with_hparams(hp).params(s.nested)))

    @property
    def period(self) -> int:
        """Clock steps per top-level step (the slowest level's period)."""
        return self.program.periods[-1]

    @property
    def n_traces(self) -> int:
        """Times the chunk was traced (it grows only with a new number of runs or new shapes)."""
        return self.engine.n_traces

    # -- the pure, per-run pieces ----------------------------------------------------------------

    def with_hparams(self, hparams: Mapping[str, Array]) -> Nested:
        """The program with the swept ``"<level>.rate"`` values set (other names are optimizer state)."""
        rates = {name[: -len(".rate")]: v for name, v in hparams.items() if name.endswith(".rate")}
        if not rates:
            return self.program
        levels = tuple(
            lv.replace(rate=rates[lv.name]) if lv.name in rates else lv for lv in self.program.levels
        )
        return self.program.replace(levels=levels)

    def init_one(self, key: PRNGKeyArray, hparams: Mapping[str, Array]) -> NestedTrainState:
        """One run's state: ``program.init(init_params(key))``, swept optimizer values set by name."""
        state = self.with_hparams(hparams).init(self.init_params(key))
        levels = list(state.levels)
        names = [lv.name for lv in self.program.levels]
        for name, value in hparams.items():
            level, field = name.split(".", 1)
            if field != "rate":
                i = names.index(level)
                levels[i] = levels[i]._replace(
                    opt_state=optax.tree_utils.tree_set(levels[i].opt_state, **{field: value})
                )
        return NestedTrainState(
            nested=state.replace(levels=tuple(levels)),
            step=jnp.zeros((), jnp.int32),
            diverged_step=jnp.full((), -1, jnp.int32),
        )

    def step(
        self, state: NestedTrainState, key: PRNGKeyArray, hparams: Mapping[str, Array]
    ) -> tuple[NestedTrainState, dict[str, Any]]:
        """One top-level step of one run (pure; the engine guards it, counts it, records divergence).

        Returns the new state and the step's metrics: ``loss`` and ``outer_loss`` (the program's
        :class:`~nestlearn.levels.Telemetry`), ``level_update_norm`` and ``num_updates`` (``[levels]``),
        ``update_norm`` (their global L2 norm, which the guard checks), ``param_norm`` (of the slowest
        level's parameters) and, with ``evaluate``, ``"eval"`` (its outputs).
        """
        program = self.with_hparams(hparams)
        nested, tele = program.step(state.nested, self.sample(key, state.step))
        params = program.params(nested)
        metrics = {
            "loss": tele.loss,
            "outer_loss": tele.outer_loss,
            "level_update_norm": tele.update_norm,
            "num_updates": tele.num_updates,
            "update_norm": jnp.sqrt(jnp.sum(jnp.square(tele.update_norm))),
            **norms(params=params),
        }
        if self.evaluate is not None:
            metrics["eval"] = self.evaluate(params, key)
        return state.replace(nested=nested), metrics

    # -- the host side ---------------------------------------------------------------------------

    def init(
        self,
        seeds: Sequence[int],
        sweep: Mapping[str, Sequence[float]] | None = None,
        *,
        mesh: Mesh | None = None,
    ) -> tuple[NestedTrainState, list[dict[str, Any]], PRNGKeyArray, dict[str, Array]]:
        """Every run's state (leading run axis), its runs, keys and swept values (sharded over ``mesh``)."""
        runs = run_grid(seeds, sweep)
        keys = run_keys([r["seed"] for r in runs])
        hparams = self._values(runs, sweep or {})
        state = self._init(keys, hparams)
        return shard_runs(state, mesh), runs, shard_runs(keys, mesh), shard_runs(hparams, mesh)

    def params(self, state: NestedTrainState, hparams: Mapping[str, Array]) -> PyTree:
        """Every run's parameters as the slowest level holds them (leading run axis)."""
        return self._params(state, hparams)

    def run(
        self,
        seeds: Sequence[int],
        *,
        sweep: Mapping[str, Sequence[float]] | None = None,
        mesh: Mesh | None = None,
        log: Callable[[dict[str, Any]], None] | None = None,
        progress: bool | None = None,
        checkpoints: Checkpoints | None = None,
    ) -> dict[str, Any]:
        """Runs every seed x swept value for ``steps`` top-level steps, ``chunk`` per compiled call.

        Args:
          seeds: the seeds (ints).
          sweep: keyword-only; ``{name: values}`` (see the class docstring), crossed with the seeds.
          mesh: keyword-only; a mesh to shard the runs over (:func:`nestlearn.engine.run_mesh`).
          log: keyword-only; called after every chunk with ``{"chunk", "step", "loss", "diverged"}``
            (per-run chunk means of the loss, the diverged mask).
          progress: keyword-only; a progress line with an ETA after every chunk (``None``: follow
            ``NESTLEARN_PROGRESS``).
          checkpoints: keyword-only; a :class:`nestlearn.engine.Checkpoints` saved after every chunk and
            resumed from when it holds one (:func:`nestlearn.engine.run_chunks`).

        Returns:
          Numpy arrays, one row per run: ``runs`` (the run dicts, sweep-major), ``loss`` and
          ``outer_loss`` ``[R, steps]``, ``level_update_norm`` and ``num_updates`` ``[R, steps, levels]``,
          ``update_norm`` and ``param_norm`` ``[R, steps]``, ``eval`` (``{name: [R, steps, ...]}``, empty
          without ``evaluate``), ``curve_step [C]`` and ``curve_loss [R, C]`` (chunk means),
          ``diverged_step`` and ``diverged [R]`` (NaN metrics from the diverged step on); ``params``,
          the slowest level's parameters at the end, and ``state``, the final :class:`NestedTrainState`.
        """
        state, runs, keys, hparams = self.init(seeds, sweep, mesh=mesh)

        state, chunks = run_chunks(
            self.engine,
            state,
            keys,
            hparams,
            n_chunks=self.steps // self.chunk,
            steps_per_chunk=self.chunk,
            checkpoints=checkpoints,
            mesh=mesh,
            progress=progress,
            desc=type(self).__name__,
            log=log,
        )
        out = jax.tree.map(lambda *xs: np.concatenate(xs, 1), *chunks)
        diverged_step = np.asarray(state.diverged_step)
        n = len(runs)
        return {
            "runs": runs,
            **{k: v for k, v in out.items() if k != "eval"},
            "eval": out.get("eval", {}),
            "curve_step": np.arange(1, len(chunks) + 1) * self.chunk,
            "curve_loss": out["loss"].reshape(n, len(chunks), self.chunk).mean(2),
            "diverged_step": diverged_step,
            "diverged": diverged_step >= 0,
            "params": jax.tree.map(np.asarray, self.params(state, hparams)),
            "state": state,
        }

    def _values(
        self, runs: Sequence[Mapping[str, Any]], sweep: Mapping[str, Sequence[float]]
    ) -> dict[str, Array]:
        """The runs' swept values ``{name: [runs, ...] float32}``, each checked against its level."""
        names = [lv.name for lv in self.program.levels]
        n, out, abstract = len(runs), {}, None
        for name in sweep:
            level, _, field = name.partition(".")
            if level not in names or not field:
                raise ConfigError(
                    f"sweep {name!r}: name a level and a field, '<level>.rate' or '<level>.<hyperparameter>', "
                    f"with a level among {names}"
                )
            i = names.index(level)
            lv = self.program.levels[i]
            values = [r[name] for r in runs]
            if field == "rate":
                if lv.learns_by != "consolidate" or lv.optimizer is not None:
                    raise ConfigError(f"sweep {name!r}: level {level!r} does not consolidate at a rate")
                rates = per_run_values(name, values, n)
                if rates.ndim != 1:
                    raise ConfigError(f"sweep {name!r}: a rate is one number per run, got {values!r}")
                out[name] = jnp.asarray(rates)
                continue
            if lv.optimizer is None:
                raise ConfigError(f"sweep {name!r}: level {level!r} has no optimizer")
            if abstract is None:
                abstract = jax.eval_shape(lambda: self.program.init(self.init_params(jax.random.key(0))))
            try:  # the engine's one hyperparameter path, over the level's own parameters
                out[name] = optimizer_values(lv.optimizer, abstract.levels[i].params, {field: values}, n)[
                    field
                ]
            except ConfigError as e:
                raise ConfigError(f"sweep {name!r}: level {level!r}: {e}") from None
        return out
