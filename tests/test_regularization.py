"""Regularisation strategies against hand loops of per-example gradients and closed forms, then in the engine."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream
from flax import nnx

from nestlearn import continual, nn
from nestlearn.continual import Batch, Context, Learner, TrainConfig
from nestlearn.continual._regularization import EWC, MAS, SI, L2Init, LwF

# One compilation per (strategy, hook): bound methods of equal strategies are equal, so cached.
jit = functools.cache(jax.jit)


def tiny_model(seed=0):
    graphdef, params = nnx.split(nn.MLP(3, (4,), 3, rngs=nnx.Rngs(seed)))
    return (lambda p, x: nnx.merge(graphdef, p)(x)), params


def context(stream, apply, task):
    return Context(
        stream=stream,
        task=jnp.asarray(task, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        key=jax.random.PRNGKey(0),
        apply=apply,
    )


# Tests compute in numpy and call jitted functions: every eager JAX op would compile a program of its own.


def perturb(params, seed, scale=0.3):
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda p: jnp.asarray(p + scale * rng.normal(size=p.shape).astype(np.float32)), params
    )


@jax.jit
def _task_examples(stream, task):
    rows = jnp.arange(stream.max_train, dtype=jnp.int32)
    return stream.train_examples(jnp.full(rows.shape, task, jnp.int32), rows)


def examples(stream, task, positions):
    """Training examples ``positions`` of ``task``, as numpy arrays."""
    x, y = _task_examples(stream, jnp.asarray(task, jnp.int32))
    positions = list(positions)
    return np.asarray(x)[positions], np.asarray(y)[positions]


def hand_fisher(apply, params, stream, task, positions):
    """mean over examples of (d log p(y|x) / d theta)^2, one jax.grad per example."""

    @jax.jit  # one compilation for the loop (every example has the same shapes)
    def grad_log_p(p, x, y):
        return jax.grad(lambda p: -optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y)[0])(p)

    x, y = examples(stream, task, positions)
    grads = [grad_log_p(params, x[i : i + 1], y[i : i + 1]) for i in range(len(x))]
    return jax.tree.map(lambda *g: np.mean(np.square(np.asarray(g, np.float64)), 0), *grads)


def quad(weight, theta, anchor):
    """sum over leaves of weight * (theta - anchor)^2, in float64 numpy."""
    return sum(
        float(
            np.sum(np.asarray(w, np.float64) * (np.asarray(p, np.float64) - np.asarray(a, np.float64)) ** 2)
        )
        for w, p, a in zip(jax.tree.leaves(weight), jax.tree.leaves(theta), jax.tree.leaves(anchor))
    )


def assert_tree_close(a, b, rtol=1e-5, atol=1e-7):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


STREAM = make_tiny_stream(n_tasks=2, n=10, d=3, train_n=[10, 7])


# -- EWC ------------------------------------------------------------------------------------------------


def test_ewc_fisher_is_the_mean_of_squared_per_example_gradients_over_valid_rows():
    apply, params = tiny_model()
    ewc = EWC(lam=3.0, fisher_batch=4)  # 10 rows -> chunks of 4, 4, 2 (the last one half padding)
    state, _ = jit(ewc.end_task)(ewc.init(params, STREAM), params, context(STREAM, apply, 1))
    # Task 1 has 7 valid rows of 10; rows 7..9 are padding (they point at pool row 0) and must be unused.
    want = hand_fisher(apply, params, STREAM, 1, range(7))
    assert_tree_close(state.fisher, want)
    assert bool(state.filled)
    # Including a padding row would change it: the estimate over rows 0..7 differs.
    assert not np.allclose(
        jax.tree.leaves(hand_fisher(apply, params, STREAM, 1, range(8)))[0], jax.tree.leaves(want)[0]
    )
    # fisher_samples caps the examples: the first 5.
    capped = EWC(lam=3.0, fisher_samples=5, fisher_batch=2)
    state, _ = jit(capped.end_task)(capped.init(params, STREAM), params, context(STREAM, apply, 1))
    assert_tree_close(state.fisher, hand_fisher(apply, params, STREAM, 1, range(5)))


def _max_abs(tree):
    return max(float(np.abs(np.asarray(leaf)).max()) for leaf in jax.tree.leaves(tree))


def test_ewc_minibatch_fisher_squares_each_chunks_mean_gradient():
    apply, params = tiny_model()
    ewc = EWC(lam=1.0, fisher_batch=4, per_example=False)
    state, _ = jit(ewc.end_task)(ewc.init(params, STREAM), params, context(STREAM, apply, 1))

    def mean_log_p(p, rows):
        x, y = STREAM.train_examples(jnp.full(rows.shape, 1, jnp.int32), rows)
        return -optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    # 7 valid rows in chunks of 4: rows 0..3 and 4..6 (the third chunk is all padding, not counted).
    g1, g2 = (
        jax.jit(jax.grad(mean_log_p))(params, np.asarray(rows, np.int32))
        for rows in ([0, 1, 2, 3], [4, 5, 6])
    )
    want = jax.tree.map(lambda a, b: (a**2 + b**2) / 2, g1, g2)
    assert_tree_close(state.fisher, want)


def test_separate_ewc_penalty_sums_a_term_per_finished_task():
    apply, params_a = tiny_model()
    params_b = perturb(params_a, 1)
    theta = perturb(params_a, 2)
    ewc = EWC(lam=7.0, fisher_batch=3)
    state = ewc.init(params_a, STREAM)
    batch = None
    assert float(jit(ewc.penalty)(state, theta, batch, context(STREAM, apply, 0))) == 0.0
    state, _ = jit(ewc.end_task)(state, params_a, context(STREAM, apply, 0))
    f_a = hand_fisher(apply, params_a, STREAM, 0, range(10))
    one = float(jit(ewc.penalty)(state, theta, batch, context(STREAM, apply, 1)))
    np.testing.assert_allclose(one, 7.0 / 2 * quad(f_a, theta, params_a), rtol=1e-5)
    state, _ = jit(ewc.end_task)(state, params_b, context(STREAM, apply, 1))
    f_b = hand_fisher(apply, params_b, STREAM, 1, range(7))
    two = float(jit(ewc.penalty)(state, theta, batch, context(STREAM, apply, 1)))
    np.testing.assert_allclose(
        two, 7.0 / 2 * (quad(f_a, theta, params_a) + quad(f_b, theta, params_b)), rtol=1e-5
    )
    # The penalty's gradient is lam * F * (theta - theta*), summed over tasks; the anchors get none.
    g = jax.jit(jax.grad(lambda p: ewc.penalty(state, p, batch, context(STREAM, apply, 1))))(theta)
    want = jax.tree.map(
        lambda fa, fb, *tab: 7.0 * (fa * np.subtract(*tab[:2]) + fb * np.subtract(*tab[::2])),
        f_a,
        f_b,
        theta,
        params_a,
        params_b,
    )
    assert_tree_close(g, want, rtol=1e-4, atol=1e-6)


def test_online_ewc_decays_and_adds_fishers_and_keeps_the_last_anchor():
    apply, params_a = tiny_model()
    params_b = perturb(params_a, 1)
    theta = perturb(params_a, 2)
    ewc = EWC(lam=5.0, online=True, gamma=0.5, fisher_batch=4)
    state = ewc.init(params_a, STREAM)
    assert float(jit(ewc.penalty)(state, theta, None, context(STREAM, apply, 0))) == 0.0
    state, _ = jit(ewc.end_task)(state, params_a, context(STREAM, apply, 0))
    state, _ = jit(ewc.end_task)(state, params_b, context(STREAM, apply, 1))
    f_a = hand_fisher(apply, params_a, STREAM, 0, range(10))
    f_b = hand_fisher(apply, params_b, STREAM, 1, range(7))
    want = jax.tree.map(lambda a, b: 0.5 * a + b, f_a, f_b)  # F = gamma * F_0 + F_1
    assert_tree_close(state.fisher, want)
    assert_tree_close(state.anchor, params_b, rtol=0, atol=0)
    got = float(jit(ewc.penalty)(state, theta, None, context(STREAM, apply, 1)))
    np.testing.assert_allclose(got, 5.0 / 2 * quad(want, theta, params_b), rtol=1e-5)


# -- SI -------------------------------------------------------------------------------------------------


def test_si_path_integral_and_importance_on_a_quadratic():
    # L(w) = w^2 / 2 (gradient w), plain SGD with lr 0.5 from w = 1: w goes 1 -> 0.5 -> 0.25 -> 0.125.
    # omega = sum -g * dw = 1 * 0.5 + 0.5 * 0.25 + 0.25 * 0.125 = 0.65625.
    # Delta = 0.125 - 1 = -0.875, so Omega = 0.65625 / (0.765625 + 0.1) = 0.758123...
    si = SI(c=2.0, xi=0.1)
    params = {"w": jnp.ones((1,), jnp.float32)}
    state = si.init(params, STREAM)
    state = si.begin_task(state, params, None)
    for _ in range(3):
        grads = {"w": params["w"]}
        params = {"w": params["w"] - 0.5 * grads["w"]}
        state, params = jit(si.after_step)(state, params, grads, None, None)
    np.testing.assert_allclose(state.omega["w"], [0.65625], rtol=1e-6)
    np.testing.assert_allclose(state.prev["w"], [0.125])
    state, _ = jit(si.end_task)(state, params, None)
    np.testing.assert_allclose(state.importance["w"], [0.65625 / 0.865625], rtol=1e-6)
    np.testing.assert_allclose(state.omega["w"], [0.0])
    # Penalty c * Omega * (theta - theta*)^2 around the task's end point 0.125, at theta = 2.
    got = jit(si.penalty)(state, {"w": jnp.full((1,), 2.0)}, None, None)
    np.testing.assert_allclose(got, 2.0 * 0.65625 / 0.865625 * 1.875**2, rtol=1e-6)
    # A second task adds its own omega / (Delta^2 + xi): one step from 0.125 with gradient 1 to -0.375.
    state = si.begin_task(state, params, None)
    state, _ = si.after_step(state, {"w": jnp.full((1,), -0.375)}, {"w": jnp.ones((1,))}, None, None)
    state, _ = jit(si.end_task)(state, {"w": jnp.full((1,), -0.375)}, None)
    np.testing.assert_allclose(state.importance["w"], [0.65625 / 0.865625 + 0.5 / 0.35], rtol=1e-6)


# -- MAS ------------------------------------------------------------------------------------------------


def test_mas_importance_is_the_mean_abs_gradient_of_the_squared_output_norm_summed_over_tasks():
    apply, params_a = tiny_model()
    params_b = perturb(params_a, 3)

    def hand(params, task, positions):
        grad_sq_norm = jax.jit(jax.grad(lambda p, x: jnp.sum(apply(p, x) ** 2)))
        x, _ = examples(STREAM, task, positions)
        grads = [grad_sq_norm(params, x[i : i + 1]) for i in range(len(x))]
        return jax.tree.map(lambda *g: np.mean(np.abs(np.asarray(g, np.float64)), 0), *grads)

    mas = MAS(lam=4.0, mas_batch=3)
    state = mas.init(params_a, STREAM)
    state, _ = jit(mas.end_task)(state, params_a, context(STREAM, apply, 0))
    w_a = hand(params_a, 0, range(10))
    assert_tree_close(state.importance, w_a)
    state, _ = jit(mas.end_task)(state, params_b, context(STREAM, apply, 1))
    w = jax.tree.map(np.add, w_a, hand(params_b, 1, range(7)))
    assert_tree_close(state.importance, w)
    theta = perturb(params_a, 4)
    got = float(jit(mas.penalty)(state, theta, None, context(STREAM, apply, 1)))
    np.testing.assert_allclose(got, 4.0 * quad(w, theta, params_b), rtol=1e-5)


# -- L2Init and LwF -------------------------------------------------------------------------------------


def test_l2_init_penalty_is_the_squared_distance_to_the_initial_parameters():
    params = {"a": jnp.asarray([1.0, 2.0]), "b": jnp.asarray([[0.5]])}
    theta = {"a": jnp.asarray([0.0, 4.0]), "b": jnp.asarray([[1.5]])}
    l2 = L2Init(lam=0.25)
    state = l2.init(params, STREAM)
    # 0.25 * ((0 - 1)^2 + (4 - 2)^2 + (1.5 - 0.5)^2) = 0.25 * 6 = 1.5
    np.testing.assert_allclose(jit(l2.penalty)(state, theta, None, None), 1.5, rtol=1e-6)
    g = jax.jit(jax.grad(lambda p: l2.penalty(state, p, None, None)))(theta)  # 2 * lam * (theta - theta_0)
    np.testing.assert_allclose(g["a"], [-0.5, 1.0], rtol=1e-6)


def _kl(p_logits, q_logits, t):
    """KL(softmax(p / t) || softmax(q / t)) per row, float64 numpy."""
    p_logits, q_logits = np.asarray(p_logits, np.float64) / t, np.asarray(q_logits, np.float64) / t
    logp = p_logits - np.log(np.exp(p_logits).sum(-1, keepdims=True))
    logq = q_logits - np.log(np.exp(q_logits).sum(-1, keepdims=True))
    return (np.exp(logp) * (logp - logq)).sum(-1)


def test_lwf_is_zero_before_the_first_task_ends_then_t2_times_kl():
    apply, params_a = tiny_model()
    theta = perturb(params_a, 5)
    x, y = STREAM.train_examples(jnp.zeros((5,), jnp.int32), jnp.arange(5, dtype=jnp.int32))
    batch = Batch(x=x, y=y, task=jnp.ones((5,), jnp.int32))
    lwf = LwF(alpha=0.7, temperature=3.0)
    state = lwf.init(params_a, STREAM)
    ctx = context(STREAM, apply, 1)
    assert float(jit(lwf.penalty)(state, theta, batch, ctx)) == 0.0
    state, _ = jit(lwf.end_task)(state, params_a, context(STREAM, apply, 0))
    got = float(jit(lwf.penalty)(state, theta, batch, ctx))
    want = 0.7 * 9.0 * _kl(apply(params_a, x), apply(theta, x), 3.0).mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert want > 1e-4
    # Its gradient is finite and only reaches the new parameters.
    g = jax.jit(jax.grad(lambda p: lwf.penalty(state, p, batch, ctx)))(theta)
    assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(g)) and _max_abs(g) > 0


def test_lwf_with_task_heads_distils_every_previous_head_over_its_own_units():
    stream = make_tiny_stream(n_tasks=3, n=10, d=3)
    masks = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], bool)
    stream = stream.replace(class_mask=jnp.asarray(masks))
    apply, old = tiny_model()
    theta = perturb(old, 6)
    x, _ = stream.train_examples(jnp.full((4,), 2, jnp.int32), jnp.arange(4, dtype=jnp.int32))
    batch = Batch(x=x, y=jnp.zeros((4,), jnp.int32), task=jnp.full((4,), 2, jnp.int32))
    lwf = LwF(alpha=1.0, temperature=2.0)
    state, _ = jit(lwf.end_task)(lwf.init(old, stream), old, context(stream, apply, 1))
    got = float(jit(lwf.penalty)(state, theta, batch, context(stream, apply, 2)))
    z_old, z = np.asarray(apply(old, x)), np.asarray(apply(theta, x))
    # Training task 2: heads 0 (units 0, 1) and 1 (units 1, 2), each a softmax over its own units.
    per_head = [_kl(z_old[:, m], z[:, m], 2.0).mean() for m in masks[:2]]
    np.testing.assert_allclose(got, 4.0 * np.mean(per_head), rtol=1e-5)


# -- in the engine --------------------------------------------------------------------------------------

ENGINE_CASES = [
    (EWC(lam=1.0, fisher_batch=16), "lam", 100.0),
    (EWC(lam=1.0, online=True, gamma=0.9, fisher_batch=16), "lam", 100.0),
    (SI(c=1.0), "c", 1.0),
    (MAS(lam=1.0, mas_batch=16), "lam", 1.0),
    (L2Init(lam=1.0), "lam", 1.0),
    (LwF(alpha=1.0), "alpha", 1.0),
]


def mlp(stream, hidden=(8,)):
    return lambda rngs: nn.MLP(stream.input_dim, hidden, stream.n_classes, rngs=rngs)


@pytest.fixture(scope="module")
def naive_run():
    stream = make_tiny_stream(n_tasks=3)
    config = TrainConfig(steps_per_task=8, batch_size=8)
    return stream, config, Learner(mlp(stream), optax.sgd(0.1), continual.Naive(), config).run(stream, [0, 1])


@pytest.mark.parametrize(
    "strategy,name,big", ENGINE_CASES, ids=["ewc", "online-ewc", "si", "mas", "l2init", "lwf"]
)
def test_sweep_runs_in_one_program_and_zero_strength_is_naive(naive_run, strategy, name, big):
    stream, config, naive = naive_run
    learner = Learner(mlp(stream), optax.sgd(0.1), strategy, config)
    result = learner.run(stream, seeds=[0, 1], sweep={name: [0.0, big]})
    assert learner.engine.n_traces == 1  # every chunk, task and sweep point: one compiled chunk program
    assert result.acc_matrix.shape == (4, 3, 3)
    assert np.isfinite(result.train_loss[:, 1:]).all() and (result.diverged_step == -1).all()
    # Strength 0: the penalty is the only difference, so the runs are Naive's, seed by seed.
    np.testing.assert_allclose(result.acc_matrix[:2], naive.acc_matrix, atol=1e-6)
    np.testing.assert_allclose(result.train_loss[:2, 1:], naive.train_loss[:, 1:], rtol=1e-5)
    # Strength > 0 does change training once a task has ended (from the start for L2Init).
    if not isinstance(strategy, L2Init):
        np.testing.assert_allclose(result.train_loss[2:, 1], naive.train_loss[:, 1], rtol=1e-5)
    assert not np.allclose(result.train_loss[2:, 2:], naive.train_loss[:, 2:], rtol=1e-4)


def test_ewc_forgets_the_first_task_less_than_fine_tuning():
    stream = make_tiny_stream(n_tasks=2, n=48)
    config = TrainConfig(steps_per_task=60, batch_size=16)
    learner = Learner(mlp(stream, (16,)), optax.sgd(0.1), EWC(lam=1.0, fisher_batch=48), config)
    result = learner.run(stream, seeds=[0, 1, 2, 3], sweep={"lam": [0.0, 100.0]})
    acc = result.acc_matrix.reshape(2, 4, 2, 2)  # [lam, seed, after task, on task]
    naive_kept, ewc_kept = acc[0, :, 1, 0].mean(), acc[1, :, 1, 0].mean()
    assert ewc_kept > naive_kept + 0.15, (naive_kept, ewc_kept)  # measured: 0.45 -> 0.71
    assert acc[1, :, 0, 0].mean() == acc[0, :, 0, 0].mean()  # same first task: nothing to protect yet


def test_separate_ewc_memory_does_not_grow_with_tasks():
    apply, params = tiny_model()
    state = EWC(lam=1.0).init(params, make_tiny_stream(n_tasks=50, n=10, d=3))
    assert jax.tree.structure(state.fisher) == jax.tree.structure(params)
    assert all(f.shape == p.shape for f, p in zip(jax.tree.leaves(state.fisher), jax.tree.leaves(params)))
