"""The compiled engine against an obvious per-step Python loop, and its batching, sharding and guards."""

import math

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream
from flax import nnx

from nestlearn import ConfigError, continual, engine, nn
from nestlearn.continual import Batch, Learner, TrainConfig


def mlp(stream, hidden=(8,)):
    return lambda rngs: nn.MLP(stream.input_dim, hidden, stream.n_classes, rngs=rngs)


def reference_run(stream, optimizer, config, seed, hidden=(8,)):
    """Naive fine-tuning written the obvious way: a Python loop over tasks and steps, numpy batching.

    It shares with the engine only the documented conventions: parameters from ``MLP(rngs=Rngs(k_model))``
    where ``k_model, k_run = split(PRNGKey(seed))``; task ``t`` shuffles epoch ``e`` by sorting
    ``uniform(fold_in(fold_in(k_run, t), 0), (n_epochs, max_train))[e]`` (padding last); example ``p`` of
    the task is ``order[p // n, p % n]``.
    """
    k_model, k_run = jax.random.split(jax.random.PRNGKey(seed))
    model = nn.MLP(stream.input_dim, hidden, stream.n_classes, rngs=nnx.Rngs(k_model))
    graphdef, params = nnx.split(model)
    opt_state = optimizer.init(params)
    x_pool, y_pool = np.asarray(stream.train_x), np.asarray(stream.train_y)

    def loss(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    def accuracy(params, t):
        x, y, valid = stream.test_set(jnp.asarray(t, jnp.int32))
        pred = np.argmax(np.asarray(nnx.merge(graphdef, params)(x)), -1)
        return float(((pred == np.asarray(y)) & np.asarray(valid)).sum() / np.asarray(valid).sum())

    b, steps = config.batch_size, config.steps_per_task
    n_epochs = math.ceil(steps * b / int(np.min(stream.train_n)))
    rows = []
    for t in range(stream.n_tasks):
        n = int(stream.train_n[t])
        task_key = jax.random.fold_in(jax.random.fold_in(k_run, t), 0)
        u = np.array(jax.random.uniform(task_key, (n_epochs, stream.max_train)))
        u[:, n:] = 2.0
        order = np.argsort(u, axis=1, kind="stable")
        perm = np.asarray(stream.feature_idx[t, :, 0])
        for s in range(steps):
            p = s * b + np.arange(b)
            rows_ = np.asarray(stream.train_idx[t])[order[p // n, p % n]]
            x, y = x_pool[rows_][:, perm], y_pool[rows_]
            grads = jax.grad(loss)(params, jnp.asarray(x), jnp.asarray(y))
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        rows.append([accuracy(params, j) for j in range(stream.n_tasks)])
    return params, np.array(rows)


def test_engine_equals_per_step_reference():
    stream = make_tiny_stream(n_tasks=3, n=40, train_n=[40, 33, 40])
    optimizer = optax.sgd(0.05, momentum=0.9)
    config = TrainConfig(steps_per_task=7, batch_size=16, eval_every=3)
    learner = Learner(mlp(stream), optimizer, continual.Naive(), config)
    state = learner.init(stream, [3])
    for t in range(stream.n_tasks):
        state, out = learner.run_task(state, stream, t)
    ref_params, ref_rows = reference_run(stream, optimizer, config, seed=3)
    got = jax.tree.map(lambda a: a[0], state.params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref_params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(out.acc_row[0]), ref_rows[-1], atol=1e-6)
    assert int(state.step[0]) == 21


def test_init_params_start_every_run_from_the_given_parameters():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=5, batch_size=8)
    learner = Learner(mlp(stream), optax.sgd(0.1), continual.Naive(), config)
    # The model's own initialisation for seed 3, handed back as a start: the run must equal seed 3's.
    own = nnx.split(mlp(stream)(nnx.Rngs(jax.random.split(jax.random.PRNGKey(3))[0])))[1]
    given = learner.run(stream, seeds=[3], init_params=own)
    plain = learner.run(stream, seeds=[3])
    np.testing.assert_allclose(given.train_loss, plain.train_loss, rtol=1e-6)
    # One start shared by every seed: seeds then differ only in their batches.
    state = learner.init(stream, [0, 1], init_params=own)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(own)):
        np.testing.assert_array_equal(a, np.stack([b, b]))
    # One start per run, stacked.
    other = jax.tree.map(lambda a: a + 1.0, own)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), own, other)
    state = learner.init(stream, [0, 1], init_params=stacked)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(other)):
        np.testing.assert_array_equal(a[1], b)
    bad = jax.tree.map(lambda a: a[..., :1], own)
    with pytest.raises(ConfigError, match=r"init_params.*has shape"):
        learner.init(stream, [0, 1], init_params=bad)
    with pytest.raises(ConfigError, match="structure"):
        learner.init(stream, [0], init_params={"w": jnp.zeros(3)})


def test_run_records_matrix_curves_and_steps():
    stream = make_tiny_stream(n_tasks=3)
    config = TrainConfig(steps_per_task=10, batch_size=8, eval_every=4)  # in-task points at 4, 8; end at 10
    learner = Learner(mlp(stream), optax.sgd(0.1), continual.Naive(), config)
    result = learner.run(stream, seeds=[0, 1])
    np.testing.assert_array_equal(result.curve_steps, [0, 4, 8, 10, 14, 18, 20, 24, 28, 30])
    np.testing.assert_array_equal(result.curve_task, [-1, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    # The end-of-task points of the curve are the rows of the accuracy matrix; point 0 is b.
    np.testing.assert_array_equal(result.curve_acc[:, [3, 6, 9]], result.acc_matrix)
    np.testing.assert_array_equal(result.curve_acc[:, 0], result.acc_init)
    _, ref_rows = reference_run(stream, optax.sgd(0.1), config, seed=1)
    np.testing.assert_allclose(result.acc_matrix[1], ref_rows, atol=1e-6)
    assert np.isnan(result.train_loss[:, 0]).all() and np.isfinite(result.train_loss[:, 1:]).all()
    assert (result.diverged_step == -1).all()
    assert learner.engine.n_traces == 1  # one compiled chunk program served every chunk of all three tasks


@flax.struct.dataclass
class CountRows(continual.Strategy):
    """Test strategy: counts how often each pool row is trained on (feature 0 encodes the row id)."""

    n: int = flax.struct.field(pytree_node=False)

    def init(self, params, stream):
        return jnp.zeros((stream.n_tasks, self.n), jnp.int32)

    def after_step(self, state, params, grads, batch: Batch, ctx):
        rows = jnp.round(batch.x[:, 0] * self.n).astype(jnp.int32)
        return state.at[batch.task, rows].add(1), params


def test_epochs_visit_every_valid_example_equally_and_never_padding():
    n, b = 40, 8
    stream = make_tiny_stream(n_tasks=2, n=n, train_n=[40, 24], permute=False)
    steps = continual.steps_for_epochs(2, 24, b)  # 2 epochs of task 1 (6 steps): 48 examples
    assert steps == 6
    learner = Learner(
        mlp(stream), optax.sgd(0.0), CountRows(n), TrainConfig(steps_per_task=steps, batch_size=b)
    )
    state = learner.init(stream, [0])
    for t in range(2):
        state, _ = learner.run_task(state, stream, t)
    counts = np.asarray(state.strategy_state[0])
    # Task 0: 48 examples over 40 rows = one full epoch + 8 rows of the second.
    assert counts[0].sum() == 48 and set(np.unique(counts[0])) <= {1, 2} and (counts[0] == 2).sum() == 8
    # Task 1: exactly two passes over its 24 valid rows, padding rows 24..39 never drawn.
    np.testing.assert_array_equal(counts[1], [2] * 24 + [0] * 16)


def test_joint_draws_uniformly_from_tasks_so_far():
    stream = make_tiny_stream(n_tasks=4, n=40, train_n=[40, 10, 40, 40])
    b = 4000
    batch = Batch(x=jnp.zeros((b, 6)), y=jnp.zeros((b,), jnp.int32), task=jnp.full((b,), 1, jnp.int32))
    ctx = continual.Context(
        stream=stream,
        task=jnp.asarray(1, jnp.int32),
        step=jnp.asarray(0),
        key=jax.random.PRNGKey(0),
        apply=None,
    )
    out = continual.Joint().train_batch((), batch, ctx)
    tasks = np.asarray(out.task)
    assert set(np.unique(tasks)) == {0, 1}
    assert abs((tasks == 1).mean() - 0.5) < 0.03
    rows = np.round(np.asarray(out.x[:, 0]) * 40).astype(int)  # task 0 is unpermuted
    rows1 = np.round(np.asarray(stream.train_x)[:, 0] * 40).astype(int)
    assert rows[tasks == 0].max() == 39 and rows[tasks == 0].min() == 0
    # Task 1 only has rows 0..9; its examples are those rows under task 1's permutation.
    x1, _ = stream.train_examples(jnp.full((10,), 1), jnp.arange(10))
    seen = {tuple(np.round(r, 5)) for r in np.asarray(out.x[tasks == 1])}
    assert seen == {tuple(np.round(r, 5)) for r in np.asarray(x1)}
    del rows1


def test_vmapped_seeds_equal_separate_runs():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=6, batch_size=8, eval_every=2)
    learner = Learner(mlp(stream), optax.adam(1e-2), continual.Naive(), config)
    # optax's Adam raises a float to its int32 step count, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        together = learner.run(stream, seeds=[5, 6, 7])
        alone = learner.run(stream, seeds=[6])
    np.testing.assert_allclose(together.curve_acc[1], alone.curve_acc[0], atol=1e-6)
    np.testing.assert_allclose(together.train_loss[1], alone.train_loss[0], rtol=1e-5)
    assert not np.allclose(together.train_loss[0, 1:], together.train_loss[1, 1:])  # seeds do differ


def test_sharded_over_fake_devices_equals_single_device():
    assert jax.device_count() == 4
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=6, batch_size=8, eval_every=3)
    learner = Learner(mlp(stream), optax.sgd(0.1, 0.9), continual.Naive(), config)
    mesh = engine.run_mesh(8)
    assert mesh.devices.size == 4
    state = learner.init(stream, list(range(8)), mesh)
    leaves = jax.tree.leaves(state)  # every leaf, zero-initialised momenta and counters too, split by seed
    assert all(
        len(leaf.sharding.device_set) == 4 and not leaf.sharding.is_fully_replicated for leaf in leaves
    )
    sharded = learner.run(stream, seeds=list(range(8)), mesh=mesh)
    single = learner.run(stream, seeds=list(range(8)))
    np.testing.assert_allclose(sharded.curve_acc, single.curve_acc, atol=1e-6)
    np.testing.assert_allclose(sharded.train_loss, single.train_loss, rtol=1e-5)
    with pytest.warns(
        UserWarning, match="6 runs do not divide over 4 devices \\(they shard evenly over 3\\)"
    ):
        assert engine.run_mesh(6).devices.size == 3  # the largest device count dividing the seeds


def nan_at(update_index):
    """An optax transform that poisons the update of one step (a hand-made divergence)."""

    def init(params):
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates, state, params=None):
        scale = jnp.where(state.count == update_index, jnp.nan, 1.0)
        return jax.tree.map(lambda u: u * scale, updates), optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init, update)


def test_divergence_is_recorded_with_its_step():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=5, batch_size=8)
    # Update 6 (0-based) is NaN, so the loss of global step 7 is the first non-finite one. The run's
    # accuracies from there on are NaN (task 1 runs steps 5-9: its row has no score); task 0's keeps its.
    learner = Learner(mlp(stream), optax.chain(optax.sgd(0.1), nan_at(6)), continual.Naive(), config)
    result = learner.run(stream, seeds=[0, 1])
    np.testing.assert_array_equal(result.diverged_step, [7, 7])
    assert result.diverged.all()
    assert np.isfinite(result.acc_matrix[:, 0]).all() and np.isnan(result.acc_matrix[:, 1]).all()
    healthy = Learner(mlp(stream), optax.chain(optax.sgd(0.1), nan_at(99)), continual.Naive(), config)
    assert (healthy.run(stream, seeds=[0]).diverged_step == -1).all()


def test_reset_optimizer_restarts_momentum_each_task():
    stream = make_tiny_stream(n_tasks=2)
    opt = optax.sgd(0.1, momentum=0.9)
    reset = Learner(mlp(stream), opt, continual.Naive(), TrainConfig(5, 8, reset_optimizer=True))
    keep = Learner(mlp(stream), opt, continual.Naive(), TrainConfig(5, 8))
    s_reset = reset.init(stream, [0])
    s_keep = keep.init(stream, [0])
    s_reset, _ = reset.run_task(s_reset, stream, 0)
    s_keep, _ = keep.run_task(s_keep, stream, 0)
    # Clearing the momentum by hand before task 1 must equal the engine's reset.
    s_keep = s_keep.replace(opt_state=jax.tree.map(jnp.zeros_like, s_keep.opt_state))
    s_reset, _ = reset.run_task(s_reset, stream, 1)
    s_keep, _ = keep.run_task(s_keep, stream, 1)
    for a, b in zip(jax.tree.leaves(s_reset.params), jax.tree.leaves(s_keep.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_context_loss_is_cross_entropy_over_the_task_units():
    stream = make_tiny_stream(n_tasks=2, n_classes=4)
    stream = stream.replace(class_mask=jnp.array([[True] * 4, [False, True, True, False]]))
    logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
    ctx = continual.Context(
        stream=stream,
        task=jnp.asarray(1),
        step=jnp.asarray(0),
        key=jax.random.PRNGKey(0),
        apply=lambda p, x: logits,
    )
    batch = Batch(x=jnp.zeros((1, 6)), y=jnp.array([2]), task=jnp.array([1]))
    expected = -0.5 + np.log(np.exp(-1.0) + np.exp(0.5))  # -log softmax([-1, 0.5])[1]: units 0 and 3 masked
    np.testing.assert_allclose(ctx.losses(None, batch), [expected], rtol=1e-6)
    unmasked = -0.5 + np.log(np.exp([2.0, -1.0, 0.5, 3.0]).sum())
    np.testing.assert_allclose(ctx.losses(None, batch.replace(task=jnp.array([0]))), [unmasked], rtol=1e-6)


@pytest.mark.parametrize(
    "field, kwargs",
    [
        ("steps_per_task", dict(steps_per_task=0, batch_size=8)),
        ("batch_size", dict(steps_per_task=5, batch_size=-1)),
        ("eval_every", dict(steps_per_task=5, batch_size=8, eval_every=0)),
    ],
)
def test_train_config_rejects_non_positive_values(field, kwargs):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**kwargs)


def test_steps_for_epochs():
    assert continual.steps_for_epochs(2, 4000, 64) == 125  # 8000 examples: exactly two passes
    assert continual.steps_for_epochs(1, 100, 64) == 2
    assert continual.steps_for_epochs(0.5, 4000, 64) == 32


@flax.struct.dataclass
class ShrinkToZero(continual.Strategy):
    """Test strategy with one hyperparameter: an L2 penalty ``lam * sum(w**2)``."""

    lam: float = 0.0

    def penalty(self, state, params, batch, ctx):
        return self.lam * sum(jnp.sum(w**2) for w in jax.tree.leaves(params))


def test_sweep_over_strategy_and_optimizer_hyperparameters_equals_separate_runs():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=6, batch_size=8, eval_every=3)
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1, momentum=0.9)
    learner = Learner(mlp(stream), sgd, ShrinkToZero(), config)
    swept = learner.run(
        stream, seeds=[0, 1], sweep={"lam": [0.0, 0.5], "optimizer.learning_rate": [0.05, 0.2]}
    )
    assert len(swept.runs) == 8
    assert swept.runs[:3] == (
        {"lam": 0.0, "optimizer.learning_rate": 0.05, "seed": 0},
        {"lam": 0.0, "optimizer.learning_rate": 0.05, "seed": 1},
        {"lam": 0.0, "optimizer.learning_rate": 0.2, "seed": 0},
    )
    for lam in (0.0, 0.5):
        for lr in (0.05, 0.2):
            alone = Learner(mlp(stream), optax.sgd(lr, momentum=0.9), ShrinkToZero(lam=lam), config)
            expected = alone.run(stream, seeds=[0, 1])
            got = swept.select(lam=lam, **{"optimizer.learning_rate": lr})
            np.testing.assert_allclose(got.train_loss, expected.train_loss, rtol=2e-5)
            np.testing.assert_allclose(got.curve_acc, expected.curve_acc, atol=1e-6)
    # The penalty does act: the strongest shrinkage ends with the largest training loss.
    by_lam = swept.groups("lam")
    assert by_lam[(0.5,)].train_loss[:, -1].mean() > by_lam[(0.0,)].train_loss[:, -1].mean()
    assert learner.engine.n_traces == 1


def test_sweep_errors_name_the_hyperparameter():
    stream = make_tiny_stream(n_tasks=2)
    learner = Learner(mlp(stream), optax.sgd(0.1), ShrinkToZero(), TrainConfig(4, 8))
    with pytest.raises(ConfigError, match="unknown hyperparameter 'lamda'.*fields: lam"):
        learner.run(stream, seeds=[0], sweep={"lamda": [1.0]})
    with pytest.raises(
        ConfigError, match="optimizer has no hyperparameter 'learning_rate'.*inject_hyperparams"
    ):
        learner.run(stream, seeds=[0], sweep={"optimizer.learning_rate": [0.1]})
    with pytest.raises(ConfigError, match="sweep 'lam' has no values"):
        learner.run(stream, seeds=[0], sweep={"lam": []})


def test_a_strategy_must_be_a_pytree_dataclass():
    class Plain(continual.Strategy):
        pass

    with pytest.raises(TypeError, match="Plain must be a flax.struct.dataclass"):
        Learner(mlp(make_tiny_stream()), optax.sgd(0.1), Plain(), TrainConfig(4, 8))


def test_batch_weights_make_a_weighted_mean():
    b = Batch(
        x=jnp.zeros((3, 1)),
        y=jnp.zeros(3, jnp.int32),
        task=jnp.zeros(3, jnp.int32),
        weight=jnp.array([1.0, 0.0, 3.0]),
    )
    np.testing.assert_allclose(b.mean(jnp.array([2.0, 100.0, 6.0])), (2.0 + 18.0) / 4.0)
    assert b.replace(weight=None).mean(jnp.array([2.0, 100.0, 6.0])) == pytest.approx(36.0)


def test_zero_weight_rows_count_for_nothing_even_when_not_finite():
    b = Batch(
        x=jnp.zeros((3, 1)),
        y=jnp.zeros(3, jnp.int32),
        task=jnp.zeros(3, jnp.int32),
        weight=jnp.array([1.0, 0.0, 1.0]),
    )
    assert b.mean(jnp.array([2.0, jnp.inf, 4.0])) == pytest.approx(3.0)
    assert b.mean(jnp.array([2.0, jnp.nan, 4.0])) == pytest.approx(3.0)
