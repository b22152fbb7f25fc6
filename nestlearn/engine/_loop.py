"""The one engine: a family's step, guarded against divergence, scanned in chunks, vmapped over runs.

A family supplies a pure per-run ``step(state, *args) -> (state, metrics)``; ``state`` is a pytree node
with an int32 ``step`` and an int32 ``diverged_step`` (``-1`` while healthy), ``metrics`` a dict of
scalars with at least a loss (``"loss"`` unless the :class:`Guard` names another). :class:`Engine` wraps the step in the divergence policy (:class:`Guard`),
runs ``length`` steps under ``lax.scan`` (a static count) or ``count`` steps under a ``fori_loop`` (a
traced count, so chunks of different lengths share one program), optionally evaluates at the chunk's end,
and compiles the chunk with ``jit``, ``vmap`` over the leading run axis and donation of the state. The host
calls the compiled chunk again and again and regains control only between calls.

The divergence policy is the same for every family: the first step whose loss (or update norm, when the
step reports one) is not finite, or whose loss exceeds an opt-in blow-up threshold, is recorded in
``diverged_step``; from then on the run is frozen (its state keeps its last healthy values) and every
metric it reports is NaN, so a diverged run can never be averaged as if it had a score.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

from nestlearn._errors import ConfigError

Step = Callable[..., tuple[Any, dict[str, Array]]]


@dataclasses.dataclass(frozen=True)
class Guard:
    """The divergence policy.

    Attributes:
      blowup: a finite loss above this is divergence too (``None``: only NaN and inf are), so that an
        explosion to 1e19 is not reported as a score.
      freeze: keep a diverged run's state at its last healthy values (``True``), or let it run on.
      loss: the metric that is the step's loss.
    """

    blowup: float | None = None
    freeze: bool = True
    loss: str = "loss"

    def __post_init__(self):
        if self.blowup is not None and not (
            isinstance(self.blowup, (int, float)) and math.isfinite(self.blowup) and self.blowup > 0
        ):
            raise ConfigError(f"Guard.blowup must be a finite positive number or None, got {self.blowup!r}")

    def healthy(self, metrics: dict[str, Array]) -> Array:
        """Whether a step's metrics are those of a healthy step."""
        loss = metrics[self.loss]
        ok = jnp.all(jnp.isfinite(loss))
        for name in ("grad_norm", "update_norm"):
            if name in metrics:  # a scalar or a vector (one norm per level or group)
                ok &= jnp.all(jnp.isfinite(metrics[name]))
        if self.blowup is not None:
            ok &= jnp.all(jnp.abs(loss) <= self.blowup)
        return ok

    def wrap(self, step: Step) -> Step:
        """``step`` under this policy (same signature)."""

        def guarded(state, *args):
            new, metrics = step(state, *args)
            ok = self.healthy(metrics)
            was = state.diverged_step < 0
            diverged = jnp.where(was & ~ok, state.step, state.diverged_step).astype(jnp.int32)
            if self.freeze:
                take = was & ok
                new = jax.tree.map(lambda n, o: _select(take, n, o), new, state)
            new = new.replace(step=state.step + 1, diverged_step=diverged)
            return new, nan_unless(was, metrics)

        return guarded


def _select(pred, new, old):
    if jax.dtypes.issubdtype(jnp.result_type(new), jax.dtypes.prng_key):
        return new  # keys are not changed by a step's update; lax.select does not take them
    return jnp.where(pred, new, old)


def nan_unless(ok: Array, tree: Any) -> Any:
    """Floating leaves of ``tree`` where ``ok``, NaN elsewhere (``ok`` broadcasts from the left)."""

    def one(x):
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        cond = jnp.reshape(ok, jnp.shape(ok) + (1,) * (x.ndim - jnp.ndim(ok)))
        return jnp.where(cond, x, jnp.full_like(x, jnp.nan))

    return jax.tree.map(one, tree)


def norms(grads: Any = None, updates: Any = None, params: Any = None) -> dict[str, Float[Array, ""]]:
    """The telemetry every family reports per step: global L2 norms of gradients, updates and parameters."""
    out = {}
    for name, tree in (("grad_norm", grads), ("update_norm", updates), ("param_norm", params)):
        if tree is not None:
            out[name] = optax.tree.norm(tree).astype(jnp.float32)
    return out


def _fast_cpu() -> dict | None:
    # Programs that run once per run (initialisation, a final evaluation): on CPU, compile them without
    # LLVM's optimisations (about two seconds of threefry code generation saved, milliseconds lost).
    return {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None


def compile_once(fn: Callable, *, vmapped: bool = True, in_axes: Any = 0, **jit_kwargs) -> Callable:
    """``jit`` (over ``vmap`` of) a once-per-run program, compiled cheaply on CPU."""
    f = jax.vmap(fn, in_axes=in_axes) if vmapped else fn
    return jax.jit(f, compiler_options=_fast_cpu(), **jit_kwargs)


class Engine:
    """Compiles and runs chunks of a family's step for many runs at once.

    Args:
      step: the per-run step, ``step(state, *args) -> (state, metrics)`` (pure, unjitted).
      length: keyword-only; steps per chunk, under ``lax.scan`` (metrics come back per step,
        ``[runs, length]``). ``None``: each call passes a traced ``count`` and a ``fori_loop`` runs it
        (metrics come back as their mean over the chunk's healthy steps, NaN when none was).
      in_axes: keyword-only; the vmap axes of ``args`` (``0`` per run, ``None`` shared by every run).
      guard: keyword-only; the divergence policy (:class:`Guard`).
      evaluate: keyword-only; ``evaluate(state, *args) -> metrics`` run after the chunk's steps
        (its float outputs are NaN for runs that have diverged).
      prepare: keyword-only; ``prepare(state, *args) -> args`` computed once per chunk before its steps
        (e.g. a task's shuffled example order), whose result the steps and the evaluation receive.
      static: keyword-only; how many trailing ``args`` are static (hashable Python values, compiled in).
      telemetry: keyword-only; ``telemetry(start, end) -> metrics`` from the states at the chunk's start
        and end, computed once per chunk (e.g. the parameter norm and the chunk's displacement, cheaper than
        norms at every step); NaN for runs that have diverged.
      reduce: keyword-only; ``reduce(metrics) -> metrics`` applied to the chunk's per-step metrics inside
        the compiled program (e.g. a mean per bin, so per-step arrays never reach the host).
      compiler_options: keyword-only; passed to ``jax.jit``.

    Attributes:
      n_traces: how many times the chunk was traced; it grows only when shapes change (a new number of
        runs), never from one chunk to the next.

    Example:
      >>> import flax.struct, jax.numpy as jnp
      >>> class S(flax.struct.PyTreeNode):
      ...     x: jax.Array
      ...     step: jax.Array
      ...     diverged_step: jax.Array
      >>> def step(s, rate):
      ...     return s.replace(x=s.x * rate), {"loss": s.x}
      >>> engine = Engine(step, length=3, in_axes=(0,))
      >>> s = S(jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.full(2, -1, jnp.int32))
      >>> s, m = engine.run(s, jnp.array([0.5, 2.0]))
      >>> s.x.tolist(), m["loss"].shape
      ([0.125, 8.0], (2, 3))
    """

    def __init__(
        self,
        step: Step,
        *,
        length: int | None,
        in_axes: Sequence[Any] = (),
        guard: Guard | None = None,
        evaluate: Callable | None = None,
        prepare: Callable | None = None,
        static: int = 0,
        reduce: Callable | None = None,
        telemetry: Callable | None = None,
        compiler_options: dict | None = None,
    ) -> None:
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 1):
            raise ConfigError(f"chunk length must be a positive int or None, got {length!r}")
        self.step = step
        self.length = length
        self.guard = guard or Guard()
        self.evaluate = evaluate
        self.reduce = reduce
        self.telemetry = telemetry
        self.prepare = prepare
        self.static = static
        self.in_axes = tuple(in_axes)
        self.n_traces = 0
        self._guarded = self.guard.wrap(step)
        # The compiled signature is (state, *dynamic args, [count], *static args); the step's is
        # (state, *dynamic args, *static args), and chunk() takes the count last.
        k, c = len(self.in_axes) - static, int(length is None)

        def split(args):
            return args[:k], args[k : k + c], args[k + c :]

        def chunk(state, *args):
            dyn, count, stat = split(args)
            return self.chunk(state, *dyn, *stat, *count)

        def vmapped(state, *args):
            dyn, count, stat = split(args)
            one = lambda st, *d: self.chunk(st, *d, *stat, *count)
            return jax.vmap(one, in_axes=(0, *self.in_axes[:k]))(state, *dyn)

        statics = tuple(range(1 + k + c, 1 + k + c + static))
        opts = dict(donate_argnums=0, compiler_options=compiler_options, static_argnums=statics)
        self._vmapped = vmapped
        self._single = jax.jit(chunk, **opts)
        self._runs = jax.jit(vmapped, **opts)

    def chunk(self, state, *args):
        """One chunk of one run (pure, unjitted): the steps, then the evaluation if any.

        ``args`` are the step's arguments, followed by the step count when ``length`` is ``None``.
        """
        self.n_traces += 1
        start, count = state, None
        if self.length is None:
            *args, count = args
        if self.prepare is not None:
            args = self.prepare(state, *args)
        if count is None:
            state, metrics = jax.lax.scan(lambda s, _: self._guarded(s, *args), state, length=self.length)
        else:
            state, metrics = self._loop(state, args, count)
        if self.reduce is not None:
            metrics = self.reduce(metrics)
        if self.telemetry is not None:
            metrics = {**metrics, **nan_unless(state.diverged_step < 0, self.telemetry(start, state))}
        if self.evaluate is not None:
            ev = self.evaluate(state, *args)
            metrics = {**metrics, **nan_unless(state.diverged_step < 0, ev)}
        return state, metrics

    def _loop(self, state, args, count):
        # Mean metrics over a traced number of steps: sums and a count of healthy steps in the carry.
        shapes = jax.eval_shape(lambda s: self._guarded(s, *args)[1], state)
        zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), shapes)

        def body(_, carry):
            s, sums, n = carry
            s, m = self._guarded(s, *args)
            ok = jnp.isfinite(m[self.guard.loss])
            sums = jax.tree.map(lambda acc, v: acc + jnp.where(ok, v, 0.0).astype(jnp.float32), sums, m)
            return s, sums, n + ok.astype(jnp.float32)

        state, sums, n = jax.lax.fori_loop(0, count, body, (state, zeros, jnp.zeros((), jnp.float32)))
        means = jax.tree.map(lambda v: v / jnp.maximum(n, 1.0), sums)
        return state, nan_unless(n > 0, means)

    def run(self, state, *args, count: int | None = None, vmapped: bool = True):
        """One compiled chunk; ``state`` (leading run axis when ``vmapped``) is donated: use the returned one.

        ``count`` is the number of steps when the engine was built with ``length=None``.
        """
        return (self._runs if vmapped else self._single)(*self._arguments(state, args, count))

    def lower(self, state, *args, count: int | None = None, vmapped: bool = True):
        """The chunk program lowered for these (abstract) arguments, e.g. for XLA's memory analysis."""
        return (self._runs if vmapped else self._single).lower(*self._arguments(state, args, count))

    def _arguments(self, state, args, count):
        if (count is None) != (self.length is not None):
            raise ConfigError("pass count= exactly when the engine was built with length=None")
        extra = () if count is None else (jnp.asarray(count, jnp.int32),)
        k = len(args) - self.static
        return (state, *args[:k], *extra, *args[k:])


def run_chunks(
    engine: Engine,
    state,
    *args,
    n_chunks: int,
    steps_per_chunk: int = 1,
    checkpoints=None,
    mesh=None,
    progress: bool | None = None,
    desc: str = "",
    on_chunk: Callable | None = None,
    log: Callable | None = None,
):
    """The host loop every family shares: ``n_chunks`` calls of ``engine``, progress, checkpoints, resume.

    Each chunk's metrics are copied to the host into a record of fixed shape (``[n_chunks, ...]`` per
    metric), so that after every chunk ``checkpoints`` (a :class:`nestlearn.engine.Checkpoints`) can save
    the state and the record as checkpoint ``chunks done``. When ``checkpoints`` already holds one, the run
    resumes after the newest: the state and the record are restored (into ``state``'s shapes, on ``mesh``)
    and the remaining chunks run, so the results equal an uninterrupted run's.

    Every chunk boundary is also a preemption point: once a notice has arrived
    (:mod:`nestlearn.engine._preempt`: SIGTERM under the run path's handler, or JAX's multi-host sync
    point), the chunk's checkpoint is saved and :class:`~nestlearn.Preempted` is raised. With a mesh
    over several processes' devices the metrics are gathered to every host, and progress is shown by
    process 0 only.

    Args:
      engine: the compiled chunk (built with a static ``length``).
      state: the state of every run before the first chunk (leading run axis).
      args: the chunk's other arguments.
      n_chunks: keyword-only; chunks to run in all.
      steps_per_chunk: keyword-only; steps per chunk (for progress).
      checkpoints: keyword-only; where to save and resume from (``None``: neither).
      mesh: keyword-only; the mesh the state is sharded over (restored onto it).
      progress: keyword-only; a progress line per chunk (``None`` follows ``NESTLEARN_PROGRESS``).
      desc: keyword-only; the progress line's label.
      on_chunk: keyword-only; ``on_chunk(c, state, metrics)`` on the host after chunk ``c``.
      log: keyword-only; ``log(info)`` after every chunk with ``{"chunk", "step", "diverged"}`` and the
        per-run chunk mean of each of the metrics ``"loss"`` and ``"acc"`` the chunk reports.

    Returns:
      ``(state, chunks)``: the final state and each chunk's metrics (numpy, ``[runs, length, ...]``).
    """
    import numpy as np

    from nestlearn._errors import Preempted
    from nestlearn.engine import _preempt
    from nestlearn.engine._distributed import to_host
    from nestlearn.engine._progress import Progress

    full = engine._arguments(state, args, None)
    cut = len(full) - engine.static
    traces = engine.n_traces  # an abstract evaluation is not a compilation: leave the count alone
    shapes = jax.eval_shape(lambda s, *d: engine._vmapped(s, *d, *full[cut:]), *full[:cut])[1]
    engine.n_traces = traces
    leaves, treedef = jax.tree.flatten(shapes)
    record = {
        f"m{i}": np.full(
            (n_chunks, *a.shape), np.nan if jnp.issubdtype(a.dtype, jnp.floating) else 0, a.dtype
        )
        for i, a in enumerate(leaves)
    }
    first = 0
    latest = checkpoints.latest() if checkpoints is not None else None
    if latest is not None:
        sharded = mesh is not None
        abstract = jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding if sharded else None), state
        )
        state, record = checkpoints.restore(latest, abstract, record)
        first = latest
    chunk = lambda c: treedef.unflatten([record[f"m{i}"][c] for i in range(len(leaves))])
    bar = Progress(n_chunks * steps_per_chunk, desc, enabled=progress)
    for c in range(first, n_chunks):
        state, metrics = engine.run(state, *args)
        for i, leaf in enumerate(jax.tree.leaves(metrics)):
            record[f"m{i}"][c] = to_host(leaf)
        if checkpoints is not None:
            checkpoints.save(c + 1, state, record)
        if c + 1 < n_chunks and _preempt.requested():
            if checkpoints is not None:
                checkpoints.wait()
            raise Preempted(
                f"preempted ({_preempt.notice() or 'SIGTERM to another process'}) after chunk {c + 1}/"
                f"{n_chunks}"
                + (
                    f"; checkpoint {c + 1} saved in {checkpoints.directory}"
                    if checkpoints is not None
                    else "; no checkpoints were configured, so the run cannot resume"
                ),
                step=c + 1 if checkpoints is not None else None,
            )
        metrics = chunk(c)
        if engine.guard.loss in metrics:
            loss = np.asarray(metrics[engine.guard.loss], np.float64)
            shown = float(np.nanmean(loss)) if np.isfinite(loss).any() else np.nan
            bar.update((c + 1) * steps_per_chunk, loss=shown)
        else:  # a chunk that reduced its losses away (online regression's bins) reports progress alone
            bar.update((c + 1) * steps_per_chunk)
        if on_chunk is not None:
            on_chunk(c, state, chunk(c))
        if log is not None:
            info = {"chunk": c, "step": (c + 1) * steps_per_chunk}
            info.update({k: np.asarray(metrics[k]).mean(1) for k in ("loss", "acc") if k in metrics})
            log({**info, "diverged": to_host(state.diverged_step) >= 0})
    if checkpoints is not None:
        checkpoints.wait()
    return state, [chunk(c) for c in range(n_chunks)]
