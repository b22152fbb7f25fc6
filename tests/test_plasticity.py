"""Plasticity strategies, measures, the slowly-changing regression stream and the online runner, by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream
from flax import nnx

from nestlearn import ConfigError, nn
from nestlearn.continual import Batch, Context, Learner, TrainConfig
from nestlearn.continual._online import run_online_regression
from nestlearn.continual._plasticity import (
    ContinualBackprop,
    ContinualBackpropState,
    ShrinkAndPerturb,
    WeightInterpolation,
)
from nestlearn.metrics._plasticity import dead_unit_fraction, effective_rank, stable_rank, weight_magnitude
from nestlearn.tasks._plasticity import SlowlyChangingRegression


def ctx_at(step=0, task=0, key=0, features=None):
    return Context(
        stream=None,
        task=jnp.int32(task),
        step=jnp.int32(step),
        key=jax.random.PRNGKey(key),
        apply=lambda p, x: x,
        features=features,
    )


def mlp_params(din=3, hidden=(4,), dout=2, seed=0):
    graphdef, params = nnx.split(nn.MLP(din, hidden, dout, init="torch", rngs=nnx.Rngs(seed)))
    return graphdef, params


def arr(params, i, name):
    return np.asarray(params["layers"][i][name][...])


# -- measures ---------------------------------------------------------------------------------------


def test_dead_unit_fraction_by_hand():
    h = jnp.array([[0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    assert float(dead_unit_fraction(h)) == pytest.approx(0.5)  # units 0 and 3 never fire
    # pooled over layers: 2 dead of 4, 1 dead of 2 -> 3 of 6
    assert float(dead_unit_fraction((h, jnp.array([[1.0, 0.0]])))) == pytest.approx(0.5)
    assert float(dead_unit_fraction(jnp.ones((3, 5)))) == 0.0


def test_effective_and_stable_rank_by_hand():
    assert float(effective_rank(jnp.eye(3))) == pytest.approx(3.0, rel=1e-5)
    identity_like = jnp.concatenate([2.0 * jnp.eye(3), jnp.zeros((2, 3))])  # 5 x 3, three equal sigmas
    assert float(effective_rank(identity_like)) == pytest.approx(3.0, rel=1e-5)
    rank_one = jnp.outer(jnp.array([1.0, 2.0, 3.0]), jnp.array([1.0, -1.0, 0.5, 2.0]))
    assert float(effective_rank(rank_one)) == pytest.approx(1.0, abs=1e-4)
    # sigmas (2, 1): p = (2/3, 1/3), erank = exp(-(2/3 ln 2/3 + 1/3 ln 1/3)) = 1.8899
    expected = math.exp(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    assert float(effective_rank(jnp.diag(jnp.array([2.0, 1.0])))) == pytest.approx(expected, rel=1e-5)
    assert float(effective_rank(jnp.zeros((4, 3)))) == pytest.approx(1.0)
    assert float(stable_rank(jnp.diag(jnp.array([2.0, 1.0])))) == pytest.approx(1.25, rel=1e-5)  # 5 / 4
    assert float(stable_rank(jnp.eye(4))) == pytest.approx(4.0, rel=1e-5)


def test_weight_magnitude_by_hand():
    params = {"kernel": jnp.array([[1.0, -3.0]]), "bias": jnp.array([0.0, 2.0])}
    assert float(weight_magnitude(params)) == pytest.approx(1.5)  # (1 + 3 + 0 + 2) / 4
    _, p = mlp_params()
    flat = np.concatenate([np.abs(np.asarray(x)).ravel() for x in jax.tree.leaves(p)])
    assert float(weight_magnitude(p)) == pytest.approx(flat.mean(), rel=1e-6)


# -- shrink and perturb -----------------------------------------------------------------------------


def test_shrink_and_perturb_without_noise_is_exact_shrink_at_task_end():
    _, params = mlp_params()
    s = ShrinkAndPerturb(shrink=0.5, noise=0.0)
    _, out = s.end_task((), params, ctx_at(step=10))
    for i in range(2):
        for name in ("kernel", "bias"):
            np.testing.assert_array_equal(arr(out, i, name), 0.5 * arr(params, i, name))
    # every == 0: steps leave the parameters alone
    _, same = s.after_step((), params, params, None, ctx_at(step=9))
    np.testing.assert_array_equal(arr(same, 0, "kernel"), arr(params, 0, "kernel"))


def test_shrink_and_perturb_every_k_steps_only():
    _, params = mlp_params()
    s = ShrinkAndPerturb(shrink=0.25, noise=0.0, every=3)
    step = jax.jit(lambda p, t: s.after_step((), p, p, None, ctx_at(step=t))[1])
    w = arr(params, 0, "kernel")
    # ctx.step counts the steps before this one: the 3rd and 6th steps (ctx.step 2, 5) shrink.
    for t, factor in [(0, 1.0), (1, 1.0), (2, 0.25), (3, 1.0), (4, 1.0), (5, 0.25)]:
        np.testing.assert_array_equal(arr(step(params, jnp.int32(t)), 0, "kernel"), factor * w)
    _, end = s.end_task((), params, ctx_at(step=6))  # periodic form does nothing at task ends
    np.testing.assert_array_equal(arr(end, 0, "kernel"), w)


def test_shrink_and_perturb_noise_has_the_given_scale():
    params = {"w": jnp.zeros((200, 200))}
    _, out = ShrinkAndPerturb(shrink=1.0, noise=0.1).end_task((), params, ctx_at())
    assert float(out["w"].std()) == pytest.approx(0.1, rel=0.02)  # 40,000 draws: std error 0.35%
    assert abs(float(out["w"].mean())) < 0.002


# -- weight interpolation ---------------------------------------------------------------------------


def test_weight_interpolation_by_hand():
    old = {"w": jnp.array([1.0, 2.0])}
    new = {"w": jnp.array([3.0, -2.0])}

    def run(alpha, task):
        s = WeightInterpolation(alpha=alpha)
        state = s.begin_task(s.init(old, None), old, ctx_at(task=task))
        return np.asarray(s.end_task(state, new, ctx_at(task=task))[1]["w"])

    np.testing.assert_array_equal(run(1.0, 1), [1.0, 2.0])  # restores the old weights exactly
    np.testing.assert_array_equal(run(0.0, 1), [3.0, -2.0])  # leaves the new ones
    np.testing.assert_allclose(run(0.25, 1), [0.25 * 1 + 0.75 * 3, 0.25 * 2 + 0.75 * -2])  # [2.5, -1]
    np.testing.assert_array_equal(run(1.0, 0), [3.0, -2.0])  # the first task is not interpolated


# -- continual backprop -----------------------------------------------------------------------------


def cbp_state(utility, age, owed=0.0):
    return ContinualBackpropState(
        utility=(jnp.asarray(utility, jnp.float32),),
        age=(jnp.asarray(age, jnp.int32),),
        to_replace=jnp.asarray([owed], jnp.float32),
    )


def test_continual_backprop_utility_update_by_hand():
    _, params = mlp_params()
    w_out = arr(params, 1, "kernel")  # [4, 2]
    h = jnp.array([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 4.0]])  # mean |h| = [2, 0, 1, 2]
    s = ContinualBackprop(replacement_rate=0.5, decay=0.75, maturity=1000)  # nobody mature: no surgery
    state, out = s.replace_units(
        cbp_state([1.0, 1.0, 1.0, 1.0], [5, 5, 5, 5]), params, (h,), None, jax.random.PRNGKey(0)
    )
    expected = 0.75 * 1.0 + 0.25 * np.array([2.0, 0.0, 1.0, 2.0]) * np.abs(w_out).sum(1)
    np.testing.assert_allclose(np.asarray(state.utility[0]), expected, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state.age[0]), [6, 6, 6, 6])
    np.testing.assert_array_equal(arr(out, 0, "kernel"), arr(params, 0, "kernel"))
    # weighted batch: only example 1 counts -> mean |h| = [3, 0, 0, 4]
    state, _ = s.replace_units(
        cbp_state([0.0] * 4, [5] * 4), params, (h,), jnp.array([0.0, 2.0]), jax.random.PRNGKey(0)
    )
    np.testing.assert_allclose(
        np.asarray(state.utility[0]), 0.25 * np.array([3.0, 0.0, 0.0, 4.0]) * np.abs(w_out).sum(1), rtol=1e-6
    )


def test_continual_backprop_replaces_lowest_utility_mature_units_per_the_accumulator():
    _, params = mlp_params()
    h = (jnp.ones((1, 4)),)
    # decay 1 keeps the constructed utilities; rate 0.25 with 4 mature units owes exactly one unit.
    s = ContinualBackprop(replacement_rate=0.25, decay=1.0, maturity=100)
    step = jax.jit(lambda st, p, k: s.replace_units(st, p, h, None, jax.random.PRNGKey(k)))
    state = cbp_state([0.5, 0.1, 0.3, 0.2], [200, 200, 200, 200])

    # step 1: owed 0 + 0.25 * 4 = 1 -> the lowest utility (unit 1) is replaced, owed back to 0
    state, p1 = step(state, params, 1)
    w0, w1 = arr(params, 0, "kernel"), arr(p1, 0, "kernel")
    assert not np.allclose(w1[:, 1], w0[:, 1])
    np.testing.assert_array_equal(np.delete(w1, 1, 1), np.delete(w0, 1, 1))
    assert np.all(np.abs(w1[:, 1]) <= 1 / math.sqrt(3))  # U(+-1/sqrt(fan_in)), fan_in 3
    assert arr(p1, 0, "bias")[1] == 0.0
    np.testing.assert_array_equal(arr(p1, 1, "kernel")[1], [0.0, 0.0])  # outgoing weights zeroed
    np.testing.assert_array_equal(
        np.delete(arr(p1, 1, "kernel"), 1, 0), np.delete(arr(params, 1, "kernel"), 1, 0)
    )
    np.testing.assert_array_equal(arr(p1, 1, "bias"), arr(params, 1, "bias"))
    np.testing.assert_array_equal(np.asarray(state.age[0]), [201, 0, 201, 201])
    np.testing.assert_allclose(np.asarray(state.utility[0]), [0.5, 0.0, 0.3, 0.2])
    assert float(state.to_replace[0]) == 0.0

    # step 2: 3 mature units -> owed 0.75, nobody replaced
    state, p2 = step(state, p1, 2)
    np.testing.assert_array_equal(arr(p2, 0, "kernel"), arr(p1, 0, "kernel"))
    assert float(state.to_replace[0]) == pytest.approx(0.75)
    # step 3: owed 1.5 -> one unit: the lowest *mature* one is unit 3 (unit 1 has utility 0 but age 2)
    state, p3 = step(state, p2, 3)
    changed = np.any(arr(p3, 0, "kernel") != arr(p2, 0, "kernel"), axis=0)
    np.testing.assert_array_equal(changed, [False, False, False, True])
    np.testing.assert_array_equal(np.asarray(state.age[0]), [203, 2, 203, 0])
    assert float(state.to_replace[0]) == pytest.approx(0.5)


def test_continual_backprop_never_replaces_immature_units():
    _, params = mlp_params()
    h = (jnp.ones((1, 4)),)
    state = cbp_state([0.5, 0.1, 0.0, 0.2], [200, 200, 50, 200])  # unit 2: lowest utility, immature
    # rate 0.5 with 3 mature: owed 1.5 -> one unit, unit 1 (not unit 2)
    s = ContinualBackprop(replacement_rate=0.5, decay=1.0, maturity=100)
    new, out = s.replace_units(state, params, h, None, jax.random.PRNGKey(42))
    changed = np.any(arr(out, 0, "kernel") != arr(params, 0, "kernel"), axis=0)
    np.testing.assert_array_equal(changed, [False, True, False, False])
    assert float(new.to_replace[0]) == pytest.approx(0.5)
    # rate 1: owed 3 -> every mature unit, still never unit 2
    s = ContinualBackprop(replacement_rate=1.0, decay=1.0, maturity=100)
    new, out = s.replace_units(state, params, h, None, jax.random.PRNGKey(42))
    np.testing.assert_array_equal(arr(out, 1, "kernel")[[0, 1, 3]], np.zeros((3, 2)))
    np.testing.assert_array_equal(arr(out, 1, "kernel")[2], arr(params, 1, "kernel")[2])
    np.testing.assert_array_equal(np.asarray(new.age[0]), [0, 0, 51, 0])


def test_continual_backprop_after_step_on_a_deep_mlp():
    """Through ``ctx.features``: replaced units add nothing to the output, in every hidden layer."""
    graphdef, params = mlp_params(din=3, hidden=(4, 5), dout=2)

    def features(p, x):
        return nnx.merge(graphdef, p).features(x)

    s = ContinualBackprop(replacement_rate=0.5, decay=0.9, maturity=0)
    state = s.init(params, None)
    assert [u.shape for u in state.utility] == [(4,), (5,)]
    x = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
    batch = Batch(x=x, y=jnp.zeros((8,), jnp.int32), task=jnp.zeros((8,), jnp.int32))
    state, out = jax.jit(lambda st, p: s.after_step(st, p, p, batch, ctx_at(features=features)))(
        state, params
    )
    # maturity 0, ages 1: layer 1 owes 0.5 * 4 = 2 units, layer 2 owes 0.5 * 5 = 2.5 -> 2 units
    np.testing.assert_array_equal([int((a == 0).sum()) for a in state.age], [2, 2])
    np.testing.assert_allclose(np.asarray(state.to_replace), [0.0, 0.5])
    for layer, age in enumerate(state.age):
        gone = np.asarray(age) == 0
        np.testing.assert_array_equal(arr(out, layer + 1, "kernel")[gone], 0.0)
        np.testing.assert_array_equal(arr(out, layer, "bias")[gone], 0.0)


def test_continual_backprop_init_reads_the_mlp_layout():
    _, params = mlp_params(din=6, hidden=(7, 3), dout=2)
    state = ContinualBackprop().init(params, None)
    assert [a.shape for a in state.age] == [(7,), (3,)] and state.to_replace.shape == (2,)


# -- the slowly-changing regression stream ----------------------------------------------------------


def draw(problem, n, seed=0):
    state = problem.init(jax.random.PRNGKey(seed))

    def body(st, k):
        x, y, st = problem.sample(st, k)
        return st, (x, y)

    final, (x, y) = jax.jit(
        lambda s: jax.lax.scan(body, s, jax.random.split(jax.random.PRNGKey(seed + 1), n))
    )(state)
    return state, final, np.asarray(x), np.asarray(y)


def test_regression_target_is_the_ltu_network_by_hand():
    problem = SlowlyChangingRegression(flip_every=7)
    state, final, x, y = draw(problem, 400)
    w, v = np.asarray(state.target_in), np.asarray(state.target_out)
    assert x.shape == (400, 21) and set(np.unique(w)) == {-1.0, 1.0} and set(np.unique(v)) == {-1.0, 1.0}
    theta = 0.7 * 21 - (w < 0).sum(0)  # beta * m - (number of negative input weights)
    np.testing.assert_allclose(np.asarray(state.threshold), theta, rtol=1e-6)
    h = (x @ w > theta).astype(np.float64)
    np.testing.assert_array_equal(y, h @ v)
    # an LTU fires iff more than beta * m inputs match its sign pattern
    matches = (x[:, :, None] == (w[None] > 0)).sum(1)
    np.testing.assert_array_equal(h, matches > 0.7 * 21)
    # same x -> same y
    _, inverse = np.unique(x, axis=0, return_inverse=True)
    for g in np.unique(inverse):
        assert np.ptp(y[inverse.ravel() == g]) == 0.0
    assert int(final.step) == 400 and np.all(x[:, -1] == 1.0)


@pytest.mark.parametrize("flip", ["one", "all"])
def test_regression_bits_change_only_at_the_period(flip):
    problem = SlowlyChangingRegression(flip_every=5, flip=flip)
    state, _, x, _ = draw(problem, 400)
    slow = x[:, :15].reshape(80, 5, 15)
    assert np.all(slow == slow[:, :1])  # constant inside each period
    np.testing.assert_array_equal(
        slow[0, 0], np.asarray(state.bits)
    )  # the first period uses the initial bits
    changes = (slow[1:, 0] != slow[:-1, 0]).sum(1)
    if flip == "one":
        np.testing.assert_array_equal(changes, 1)  # exactly one bit flips at every boundary
    else:
        assert changes.mean() == pytest.approx(7.5, abs=1.0)  # each redrawn bit differs with probability 1/2
    fresh = x[:, 15:20]
    assert fresh.mean() == pytest.approx(0.5, abs=0.03)  # 2000 fair bits: std error 0.011
    assert np.all((fresh == 0) | (fresh == 1))


def test_regression_config_is_checked():
    with pytest.raises(ConfigError):
        SlowlyChangingRegression(flip="some")
    with pytest.raises(ConfigError):
        SlowlyChangingRegression(n_flipping=21)


# -- the online runner ------------------------------------------------------------------------------


STATIONARY = SlowlyChangingRegression(flip_every=10**9)  # never flips within these runs


def test_online_regression_learns_a_stationary_target():
    r = run_online_regression(STATIONARY, None, steps=4_000, bin=500, seeds=(0, 1), lr=0.01)
    assert r.error.shape == r.dead_fraction.shape == r.weight_magnitude.shape == (2, 8)
    np.testing.assert_array_equal(r.bin_end, 500 * np.arange(1, 9))
    assert np.all(r.error[:, -2:].mean(1) < 0.75 * r.error[:, 0])
    assert np.all(r.dead_fraction * 5 == np.round(r.dead_fraction * 5))  # 5 units: multiples of 1/5
    assert np.all((r.dead_fraction >= 0) & (r.dead_fraction <= 1))
    # U(+-1/sqrt(21)) starts at mean |w| ~ 0.11; training keeps it of that order
    assert np.all((r.weight_magnitude > 0.05) & (r.weight_magnitude < 1.0))


def test_online_continual_backprop_at_rate_zero_is_plain_backprop():
    plain = run_online_regression(STATIONARY, None, steps=2_000, bin=500, seeds=(0, 1))
    cbp0 = run_online_regression(
        STATIONARY, ContinualBackprop(0.0, 0.99, 10), steps=2_000, bin=500, seeds=(0, 1)
    )
    np.testing.assert_array_equal(cbp0.error, plain.error)
    np.testing.assert_array_equal(cbp0.weight_magnitude, plain.weight_magnitude)
    # same program, a replacing rate: different, finite and reproducible
    cbp = [
        run_online_regression(
            STATIONARY, ContinualBackprop(2e-2, 0.99, 10), steps=2_000, bin=500, seeds=(0, 1)
        )
        for _ in range(2)
    ]
    np.testing.assert_array_equal(cbp[0].error, cbp[1].error)
    assert np.all(np.isfinite(cbp[0].error)) and not np.array_equal(cbp[0].error, plain.error)
    with pytest.raises(ConfigError):
        run_online_regression(STATIONARY, steps=1_001, bin=500)


# -- every strategy through the engine --------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy",
    [
        ShrinkAndPerturb(shrink=0.99, noise=0.001, every=4),
        WeightInterpolation(alpha=0.5),
        ContinualBackprop(replacement_rate=0.05, decay=0.9, maturity=3),
    ],
    ids=["shrink-perturb", "interpolation", "continual-backprop"],
)
def test_strategies_run_in_the_learner(strategy):
    stream = make_tiny_stream()
    learner = Learner(
        lambda rngs: nn.MLP(stream.input_dim, (8,), stream.n_classes, rngs=rngs),
        optax.sgd(0.1),
        strategy,
        TrainConfig(steps_per_task=12, batch_size=8),
    )
    result = learner.run(stream, seeds=[0, 1])
    assert result.acc_matrix.shape == (2, 3, 3)
    assert np.all(np.isfinite(result.acc_matrix)) and np.all(np.isfinite(result.train_loss[:, 1:]))
    assert np.all(result.diverged_step == -1)
