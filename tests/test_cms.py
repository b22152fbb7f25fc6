"""CMS-MLP, its block labels and period schedule, per-level telemetry, FastSlow and nested CMS, by hand."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream
from flax import nnx

from nestlearn import nn
from nestlearn.continual import Context, FastSlow, Learner, Naive, TrainConfig, nested_cms


def ctx_at(step):
    return Context(stream=None, task=jnp.int32(0), step=jnp.int32(step), key=jax.random.PRNGKey(0),
                   apply=lambda p, x: x)  # fmt: skip


def cms_params(levels=3, variant="sequential", residual=True, din=5, width=4, hidden=3, dout=2, seed=0):
    model = nn.CMSMLP(din, width, dout, levels=levels, hidden=hidden, variant=variant, residual=residual,
                      rngs=nnx.Rngs(seed))  # fmt: skip
    return model, *nnx.split(model)


def np_linear(layer, x):
    return x @ np.asarray(layer["kernel"][...]) + np.asarray(layer["bias"][...])


# -- the model -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["sequential", "independent"])
def test_one_plain_block_is_the_plain_mlp(variant):
    # One block, residual=False, aggregate 1: relu(E x) -> relu(W2 relu(W1 h)) -> H, i.e. the
    # MLP din -> (width, hidden, width) -> dout with layers [E, W1, W2, H] and the same weights.
    model, _, p = cms_params(levels=1, variant=variant, residual=False)
    mlp = nn.MLP(5, (4, 3, 4), 2, rngs=nnx.Rngs(9))
    for layer, src in zip(mlp.layers, (model.embed, model.blocks[0].up, model.blocks[0].down, model.head)):
        layer.kernel[...] = src.kernel[...]
        layer.bias[...] = src.bias[...]
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 5))
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(mlp(x)))
    hidden = model.features(x)[1]
    np.testing.assert_array_equal(np.asarray(hidden[1]), np.asarray(mlp.features(x)[1][1]))


def test_residual_variants_against_numpy():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (6, 5)))
    relu = lambda v: np.maximum(v, 0)  # noqa: E731

    def f(block, h):
        return np_linear(block["down"], relu(np_linear(block["up"], h)))

    # sequential residual: h <- h + f_l(h) along the chain.
    model, _, p = cms_params(levels=3, variant="sequential")
    h = relu(np_linear(p["embed"], x))
    for i in range(3):
        h = h + f(p["blocks"][i], h)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(x))), np_linear(p["head"], h), rtol=1e-5, atol=1e-6
    )
    # independent residual: h0 + sum_l a_l f_l(h0), with a set to (0.5, -2) by hand.
    model, _, p = cms_params(levels=2, variant="independent")
    model.mix[...] = jnp.array([0.5, -2.0])
    h0 = relu(np_linear(p["embed"], x))
    h = h0 + 0.5 * f(p["blocks"][0], h0) - 2.0 * f(p["blocks"][1], h0)
    np.testing.assert_allclose(
        np.asarray(model(jnp.asarray(x))), np_linear(p["head"], h), rtol=1e-5, atol=1e-6
    )
    logits, hidden = model.features(jnp.asarray(x))
    assert logits.shape == (6, 2) and [a.shape for a in hidden] == [(6, 4), (6, 3), (6, 3)]


def test_bad_model_arguments():
    with pytest.raises(ValueError, match="variant"):
        nn.CMSMLP(2, 3, 2, levels=1, variant="parallel", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="levels"):
        nn.CMSMLP(2, 3, 2, levels=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="periods"):
        nn.cms_optimizer(optax.sgd(0.1), ())
    with pytest.raises(ValueError, match="periods"):
        nested_cms((1, 0, 4))
    with pytest.raises(ValueError, match="period"):
        FastSlow(period=0.0)


# -- labels, the period schedule and the telemetry ------------------------------------------------


def test_labels_name_every_block():
    _, _, p = cms_params(levels=3, variant="independent")
    labels = nn.cms_labels(p)
    assert labels["blocks"][1]["up"]["kernel"].get_value() == "block1"
    assert labels["blocks"][2]["down"]["bias"].get_value() == "block2"
    assert labels["mix"].get_value() == "io" and labels["head"]["kernel"].get_value() == "io"
    flat = jax.tree.leaves(labels)
    # 4 leaves per block (up/down kernel and bias); io: embed (2), head (2), mix (1).
    assert {k: flat.count(k) for k in set(flat)} == {"block0": 4, "block1": 4, "block2": 4, "io": 5}


def test_cms_optimizer_updates_each_block_at_its_period():
    # SGD lr 0.5 and a constant gradient of ones: block l with period P changes only at steps t with
    # (t+1) % P == 0, by -0.5 * P (the sum of its P gradients), so after step t every entry equals
    # start - 0.5 * P * floor((t+1)/P). io has period 2 here.
    periods, io_period = (1, 2, 3), 2
    _, _, p = cms_params(levels=3)
    tx = nn.cms_optimizer(optax.sgd(0.5), periods, io_period=io_period)
    state, params = tx.init(p), p
    ones = jax.tree.map(jnp.ones_like, p)
    # The expected values advance in float32 the same way (one addition of -0.5 * P per update).
    expected = {k: [np.asarray(x) for x in v] for k, v in nn._cms._groups(p).items()}
    update = jax.jit(tx.update)
    for t in range(6):
        u, state = update(ones, state, params)
        params = optax.apply_updates(params, u)
        for label, leaves in nn._cms._groups(params).items():
            period = io_period if label == "io" else periods[int(label[-1])]
            if (t + 1) % period == 0:
                expected[label] = [x + np.float32(-0.5 * period) for x in expected[label]]
            for a, b in zip(leaves, expected[label]):
                np.testing.assert_array_equal(np.asarray(a), b)
    counts = {k: int(v) for k, v in nn.level_num_updates(state, periods, io_period=io_period).items()}
    assert counts == {"block0": 6, "block1": 3, "block2": 2, "io": 3}
    assert {k: int(v) for k, v in nn.level_steps(state).items()} == dict.fromkeys(counts, 6)


def test_cms_optimizer_puts_io_in_the_slowest_level_by_default():
    # periods (1, 3): io (embedding, head, aggregate) steps with block 1, at steps 2 and 5, by -0.5 * 3
    # each (SGD lr 0.5 on a constant gradient of ones); block 0 every step.
    _, _, p = cms_params(levels=2)
    tx = nn.cms_optimizer(optax.sgd(0.5), (1, 3))
    state, params = tx.init(p), p
    ones = jax.tree.map(jnp.ones_like, p)
    start = {k: [np.asarray(x) for x in v] for k, v in nn._cms._groups(p).items()}
    update = jax.jit(tx.update)
    moved = []
    for _ in range(6):
        u, state = update(ones, state, params)
        params = optax.apply_updates(params, u)
        io = nn._cms._groups(params)["io"]
        moved.append(float(np.max(np.abs(np.asarray(io[0]) - start["io"][0]))))
    np.testing.assert_allclose(moved, [0, 0, 1.5, 1.5, 1.5, 3.0], atol=1e-6)
    counts = {k: int(v) for k, v in nn.level_num_updates(state, (1, 3)).items()}
    assert counts == {"block0": 6, "block1": 2, "io": 2}


def test_telemetry_by_hand():
    _, _, p = cms_params(levels=3, width=4, hidden=3)
    # Move block1 by +1 everywhere: its norm is sqrt(#entries) = sqrt(4*3 + 3 + 3*4 + 4) = sqrt(31).
    after = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 1.0 if "1" in jax.tree_util.keystr(path).split("blocks")[-1][:5] else x, p
    )
    norms = {k: float(v) for k, v in nn.level_update_norms(p, after).items()}
    assert norms["block0"] == 0.0 and norms["block2"] == 0.0 and norms["io"] == 0.0
    assert norms["block1"] == pytest.approx(math.sqrt(31), rel=1e-6)
    # Cosine: block1 = 2 * block0 gives 1, block2 = -block0 gives -1.
    b = p["blocks"]
    twin = jax.tree.map(lambda x: x, p)
    twin["blocks"][1] = jax.tree.map(lambda x: 2.0 * x, b[0])
    twin["blocks"][2] = jax.tree.map(lambda x: -x, b[0])
    np.testing.assert_allclose(
        np.asarray(nn.block_cosine(twin)), [[1, 1, -1], [1, 1, -1], [-1, -1, 1]], atol=1e-6
    )
    # Linear CKA: X = [[1,0],[0,1],[-1,0],[0,-1]] (already centred), Y = X[:, :1].
    # Y^T X = [2, 0] -> 4; ||X^T X||_F = ||diag(2,2)|| = 2 sqrt 2; ||Y^T Y|| = 2; CKA = 4 / (4 sqrt 2).
    x = jnp.array([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    assert float(nn.linear_cka(x, x[:, :1])) == pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert float(nn.linear_cka(x, 3.0 * x + 1.0)) == pytest.approx(1.0, rel=1e-6)
    assert float(nn.linear_cka(x[:, :1], x[:, 1:])) == 0.0
    cka = nn.block_cka((x, x, x[:, :1]))
    np.testing.assert_allclose(np.asarray(cka), [[1, 2**-0.5], [2**-0.5, 1]], rtol=1e-6)


# -- FastSlow and nested CMS -----------------------------------------------------------------------


def run_hooks(strategy, params, grad_fn, lr, steps):
    """SGD steps with the strategy's after_step, as the engine calls it; returns fast and slow per step."""
    state = strategy.init(params, None)
    fast, slow = [], []
    for t in range(steps):
        params = jax.tree.map(lambda w, g: w - lr * g, params, grad_fn(params))
        state, params = strategy.after_step(state, params, None, None, ctx_at(t))
        fast.append(params)
        slow.append(state.slow)
    return fast, slow


def test_fast_slow_hand_trajectory():
    # Gradient 1, lr 0.5, P = 2, alpha = 0.5, from 0. With reset, fast: -0.5, then -1.0 -> sync:
    # slow = 0 + 0.5 (-1 - 0) = -0.5 and fast = -0.5; -1.0, -1.5 -> slow = -0.5 + 0.5 (-1.5 + 0.5) = -1.0
    # and fast = -1.0; -1.5, -2.0 -> slow = -1.5. Without reset, fast = -0.5 (t+1) and
    # slow = -0.5 (t=1), -0.5 + 0.5 (-2 + 0.5) = -1.25 (t=3), -1.25 + 0.5 (-3 + 1.25) = -2.125 (t=5).
    g = lambda p: jnp.ones_like(p)  # noqa: E731
    fast, slow = run_hooks(FastSlow(period=2.0, rate=0.5), jnp.zeros(()), g, 0.5, 6)
    assert [float(f) for f in fast] == [-0.5, -0.5, -1.0, -1.0, -1.5, -1.5]
    assert [float(s) for s in slow] == [0.0, -0.5, -0.5, -1.0, -1.0, -1.5]
    fast, slow = run_hooks(FastSlow(period=2.0, rate=0.5, reset=False), jnp.zeros(()), g, 0.5, 6)
    assert [float(f) for f in fast] == [-0.5, -1.0, -1.5, -2.0, -2.5, -3.0]
    assert [float(s) for s in slow] == [0.0, -0.5, -0.5, -1.25, -1.25, -2.125]


def test_fast_slow_is_optax_lookahead():
    # Another implementation: optax.lookahead(sgd, 3, 0.4) on the quadratic 0.5 ||A w - b||^2.
    a = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    b = jax.random.normal(jax.random.PRNGKey(1), (4,))
    grad = jax.grad(lambda w: 0.5 * jnp.sum(jnp.square(a @ w - b)))
    w0 = jnp.zeros(3)
    fast, slow = run_hooks(FastSlow(period=3.0, rate=0.4), w0, grad, 0.1, 12)
    tx = optax.lookahead(optax.sgd(0.1), 3, 0.4)
    params = optax.LookaheadParams(w0, w0)
    state = tx.init(params)
    for t in range(12):
        with jax.numpy_dtype_promotion("standard"):  # optax 0.2.8's lookahead multiplies bool by float
            u, state = tx.update(grad(params.fast), state, params)
        params = optax.apply_updates(params, u)
        np.testing.assert_allclose(np.asarray(fast[t]), np.asarray(params.fast), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(np.asarray(slow[t]), np.asarray(params.slow), rtol=1e-6, atol=1e-7)


def test_nested_cms_resets_each_block_after_its_context():
    # Periods (1, 2, 4): block0's context is 2 steps, block1's 4; block2 and io are never reset.
    # With meta_rate 0 the initial states never move, so block0 is back at its start after steps
    # t = 1, 3, 5 and block1 after t = 3, while block2 and io keep drifting by -lr per step.
    _, _, p = cms_params(levels=3)
    strategy = nested_cms((1, 2, 4), meta_rate=0.0)
    assert strategy.group_periods == (("block0", 2), ("block1", 4))
    fast, _ = run_hooks(strategy, p, lambda q: jax.tree.map(jnp.ones_like, q), 0.25, 6)
    start = nn._cms._groups(p)
    for t, params in enumerate(fast):
        now = nn._cms._groups(params)
        since = {"block0": (t + 1) % 2, "block1": (t + 1) % 4, "block2": t + 1, "io": t + 1}
        for label, n in since.items():
            for x, x0 in zip(now[label], start[label]):
                np.testing.assert_allclose(np.asarray(x), np.asarray(x0) - 0.25 * n, atol=1e-6)


# -- in the engine ---------------------------------------------------------------------------------


def tiny_learner(optimizer, strategy, steps=8, cms=True):
    if cms:
        model = lambda rngs: nn.CMSMLP(6, 8, 3, levels=2, hidden=5, rngs=rngs)  # noqa: E731
    else:
        model = lambda rngs: nn.MLP(6, (8,), 3, rngs=rngs)  # noqa: E731
    return Learner(model, optimizer, strategy, TrainConfig(steps_per_task=steps, batch_size=8))


def test_cms_off_is_the_inner_optimizer_in_the_engine():
    stream = make_tiny_stream()
    inner = optax.sgd(0.1, momentum=0.9)
    plain = tiny_learner(inner, Naive()).run(stream, seeds=[0, 1])
    off = tiny_learner(nn.cms_optimizer(inner, (1, 1)), Naive()).run(stream, seeds=[0, 1])
    np.testing.assert_array_equal(off.train_loss, plain.train_loss)
    np.testing.assert_array_equal(off.acc_matrix, plain.acc_matrix)


def test_fast_slow_rate_zero_returns_to_the_start_in_the_engine():
    # alpha = 0 with reset and P = steps_per_task: the slow weights never move and the fast ones restart
    # from them at every task end, so every row of the accuracy matrix is the accuracy before training.
    stream = make_tiny_stream()
    r = tiny_learner(optax.sgd(0.1), FastSlow(period=8.0, rate=0.0), cms=False).run(stream, seeds=[0, 1])
    for i in range(stream.n_tasks):
        np.testing.assert_array_equal(r.acc_matrix[:, i], r.acc_init)
    assert np.all(np.isfinite(r.train_loss[:, 1:]))
