"""The optimizers of Nested Learning as the paper writes them: M3 (Algorithm 1 and the Adam-EMA variant),
deep momentum (dot-product objective, Muon output), delta momentum with a preconditioner, and learning rates
split from the directions (schedules). References: hand recursions in numpy and optax's own optimizers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nestlearn import optim

A, B, C = 3.4445, -4.7750, 2.0315  # Muon's quintic Newton–Schulz coefficients


def ns_diag(d, steps=5):
    """NS of diag(d) by hand: Frobenius-normalise, then p(s) = A s + B s³ + C s⁵ on each singular value.

    For a diagonal X, X Xᵀ = diag(s²), so every Newton–Schulz step acts entry by entry (odd in s, so the
    signs stay); the optax iteration multiplies matrices, this one does not.
    """
    s = np.asarray(d, np.float64) / (np.linalg.norm(d) + 1e-8)
    for _ in range(steps):
        s = A * s + B * s**3 + C * s**5
    return s


def run(tx, grads, params):
    s = tx.init(params)
    out = []
    for g in grads:
        u, s = tx.update(g, s, params)
        out.append(u)
    return out, s


DIAG = [np.array(v) for v in ([1.0, 0.5], [2.0, -1.0], [0.5, 0.25], [-1.0, 3.0], [1.5, 1.0], [0.2, -0.4])]


# -- M3 --------------------------------------------------------------------------------------------


def test_m3_paper_hand_trajectory_vector_leaf():
    # 1-D leaf (no Newton–Schulz): β1 = β2 = β3 = 0.5, α = 1, f = 2, ε = 0, η = 0.1; g = 1, 2, 3.
    #   t=0: M1 = .5, V = .5, O2 = 0: u = -.1 · .5/√.5 = -0.0707107; acc = 1 (chunk not over)
    #   t=1: M1 = 1.5, V = 2.5: u = -.1 · 1.5/√2.5 = -0.0948683; chunk over: M2 = .5 · 3 = 1.5 = O2, acc = 0
    #   t=2: M1 = 3, V = 7: u = -.1 (3 + 1.5)/√7 = -0.1700840 (O2 from the finished chunk, held)
    tx = optim.m3(0.1, b1=0.5, b2=0.5, b3=0.5, alpha=1.0, slow_period=2, eps=0.0)
    us, s = run(tx, [jnp.full(1, v) for v in (1.0, 2.0, 3.0)], jnp.zeros(1))
    np.testing.assert_allclose([float(u[0]) for u in us], [-0.0707107, -0.0948683, -0.1700840], rtol=1e-6)
    np.testing.assert_allclose(s[0].mu_slow, [1.5])
    np.testing.assert_allclose(s[0].acc, [3.0])  # t=2 is the first step of the second chunk


def m3_paper_numpy(grads, lr, b1, b2, b3, alpha, f, eps):
    """Algorithm 1 on diagonal gradients, with NS by the scalar polynomial; returns the diagonals of u."""
    m1, v, m2, acc, o2, out = 0.0, 0.0, 0.0, 0.0, np.zeros(2), []
    for t, g in enumerate(grads):
        m1, v = m1 + b1 * g, v + b2 * g * g
        out.append(-lr * (ns_diag(m1) + alpha * o2) / (np.sqrt(v) + eps))
        acc = acc + g
        if (t + 1) % f == 0:
            m2, acc = m2 + b3 * acc, 0.0
            o2 = ns_diag(m2)
    return np.array(out)


def test_m3_paper_matrix_leaf_matches_numpy_algorithm_1():
    # A 2×2 leaf with diagonal gradients: every state stays diagonal and NS is the scalar polynomial, so
    # the whole trajectory (O2 refreshed at t = 2, 5 and held in between) is checkable entry by entry.
    hp = dict(b1=0.9, b2=0.5, b3=0.7, alpha=0.5, slow_period=3, eps=1e-3)
    tx = optim.m3(0.05, **hp)
    us, s = run(tx, [jnp.diag(jnp.asarray(d, jnp.float32)) for d in DIAG], jnp.zeros((2, 2)))
    want = m3_paper_numpy(DIAG, 0.05, 0.9, 0.5, 0.7, 0.5, 3, 1e-3)
    got = np.array([np.diag(np.asarray(u)) for u in us])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    assert max(float(jnp.max(jnp.abs(u - jnp.diag(jnp.diag(u))))) for u in us) < 1e-6
    # The held O2 is NS(M2) after two chunks: M2 = 0.7 (g0 + ... + g5).
    np.testing.assert_allclose(np.diag(s[0].o_slow), ns_diag(0.7 * np.sum(DIAG, 0)), rtol=2e-5, atol=1e-6)


def test_m3_paper_slow_term_is_held_within_a_chunk():
    # α = 1, β1 = 0 (O1 = 0, NS(0) = 0) and β2 = 0 with ε = 1: u = -η O2. First chunk: O2 = 0; then the
    # held NS(β3 · chunk sum) whatever the gradients inside the next chunk are.
    tx = optim.m3(1.0, b1=0.0, b2=0.0, b3=1.0, alpha=1.0, slow_period=2, eps=1.0)
    us, _ = run(tx, [jnp.diag(jnp.asarray(d, jnp.float32)) for d in DIAG[:4]], jnp.zeros((2, 2)))
    held = -ns_diag(DIAG[0] + DIAG[1])
    got = np.array([np.diag(np.asarray(u)) for u in us])
    # float32 against the float64 NS, as in the test above (rounding differs with XLA's backend level)
    np.testing.assert_allclose(got, [[0, 0], [0, 0], held, held], rtol=2e-5, atol=1e-6)
    np.testing.assert_array_equal(got[3], got[2])  # held: the very same O2, not a recomputation


def m3_adam_numpy(grads, lr, b1, b2, b3, alpha, f, eps):
    m1, v, m2, acc, out = 0.0, 0.0, 0.0, 0.0, []
    for t, g in enumerate(grads):
        m1, v, acc = b1 * m1 + (1 - b1) * g, b2 * v + (1 - b2) * g * g, acc + g
        if (t + 1) % f == 0:
            m2, acc = m2 + (1 - b3) * (acc / f - m2), 0.0
        den = np.sqrt(v / (1 - b2 ** (t + 1))) + eps
        out.append(-lr * (ns_diag(m1 / (1 - b1 ** (t + 1)) / den) + alpha * ns_diag(m2 / den)))
    return np.array(out)


def test_m3_adam_ema_matrix_leaf_matches_numpy():
    # The Adam-EMA variant: bias-corrected EMAs, chunk-mean slow EMA, normalised before NS, the slow term
    # re-orthogonalised every step (the first chunk's NS(M2 = 0) is 0 up to NS's ε).
    tx = optim.m3(0.05, b1=0.9, b2=0.5, b3=0.7, alpha=0.5, slow_period=3, eps=1e-3, variant="adam_ema")
    us, _ = run(tx, [jnp.diag(jnp.asarray(d, jnp.float32)) for d in DIAG], jnp.zeros((2, 2)))
    want = m3_adam_numpy(DIAG, 0.05, 0.9, 0.5, 0.7, 0.5, 3, 1e-3)
    got = np.array([np.diag(np.asarray(u)) for u in us])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-6)
    # The two variants are different rules.
    assert not np.allclose(want, m3_paper_numpy(DIAG, 0.05, 0.9, 0.5, 0.7, 0.5, 3, 1e-3), atol=1e-3)


def test_m3_bad_variant_is_named():
    with pytest.raises(ValueError, match="variant must be one of .* got 'adam'"):
        optim.m3(0.1, variant="adam")


# -- deep momentum ------------------------------------------------------------------------------------


def tree_grads(n, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "w": jnp.asarray(rng.normal(size=(5, 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(size=3), jnp.float32),
        }
        for _ in range(n)
    ]


def max_err(xs, ys):
    return max(
        float(jnp.max(jnp.abs(a - b)))
        for x, y in zip(xs, ys)
        for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y))
    )


def test_deep_momentum_linear_dot_is_heavy_ball():
    # Linear (key-less) memory, dot objective: m <- α m + η_m g with η_m = 1 is optax.trace; the update
    # -η m is optax.sgd(η, momentum=α), leaf for leaf, step for step.
    p = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    grads = tree_grads(8)
    ours, _ = run(optim.deep_momentum(0.1, memory_lr=1.0, decay=0.9, memory="linear"), grads, p)
    ref, _ = run(optax.sgd(0.1, momentum=0.9), grads, p)
    assert max_err(ours, ref) < 1e-6


def test_deep_momentum_mlp_dot_hand_trajectory():
    # hidden = 1 (a0 = 1), one coordinate: f(g) = m + b tanh(a g); ℓ = -f(g) g; α = 0.5, η_m = 1, η = 0.1.
    #   ∂ℓ/∂m = -g, ∂ℓ/∂b = -tanh(a g) g, ∂ℓ/∂a = -b (1 - tanh²(a g)) g²; φ <- α φ - η_m ∂ℓ/∂φ;
    #   u = -η f_new(g). g = 0.5, then -1.0 (a uses the old b).
    m, a, b, want = 0.0, 1.0, 0.0, []
    for g in (0.5, -1.0):
        th = np.tanh(a * g)
        m, a, b = 0.5 * m + g, 0.5 * a + b * (1 - th**2) * g**2, 0.5 * b + th * g
        want.append(-0.1 * (m + b * np.tanh(a * g)))
    tx = optim.deep_momentum(0.1, memory_lr=1.0, decay=0.5, hidden=1)
    us, s = run(tx, [jnp.full(1, g) for g in (0.5, -1.0)], jnp.zeros(1))
    np.testing.assert_allclose([float(u[0]) for u in us], want, rtol=1e-6)
    mem = s[0].memory
    np.testing.assert_allclose(
        [float(mem["m"][0]), float(mem["a"][0, 0]), float(mem["b"][0, 0])], [m, a, b], rtol=1e-6
    )


def last_update(tx, g, n):
    """The n-th update under a constant gradient g (a jitted scan)."""

    def body(s, _):
        u, s = tx.update(g, s)
        return s, u

    return jax.jit(lambda: jax.lax.scan(body, tx.init(g), None, length=n)[1][-1])()


def test_deep_momentum_constant_gradient_dot_stores_history_reconstruct_settles_at_sgd():
    # Under a constant g: heavy ball's step tends to -η g/(1-α) (here 4× SGD's); the dot-objective MLP
    # memory steps at least that far; the reconstruction memory settles at plain SGD's -η g.
    g = jnp.array([0.3, -0.2, 0.1])
    lin = last_update(optim.deep_momentum(0.1, 1.0, 0.75, memory="linear"), g, 200)
    np.testing.assert_allclose(lin, -0.1 * g / 0.25, rtol=1e-5)
    mlp = last_update(optim.deep_momentum(0.1, 1.0, 0.75), g, 200)
    assert bool(jnp.all(jnp.abs(mlp) >= jnp.abs(lin) * (1 - 1e-6)))
    for memory in ("mlp", "linear"):
        rec = last_update(optim.deep_momentum(0.1, 0.5, 1.0, objective="reconstruct", memory=memory), g, 200)
        np.testing.assert_allclose(rec, -0.1 * g, rtol=1e-4)


def test_deep_momentum_muon_output_equals_optax_muon():
    # Linear memory, dot objective, α = β, η_m = 1 - β, NS on the output: m is Muon's EMA without its
    # bias correction, which NS's Frobenius normalisation removes (up to its 1e-8); a (5, 3) leaf has
    # Muon's width factor √max(1, 3/5) = 1. optax.contrib.muon with nesterov=False.
    grads = [g["w"] for g in tree_grads(6, seed=1)]
    p = jnp.zeros((5, 3))
    ours, _ = run(optim.deep_momentum(0.02, 0.05, 0.95, memory="linear", orthogonalize_output=True), grads, p)
    with jax.numpy_dtype_promotion("standard"):  # optax's bias correction raises a float to an int32 power
        ref, _ = run(optax.contrib.muon(0.02, beta=0.95, nesterov=False), grads, p)
    assert max_err(ours, ref) < 1e-6
    # Muon's direction is not the heavy-ball one: the test compares a non-trivial map.
    hb, _ = run(optax.sgd(0.02, momentum=0.95), grads, p)
    assert max_err(ours, hb) > 1e-3


def test_deep_momentum_bad_options_are_named():
    with pytest.raises(ValueError, match="objective must be one of .* got 'l2'"):
        optim.deep_momentum(0.1, objective="l2")
    with pytest.raises(ValueError, match="memory must be one of .* got 'deep'"):
        optim.deep_momentum(0.1, memory="deep")
    with pytest.raises(ValueError, match="hidden"):
        optim.deep_momentum(0.1, hidden=0)


# -- delta momentum with a preconditioner -------------------------------------------------------------


def delta_numpy(grads, lr, alpha, beta, precond):
    m, v, out = np.zeros_like(grads[0]), np.zeros_like(grads[0]), []
    for t, g in enumerate(grads):
        k = g / np.sqrt(g @ g + 1e-12)
        if precond == "adam":
            v = 0.999 * v + 0.001 * g * g
            pg = g / (np.sqrt(v / (1 - 0.999 ** (t + 1))) + 1e-8)
        else:
            pg = precond(g)
        m = alpha * m - beta * (m @ k) * k + pg
        out.append(-lr * m)
    return np.array(out)


def test_delta_momentum_adam_preconditioner_hand_recursion():
    # P g = g / (√v̂ + ε), Adam's bias-corrected second moment; the erasure key is the raw gradient.
    # First step by hand: v̂ = g², P g = sign(g) (up to ε): u1 = -η sign(g1).
    rng = np.random.default_rng(3)
    grads = [rng.normal(size=4) for _ in range(5)]
    tx = optim.delta_momentum(0.1, 0.8, 0.5, precondition="adam")
    us, _ = run(tx, [jnp.asarray(g, jnp.float32) for g in grads], jnp.zeros(4))
    np.testing.assert_allclose(us[0], -0.1 * np.sign(grads[0]), rtol=1e-6)
    want = delta_numpy(grads, 0.1, 0.8, 0.5, "adam")
    np.testing.assert_allclose(np.array(us), want, rtol=1e-5, atol=1e-6)
    # A callable preconditioner: a fixed diagonal.
    diag = np.array([1.0, 0.5, 2.0, 0.25])
    tx = optim.delta_momentum(0.1, 0.8, 0.5, precondition=lambda g: g * jnp.asarray(diag, g.dtype))
    us, _ = run(tx, [jnp.asarray(g, jnp.float32) for g in grads], jnp.zeros(4))
    np.testing.assert_allclose(
        np.array(us), delta_numpy(grads, 0.1, 0.8, 0.5, lambda g: diag * g), rtol=1e-5, atol=1e-6
    )
    with pytest.raises(ValueError, match="precondition must be one of .* got 'shampoo'"):
        optim.delta_momentum(0.1, precondition="shampoo")


# -- learning rates split from the directions ---------------------------------------------------------


SCHEDULE = optax.linear_schedule(0.1, 0.0, transition_steps=8, transition_begin=3)  # 0.1 until step 3


@pytest.mark.parametrize(
    "factory",
    [
        lambda lr: optim.m3(lr, slow_period=2),
        lambda lr: optim.m3(lr, slow_period=2, variant="adam_ema"),
        lambda lr: optim.deep_momentum(lr),
        lambda lr: optim.deep_momentum(lr, memory="linear", orthogonalize_output=True),
        lambda lr: optim.delta_momentum(lr, precondition="adam"),
    ],
    ids=["m3", "m3_adam_ema", "deep_momentum", "deep_muon", "delta_momentum"],
)
def test_schedule_matches_constant_rate_step_by_step(factory):
    # The direction does not depend on the rate, so with a schedule η_t every update is the constant-rate
    # update times η_t / 0.1: equal while η_t = 0.1 (steps 0-3), scaled after, zero at the end.
    grads = tree_grads(12, seed=2)
    p = {"w": jnp.zeros((5, 3)), "b": jnp.zeros(3)}
    const, _ = run(factory(0.1), grads, p)
    sched, _ = run(factory(SCHEDULE), grads, p)
    for t, (a, b) in enumerate(zip(sched, const)):
        r = float(SCHEDULE(t)) / 0.1
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_allclose(x, r * y, rtol=1e-5, atol=1e-7)
    assert float(SCHEDULE(3)) == pytest.approx(0.1) and float(SCHEDULE(11)) == 0.0


def test_delta_gradient_descent_schedule_is_the_rate_of_each_step():
    # DGD's rate enters η' = η/(1 + η‖x‖²) nonlinearly; a schedule is read at the step count.
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    p = {"k": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    g = {"k": jnp.asarray(rng.normal(size=(4, 2)), jnp.float32)}
    tx = optim.delta_gradient_descent(SCHEDULE)
    s = tx.init(p)
    for t in range(6):
        u, s = tx.update(g, s, p, inputs={"k": x})
        want, _ = optim.delta_gradient_descent(float(SCHEDULE(t))).update(g, tx.init(p), p, inputs={"k": x})
        np.testing.assert_allclose(u["k"], want["k"], rtol=1e-6, atol=1e-7)


# -- the orthogonal-regression experiment's DGD learner and tuning pieces -------------------------------


def _orth():
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "experiments" / "orthogonal_regression.py"
    spec = importlib.util.spec_from_file_location("orthogonal_regression_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


def test_orthogonal_regression_dgd_learner_is_delta_gradient_step():
    # The experiment's DGD runs (engine, vmapped over rate x seed) against a Python loop of the paper's
    # per-batch rule, optim.delta_gradient_step, on both kernels with the batch's δ = ŷ - y.
    orth = _orth()
    steps, lr = 2, 0.05
    curve, runs = orth.train_dgd([0], [lr, 0.2], steps)
    assert curve.shape == (2, orth.K * steps, orth.K) and [r["lr"] for r in runs] == [lr, 0.2]
    key = jax.random.key(0)

    @jax.jit
    def hand(a, b, s):
        x, y = orth.data(key, s, steps)
        delta = x @ (a + b) - y
        a, b = optim.delta_gradient_step(a, x, delta, lr), optim.delta_gradient_step(b, x, delta, lr)
        return a, b, orth.test_losses((a + b).T, key)

    a = b = jnp.zeros((orth.D, orth.M))
    want = []
    for s in range(orth.K * steps):
        a, b, t = hand(a, b, jnp.int32(s))
        want.append(t)
    np.testing.assert_allclose(curve[0], np.array(want), rtol=1e-4, atol=1e-6)
    assert not np.allclose(curve[0], curve[1])


def test_orthogonal_regression_scores_and_config():
    orth = _orth()
    # Two evaluations per task (n = 2), K = 4: ends are every second row; forgetting by hand.
    curve = np.arange(1.0, 1 + 8 * 4).reshape(1, 8, 4)
    sc = orth.scores(curve, 2)
    ends = curve[0, 1::2]
    np.testing.assert_allclose(sc["final_loss"], [ends[-1].mean()])
    np.testing.assert_allclose(sc["forgetting"], [np.mean([ends[-1, j] - ends[j, j] for j in range(3)])])
    with pytest.raises(orth.ConfigError, match="tune_seed"):
        orth.Config(seeds=(0, 100)).validate()
    with pytest.raises(orth.ConfigError, match="lr_grid"):
        orth.Config(lr_grid=(1.0, -0.1)).validate()
