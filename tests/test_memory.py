"""Reservoir buffer against Algorithm R's inclusion law; Replay, A-GEM and DER++ against closed forms."""

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import make_tiny_stream

from nestlearn import ConfigError, continual, nn
from nestlearn.continual import Batch, Context, Learner, TrainConfig
from nestlearn.continual._memory import AGEM, DERPP, Replay, reservoir_init
from nestlearn.continual._memory import agem_project as _agem_project
from nestlearn.continual._memory import reservoir_add as _reservoir_add
from nestlearn.continual._memory import reservoir_sample as _reservoir_sample

# Compiled once each (eager calls compile every operation separately); test data is built in numpy.
reservoir_add = jax.jit(_reservoir_add)
reservoir_sample = jax.jit(_reservoir_sample, static_argnums=2)
agem_project = jax.jit(_agem_project)


def mlp(stream, hidden=(8,)):
    return lambda rngs: nn.MLP(stream.input_dim, hidden, stream.n_classes, rngs=rngs)


def linear(params, x):
    return x @ params["w"] + params["b"][None, :]


def linear_np(params, x):
    return np.asarray(x, np.float64) @ np.asarray(params["w"], np.float64) + np.asarray(params["b"])


def tree_dot_np(a, b):
    return sum(
        float(np.vdot(np.asarray(u, np.float64), np.asarray(v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


task_loss = jax.jit(lambda ctx, params, batch: ctx.loss(params, batch))


def linear_params(d=6, c=3, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "w": jnp.asarray(rng.normal(size=(d, c)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=c), jnp.float32),
    }


def examples(stream, task, pos):
    """Training examples ``pos`` of task ``task`` in numpy (the stream's rows, permuted features)."""
    rows = np.asarray(stream.train_idx)[task, np.asarray(pos)]
    perm = np.asarray(stream.feature_idx)[task, :, 0]
    return np.asarray(stream.train_x)[rows][:, perm], np.asarray(stream.label_map)[
        task, np.asarray(stream.train_y)[rows]
    ]


def context(stream, task=0, key=0, apply=linear):
    return Context(
        stream=stream,
        task=jnp.asarray(task, jnp.int32),
        step=jnp.asarray(0, jnp.int32),
        key=jax.random.PRNGKey(key),
        apply=apply,
    )


def ce(logits, y):
    """Cross-entropy per row, in numpy."""
    logits = np.asarray(logits, np.float64)
    z = logits - logits.max(-1, keepdims=True)
    return np.log(np.exp(z).sum(-1)) - z[np.arange(len(y)), np.asarray(y)]


# -- the reservoir ----------------------------------------------------------------------------------

N, K, N_KEYS = 20, 5, 4000


def ids_batch(ids):
    ids = np.asarray(ids)
    x = jnp.asarray(np.stack([ids, -ids], 1), jnp.float32)  # the id is readable from the row
    return x, jnp.asarray(ids, jnp.int32), jnp.asarray(ids // 5, jnp.int32)


def feed(key):
    """Offers examples 0..19 in four batches of five; returns the buffer after the first and the last."""
    buf = reservoir_init(K, 2, 3)
    first = None
    for i in range(4):
        x, y, t = ids_batch(np.arange(5 * i, 5 * i + 5))
        buf = reservoir_add(buf, x, y, t, jax.random.fold_in(key, i))
        first = buf if i == 0 else first
    return first, buf


def test_reservoir_keeps_every_example_with_probability_k_over_n():
    first, last = jax.jit(jax.vmap(feed))(jax.random.split(jax.random.PRNGKey(0), N_KEYS))
    # The first K examples fill slots 0..K-1 in order, whatever the key.
    np.testing.assert_array_equal(np.asarray(first.y), np.tile(np.arange(K), (N_KEYS, 1)))
    np.testing.assert_array_equal(np.asarray(first.seen), K)
    np.testing.assert_array_equal(np.asarray(last.seen), N)
    y = np.asarray(last.y)
    # Rows stay whole (x, y and task of one example) and no example is held twice.
    np.testing.assert_array_equal(np.asarray(last.x[..., 0]), y)
    np.testing.assert_array_equal(np.asarray(last.task), y // 5)
    assert all(len(set(row)) == K for row in y)
    # Algorithm R: each of the N examples ends in the buffer with probability K/N = 1/4.
    freq = np.array([(y == i).any(1).mean() for i in range(N)])
    sd = np.sqrt(0.25 * 0.75 / N_KEYS)
    assert np.abs(freq - K / N).max() < 4 * sd, freq
    # An off-by-one draw j ~ U{0..i-1} would keep example K always: the law above tells them apart.
    assert freq[K] < 0.25 + 4 * sd


def test_reservoir_ignores_examples_not_offered():
    buf = reservoir_init(4, 2, 3)
    x, y, t = ids_batch(np.arange(6))
    valid = jnp.array([True, False, True, False, False, True])
    buf = reservoir_add(buf, x, y, t, jax.random.PRNGKey(1), valid=valid)
    assert int(buf.seen) == 3
    np.testing.assert_array_equal(np.asarray(buf.y[:3]), [0, 2, 5])  # in order, the gaps skipped
    assert int(buf.filled) == 3


def offer_one_at_a_time(buf, x, y, t, key, valid):
    """Algorithm R written out: valid example i is offer number ``n_i`` and draws ``j_i ~ U{0..n_i}``.

    The draws are element ``i`` of ``randint(key, (b,), 0, n + 1)`` (the documented key use), then the
    examples are written one after another, so a later example overwrites an earlier one's slot.
    """
    bx, by, bt, seen = np.array(buf.x), np.array(buf.y), np.array(buf.task), int(buf.seen)
    offers = seen + np.cumsum(valid) - valid
    draws = np.asarray(
        jax.random.randint(key, (len(y),), 0, jnp.asarray(offers + 1, jnp.int32), dtype=jnp.int32)
    )
    for i in range(len(y)):
        if not valid[i]:
            continue
        j = seen if seen < len(by) else int(draws[i])
        if j < len(by):
            bx[j], by[j], bt[j] = x[i], y[i], t[i]
        seen += 1
    return bx, by, bt, seen


def test_reservoir_batch_add_equals_offering_one_example_at_a_time():
    # K = 3 slots and batches of 12: most draws past the fill collide with another example of the same
    # batch, and the later one must win, exactly as when the examples are offered one after another.
    rng = np.random.default_rng(0)
    for seed in range(6):
        buf = reservoir_init(3, 2, 3)
        ref = (np.array(buf.x), np.array(buf.y), np.array(buf.task), 0)
        for step in range(4):
            x, y, t = ids_batch(np.arange(12) + 12 * step)
            valid = rng.random(12) < 0.8
            key = jax.random.PRNGKey(100 * seed + step)
            buf = reservoir_add(buf, x, y, t, key, valid=jnp.asarray(valid))
            ref = offer_one_at_a_time(
                buf.replace(
                    x=jnp.asarray(ref[0]),
                    y=jnp.asarray(ref[1]),
                    task=jnp.asarray(ref[2]),
                    seen=jnp.asarray(ref[3], jnp.int32),
                ),
                np.asarray(x),
                np.asarray(y),
                np.asarray(t),
                key,
                valid,
            )
            np.testing.assert_array_equal(np.asarray(buf.y), ref[1])
            np.testing.assert_array_equal(np.asarray(buf.x), ref[0])
            np.testing.assert_array_equal(np.asarray(buf.task), ref[2])
            assert int(buf.seen) == ref[3]


def test_reservoir_sample_draws_only_filled_slots_and_weights_an_empty_buffer_zero():
    buf = reservoir_init(10, 2, 3, with_logits=True)
    x, y, w = reservoir_sample(buf, jax.random.PRNGKey(0), 7)[::2]
    np.testing.assert_array_equal(np.asarray(w), np.zeros(7))
    xs, ys, ts = ids_batch(np.arange(4) + 1)
    logits = jnp.asarray(np.arange(12, dtype=np.float32).reshape(4, 3))
    buf = reservoir_add(buf, xs, ys, ts, jax.random.PRNGKey(1), logits=logits)
    x, y, task, z, w = reservoir_sample(buf, jax.random.PRNGKey(2), 4000)
    y = np.asarray(y)
    assert set(np.unique(y)) == {1, 2, 3, 4}  # slots 4..9 are empty and never drawn
    counts = np.bincount(y, minlength=5)[1:] / 4000
    assert np.abs(counts - 0.25).max() < 4 * np.sqrt(0.25 * 0.75 / 4000)
    np.testing.assert_array_equal(np.asarray(w), np.ones(4000))
    np.testing.assert_array_equal(np.asarray(x[:, 0]), y)
    np.testing.assert_array_equal(np.asarray(z), np.asarray(logits)[y - 1])  # logits travel with rows
    with pytest.raises(ValueError, match="logits"):
        reservoir_add(buf, xs, ys, ts, jax.random.PRNGKey(1))


# -- A-GEM ------------------------------------------------------------------------------------------


def test_agem_projection_closed_form():
    g_ref = jnp.array([-1.0, 1.0])
    # g . g_ref = -1 < 0, |g_ref|^2 = 2: g - (-1/2) g_ref = [1, 0] + [-0.5, 0.5] = [0.5, 0.5].
    got = agem_project(jnp.array([1.0, 0.0]), g_ref)
    np.testing.assert_allclose(got, [0.5, 0.5], rtol=1e-6)
    assert float(got @ g_ref) == pytest.approx(0.0, abs=1e-7)
    # g . g_ref = 1 > 0: unchanged.
    np.testing.assert_array_equal(agem_project(jnp.array([1.0, 2.0]), g_ref), [1.0, 2.0])
    # Several leaves, dots over the whole tree: g . g_ref = -1 - 3 = -4, |g_ref|^2 = 2, so g + 2 g_ref.
    g = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([[3.0]])}
    r = {"a": jnp.array([-1.0, 0.0]), "b": jnp.array([[-1.0]])}
    got = agem_project(g, r)
    np.testing.assert_allclose(got["a"], [-1.0, 2.0], rtol=1e-6)
    np.testing.assert_allclose(got["b"], [[1.0]], rtol=1e-6)
    # Leafwise projection would differ: leaf "a" alone has g . r = -1, so it would give [0.5, 2].
    # An empty memory (g_ref = 0) leaves g as it is.
    zero = jax.tree.map(jnp.zeros_like, r)
    np.testing.assert_array_equal(agem_project(g, zero)["a"], g["a"])


@pytest.mark.parametrize("sign", [-1.0, 1.0])
def test_agem_projection_of_random_pytrees_against_flat_numpy(sign):
    rng = np.random.default_rng(3)
    r = {"w": rng.normal(size=(4, 3)), "b": rng.normal(size=(3,)), "v": rng.normal(size=(2, 2, 2))}
    noise = {k: 0.1 * rng.normal(size=v.shape) for k, v in r.items()}
    g = {k: sign * r[k] + noise[k] for k in r}  # dot product of the sign given
    flat_g = np.concatenate([g[k].ravel() for k in sorted(g)])
    flat_r = np.concatenate([r[k].ravel() for k in sorted(r)])
    dot = flat_g @ flat_r
    assert np.sign(dot) == sign
    expected = flat_g - min(dot, 0.0) / (flat_r @ flat_r) * flat_r
    as_jax = lambda t: {k: jnp.asarray(v, jnp.float32) for k, v in t.items()}
    got = agem_project(as_jax(g), as_jax(r))
    np.testing.assert_allclose(
        np.concatenate([np.asarray(got[k]).ravel() for k in sorted(got)]), expected, rtol=1e-5, atol=1e-6
    )


def test_agem_memory_fill_and_reference_gradient():
    stream = make_tiny_stream(n_tasks=3, n=48, train_n=[48, 7, 48])
    strategy = AGEM(memory_size=31, sample_size=64)  # 10 slots per task, the 31st unused
    params = linear_params()
    state = strategy.init(params, stream)
    assert state.y.shape == (30,)
    g = jax.tree.map(lambda p: jnp.ones_like(p), params)
    ctx = context(stream, task=1, key=5)
    # Empty memory: the gradient passes unchanged.
    transform_grads, end_task = jax.jit(strategy.transform_grads), jax.jit(strategy.end_task)
    got = transform_grads(state, params, g, None, ctx)
    jax.tree.map(np.testing.assert_array_equal, got, g)
    state, _ = end_task(state, params, context(stream, task=0, key=1))
    state, _ = end_task(state, params, context(stream, task=1, key=2))  # 7 examples only
    valid = np.asarray(state.valid)
    np.testing.assert_array_equal(valid, [True] * 10 + [True] * 7 + [False] * 13)
    np.testing.assert_array_equal(np.asarray(state.task)[valid], [0] * 10 + [1] * 7)
    # Task 0's slots hold 10 distinct examples of task 0; task 1's all 7 of its examples.
    x0_all, _ = examples(stream, 0, np.arange(48))
    rows = np.round(np.asarray(state.x[:10, 0]) * 48).astype(int)  # task 0 is unpermuted
    assert len(set(rows)) == 10
    np.testing.assert_allclose(np.asarray(state.x[:10]), np.asarray(x0_all)[rows], rtol=1e-6)
    x1_all, _ = examples(stream, 1, np.arange(7))
    got_rows = {tuple(np.round(r, 5)) for r in np.asarray(state.x[10:17])}
    assert got_rows == {tuple(np.round(r, 5)) for r in np.asarray(x1_all)}
    # The reference gradient is the plain mean loss over the 17 stored examples (sample_size >= 30).
    xm, ym = np.asarray(state.x)[valid], np.asarray(state.y)[valid]
    g_ref = jax.jit(
        jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(linear(p, xm), ym).mean())
    )(params)
    g = jax.tree.map(lambda r: -r + 0.01, g_ref)  # points against g_ref: projected
    assert tree_dot_np(g, g_ref) < 0
    got = transform_grads(state, params, g, None, ctx)
    expected = agem_project(g, g_ref)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), got, expected)
    assert abs(tree_dot_np(got, g_ref)) < 1e-5
    with pytest.raises(ConfigError, match="at least the number of tasks"):
        AGEM(memory_size=2).init(params, stream)


def test_agem_reference_sample_is_a_subset_of_the_filled_rows():
    stream = make_tiny_stream(n_tasks=2, n=48)
    strategy = AGEM(memory_size=40, sample_size=8)
    params = linear_params()
    state, _ = jax.jit(strategy.end_task)(
        strategy.init(params, stream), params, context(stream, task=0, key=1)
    )
    batch = jax.jit(strategy.reference_batch)(state, context(stream, task=1, key=3))
    np.testing.assert_array_equal(np.asarray(batch.weight), np.ones(8))  # 20 filled rows >= 8
    np.testing.assert_array_equal(np.asarray(batch.task), np.zeros(8))
    rows = np.round(np.asarray(batch.x[:, 0]) * 48).astype(int)
    assert len(set(rows)) == 8 and set(rows) <= set(np.round(np.asarray(state.x[:20, 0]) * 48).astype(int))


# -- Replay -----------------------------------------------------------------------------------------


def engine_batch(stream, task, b, seed=0):
    x, y = examples(stream, task, np.random.default_rng(seed).permutation(48)[:b])
    return Batch(x=jnp.asarray(x), y=jnp.asarray(y, jnp.int32), task=jnp.full((b,), task, jnp.int32))


def test_replay_batch_appends_buffer_rows_weighted_zero_while_empty():
    # Task 0 may not use unit 0 (its labels map to 1, 2): an empty buffer's zero targets would make the
    # replayed rows' loss inf, and inf * 0 is NaN, unless they are replaced by a unit the task may use.
    stream = make_tiny_stream(n_tasks=2).replace(
        class_mask=jnp.array([[False, True, True], [True, True, True]]),
        label_map=jnp.array([[1, 2, 2], [0, 1, 2]], jnp.int32),
    )
    strategy = Replay(buffer_size=16, replay_batch=5)
    params = linear_params()
    state = strategy.init(params, stream)
    own = engine_batch(stream, 0, 8)
    ctx = context(stream, task=0, key=4)
    train_batch = jax.jit(strategy.train_batch)
    batch = train_batch(state, own, ctx)
    assert batch.y.shape == (13,)
    np.testing.assert_array_equal(np.asarray(batch.x[:8]), np.asarray(own.x))
    np.testing.assert_array_equal(np.asarray(batch.weight), [1.0] * 8 + [0.0] * 5)
    loss = task_loss(ctx, params, batch)
    assert np.isfinite(float(loss))
    np.testing.assert_allclose(loss, task_loss(ctx, params, own), rtol=1e-6)
    # after_step stores the 8 new rows, never the replayed ones.
    state, _ = jax.jit(strategy.after_step)(state, params, None, batch, ctx)
    assert int(state.seen) == 8
    np.testing.assert_array_equal(np.asarray(state.x[:8]), np.asarray(own.x))
    batch = train_batch(state, engine_batch(stream, 1, 8, seed=1), context(stream, 1, key=5))
    np.testing.assert_array_equal(np.asarray(batch.weight), np.ones(13))
    np.testing.assert_array_equal(np.asarray(batch.task), [1] * 8 + [0] * 5)
    # replay_batch = 0: as many replayed rows as the engine's batch.
    assert jax.eval_shape(Replay(buffer_size=16).train_batch, state, own, ctx).y.shape == (16,)
    with pytest.raises(ConfigError, match="Replay.buffer_size"):
        Replay(buffer_size=0)


@flax.struct.dataclass
class SpyReplay(continual.Strategy):
    """Test strategy: Replay, counting replayed rows by (current task, their task) and bad rows.

    A replayed row is bad if it is not a training example of its task with that example's label.
    """

    inner: Replay

    def init(self, params, stream):
        t = stream.n_tasks
        return self.inner.init(params, stream), jnp.zeros((t, t), jnp.int32), jnp.zeros((), jnp.int32)

    def train_batch(self, state, batch, ctx):
        return self.inner.train_batch(state[0], batch, ctx)

    def after_step(self, state, params, grads, batch, ctx):
        buf, counts, bad = state
        b = batch.y.shape[0] // 2
        rx, ry, rt, rw = batch.x[b:], batch.y[b:], batch.task[b:], batch.weight[b:]
        counts = counts.at[ctx.task, rt].add((rw > 0).astype(jnp.int32))
        n = ctx.stream.max_train
        pool = jax.vmap(lambda t: ctx.stream.train_examples(jnp.full((n,), t), jnp.arange(n)))(rt)
        dist = jnp.abs(pool[0] - rx[:, None, :]).max(-1)  # [replayed, pool]
        nearest = jnp.argmin(dist, axis=1)
        match = (dist.min(1) < 1e-6) & (jnp.take_along_axis(pool[1], nearest[:, None], 1)[:, 0] == ry)
        bad = bad + ((rw > 0) & ~match).sum().astype(jnp.int32)
        buf, params = self.inner.after_step(buf, params, grads, batch, ctx)
        return (buf, counts, bad), params


def test_replay_in_the_engine_replays_earlier_and_current_tasks_only():
    stream = make_tiny_stream(n_tasks=3)
    learner = Learner(mlp(stream), optax.sgd(0.1), SpyReplay(Replay(buffer_size=24)), TrainConfig(8, 6))
    state = learner.init(stream, [0, 1])
    for t in range(3):
        state, out = learner.run_task(state, stream, t)
        assert np.isfinite(np.asarray(out.loss)).all()
    buf, counts, bad = state.strategy_state
    counts = np.asarray(counts)
    np.testing.assert_array_equal(np.asarray(bad), 0)
    # Task 0 has 7 steps with a filled buffer, 6 rows each; nothing from later tasks ever.
    np.testing.assert_array_equal(counts[:, 0], [[42, 0, 0]] * 2)
    assert (counts[:, 1, 2] == 0).all() and (counts[:, 1, :2].sum(1) == 48).all()
    assert (counts[:, 1, 0] > 0).all() and (counts[:, 2] > 0).all()
    np.testing.assert_array_equal(np.asarray(buf.seen), 3 * 8 * 6)


def test_replay_first_step_equals_naive():
    stream = make_tiny_stream(n_tasks=2)
    config = TrainConfig(steps_per_task=1, batch_size=8)
    opt = optax.sgd(0.1, momentum=0.9)
    states = []
    for strategy in (continual.Naive(), Replay(buffer_size=16)):
        learner = Learner(mlp(stream), opt, strategy, config)
        state, _ = learner.run_task(learner.init(stream, [3]), stream, 0)
        states.append(state)
    for a, b in zip(jax.tree.leaves(states[0].params), jax.tree.leaves(states[1].params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert not np.allclose(jax.tree.leaves(states[0].params)[0], 0.0)
    assert int(states[1].strategy_state.seen[0]) == 8


def test_replay_forgets_less_than_naive():
    stream = make_tiny_stream(n_tasks=2, n=64, m=64, d=8, seed=0)
    config = TrainConfig(steps_per_task=40, batch_size=16)
    model = mlp(stream, hidden=(16,))
    naive = Learner(model, optax.sgd(0.2), continual.Naive(), config).run(stream, seeds=[0, 1, 2])
    replay = Learner(model, optax.sgd(0.2), Replay(buffer_size=64), config).run(stream, seeds=[0, 1, 2])
    # Measured: R[1, 0] about 0.19 for naive and 0.36 for replay, every seed.
    assert (replay.acc_matrix[:, 1, 0] > naive.acc_matrix[:, 1, 0]).all()
    assert replay.acc_matrix[:, 1, 0].mean() > naive.acc_matrix[:, 1, 0].mean() + 0.08


# -- DER++ ------------------------------------------------------------------------------------------


def test_derpp_penalty_is_zero_with_an_empty_buffer():
    stream = make_tiny_stream(n_tasks=2).replace(class_mask=jnp.array([[False, True, True]] * 2))
    strategy = DERPP(buffer_size=8, alpha=0.3, beta=0.7)
    params = linear_params()
    state = strategy.init(params, stream)
    got = jax.jit(strategy.penalty)(state, params, engine_batch(stream, 0, 5), context(stream, key=2))
    assert float(got) == 0.0


def test_derpp_penalty_equals_hand_computed_terms():
    stream = make_tiny_stream(n_tasks=2)
    strategy = DERPP(buffer_size=6, alpha=0.3, beta=0.7)
    penalty = jax.jit(strategy.penalty)
    params = linear_params()
    own = engine_batch(stream, 0, 4)
    ctx = context(stream, key=9)
    # Six copies of one example: both samples are that row whatever the key. Stored logits arbitrary.
    one = engine_batch(stream, 0, 1)
    z = np.array([[0.5, -1.0, 2.0]], np.float32)
    copies = [jnp.repeat(a, 6, axis=0) for a in (one.x, one.y, one.task, jnp.asarray(z))]
    buf = reservoir_add(strategy.init(params, stream), *copies[:3], jax.random.PRNGKey(0), logits=copies[3])
    out = linear_np(params, one.x)
    expected = 0.3 * np.mean((out - z) ** 2) + 0.7 * ce(out, np.asarray(one.y))[0]
    np.testing.assert_allclose(penalty(buf, params, own, ctx), expected, rtol=1e-5)

    # Six distinct examples: the two samples are split(ctx.key)'s draws, each of the batch's size (4).
    b6 = engine_batch(stream, 1, 6, seed=2)
    z6 = jnp.asarray(np.random.default_rng(7).normal(size=(6, 3)), jnp.float32)
    buf = reservoir_add(strategy.init(params, stream), b6.x, b6.y, b6.task, jax.random.PRNGKey(0), logits=z6)
    k1, k2 = jax.random.split(ctx.key)
    x1, _, _, z1, _ = reservoir_sample(buf, k1, 4)
    x2, y2, _, _, _ = reservoir_sample(buf, k2, 4)
    assert not np.array_equal(np.asarray(x1), np.asarray(x2))  # independent samples
    mse = np.mean((linear_np(params, x1) - np.asarray(z1)) ** 2)
    expected = 0.3 * mse + 0.7 * ce(linear_np(params, x2), y2).mean()
    np.testing.assert_allclose(penalty(buf, params, own, ctx), expected, rtol=1e-5)


def test_derpp_stores_the_logits_of_the_updated_model():
    stream = make_tiny_stream(n_tasks=2)
    strategy = DERPP(buffer_size=10)
    params = linear_params(seed=4)
    batch = engine_batch(stream, 0, 6)
    state, _ = jax.jit(strategy.after_step)(
        strategy.init(params, stream), params, None, batch, context(stream)
    )
    np.testing.assert_allclose(state.logits[:6], linear_np(params, batch.x), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(state.logits[6:]), 0.0)
    assert int(state.seen) == 6


# -- every strategy through the engine --------------------------------------------------------------


@pytest.mark.parametrize(
    "strategy, sweep",  # Replay runs a stream in test_replay_in_the_engine_replays_...
    [
        (AGEM(memory_size=30, sample_size=16), None),
        (DERPP(buffer_size=20), {"alpha": [0.0, 1.0]}),
    ],
    ids=["agem", "derpp"],
)
def test_strategy_runs_a_stream(strategy, sweep):
    stream = make_tiny_stream(n_tasks=3)
    learner = Learner(mlp(stream), optax.sgd(0.1), strategy, TrainConfig(steps_per_task=10, batch_size=8))
    result = learner.run(stream, seeds=[0, 1], sweep=sweep)
    assert np.isfinite(result.acc_matrix).all() and np.isfinite(result.train_loss[:, 1:]).all()
    assert (result.diverged_step == -1).all()
    assert result.acc_matrix[:, 0, 0].mean() > 0.4  # learns the first task (chance is 1/3)
    if sweep:
        assert len(result.runs) == 4
        # alpha = 0 and alpha = 1 train differently after the first task (the buffer is filled then).
        assert not np.allclose(result.train_loss[:2, 2:], result.train_loss[2:, 2:])
