"""Levels: MAML, FOMAML, Reptile, Lookahead, N-level consolidation and the CMS rule as configurations of
levels, each checked number for number against its direct implementation on the same data."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nestlearn._errors import ConfigError
from nestlearn.levels import Level, Nested, NestedTrainer, Stream, Tasks
from nestlearn.meta import ANIL, MAML, Reptile, adapt
from nestlearn.optim import LevelParams, consolidation, period_schedule
from nestlearn.tasks import TaskBatch

FAST_COMPILE = {"xla_backend_optimization_level": 0}
H = 6  # hidden units of the tiny tanh network


def jit(f):
    return jax.jit(f, compiler_options=FAST_COMPILE)


def apply(p, x):
    """1-H-1 tanh network (biases as [1, H] rows: rank promotion raises in the tests)."""
    return jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def loss_fn(p, x, y):
    return jnp.mean((apply(p, x) - y) ** 2)


def init_params(seed=0):
    r = np.random.default_rng(seed)
    return {
        "w1": jnp.asarray(r.normal(size=(1, H)), jnp.float32),
        "b1": jnp.asarray(r.normal(size=(1, H)) * 0.1, jnp.float32),
        "w2": jnp.asarray(r.normal(size=(H, 1)) / np.sqrt(H), jnp.float32),
        "b2": jnp.zeros((1, 1), jnp.float32),
    }


def sine_tasks(n_iters=3, n_tasks=3, k=5, seed=1):
    """``[n_iters, n_tasks, k, 1]`` sinusoid tasks (amplitude, phase per task; support and query points)."""
    r = np.random.default_rng(seed)
    amp = r.uniform(0.5, 2.0, (n_iters, n_tasks, 1, 1))
    phase = r.uniform(0, np.pi, (n_iters, n_tasks, 1, 1))
    xs, xq = (r.uniform(-3, 3, (n_iters, n_tasks, k, 1)) for _ in range(2))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return TaskBatch(f32(xs), f32(amp * np.sin(xs + phase)), f32(xq), f32(amp * np.sin(xq + phase)))


def stream(n, batch=4, seed=2):
    """``n`` regression batches ``(x [n, batch, 1], y [n, batch, 1])`` from a fixed target net."""
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.uniform(-2, 2, (n, batch, 1)), jnp.float32)
    return x, jax.vmap(apply, in_axes=(None, 0))(init_params(seed=7), x)


def close(a, b, rtol=2e-5, atol=2e-6):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=rtol, atol=atol)


# ---------------------------------------------------------------- MAML, first-order MAML, Reptile


def head(path):
    return path[0] in ("w2", "b2")


@pytest.mark.parametrize("mode", ["unroll", "first_order", "consolidate", "anil"])
def test_maml_fomaml_reptile_anil_equal_direct_meta_learners(mode):
    """Two levels on tasks equal meta.MAML (second order, first order) / Reptile / ANIL + outer optimizer.

    Level 0: all parameters (ANIL: the head only), SGD(α), period 1, restarted from level 1 at every task
    (k = 2 steps); level 1: all parameters, period k, learns by ``mode`` (ANIL: "unroll", the body gets
    its gradient through the head's unroll). Reference: the meta-learner's meta_grad fed to the same
    outer optax optimizer, 3 meta-iterations of 3 tasks each, under one scan. (Second- and first-order
    MAML's results differ by ~0.1 here, far above the tolerance, so the modes are told apart.)
    """
    alpha, k = 0.1, 2
    tasks = sine_tasks()
    params = init_params()
    fast = Level("task", optax.sgd(alpha))
    if mode == "anil":
        learner = ANIL(loss_fn, optax.sgd(alpha), steps=k, head=head)
        outer = optax.sgd(0.2)
        fast = Level("task", optax.sgd(alpha), owns=head)
        slow = Level("init", outer, period=k, learns_by="unroll")
    elif mode == "consolidate":  # Reptile: θ ← θ + ε (mean φ − θ) = outer SGD(ε) on the mean of θ − φ
        eps = 0.3
        learner = Reptile(loss_fn, optax.sgd(alpha), steps=k)
        outer = optax.sgd(eps)
        slow = Level("init", period=k, learns_by="consolidate", rate=eps)
    else:
        learner = MAML(loss_fn, optax.sgd(alpha), steps=k, first_order=mode == "first_order")
        outer = optax.adam(0.05)
        slow = Level("init", outer, period=k, learns_by=mode)
    prog = Nested((fast, slow), loss_fn, Tasks())

    def reference(theta, tasks):
        def body(carry, batch):
            theta, opt_state = carry
            grads, metrics = learner.meta_grad(theta, batch)
            updates, opt_state = outer.update(grads, opt_state, theta)
            # Level 0's last update, per task: α ‖∇L(φ_{k−1}; support)‖ with φ_{k−1} from meta.adapt.
            phi = jax.vmap(
                lambda sx, sy: adapt(loss_fn, theta, sx, sy, inner_opt=optax.sgd(alpha), steps=k - 1)
            )(batch.support_x, batch.support_y)
            g = jax.vmap(jax.grad(loss_fn))(phi, batch.support_x, batch.support_y)
            fast_norm = jnp.mean(alpha * jax.vmap(optax.tree.norm)(g))
            out = (metrics["loss_post"], optax.tree.norm(updates), fast_norm)
            return (optax.apply_updates(theta, updates), opt_state), out

        return jax.lax.scan(body, (theta, outer.init(theta)), tasks)

    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes weak and strong types
        (theta_ref, _), (post_ref, norm_ref, fast_ref) = jit(reference)(params, tasks)
        state, tele = jit(prog.run)(prog.init(params), tasks)

    close(prog.params(state), theta_ref)
    close(tele.outer_loss, post_ref)  # the query loss after adaptation (MAML's loss_post)
    close(tele.update_norm[:, 1], norm_ref)  # ‖θ_{i+1} − θ_i‖
    if mode != "anil":  # (the reference's fast update moves every parameter, ANIL's the head only)
        close(tele.update_norm[:, 0], fast_ref)
    # Level 0 updates k times per task-episode, level 1 once: after meta-iteration i, (k(i+1), i+1).
    np.testing.assert_array_equal(tele.num_updates, [[2, 1], [4, 2], [6, 3]])
    # The fast level restarts from the new initialisation after every meta-update.
    close(prog.fast_params(state), theta_ref)


# ---------------------------------------------------------------- Lookahead and N-level consolidation


@pytest.mark.parametrize("reset_state", [False, True])
def test_lookahead_equals_optax_lookahead_vmapped_over_rates(reset_state):
    """Fast SGD-momentum level + a slow level consolidating every 3 steps = optax.lookahead, per rate.

    The consolidation rate is a pytree leaf of the level, so two rates run as one vmapped program; each
    equals its own optax.lookahead trajectory (grads at the fast weights, 12 steps = 4 syncs).
    """
    inner = optax.sgd(0.05, momentum=0.9)
    k, n = 3, 12
    data = stream(n)
    params = init_params()
    rates = jnp.asarray([0.5, 0.8], jnp.float32)

    def ours(rate):
        prog = Nested(
            (
                Level("fast", inner),
                Level("slow", period=k, learns_by="consolidate", rate=rate, reset_state=reset_state),
            ),
            loss_fn,
            Stream(),
        )
        state, tele = prog.run(prog.init(params), data)
        return prog.params(state), prog.fast_params(state), tele

    def reference(rate):
        la = optax.lookahead(inner, k, rate, reset_state=reset_state)

        def body(carry, batch):
            p, s = carry
            loss, g = jax.value_and_grad(loss_fn)(p.fast, *batch)
            u, s = la.update(g, s, p)
            new = optax.apply_updates(p, u)
            return (new, s), (loss, optax.tree.norm(jax.tree.map(jnp.subtract, new.slow, p.slow)))

        p0 = optax.LookaheadParams.init_synced(params)
        (p, _), (losses, slow_moves) = jax.lax.scan(body, (p0, la.init(p0)), data)
        return p.slow, p.fast, losses, slow_moves

    slow, fast, tele = jit(jax.vmap(ours))(rates)
    with jax.numpy_dtype_promotion("standard"):  # optax.lookahead multiplies bool by float
        slow_ref, fast_ref, losses, moves = jit(jax.vmap(reference))(rates)
    close(slow, slow_ref)
    close(fast, fast_ref)
    # Telemetry: mean loss of each top step's 3 clock steps; the slow level's update is its move.
    close(tele.loss, losses.reshape(2, n // k, k).mean(-1))
    close(tele.update_norm[..., 1], moves[:, k - 1 :: k])
    np.testing.assert_array_equal(tele.num_updates[0], [[3, 1], [6, 2], [9, 3], [12, 4]])
    # The rates differ, so the two runs must differ (the vmapped leaf is really used).
    assert not np.allclose(slow["w1"][0], slow["w1"][1])


@pytest.mark.parametrize("reset", [True, False])
def test_three_levels_equal_n_level_consolidation(reset):
    """Levels (1, 2, 4) consolidating at rates (0.5, 0.3) = optim.consolidation(sgd, [2, 4], [0.5, 0.3]),
    with and without restarting the faster levels."""
    inner = optax.sgd(0.1)
    data = stream(8)
    params = init_params()
    prog = Nested(
        (
            Level("l0", inner),
            Level("l1", period=2, learns_by="consolidate", rate=0.5, reset_faster=reset),
            Level("l2", period=4, learns_by="consolidate", rate=0.3, reset_faster=reset),
        ),
        loss_fn,
        Stream(),
    )
    tx = consolidation(inner, [2, 4], [0.5, 0.3], reset_faster=reset)

    def reference():
        def body(carry, batch):
            p, s = carry
            u, s = tx.update(jax.grad(loss_fn)(p.fastest, *batch), s, p)
            return (optax.apply_updates(p, u), s), None

        p0 = LevelParams.init_synced(params, 3)
        return jax.lax.scan(body, (p0, tx.init(p0)), data)[0][0]

    state, tele = jit(prog.run)(prog.init(params), data)
    ref = jit(reference)()
    for level in range(3):
        close(prog.params(state, level), ref.levels[level])
    np.testing.assert_array_equal(tele.num_updates, [[4, 2, 1], [8, 4, 2]])
    if not reset:  # without restarts the three copies drift apart
        assert not np.allclose(ref.levels[0]["w1"], ref.levels[2]["w1"])


# ---------------------------------------------------------------- the CMS rule


def test_cms_levels_equal_period_schedule():
    """Gradient levels over disjoint groups, periods (1, 2, 4), each applying the SUM of its period's
    gradients with its own optimizer = optim.period_schedule on the same 16-batch stream."""
    data = stream(16)
    params = init_params()
    groups = {"w2": "fast", "b2": "fast", "w1": "mid", "b1": "slow"}
    txs = {"fast": optax.sgd(0.1), "mid": optax.sgd(0.05, momentum=0.9), "slow": optax.adam(0.02)}
    periods = {"fast": 1, "mid": 2, "slow": 4}
    levels = tuple(
        Level(name, txs[name], period=periods[name], owns=lambda path, name=name: groups[path[0]] == name)
        for name in ("fast", "mid", "slow")
    )
    prog = Nested(levels, loss_fn, Stream())
    tx = period_schedule(txs, periods, {k: v for k, v in groups.items()})

    def reference():
        def body(carry, batch):
            p, s = carry
            u, s = tx.update(jax.grad(loss_fn)(p, *batch), s, p)
            norms = [optax.tree.norm([u[key] for key in sorted(groups) if groups[key] == g]) for g in periods]
            return (optax.apply_updates(p, u), s), jnp.stack(norms)

        return jax.lax.scan(body, (params, tx.init(params)), data)

    with jax.numpy_dtype_promotion("standard"):
        state, tele = jit(prog.run)(prog.init(params), data)
        (p_ref, _), norms = jit(reference)()
    close(prog.params(state), p_ref)
    close(prog.fast_params(state), p_ref)  # one owner per parameter: fast and slow views agree
    # At the last clock step of every top step (t = 4i + 3) all three groups update: same norms.
    close(tele.update_norm, norms[3::4])
    assert np.all(np.asarray(norms[3::4]) > 0)
    np.testing.assert_array_equal(tele.num_updates, [[4, 2, 1], [8, 4, 2], [12, 6, 3], [16, 8, 4]])
    # Off-period steps leave a group alone: the slow group's reference norm is zero at t = 0, 1, 2.
    np.testing.assert_array_equal(np.asarray(norms[:3, 2]), 0.0)


# ---------------------------------------------------------------- validation


def test_level_validation_errors_name_the_level_and_field():
    sgd = optax.sgd(0.1)
    with pytest.raises(ValueError, match=r"level 'slow': learns_by must be one of .*'backprop'"):
        Level("slow", sgd, learns_by="backprop")
    with pytest.raises(ValueError, match=r"level 'slow': period must be an int >= 1, got 0"):
        Level("slow", sgd, period=0)
    with pytest.raises(ValueError, match=r"level 'slow': period must be an int >= 1, got -2"):
        Level("slow", sgd, period=-2)
    with pytest.raises(ValueError, match=r"level 'slow': learns_by='unroll' needs an optimizer"):
        Level("slow", learns_by="unroll")
    with pytest.raises(ValueError, match=r"level 'slow': learns_by='consolidate' takes exactly one"):
        Level("slow", sgd, learns_by="consolidate", rate=0.5)
    with pytest.raises(ValueError, match=r"level 'fast': rate is the interpolation rate"):
        Level("fast", sgd, rate=0.5)
    fast = Level("fast", sgd)
    params = init_params()
    with pytest.raises(ValueError, match=r"level 'slow': learns_by='consolidate' needs a rate"):
        Nested((fast, Level("slow", period=2, learns_by="consolidate")), loss_fn).init(params)
    with pytest.raises(ValueError, match=r"level 'slow': period 3 must be a multiple of the period 2"):
        Nested((Level("fast", sgd, period=2), Level("slow", sgd, period=3, owns=lambda p: False)), loss_fn)
    with pytest.raises(ValueError, match=r"level 'init': learns_by='unroll' needs an outer .*Tasks"):
        Nested((fast, Level("init", sgd, period=2, learns_by="unroll")), loss_fn, Stream())
    with pytest.raises(ValueError, match=r"level 'fast': the fastest level .* got 'consolidate'"):
        Nested((Level("fast", learns_by="consolidate", rate=0.5),), loss_fn)
    with pytest.raises(ValueError, match=r"level names must be unique"):
        Nested((fast, Level("fast", sgd, period=2)), loss_fn)
    # Ownership, checked against the parameters' paths.
    with pytest.raises(ValueError, match=r"level 'slow': learns_by='gradient' but owns .*'fast' also owns"):
        Nested((fast, Level("slow", sgd, period=2)), loss_fn).init(params)
    head = lambda path: path[0] in ("w2", "b2")  # noqa: E731
    with pytest.raises(ValueError, match=r"parameters owned by no level: \[\('b1',\), \('w1',\)\]"):
        Nested((Level("fast", sgd, owns=head),), loss_fn).init(params)
    with pytest.raises(
        ValueError, match=r"level 'slow': learns_by='consolidate' .* no faster level owns \[\('b1',\)"
    ):
        Nested(
            (
                Level("fast", sgd, owns=lambda p: p[0] != "b1"),
                Level("slow", period=2, learns_by="consolidate", rate=0.5),
            ),
            loss_fn,
        ).init(params)
    with pytest.raises(
        ValueError, match=r"level 'slow': learns_by='first_order' learns from the level below, but"
    ):
        Nested(
            (
                Level("fast", sgd, owns=head),
                Level("slow", sgd, period=2, learns_by="first_order", owns=lambda p: not head(p)),
            ),
            loss_fn,
            Tasks(),
        ).init(params)
    with pytest.raises(ValueError, match=r"level 'slow': owns selects no parameter"):
        Nested((fast, Level("slow", sgd, period=2, owns=lambda p: False)), loss_fn).init(params)
    prog = Nested((fast, Level("slow", period=4, learns_by="consolidate", rate=0.5)), loss_fn)
    with pytest.raises(ValueError, match=r"data has 6 clock steps, not a multiple of the slowest period 4"):
        prog.run(prog.init(params), stream(6))


def test_hand_derived_lookahead_and_rate_is_traced_without_recompiling():
    """Scalar loss (p − 1)², fast SGD(0.25), slow consolidates every 2 steps at rate α.

    Fast step: p ← p − 0.25 · 2 (p − 1) = p + (1 − p)/2. From 0: fast 0 → .5 → .75, slow → α · .75;
    fast restarts there. α = .5: slow .375, fast .375 → .6875 → .84375, slow .375 + .5 (.84375 − .375)
    = .609375. α = .7: slow .525, fast → .7625 → .88125, slow .525 + .7 (.88125 − .525) = .774375.
    The rate is a pytree leaf, so a new rate reuses the compiled program.
    """
    loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)  # noqa: E731
    sgd = optax.sgd(0.25)

    def prog(rate):
        return Nested((Level("fast", sgd), Level("slow", period=2, learns_by="consolidate", rate=rate)), loss)

    traces = []

    @jit
    def run(program, state, data):
        traces.append(1)
        return program.run(state, data)

    data = (jnp.ones(4), jnp.ones(4))
    state = prog(0.5).init(jnp.zeros(()))
    for rate, slow_ref in ((0.5, 0.609375), (0.7, 0.774375)):
        out, tele = run(prog(jnp.float32(rate)), state, data)
        np.testing.assert_allclose(float(prog(rate).params(out)), slow_ref, rtol=1e-6)
        np.testing.assert_allclose(
            tele.update_norm[:, 1], [rate * 0.75, abs(slow_ref - rate * 0.75)], rtol=1e-6
        )
    assert len(traces) == 1


# ---------------------------------------------------------------- on the engine: NestedTrainer


def test_trainer_equals_nested_run_per_seed_and_rate():
    """NestedTrainer (2 seeds x 2 rates, 2 chunks of 2 top-level steps, one program) = Nested.run per run.

    Lookahead levels (fast SGD-momentum, slow consolidating every 3 clock steps); run r starts from
    init_params(seed) and trains on the same fixed stream of 12 batches. Every run's slowest and fastest
    parameters and per-step telemetry equal a separate Nested.run with that seed's parameters and rate.
    """
    k, n = 3, 12
    data = stream(n)
    inner = optax.sgd(0.05, momentum=0.9)

    def program(rate):
        return Nested(
            (Level("fast", inner), Level("slow", period=k, learns_by="consolidate", rate=rate)), loss_fn
        )

    def init(key):
        return jax.tree.map(lambda p: p + 0.1 * jax.random.normal(key, p.shape), init_params())

    def sample(key, i):  # top-level step i: clock steps 3i .. 3i + 2 of the fixed stream
        return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, i * k, k), data)

    trainer = NestedTrainer(program(0.5), init, sample, steps=n // k, chunk=2, compiler_options=FAST_COMPILE)
    res = trainer.run([0, 1], sweep={"slow.rate": [0.5, 0.8]}, progress=False)
    assert [(r["slow.rate"], r["seed"]) for r in res["runs"]] == [(0.5, 0), (0.5, 1), (0.8, 0), (0.8, 1)]
    assert trainer.n_traces == 1  # two chunks, one program
    fast = jax.jit(jax.vmap(lambda s: program(0.5).fast_params(s.nested)))(res["state"])
    for r, run in enumerate(res["runs"]):
        prog = program(run["slow.rate"])
        state, tele = jit(prog.run)(prog.init(init(jax.random.key(run["seed"]))), data)
        close(jax.tree.map(lambda a, r=r: a[r], res["params"]), prog.params(state))
        close(jax.tree.map(lambda a, r=r: a[r], fast), prog.fast_params(state))
        close(res["loss"][r], tele.loss)
        close(res["level_update_norm"][r], tele.update_norm)
        np.testing.assert_array_equal(res["num_updates"][r], tele.num_updates)
    assert not np.allclose(res["params"]["w1"][0], res["params"]["w1"][2])  # the rate is really swept
    np.testing.assert_array_equal(res["diverged_step"], -1)


def test_trainer_diverged_run_is_frozen_and_nan():
    """Loss (p - 1)^2 from p = 0, fast SGD(η) on two clock steps per top-level step, slow at rate 0.5.

    η = 0.25 (hand-derived as in the Nested docstring): slow .375 after one top-level step, then .609375.
    η = 1e20: clock step 0 has loss 1 and sends p to 2e20, whose loss overflows float32 at clock step 1,
    so top-level step 0 diverges: diverged_step 0, its loss inf and every later metric NaN, the state
    frozen at the start (0).
    The swept learning rate is set in the fast level's inject_hyperparams state.
    """
    loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)  # noqa: E731
    prog = Nested(
        (
            Level("fast", optax.inject_hyperparams(optax.sgd)(learning_rate=0.25)),
            Level("slow", period=2, learns_by="consolidate", rate=0.5),
        ),
        loss,
    )
    ones = (jnp.ones(2), jnp.ones(2))
    trainer = NestedTrainer(
        prog,
        lambda key: jnp.zeros(()),
        lambda key, i: ones,
        steps=2,
        chunk=1,
        evaluate=lambda p, key: {"distance": jnp.abs(p - 1.0)},
        compiler_options=FAST_COMPILE,
    )
    res = trainer.run([0], sweep={"fast.learning_rate": [0.25, 1e20]}, progress=False)
    np.testing.assert_array_equal(res["diverged_step"], [-1, 0])
    np.testing.assert_allclose(res["params"], [0.609375, 0.0], rtol=1e-6)
    np.testing.assert_allclose(res["eval"]["distance"][0], [0.625, 0.390625], rtol=1e-6)
    # Clock losses (0 - 1)^2 = 1, (.5 - 1)^2 = .25; then (.375 - 1)^2 = .390625, (.6875 - 1)^2 = .09765625:
    # means .625 and .244140625.
    np.testing.assert_allclose(res["loss"][0], [0.625, 0.244140625], rtol=1e-6)
    # The diverging step reports its own loss (inf); every later metric is NaN (the engine's policy).
    assert np.isinf(res["loss"][1, 0]) and np.isnan(res["loss"][1, 1])
    assert np.isnan(res["eval"]["distance"][1, 1]) and np.isnan(res["level_update_norm"][1, 1]).all()
    np.testing.assert_array_equal(res["num_updates"][0], [[2, 1], [4, 2]])


def test_trainer_runs_maml_tasks_like_nested_run():
    """Tasks schedule (first-order MAML levels) on the trainer = Nested.run on the same 3 task batches."""
    tasks = sine_tasks()
    prog = Nested(
        (Level("task", optax.sgd(0.1)), Level("init", optax.adam(0.05), period=2, learns_by="first_order")),
        loss_fn,
        Tasks(),
    )
    trainer = NestedTrainer(
        prog,
        lambda key: init_params(),
        lambda key, i: jax.tree.map(lambda a: a[i], tasks),
        steps=3,
        compiler_options=FAST_COMPILE,
    )
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes weak and strong types
        res = trainer.run([0], progress=False)
        state, tele = jit(prog.run)(prog.init(init_params()), tasks)
    close(jax.tree.map(lambda a: a[0], res["params"]), prog.params(state))
    close(res["outer_loss"][0], tele.outer_loss)
    close(res["level_update_norm"][0], tele.update_norm)


def test_trainer_sweep_errors_name_the_field():
    prog = Nested(
        (Level("fast", optax.sgd(0.1)), Level("slow", period=2, learns_by="consolidate", rate=0.5)), loss_fn
    )
    trainer = NestedTrainer(prog, lambda key: init_params(), lambda key, i: stream(2), steps=1)
    with pytest.raises(ConfigError, match=r"sweep 'fast.rate': level 'fast' does not consolidate at a rate"):
        trainer.run([0], sweep={"fast.rate": [0.1]}, progress=False)
    with pytest.raises(
        ConfigError,
        match=r"sweep 'fast.learning_rate': level 'fast': optimizer has no hyperparameter 'learning_rate'",
    ):
        trainer.run([0], sweep={"fast.learning_rate": [0.1]}, progress=False)
    with pytest.raises(ConfigError, match=r"sweep 'mid.rate': name a level"):
        trainer.run([0], sweep={"mid.rate": [0.1]}, progress=False)
    with pytest.raises(ConfigError, match=r"chunk must be a positive int dividing steps=3"):
        NestedTrainer(prog, lambda key: init_params(), lambda key, i: stream(2), steps=3, chunk=2)


def test_trainer_sharded_over_a_mesh_equals_unsharded():
    """The runs sharded over the four fake CPU devices (a one-axis mesh) give the same numbers."""
    from nestlearn.engine import run_mesh

    loss = lambda p, x, y: jnp.mean((x * p - y) ** 2)  # noqa: E731
    prog = Nested(
        (Level("fast", optax.sgd(0.25)), Level("slow", period=2, learns_by="consolidate", rate=0.5)), loss
    )
    trainer = NestedTrainer(
        prog,
        lambda key: jax.random.normal(key, ()),
        lambda key, i: (jnp.ones(2), jnp.ones(2)),
        steps=2,
        compiler_options=FAST_COMPILE,
    )
    plain = trainer.run([0, 1], sweep={"slow.rate": [0.5, 0.7]}, progress=False)
    sharded = trainer.run([0, 1], sweep={"slow.rate": [0.5, 0.7]}, mesh=run_mesh(4), progress=False)
    assert len(sharded["state"].step.sharding.device_set) == 4
    np.testing.assert_array_equal(sharded["params"], plain["params"])
    np.testing.assert_array_equal(sharded["loss"], plain["loss"])
