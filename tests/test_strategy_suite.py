"""The shared strategy suite (optax alias_test style), run on every strategy nestlearn.continual exports.

Strategies are discovered, not listed: every subclass of :class:`Strategy` (walked recursively) that
``nestlearn.continual`` exports goes through every test below. ``REQUIRED`` holds constructor arguments
only for classes that have required ones; a new strategy that has some and is not registered fails
``test_every_strategy_is_built`` (and every other test of it), so it cannot skip the suite.

Each strategy runs a small MLP (6 -> 8 -> 3) on conftest's tiny 3-task stream (``make_tiny_stream``,
imported rather than taken from the function-scoped ``tiny_stream`` fixture so that module-level caches
can hold it), 12 SGD steps per task with a training-loss point every 4 steps. Learners and results are
cached per strategy for the whole module, so each strategy's programs are compiled once; the sweep check's
separately built Learner compiles the same programs again, which nestlearn's persistent compilation
cache serves when it is on. Cold cache: about 75 s on 2 CPU cores; warm: about 35 s.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect

import jax
import jax.monitoring
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream

from nestlearn import continual, engine, nn
from nestlearn.continual import Learner, Recorder, Strategy, TrainConfig

# -- discovery ----------------------------------------------------------------------------------------


def _subclasses(cls: type) -> list[type]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


EXPORTED = {getattr(continual, name) for name in continual.__all__}
# Test files define strategies of their own (test_engine's CountRows); only the exported ones belong here.
STRATEGIES = sorted(
    {c for c in _subclasses(Strategy) if c in EXPORTED and not inspect.isabstract(c)},
    key=lambda c: c.__name__,
)

# Constructor arguments, only for strategies that cannot be built with defaults.
REQUIRED: dict[type, dict] = {
    continual.AGEM: {"memory_size": 12},
    continual.DERPP: {"buffer_size": 16},
    continual.EWC: {"lam": 10.0},
    continual.L2Init: {"lam": 0.1},
    continual.LwF: {"alpha": 1.0},
    continual.MAS: {"lam": 1.0},
    continual.Replay: {"buffer_size": 16},
    continual.SI: {"c": 1.0},
    continual.ShrinkAndPerturb: {"shrink": 0.8, "noise": 0.01},
    continual.WeightInterpolation: {"alpha": 0.5},
}


def build(cls: type) -> Strategy:
    return cls(**REQUIRED.get(cls, {}))


def swept_field(cls: type) -> str | None:
    """The field a sweep varies: the class's ``strength``, else its first float pytree leaf, else None."""
    if isinstance(getattr(cls, "strength", None), str):
        return cls.strength
    try:
        strategy = build(cls)
    except TypeError:  # not buildable: test_every_strategy_is_built fails for it
        return None
    for f in dataclasses.fields(strategy):
        if f.metadata.get("pytree_node", True) and isinstance(getattr(strategy, f.name), float):
            return f.name
    return None


SWEPT = [c for c in STRATEGIES if swept_field(c) is not None]
ids = lambda c: c.__name__

# Strategies whose swept field cannot act in this suite's short runs (measured, not assumed).
NO_EFFECT_HERE = {
    continual.ContinualBackprop: (
        "replacement_rate acts only on units older than maturity=100 steps (the default); the suite "
        "trains 3 x 12 = 36 steps, so 1e-4 and 5e-5 give bit-identical runs (max |diff| 0.0)"
    ),
}
SWEPT_EFFECT = [
    pytest.param(c, id=c.__name__, marks=pytest.mark.xfail(strict=True, reason=NO_EFFECT_HERE[c]))
    if c in NO_EFFECT_HERE
    else pytest.param(c, id=c.__name__)
    for c in SWEPT
]

# -- the shared runs ------------------------------------------------------------------------------------

SEEDS = [0, 1]
CONFIG = TrainConfig(steps_per_task=12, batch_size=8, eval_every=4)  # loss points after steps 4, 8, 12
PER_TASK = len(CONFIG.eval_steps)


@functools.cache
def stream():
    return make_tiny_stream(n_tasks=3)


def make_learner(strategy: Strategy) -> Learner:
    s = stream()
    return Learner(
        lambda rngs: nn.MLP(s.input_dim, (8,), s.n_classes, rngs=rngs), optax.sgd(0.2), strategy, CONFIG
    )


@functools.cache
def learner(cls: type) -> Learner:
    return make_learner(build(cls))


def _run(lrn: Learner, **kwargs):
    """``lrn.run`` and its final RunState (the last task's state is never donated, so it can be kept)."""
    final = {}

    def keep(task, state, result):
        if task == stream().n_tasks - 1:
            final["state"] = state

    result = lrn.run(stream(), on_task_end=keep, **kwargs)
    return result, final["state"]


@functools.cache
def base_run(cls: type):
    """Two seeds at the strategy's own hyperparameters."""
    return _run(learner(cls), seeds=SEEDS)


def sweep_values(cls: type) -> tuple[float, float]:
    """The strategy's own value of its swept field and half of it (0.5 if it is 0)."""
    v0 = float(getattr(build(cls), swept_field(cls)))
    return v0, (0.5 * v0 if v0 else 0.5)


@functools.cache
def sweep_run(cls: type):
    """Seed 0 at both sweep values, in one program: the same number of runs (2) as base_run."""
    return _run(learner(cls), seeds=[0], sweep={swept_field(cls): list(sweep_values(cls))})


def is_key(x) -> bool:
    return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def host(tree):
    """Host copies of a state's leaves, PRNG keys as their raw data, to compare bit for bit."""
    return jax.tree.map(lambda x: np.array(jax.random.key_data(x) if is_key(x) else x), tree)


class CompileCounter:
    """Counts lowerings and XLA compilations of jitted programs, through jax.monitoring.

    JAX records ``/jax/core/compile/jaxpr_to_mlir_module_duration`` each time it lowers a traced program
    for compilation and ``/jax/core/compile/backend_compile_duration`` each time XLA compiles one; a jit
    cache hit records neither. Lowering is counted because nestlearn's persistent compilation cache may
    spare XLA a recompilation but never the lowering that computes its key, and because traces alone
    would count ``jax.eval_shape`` checks, which compile nothing (``Learner.run`` checks the model
    against the stream that way on every call). It covers every program of a run (initialisation,
    evaluation, a task's start, chunks and end); ``learner.engine.n_traces`` counts the chunk program's
    traces. ``test_compile_counter_counts`` checks that the counter sees a fresh program.
    """

    LOWER = "/jax/core/compile/jaxpr_to_mlir_module_duration"
    COMPILE = "/jax/core/compile/backend_compile_duration"

    def __init__(self):
        self.counts = {self.LOWER: 0, self.COMPILE: 0}

    def __call__(self, event, duration, **kwargs):
        if event in self.counts:
            self.counts[event] += 1

    def __enter__(self):
        jax.monitoring.register_event_duration_secs_listener(self)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self)


# -- discovery tests ------------------------------------------------------------------------------------


def test_discovery_finds_the_strategies():
    names = {c.__name__ for c in STRATEGIES}
    assert {"Naive", "Joint", "EWC", "Replay", "FastSlow", "ContinualBackprop"} <= names
    assert set(REQUIRED) <= set(STRATEGIES), "REQUIRED names a class that is not an exported strategy"
    # Every strategy defined in nestlearn.continual is exported, hence in the suite.
    defined = {c for c in _subclasses(Strategy) if c.__module__.startswith("nestlearn.continual")}
    assert defined <= EXPORTED, f"not exported: {sorted(c.__name__ for c in defined - EXPORTED)}"


@pytest.mark.parametrize("cls", STRATEGIES, ids=ids)
def test_every_strategy_is_built(cls):
    if cls in REQUIRED:
        # The registry holds only classes that need it.
        with pytest.raises(TypeError):
            cls()
    strategy = build(cls)  # a TypeError here: register the class's required arguments in REQUIRED
    assert type(strategy) is cls
    # Its pytree leaves are numbers (hyperparameters); the engine stacks them per run as float32.
    leaves = jax.tree.leaves(strategy)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in leaves), leaves


# -- the suite ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls", STRATEGIES, ids=ids)
def test_runs_under_jit_with_vmapped_seeds(cls):
    result, state = base_run(cls)
    t = stream().n_tasks
    assert result.acc_matrix.shape == (2, t, t) and result.acc_matrix.dtype == np.float32
    assert np.isfinite(result.acc_matrix).all()
    assert ((result.acc_matrix >= 0) & (result.acc_matrix <= 1)).all()
    assert result.train_loss.shape == (2, 1 + t * PER_TASK)
    # Different seeds, different runs (initialisation, batch order, the strategy's own keys); column 0,
    # before training, is NaN and would make array_equal false on its own.
    assert not np.array_equal(result.train_loss[0, 1:], result.train_loss[1, 1:])
    # Shapes and dtypes kept: the final state is exactly what abstract_state promises.
    want = learner(cls).abstract_state(stream(), SEEDS)
    assert jax.tree.structure(state) == jax.tree.structure(want)
    got = [(x.shape, x.dtype) for x in jax.tree.leaves(state)]
    assert got == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]
    # The state kept one value of every hyperparameter per run, as float32.
    for leaf, value in zip(jax.tree.leaves(state.strategy), jax.tree.leaves(build(cls)), strict=True):
        np.testing.assert_array_equal(leaf, np.full((2,), value, np.float32))


@pytest.mark.parametrize("cls", STRATEGIES, ids=ids)
def test_loss_is_finite_and_goes_down(cls):
    result, _ = base_run(cls)
    loss = result.train_loss
    assert np.isnan(loss[:, 0]).all()  # no training loss before training
    assert np.isfinite(loss[:, 1:]).all(), loss
    assert (result.diverged_step == -1).all()
    # Task 0: mean loss over steps 1-4 against steps 9-12, per seed.
    first, last = loss[:, 1], loss[:, PER_TASK]
    assert (first > last).all(), (first, last)


@pytest.mark.parametrize("cls", SWEPT, ids=ids)
def test_vmapped_sweep_equals_separate_runs(cls):
    field = swept_field(cls)
    assert field in {f.name for f in dataclasses.fields(cls) if f.metadata.get("pytree_node", True)}
    v0, v1 = sweep_values(cls)
    swept, state = sweep_run(cls)
    assert [r[field] for r in swept.runs] == [v0, v1]
    np.testing.assert_array_equal(getattr(state.strategy, field), np.asarray([v0, v1], np.float32))
    alone0, _ = base_run(cls)  # the strategy as built is at v0
    alone1 = make_learner(dataclasses.replace(build(cls), **{field: v1})).run(stream(), seeds=SEEDS)
    # Same program, same inputs per row: measured bit-identical on CPU; a tolerance leaves room for
    # backends whose batched kernels depend on the batch's contents.
    for row, alone in ((0, alone0), (1, alone1)):
        np.testing.assert_allclose(swept.train_loss[row], alone.train_loss[0], rtol=1e-6)
        np.testing.assert_allclose(swept.acc_matrix[row], alone.acc_matrix[0], rtol=1e-6)
        np.testing.assert_allclose(swept.curve_acc[row], alone.curve_acc[0], rtol=1e-6)


@pytest.mark.parametrize("cls", SWEPT_EFFECT)
def test_swept_values_change_the_run(cls):
    # Makes the test above non-vacuous: the two values give different runs.
    swept, _ = sweep_run(cls)
    assert not np.array_equal(swept.train_loss[0, 1:], swept.train_loss[1, 1:])


def test_compile_counter_counts():
    with CompileCounter() as counter:
        jax.jit(lambda x: x * 3.0)(np.float32(1.0))
    assert counter.counts[CompileCounter.LOWER] == 1, counter.counts


@pytest.mark.parametrize("cls", STRATEGIES, ids=ids)
def test_no_recompilation_on_a_second_call(cls):
    lrn = learner(cls)
    field = swept_field(cls)
    if field is None:
        base_run(cls)  # compiled for two runs
        second = {"seeds": [2, 3]}
    else:
        sweep_run(cls)  # compiled for two runs
        v0, _ = sweep_values(cls)
        scale = v0 or 1.0
        second = {"seeds": [0], "sweep": {field: [0.25 * scale, 0.75 * scale]}}
    n_traces = lrn.engine.n_traces
    with CompileCounter() as counter:
        result = lrn.run(stream(), **second)
    assert counter.counts == {CompileCounter.LOWER: 0, CompileCounter.COMPILE: 0}, counter.counts
    assert lrn.engine.n_traces == n_traces == 1  # one chunk program for every chunk of every call
    assert np.isfinite(result.acc_matrix).all()


@pytest.mark.parametrize("cls", STRATEGIES, ids=ids)
def test_checkpoint_round_trip_is_bit_identical(cls, tmp_path):
    # Resume as nestlearn.experiment does: nestlearn.engine.Checkpoints is Orbax's CheckpointManager
    # (synchronous saves) that stores the run's typed PRNG keys as their raw data.
    lrn, s = learner(cls), stream()
    expected, expected_state = base_run(cls)
    recorder = Recorder(CONFIG, s, expected.runs)
    state = lrn.init(s, SEEDS)
    recorder.record_init(lrn.evaluate(state, s))
    state, out = lrn.run_task(state, s, 0)
    recorder.record_task(0, out, state.diverged_step)
    saved = host(state)
    with engine.Checkpoints(tmp_path / "ckpt") as checkpoints:
        checkpoints.save(1, state, recorder.arrays)
        checkpoints.wait()
        del state, recorder
        recorder = Recorder(CONFIG, s, expected.runs)
        state, recorder.arrays = checkpoints.restore(1, lrn.abstract_state(s, SEEDS), recorder.arrays)
    jax.tree.map(np.testing.assert_array_equal, host(state), saved)
    # Orbax returns arrays committed to a device and learner.init's are not; jit keys its cache on that,
    # so engine.Checkpoints uploads unsharded leaves afresh. The restored state must run in the programs
    # already compiled (no lowering, no compilation), which also checks its dtypes and shapes.
    with CompileCounter() as counter:
        for task in range(1, s.n_tasks):
            state, out = lrn.run_task(state, s, task)
            recorder.record_task(task, out, state.diverged_step)
    assert counter.counts == {CompileCounter.LOWER: 0, CompileCounter.COMPILE: 0}, counter.counts
    resumed = recorder.result()
    for name in ("acc_matrix", "acc_init", "curve_acc", "train_loss", "train_acc", "diverged_step"):
        np.testing.assert_array_equal(getattr(resumed, name), getattr(expected, name), err_msg=name)
    for name, values in expected.norms.items():
        np.testing.assert_array_equal(resumed.norms[name], values, err_msg=name)
    # The whole final state (parameters, optimizer and strategy state, key, step) is bit-identical.
    jax.tree.map(np.testing.assert_array_equal, host(state), host(expected_state))
