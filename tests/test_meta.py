"""Meta-learning: MAML family against finite differences, explicit reference loops and closed forms."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestlearn.meta import (
    ANIL,
    IMAML,
    MAML,
    MetaSGD,
    MetaSGDParams,
    MetaTrainer,
    Reptile,
    adapt,
    cross_entropy_loss,
    functional,
    meta_train,
    mse_loss,
    plain_path,
)
from nestlearn.nn import MLP
from nestlearn.tasks._meta import TaskBatch

# ---------------------------------------------------------------- helpers


class TanhNet(nnx.Module):
    """1-h-1 tanh network: smooth, so central finite differences of second-order terms are accurate."""

    def __init__(self, h: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(1, h, rngs=rngs)
        self.l2 = nnx.Linear(h, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


# Tests compile many small programs; LLVM's optimisations cost more time than they save here.
FAST = {"xla_backend_optimization_level": 0}


def fjit(f, **kw):
    return jax.jit(f, compiler_options=FAST, **kw)


def model_params(make, seed=0):
    """``functional`` on a model built by ``make(rngs)``; the parameters initialised in one compiled call."""
    apply, _ = functional(nnx.eval_shape(lambda: make(nnx.Rngs(0))))
    params = fjit(lambda: nnx.split(make(nnx.Rngs(seed)), nnx.Param, ...)[1])()
    return apply, params


def sample_sine(key, n_tasks=25, k=10, dtype=jnp.float32):
    """MAML's sinusoid family: amplitude U[0.1, 5], phase U[0, π], x U[-5, 5]; K support, K query."""
    ka, kp, kx = jax.random.split(key, 3)
    amp = jax.random.uniform(ka, (n_tasks, 1, 1), dtype, 0.1, 5.0)
    phase = jax.random.uniform(kp, (n_tasks, 1, 1), dtype, 0.0, math.pi)
    x = jax.random.uniform(kx, (n_tasks, 2 * k, 1), dtype, -5.0, 5.0)
    y = amp * jnp.sin(x - phase)
    return TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])


# The same, compiled once per shape (outside of other compiled functions).
sine_tasks = functools.partial(jax.jit, static_argnums=(1, 2, 3), compiler_options=FAST)(sample_sine)


def flat(tree):
    return jnp.concatenate([jnp.ravel(a) for a in jax.tree.leaves(tree)])


def tanh_setup(dtype=jnp.float32, n_tasks=3, k=5, h=6):
    apply, params = model_params(lambda rngs: TanhNet(h, rngs=rngs), 1)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    return apply, params, sine_tasks(jax.random.key(3), n_tasks, k, dtype)


def reference_meta_loss(loss, alpha, steps, tasks, truncate=None):
    """The obviously-correct MAML objective: a Python loop of explicit SGD steps per task.

    With ``truncate=k``, the first ``steps - k`` steps see stop_gradient'ed parameters and their
    displacement is re-attached as a constant: φ = θ + sg(φ_prefix − θ).
    """

    def meta_loss(theta):
        total = 0.0
        for t in range(tasks.support_x.shape[0]):
            sx, sy, qx, qy = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
            n_sg = 0 if truncate is None else steps - truncate
            phi = jax.lax.stop_gradient(theta) if n_sg > 0 else theta
            for i in range(steps):
                if i == n_sg and n_sg > 0:
                    phi = jax.tree.map(lambda a, b: a + jax.lax.stop_gradient(b - a), theta, phi)
                g = jax.grad(loss)(phi, sx, sy)
                phi = jax.tree.map(lambda p, gi: p - alpha * gi, phi, g)
            if n_sg == steps and steps > 0:
                phi = jax.tree.map(lambda a, b: a + jax.lax.stop_gradient(b - a), theta, phi)
            total = total + loss(phi, qx, qy)
        return total / tasks.support_x.shape[0]

    return meta_loss


def fd_directional(f, theta, v, eps):
    plus = f(jax.tree.map(lambda a, b: a + eps * b, theta, v))
    minus = f(jax.tree.map(lambda a, b: a - eps * b, theta, v))
    return (plus - minus) / (2 * eps)


def random_like(key, tree):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, a.shape, a.dtype) for k, a in zip(keys, leaves)])


# ---------------------------------------------------------------- 1. second-order MAML is exact


def test_maml_second_order_matches_finite_differences_and_reference_loop():
    with jax.enable_x64(True):
        apply, params, tasks = tanh_setup(jnp.float64, n_tasks=2)
        loss = mse_loss(apply)
        alpha, steps = 0.05, 2
        ref = reference_meta_loss(loss, alpha, steps, tasks)
        vs = [random_like(jax.random.key(10 + i), params) for i in range(2)]

        @fjit
        def run(theta):
            grads, metrics = MAML(loss, optax.sgd(alpha), steps=steps).meta_grad(theta, tasks)
            fo, _ = MAML(loss, optax.sgd(alpha), steps=steps, first_order=True).meta_grad(theta, tasks)
            fds = jnp.stack([fd_directional(ref, theta, v, 1e-5) for v in vs])
            return grads, metrics, fo, jax.grad(ref)(theta), ref(theta), fds

        grads, metrics, fo, ref_grads, ref_value, fds = run(params)
        np.testing.assert_allclose(flat(grads), flat(ref_grads), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(metrics["loss_post"], ref_value, rtol=1e-12)
        # Central differences along random directions: truncation error O(eps²) ~ 1e-10 relative.
        for v, fd in zip(vs, fds):
            np.testing.assert_allclose(jnp.vdot(flat(grads), flat(v)), fd, rtol=1e-7)
        # The second-order terms matter here: first-order MAML is measurably different.
        assert float(jnp.max(jnp.abs(flat(fo) - flat(grads)))) > 1e-3


def test_second_order_through_adam_needs_eps_root():
    # A parameter u that starts at 0 under the loss term u² has gradient 0, so Adam's second moment is 0
    # and d sqrt(v)/dv = inf: with eps_root = 0 the meta-gradient is NaN; with eps_root > 0 it is
    # finite and matches central differences.
    # optax's Adam raises a float to its int32 step count, which strict promotion refuses.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        apply, params, tasks = tanh_setup(jnp.float64, n_tasks=2)
        base = mse_loss(apply)
        theta = {"net": params, "u": jnp.zeros((2,), jnp.float64)}

        def loss(p, x, y):
            return base(p["net"], x, y) + jnp.sum(jnp.square(p["u"]))

        good = optax.adam(0.05, eps_root=1e-8)

        def meta_loss(th):
            post = [
                loss(adapt(loss, th, sx, sy, inner_opt=good, steps=2), qx, qy)
                for sx, sy, qx, qy in zip(tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
            ]
            return sum(post) / len(post)

        v = random_like(jax.random.key(20), theta)

        @fjit
        def run(th):
            bad, _ = MAML(loss, optax.adam(0.05), steps=2).meta_grad(th, tasks)
            grads, _ = MAML(loss, good, steps=2).meta_grad(th, tasks)
            return bad, grads, fd_directional(meta_loss, th, v, 1e-6)

        bad, grads, fd = run(theta)
        assert bool(jnp.any(jnp.isnan(flat(bad))))
        assert bool(jnp.all(jnp.isfinite(flat(grads))))
        np.testing.assert_allclose(jnp.vdot(flat(grads), flat(v)), fd, rtol=1e-6)


# ---------------------------------------------------------------- 2-3. closed forms on a quadratic


def quadratic_tasks(key, n_tasks=4, d=3):
    """L_t(θ) = ½ (θ − c)ᵀ A_t (θ − c) with x = A_t (SPD), y = c; support centre c_t, query centre c'_t."""
    ka, kc, kq = jax.random.split(key, 3)
    m = jax.random.normal(ka, (n_tasks, d, d)) / math.sqrt(d)
    a = jnp.einsum("tij,tkj->tik", m, m) + 0.5 * jnp.eye(d)[None]
    c = jax.random.normal(kc, (n_tasks, d))
    cq = jax.random.normal(kq, (n_tasks, d))
    return TaskBatch(a, c, a, cq)


def quad_loss(theta, a, c):
    r = theta - c
    return 0.5 * r @ (a @ r)


def test_first_and_second_order_maml_and_reptile_closed_forms():
    # k SGD steps of size α on L(φ) = ½(φ−c)ᵀA(φ−c):  φ_{i+1} − c = (I − αA)(φ_i − c), so
    #   φ_k = c + (I − αA)^k (θ − c),        ∂φ_k/∂θ = (I − αA)^k  (symmetric).
    # Query loss ½(φ−c')ᵀA(φ−c') has gradient A(φ − c'), hence per task
    #   FOMAML:  A(φ_k − c')
    #   MAML:    ((I − αA)^k)ᵀ A(φ_k − c') = (I − αA)^k A (φ_k − c')
    #   Reptile: θ − φ_k = (I − (I − αA)^k)(θ − c)
    # and each meta-gradient is the mean over tasks.
    tasks = quadratic_tasks(jax.random.key(0))
    theta = jnp.array([0.3, -1.0, 2.0])
    alpha, k = 0.1, 3
    eye = jnp.eye(3)
    fomaml, maml, reptile, phis = [], [], [], []
    for a, c, cq in zip(tasks.support_x, tasks.support_y, tasks.query_y):
        p = jnp.linalg.matrix_power(eye - alpha * a, k)
        phi = c + p @ (theta - c)
        phis.append(phi)
        fomaml.append(a @ (phi - cq))
        maml.append(p @ (a @ (phi - cq)))
        reptile.append(theta - phi)
    kw = dict(inner_opt=optax.sgd(alpha), steps=k)

    @fjit
    def run(th):
        return (
            MAML(quad_loss, first_order=True, **kw).meta_grad(th, tasks),
            MAML(quad_loss, **kw).meta_grad(th, tasks),
            Reptile(quad_loss, **kw).meta_grad(th, tasks),
        )

    (g_fo, _), (g_so, m), (g_rep, _) = run(theta)
    np.testing.assert_allclose(g_fo, jnp.mean(jnp.stack(fomaml), 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_so, jnp.mean(jnp.stack(maml), 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g_rep, jnp.mean(jnp.stack(reptile), 0), rtol=1e-5, atol=1e-6)
    post = jnp.mean(jnp.stack([quad_loss(p, a, cq) for p, a, cq in zip(phis, tasks.query_x, tasks.query_y)]))
    pre = jnp.mean(jnp.stack([quad_loss(theta, a, cq) for a, cq in zip(tasks.query_x, tasks.query_y)]))
    np.testing.assert_allclose(m["loss_post"], post, rtol=1e-5)
    np.testing.assert_allclose(m["loss_pre"], pre, rtol=1e-5)
    # Outer SGD with step ε on the pseudo-gradient is the paper's θ ← θ + ε(mean φ − θ).
    eps = 0.5
    upd, _ = optax.sgd(eps).update(g_rep, optax.sgd(eps).init(theta))
    np.testing.assert_allclose(theta + upd, theta + eps * (jnp.mean(jnp.stack(phis), 0) - theta), rtol=1e-5)


# ---------------------------------------------------------------- 4. Meta-SGD


def test_meta_sgd_log_lr_gradient_closed_form():
    # One step with rates a = exp(ℓ): φ = θ − a ⊙ s, s = A(θ − c). With r = A(φ − c') the query gradient,
    #   ∂L'/∂θ = (I − diag(a) A)ᵀ r,   ∂L'/∂ℓ_j = a_j · r_j · (−s_j).
    tasks = quadratic_tasks(jax.random.key(1), n_tasks=3)
    theta = jnp.array([1.0, 0.5, -0.5])
    log_lr = jnp.log(jnp.array([0.05, 0.1, 0.2]))
    g, _ = fjit(MetaSGD(quad_loss, steps=1).meta_grad)(MetaSGDParams(theta, log_lr), tasks)
    rates = jnp.exp(log_lr)
    gt, gl = [], []
    for a, c, cq in zip(tasks.support_x, tasks.support_y, tasks.query_y):
        s = a @ (theta - c)
        r = a @ (theta - rates * s - cq)
        gt.append((jnp.eye(3) - rates[:, None] * a).T @ r)
        gl.append(rates * r * -s)
    np.testing.assert_allclose(g.params, jnp.mean(jnp.stack(gt), 0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g.log_lr, jnp.mean(jnp.stack(gl), 0), rtol=1e-5, atol=1e-6)


def test_meta_sgd_matches_finite_differences_and_reduces_to_maml():
    with jax.enable_x64(True):
        apply, params, tasks = tanh_setup(jnp.float64, n_tasks=2)
        loss = mse_loss(apply)
        msgd = MetaSGD(loss, steps=2, init_lr=0.03)
        mp0 = msgd.init(params)
        np.testing.assert_allclose(flat(jax.tree.map(jnp.exp, mp0.log_lr)), 0.03, rtol=1e-12)
        # Rates differ per parameter (so the log_lr gradient is not a single shared number).
        mp = MetaSGDParams(
            params,
            jax.tree.map(lambda ll, v: ll + 0.3 * v, mp0.log_lr, random_like(jax.random.key(5), params)),
        )
        v = random_like(jax.random.key(6), params)

        def post(log_lr):
            return msgd.meta_grad(MetaSGDParams(params, log_lr), tasks)[1]["loss_post"]

        @fjit
        def run(mp, mp0):
            g, _ = msgd.meta_grad(mp, tasks)
            g0, _ = msgd.meta_grad(mp0, tasks)
            g_maml, _ = MAML(loss, optax.sgd(0.03), steps=2).meta_grad(mp0.params, tasks)
            return g, fd_directional(post, mp.log_lr, v, 1e-5), g0, g_maml

        g, fd, g0, g_maml = run(mp, mp0)
        np.testing.assert_allclose(jnp.vdot(flat(g.log_lr), flat(v)), fd, rtol=1e-7)
        # With every rate equal to α and inner SGD(1), Meta-SGD's θ-gradient is MAML's with SGD(α).
        np.testing.assert_allclose(flat(g0.params), flat(g_maml), rtol=1e-10, atol=1e-13)


# ---------------------------------------------------------------- 5. ANIL


def test_anil_adapts_the_head_only_and_matches_a_hand_written_head_loop():
    apply, params = model_params(lambda rngs: MLP(1, (8, 8), 1, rngs=rngs), 0)
    loss = mse_loss(apply)
    tasks = sine_tasks(jax.random.key(2), n_tasks=2, k=5)
    alpha, steps = 0.02, 2
    anil = ANIL(loss, optax.sgd(alpha), steps=steps)
    # The default head is the last layer, layers[2] of nn.MLP; a path predicate can name it too.
    paths = [plain_path(kp) for kp, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    start = anil.inner_problem(params).start
    assert [a.shape for a in start] == [(1,), (8, 1)]  # layers[2]: bias, kernel
    by_name = ANIL(loss, optax.sgd(alpha), head=lambda p: p[:2] == ("layers", 2)).inner_problem(params).start
    assert all(a is b for a, b in zip(start, by_name)) and len(by_name) == 2
    assert ("layers", 2, "kernel") in paths
    with pytest.raises(ValueError, match="ANIL head"):
        ANIL(loss, optax.sgd(alpha), head=lambda p: False).init(params)

    # By hand: SGD steps on the head only, then the query loss of (body, adapted head), differentiated
    # with respect to everything.
    def with_head(theta, head):
        out = jax.tree.map(lambda a: a, theta)
        out["layers"][2]["kernel"], out["layers"][2]["bias"] = head
        return out

    def meta_loss(theta):
        total = 0.0
        for t in range(2):
            sx, sy, qx, qy = tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
            head = (theta["layers"][2]["kernel"][...], theta["layers"][2]["bias"][...])
            for _ in range(steps):
                g = jax.grad(lambda h, sx=sx, sy=sy: loss(with_head(theta, h), sx, sy))(head)
                head = jax.tree.map(lambda h, gi: h - alpha * gi, head, g)
            total = total + loss(with_head(theta, head), qx, qy)
        return total / 2

    @fjit
    def run(theta):
        phi = anil.adapt(theta, tasks.support_x[0], tasks.support_y[0])
        return phi, anil.meta_grad(theta, tasks)[0], jax.grad(meta_loss)(theta)

    phi, grads, ref = run(params)
    for i in range(3):
        for name in ("kernel", "bias"):
            moved = np.asarray(phi["layers"][i][name][...] != params["layers"][i][name][...])
            assert moved.all() if i == 2 else not moved.any(), (i, name)
    np.testing.assert_allclose(flat(grads), flat(ref), rtol=1e-4, atol=1e-6)
    # The body is meta-learned through the head's adaptation.
    assert float(jnp.max(jnp.abs(flat(grads["layers"][0])))) > 1e-4


# ---------------------------------------------------------------- 6. iMAML


def test_imaml_conjugate_gradient_matches_implicit_closed_form():
    # Proximal inner problem on the quadratic: min_φ ½(φ−c)ᵀA(φ−c) + λ/2 ‖φ−θ‖²
    #   ⇒ (A + λI) φ* = Ac + λθ,   dφ*/dθ = λ (A + λI)⁻¹ = (I + A/λ)⁻¹,
    # meta-gradient per task: (I + A/λ)⁻¹ A(φ* − c')  (A symmetric), mean over tasks.
    tasks = quadratic_tasks(jax.random.key(4))
    theta = jnp.array([0.2, 0.7, -1.3])
    lam = 2.0
    eye = jnp.eye(3)

    def learner(lam, cg_steps=10):
        # SGD 0.1 contracts φ − φ* by ‖I − 0.1(A + λI)‖ < 0.9 per step; 200 steps reach float32 precision.
        return IMAML(quad_loss, optax.sgd(0.1), steps=200, lam=lam, cg_steps=cg_steps)

    @fjit
    def run(th, lams):
        imaml = learner(lams[1])
        phis = jax.vmap(imaml.adapt, (None, 0, 0))(th, tasks.support_x, tasks.support_y)
        g_one_cg = learner(lams[1], cg_steps=1).meta_grad(th, tasks)[0]
        # λ is a pytree leaf: vmap over values of it.
        gv = jax.vmap(lambda lm: learner(lm).meta_grad(th, tasks)[0])(lams)
        return imaml.meta_grad(th, tasks), phis, g_one_cg, gv

    (g, m), phis, g1, gv = run(theta, jnp.array([0.5, lam]))
    expect, phi_star = [], []
    for a, c, cq in zip(tasks.support_x, tasks.support_y, tasks.query_y):
        phi = jnp.linalg.solve(a + lam * eye, a @ c + lam * theta)
        phi_star.append(phi)
        expect.append(jnp.linalg.solve(eye + a / lam, a @ (phi - cq)))
    np.testing.assert_allclose(phis, jnp.stack(phi_star), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(g, jnp.mean(jnp.stack(expect), 0), rtol=1e-4, atol=1e-5)
    post = jnp.mean(
        jnp.stack([quad_loss(p, a, cq) for p, a, cq in zip(phi_star, tasks.query_x, tasks.query_y)])
    )
    np.testing.assert_allclose(m["loss_post"], post, rtol=1e-5)
    np.testing.assert_allclose(gv[1], g, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(gv[0] - g))) > 1e-3  # λ matters
    # One CG iteration is not yet the solution, so the check above exercised the solver.
    assert float(jnp.max(jnp.abs(g1 - g))) > 1e-3


# ---------------------------------------------------------------- 7. checkpointing and truncation


def test_checkpoint_modes_give_the_same_gradient_and_truncation_matches_reference():
    apply, params, tasks = tanh_setup(jnp.float32, n_tasks=2)
    loss = mse_loss(apply)
    steps = 5
    variants = {
        "plain": {},
        "step": {"checkpoint": "step"},
        "segments": {"checkpoint": "segments"},  # s = ceil(√5) = 3: segments of 3 and 2
        "segments2": {"checkpoint": "segments", "segment_length": 2},  # 2 + 2 + 1
        "segments9": {"checkpoint": "segments", "segment_length": 9},  # longer than the unroll
        "trunc0": {"truncate": 0},
        "first_order": {"first_order": True},
        "trunc2": {"truncate": 2},
        "trunc2_segments": {"truncate": 2, "checkpoint": "segments"},
        "trunc5": {"truncate": 5},
    }

    @fjit
    def run(theta):
        out = {
            k: MAML(loss, optax.sgd(0.05), steps=steps, **kw).meta_grad(theta, tasks)[0]
            for k, kw in variants.items()
        }
        out["ref2"] = jax.grad(reference_meta_loss(loss, 0.05, steps, tasks, truncate=2))(theta)
        out["ref0"] = jax.grad(reference_meta_loss(loss, 0.05, steps, tasks, truncate=0))(theta)
        sx, sy = tasks.support_x[0], tasks.support_y[0]
        phis = [
            adapt(loss, theta, sx, sy, inner_opt=optax.sgd(0.05), steps=steps, **kw)
            for kw in ({}, {"checkpoint": "segments", "segment_length": 2}, {"truncate": 1})
        ]
        return out, phis

    out, phis = run(params)
    out = {k: flat(v) for k, v in out.items()}
    for k in ("step", "segments", "segments2", "segments9", "trunc5"):
        np.testing.assert_allclose(out[k], out["plain"], rtol=1e-5, atol=1e-7, err_msg=k)
    # Truncation: gradients flow through the last k steps only, the prefix counts as the identity.
    np.testing.assert_allclose(out["trunc2"], out["ref2"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["trunc2_segments"], out["ref2"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["trunc0"], out["ref0"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out["first_order"], out["trunc0"], rtol=1e-6, atol=1e-8)
    assert float(jnp.max(jnp.abs(out["trunc2"] - out["plain"]))) > 1e-4
    # The adapted parameters themselves do not depend on checkpointing or truncation.
    for phi in phis[1:]:
        np.testing.assert_allclose(flat(phi), flat(phis[0]), rtol=1e-6)
    sx, sy = tasks.support_x[0], tasks.support_y[0]
    with pytest.raises(ValueError, match="checkpoint"):
        adapt(loss, params, sx, sy, inner_opt=optax.sgd(0.1), steps=2, checkpoint="all")
    with pytest.raises(ValueError, match="steps"):
        adapt(loss, params, sx, sy, inner_opt=optax.sgd(0.1), steps=-1)
    with pytest.raises(ValueError, match="truncate"):
        adapt(loss, params, sx, sy, inner_opt=optax.sgd(0.1), steps=2, truncate=-1)


def test_checkpointing_reduces_compiled_temporary_memory():
    apply, params = model_params(lambda rngs: MLP(16, (64, 64), 4, rngs=rngs), 0)
    loss = mse_loss(apply)
    x = jax.random.normal(jax.random.key(0), (2, 64, 16))
    y = jax.random.normal(jax.random.key(1), (2, 64, 4))
    tasks = TaskBatch(x, y, x, y)
    temp = {}
    for ck in (None, "step", "segments"):
        f = fjit(lambda p, ck=ck: MAML(loss, optax.sgd(0.01), steps=50, checkpoint=ck).meta_grad(p, tasks)[0])
        temp[ck] = f.lower(params).compile().memory_analysis().temp_size_in_bytes
    # None stores 50 steps of activations and carries; "step" 50 carries; "segments" about 2·√50 carries.
    assert temp["step"] < temp[None], temp
    assert temp["segments"] < temp["step"], temp
    assert temp["segments"] <= temp[None] / 3, temp


# ---------------------------------------------------------------- 8. the shared suite


def _learners(loss):
    return {
        "maml_segments": MAML(loss, optax.sgd(0.01), steps=3, checkpoint="segments"),
        "fomaml": MAML(loss, optax.sgd(0.01), steps=2, first_order=True),
        "metasgd": MetaSGD(loss, steps=2, init_lr=0.01),
        "anil": ANIL(loss, optax.sgd(0.01), steps=2),
        "reptile": Reptile(loss, optax.sgd(0.01), steps=3),
        "imaml": IMAML(loss, optax.sgd(0.01), steps=3, lam=1.0, cg_steps=3),
    }


@pytest.mark.parametrize("name", list(_learners(None)))
def test_suite_finite_shapes_jit_vmap_and_evaluate(name):
    apply, params = model_params(lambda rngs: MLP(1, (8, 8), 1, rngs=rngs), 0)
    params2 = model_params(lambda rngs: MLP(1, (8, 8), 1, rngs=rngs), 1)[1]
    learner = _learners(mse_loss(apply))[name]
    tasks = sine_tasks(jax.random.key(7), n_tasks=4, k=5)
    mp, mp2 = learner.init(params), learner.init(params2)
    both = jax.tree.map(lambda a, b: jnp.stack([a, b]), mp, mp2)

    @fjit
    def run(mp, mp2, both):
        grads, metrics = learner.meta_grad(mp, tasks)
        curve = learner.evaluate(mp, tasks, 4)
        per_task = jax.vmap(
            lambda t: learner.loss_fn(
                learner.adapt(mp, t.support_x, t.support_y, steps=4), t.query_x, t.query_y
            )
        )(tasks)
        # Seeds as a leading axis under vmap.
        gv, _ = jax.vmap(learner.meta_grad, in_axes=(0, None))(both, tasks)
        return grads, metrics, curve, per_task, gv

    grads, metrics, curve, per_task, gv = run(mp, mp2, both)
    # Finite, same structure, shapes and dtypes as the meta-parameters.
    assert jax.tree.structure(grads) == jax.tree.structure(mp)
    for g, p in zip(jax.tree.leaves(grads), jax.tree.leaves(mp)):
        assert g.shape == p.shape and g.dtype == p.dtype
        assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.max(jnp.abs(flat(grads)))) > 0
    # The curve of evaluate starts at the pre-adaptation loss, hits loss_post after `steps`, and its
    # last point is the mean over tasks of adapt() followed by the query loss.
    assert curve.shape == (5,)
    np.testing.assert_allclose(curve[0], metrics["loss_pre"], rtol=1e-5)
    np.testing.assert_allclose(curve[learner.steps], metrics["loss_post"], rtol=1e-5)
    np.testing.assert_allclose(curve[4], jnp.mean(per_task), rtol=1e-5)
    assert float(curve[4]) < float(curve[0])  # adaptation on the support set helps on the query set
    # vmap over two seeds' parameters: seed 0 equals the unbatched call, seed 1 is its own.
    np.testing.assert_allclose(flat(jax.tree.map(lambda a: a[0], gv)), flat(grads), rtol=1e-4, atol=1e-6)
    g1 = flat(jax.tree.map(lambda a: a[1], gv))
    assert bool(jnp.all(jnp.isfinite(g1))) and float(jnp.max(jnp.abs(g1 - flat(grads)))) > 1e-4


@jax.numpy_dtype_promotion("standard")  # optax's Adam: float ** int32 step count
def test_meta_trainer_chunks_resume_exactly_and_seeds_share_one_program():
    apply, params = model_params(lambda rngs: MLP(1, (8,), 1, rngs=rngs), 0)
    params2 = model_params(lambda rngs: MLP(1, (8,), 1, rngs=rngs), 1)[1]
    maml = MAML(mse_loss(apply), optax.sgd(0.01), steps=1)

    def sample(key):
        return sample_sine(key, 4, 5)

    key, key2 = jax.random.key(0), jax.random.key(1)
    three = MetaTrainer(maml, optax.adam(1e-2), sample, n_iters=3, compiler_options=FAST)
    s, m1 = three.run(three.init(maml.init(params)), key)
    s, m2 = three.run(s, key)
    assert three._run._cache_size() == 1  # the second chunk reused the compiled program
    assert int(s.step) == 6 and int(s.diverged_step) == -1
    # Six iterations in one chunk equal two chunks of three (tasks come from fold_in(key, step)).
    p6, _, m6 = meta_train(
        maml, params, optax.adam(1e-2), sample, key, 6, compiler_options=FAST, loss_pre=True
    )
    np.testing.assert_allclose(flat(s.meta_params), flat(p6), rtol=1e-6)
    np.testing.assert_allclose(
        jnp.concatenate([m1["loss_post"], m2["loss_post"]]), m6["loss_post"], rtol=1e-6
    )
    assert float(jnp.max(jnp.abs(flat(p6) - flat(params)))) > 1e-3  # params were trained (and not donated)
    # The first iteration's metrics equal a direct meta_grad on the same task batch.
    g, m = fjit(maml.meta_grad)(params, sine_tasks(jax.random.fold_in(key, 0), 4, 5))
    np.testing.assert_allclose(m6["loss_pre"][0], m["loss_pre"], rtol=1e-6)
    np.testing.assert_allclose(m6["grad_norm"][0], optax.tree.norm(g), rtol=1e-5)
    # Two seeds in one program: each equals its own run.
    states = jax.vmap(three.init)(jax.tree.map(lambda a, b: jnp.stack([a, b]), params, params2))
    keys = jnp.stack([key, key2])
    states, ms = three.run_seeds(states, keys)
    states, ms = three.run_seeds(states, keys)
    assert three._run_seeds._cache_size() == 1
    assert ms["loss_post"].shape == (2, 3)
    s2 = three.run(three.run(three.init(params2), key2)[0], key2)[0]
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda a: a[0], states.meta_params)), flat(s.meta_params), rtol=1e-5
    )
    np.testing.assert_allclose(
        flat(jax.tree.map(lambda a: a[1], states.meta_params)), flat(s2.meta_params), rtol=1e-5
    )


@jax.numpy_dtype_promotion("standard")  # optax's Adam: float ** int32 step count
def test_maml_on_sinusoids_beats_the_untrained_initialisation():
    # MAML's sinusoid setup (1-40-40-1 ReLU, K=10, one SGD step α=0.01, Adam 1e-3, 25 tasks per batch),
    # shortened to 400 meta-iterations: the post-adaptation query MSE on held-out tasks must fall.
    apply, params = model_params(lambda rngs: MLP(1, (40, 40), 1, rngs=rngs), 0)
    maml = MAML(mse_loss(apply), optax.sgd(0.01), steps=1)
    trainer = MetaTrainer(
        maml, optax.adam(1e-3), lambda k: sample_sine(k, 25, 10), n_iters=200, compiler_options=FAST
    )
    state = trainer.init(maml.init(params))
    test_tasks = sine_tasks(jax.random.key(123), 100, 10)
    evaluate = fjit(maml.evaluate, static_argnums=2)
    before = evaluate(state.meta_params, test_tasks, 10)
    state, m1 = trainer.run(state, jax.random.key(0))
    state, m2 = trainer.run(state, jax.random.key(0))
    after = evaluate(state.meta_params, test_tasks, 10)
    assert float(after[1]) < 0.6 * float(before[1]), (before, after)
    assert float(after[1]) < float(after[0])  # one inner step now helps
    assert float(jnp.mean(m2["loss_post"][-50:])) < float(jnp.mean(m1["loss_post"][:50]))


def test_cross_entropy_loss_and_errors():
    logits_params = jnp.array([[2.0, 0.0, -1.0]])
    loss = cross_entropy_loss(lambda p, x: x @ p)
    x = jnp.ones((2, 1))
    y = jnp.array([0, 2], jnp.int32)
    lse = math.log(math.exp(2.0) + 1.0 + math.exp(-1.0))
    np.testing.assert_allclose(loss(logits_params, x, y), ((lse - 2.0) + (lse + 1.0)) / 2, rtol=1e-6)
    with pytest.raises(ValueError, match="shape"):
        mse_loss(lambda p, x: x)(None, jnp.ones((3, 1)), jnp.ones((3,)))
    with pytest.raises(ValueError, match="n_iters"):
        MetaTrainer(MAML(loss, optax.sgd(0.1)), optax.sgd(0.1), lambda k: None, n_iters=0)
