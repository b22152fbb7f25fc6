"""OML and La-MAML: meta-gradients against slow references and closed forms, frozen parts kept frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from nestlearn.meta._inner import functional, mse_loss
from nestlearn.meta._lamaml import LaMAML
from nestlearn.meta._oml import OML, OMLParams
from nestlearn.nn import MLP
from nestlearn.tasks import IncrementalSine

# ------------------------------------------------------------------------------------------------- OML


def _rln_apply(p, x):
    return jnp.tanh(x @ p["w"] + p["b"][None, :])


def _head(p, h):
    return h @ p["v"] + p["c"][None, :]


def _head_loss(p, h, y):
    return jnp.mean((_head(p, h) - y) ** 2)


def _tiny_oml_problem(seed=0):
    r = np.random.default_rng(seed)
    f = np.float32
    params = OMLParams(
        rln={"w": jnp.asarray(r.normal(size=(3, 4)), f), "b": jnp.asarray(r.normal(size=(4,)) * 0.1, f)},
        pln={"v": jnp.asarray(r.normal(size=(4, 1)), f), "c": jnp.zeros((1,), f)},
    )
    x_traj = jnp.asarray(r.normal(size=(3, 2, 3)), f)  # 3 online minibatches of 2
    y_traj = jnp.asarray(r.normal(size=(3, 2, 1)), f)
    x_rand = jnp.asarray(r.normal(size=(5, 3)), f)
    y_rand = jnp.asarray(r.normal(size=(5, 1)), f)
    return params, x_traj, y_traj, x_rand, y_rand


def _slow_oml_meta_loss(params, x_traj, y_traj, x_rand, y_rand, beta, stop_features=False):
    """OML's meta-loss written out: a Python loop of SGD steps on the head, then the loss on rand ∪ traj."""
    w = params.pln
    for s in range(x_traj.shape[0]):
        h = _rln_apply(params.rln, x_traj[s])
        if stop_features:
            h = jax.lax.stop_gradient(h)
        g = jax.grad(_head_loss)(w, h, y_traj[s])
        w = {k: w[k] - beta * g[k] for k in w}
    x_all = jnp.concatenate([x_rand, x_traj.reshape(-1, 3)])
    y_all = jnp.concatenate([y_rand, y_traj.reshape(-1, 1)])
    return _head_loss(w, _rln_apply(params.rln, x_all), y_all)


def test_oml_meta_gradient_through_the_online_updates_equals_the_slow_reference():
    params, *data = _tiny_oml_problem()
    beta = 0.3  # large, so the second-order path through the updates is big
    oml = OML(_rln_apply, _head_loss, inner_lr=beta)
    grads, metrics = jax.jit(oml.meta_grad)(params, *data)
    slow_grad = jax.jit(jax.grad(_slow_oml_meta_loss), static_argnums=6)
    ref = slow_grad(params, *data, beta, False)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(metrics["loss_meta"], _slow_oml_meta_loss(params, *data, beta), rtol=1e-6)
    # The RLN's gradient really flows through the online updates: cutting that path changes it.
    cut = slow_grad(params, *data, beta, True)
    assert float(jnp.max(jnp.abs(cut.rln["w"] - ref.rln["w"]))) > 1e-3
    # Rematerialising the online steps changes nothing.
    remat = OML(_rln_apply, _head_loss, inner_lr=beta, checkpoint=True)
    for a, b in zip(jax.tree.leaves(jax.jit(remat.meta_grad)(params, *data)[0]), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_oml_meta_test_freezes_the_representation_and_runs_plain_online_sgd():
    params, x_traj, y_traj, _, _ = _tiny_oml_problem(1)
    r = np.random.default_rng(2)
    x_eval = jnp.asarray(r.normal(size=(3, 4, 3)), jnp.float32)  # 3 tasks, 4 held-out points each
    y_eval = jnp.asarray(r.normal(size=(3, 4, 1)), jnp.float32)
    oml = OML(_rln_apply, _head_loss, inner_lr=0.1)
    after, losses = jax.jit(oml.meta_test)(params, x_traj, y_traj, x_eval, y_eval)
    for a, b in zip(jax.tree.leaves(after.rln), jax.tree.leaves(params.rln)):
        np.testing.assert_array_equal(a, b)  # the RLN is bit for bit unchanged
    # Reference: features once from the frozen RLN, then SGD on the head minibatch by minibatch.
    w = params.pln
    for s in range(3):
        g = jax.grad(_head_loss)(w, _rln_apply(params.rln, x_traj[s]), y_traj[s])
        w = {k: w[k] - 0.1 * g[k] for k in w}
    for k in w:
        np.testing.assert_allclose(after.pln[k], w[k], rtol=1e-5, atol=1e-6)
    expected = [float(_head_loss(w, _rln_apply(params.rln, x_eval[i]), y_eval[i])) for i in range(3)]
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    # Nothing in meta-test reaches the RLN: its gradient through the per-task losses is exactly zero.
    g_rln = jax.grad(
        lambda rln: oml.meta_test(params.replace(rln=rln), x_traj, y_traj, x_eval, y_eval)[1].sum()
    )(params.rln)
    assert all(float(jnp.abs(v).max()) == 0.0 for v in jax.tree.leaves(g_rln))


def test_oml_meta_train_scan_equals_a_loop_of_meta_gradients_and_adam_steps():
    """The compiled chunk on the incremental sine with NNX models, against the same steps one by one."""
    family = IncrementalSine(n_functions=3, n_batches=2, batch_size=4, n_pool=6)
    pool = family.pool(jax.random.key(0))
    rln_apply, rln = functional(MLP(family.n_inputs, (8,), 8, rngs=nnx.Rngs(0)))
    pln_apply, pln = functional(MLP(8, (), 1, rngs=nnx.Rngs(1)))
    oml = OML(rln_apply, mse_loss(pln_apply), inner_lr=0.05)
    opt = optax.adam(1e-2)

    def sample(k):
        traj = family.sample_trajectory(k, pool)
        return (*traj.online(), *traj.remember())

    # optax's Adam raises a float to its int32 step count, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        key = jax.random.key(3)
        state = oml.train_init(OMLParams(rln=rln, pln=pln), opt)
        out, metrics = jax.jit(lambda s: oml.meta_train(s, key, sample, opt, 3))(state)
        assert int(out.step) == 3 and metrics["loss_meta"].shape == (3,)
        params, opt_state = state.params, state.opt_state

        @jax.jit
        def one_iteration(params, opt_state, k):
            grads, m = oml.meta_grad(params, *sample(k))
            updates, opt_state = opt.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, m

        for i in range(3):
            params, opt_state, m = one_iteration(params, opt_state, jax.random.fold_in(key, i))
            np.testing.assert_allclose(metrics["loss_meta"][i], m["loss_meta"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(out.params), jax.tree.leaves(params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- La-MAML


def _linear_loss(p, x, y):
    return jnp.mean((x @ p - y.astype(jnp.float32)) ** 2)


def test_lamaml_alpha_and_weight_update_equal_the_hand_derivation_for_one_sample():
    """One incoming sample, empty buffer (so the meta batch is that sample), linear model.

    With l(w) = (w.x - y)^2, r = w.x - y, the inner gradient is g = 2 r x, the look-ahead is
    w1 = w - alpha * g, its residual r1 = w1.x - y = r (1 - 2 sum_i alpha_i x_i^2) and L = r1^2.
      dL/dalpha_i = 2 r1 * (-g_i x_i) = -4 r r1 x_i^2          (g does not depend on alpha)
      first order  (dw1/dw = I):                dL/dw = 2 r1 x
      second order (dw1/dw = I - 2 diag(alpha) x x^T): dL/dw = 2 r1 x (1 - 2 sum_i alpha_i x_i^2)
    then alpha' = alpha - eta dL/dalpha and w' = w - max(alpha', 0) * dL/dw.
    """
    x = np.array([0.5, -1.0, 2.0], np.float32)
    w = np.array([0.3, 0.2, -0.1], np.float32)
    alpha0 = np.array([0.05, -0.02, 0.01], np.float32)
    y, eta = 2, 0.7
    r = float(w @ x - y)
    r1 = r * (1 - 2 * float(np.sum(alpha0 * x**2)))
    d_alpha = -4 * r * r1 * x**2
    alpha1 = alpha0 - eta * d_alpha
    for second_order, d_w in (
        (False, 2 * r1 * x),
        (True, 2 * r1 * x * (1 - 2 * float(np.sum(alpha0 * x**2)))),
    ):
        lamaml = LaMAML(_linear_loss, capacity=4, replay_batch=3, alpha_lr=eta, second_order=second_order)
        state = lamaml.init(jnp.asarray(w), jax.random.key(0), 3).replace(alpha=jnp.asarray(alpha0))
        new, metrics = jax.jit(lamaml.step)(state, (jnp.asarray(x[None]), jnp.asarray([y], jnp.int32)))
        np.testing.assert_allclose(metrics["loss_meta"], r1**2, rtol=1e-5)
        np.testing.assert_allclose(new.alpha, alpha1, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(new.params, w - np.maximum(alpha1, 0) * d_w, rtol=1e-5, atol=1e-7)
        assert int(new.buffer.seen) == 1
        np.testing.assert_array_equal(new.buffer.x[0], x)


def test_lamaml_step_with_replay_equals_a_slow_reference():
    """Two incoming samples and a filled buffer: the step against an explicit loop and jax.grad."""
    r = np.random.default_rng(0)
    d = 4
    lamaml = LaMAML(_linear_loss, capacity=6, replay_batch=3, alpha_lr=0.02, alpha_init=0.05)
    state = lamaml.init(jnp.asarray(r.normal(size=d), jnp.float32), jax.random.key(1), d)
    step = jax.jit(lamaml.step)
    for _ in range(3):  # fill the buffer with six examples
        state, _ = step(
            state,
            (jnp.asarray(r.normal(size=(2, d)), jnp.float32), jnp.asarray(r.integers(0, 3, 2), jnp.int32)),
        )
    assert int(state.buffer.seen) == 6
    assert bool(jnp.all(jnp.isfinite(state.params)))
    x = jnp.asarray(r.normal(size=(2, d)), jnp.float32)
    y = jnp.asarray([1, 2], jnp.int32)
    new, _ = step(state, (x, y))

    # Reference: the replay rows the step draws (documented key derivation), then the look-ahead by hand.
    k_replay, _ = jax.random.split(jax.random.fold_in(state.key, state.step))
    idx = jax.random.randint(k_replay, (3,), 0, 6, dtype=jnp.int32)
    mx = jnp.concatenate([x, state.buffer.x[idx]])
    my = jnp.concatenate([y, state.buffer.y[idx]])

    def slow_meta_loss(w, alpha):
        total = 0.0
        for i in range(2):
            g = jax.lax.stop_gradient(jax.grad(_linear_loss)(w, x[i : i + 1], y[i : i + 1]))
            w = w - alpha * g
            total = total + _linear_loss(w, mx, my)  # mean over the 2 + 3 meta rows
        return total / 2

    g_w, g_a = jax.grad(slow_meta_loss, argnums=(0, 1))(state.params, state.alpha)
    alpha = state.alpha - 0.02 * g_a
    np.testing.assert_allclose(new.alpha, alpha, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new.params, state.params - jnp.maximum(alpha, 0.0) * g_w, rtol=1e-5, atol=1e-7)


def test_lamaml_never_moves_a_weight_whose_rate_is_not_positive():
    r = np.random.default_rng(3)
    apply, params = functional(MLP(5, (6,), 3, rngs=nnx.Rngs(0)))

    def loss(p, x, y):
        return optax.softmax_cross_entropy_with_integer_labels(apply(p, x), y).mean()

    lamaml = LaMAML(loss, capacity=8, replay_batch=4, alpha_lr=0.05, alpha_init=0.01)
    state = lamaml.init(params, jax.random.key(0), 5)
    # Half the rates start at or below zero (sign from a fixed random pattern), the rest positive.
    signs = jax.tree.map(lambda p: jnp.asarray(r.choice([-1.0, 0.0, 1.0], size=p.shape), jnp.float32), params)
    state = state.replace(alpha=jax.tree.map(lambda a, s: a * s, state.alpha, signs))
    step = jax.jit(lamaml.step)
    frozen_seen = moved_seen = 0
    for _ in range(4):
        batch = (jnp.asarray(r.normal(size=(3, 5)), jnp.float32), jnp.asarray(r.integers(0, 3, 3), jnp.int32))
        new, _ = step(state, batch)
        for p_old, p_new, a in zip(
            jax.tree.leaves(state.params), jax.tree.leaves(new.params), jax.tree.leaves(new.alpha)
        ):
            frozen = np.asarray(a) <= 0
            np.testing.assert_array_equal(np.asarray(p_new)[frozen], np.asarray(p_old)[frozen])
            frozen_seen += int(frozen.sum())
            moved_seen += int((np.asarray(p_new)[~frozen] != np.asarray(p_old)[~frozen]).sum())
        state = new
    assert frozen_seen > 0 and moved_seen > 0
