"""Gated DeltaNet's write and Sun et al.'s TTT layer, against independent per-token numpy recursions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nestlearn import nn
from nestlearn.nn import AssociativeMemory, TTTLayer, TTTState, ttt_chunked, ttt_initial_state, ttt_scan


def _float64(module):
    """The module with every parameter cast to float64 (call inside ``jax.enable_x64``)."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda p: jnp.asarray(p, jnp.float64), state))


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


# -- Gated DeltaNet ---------------------------------------------------------------------------------------


def _gated_delta_memory(decay, path, d=4, seed=0):
    mem = AssociativeMemory(
        d, heads=1, gate=True, decay=decay, conv=0, chunk=4, path=path, rngs=nnx.Rngs(seed)
    )
    rng = np.random.default_rng(seed)
    mem.w_init[...] = jnp.asarray(0.5 * rng.normal(size=(1, d, d)), jnp.float32)
    # gates far from 1 and from each other, so the two decay forms differ visibly
    mem.gate_proj.kernel[...] = jnp.asarray(rng.normal(size=(d, 1)), jnp.float32)
    mem.gate_proj.bias[...] = jnp.zeros(1)
    mem.lr_proj.kernel[...] = jnp.asarray(rng.normal(size=(d, 1)), jnp.float32)
    return mem


def _projections(mem, x):
    """q, k (L2-normalised), v, beta (the write rate) and alpha (the retention) of one head, in numpy."""
    p = lambda lin: np.asarray(lin.kernel[...], np.float64)  # noqa: E731
    unit = lambda z: z / np.sqrt(np.sum(z * z, -1, keepdims=True) + 1e-6)  # noqa: E731
    q, k, v = unit(x @ p(mem.q)), unit(x @ p(mem.k)), x @ p(mem.v)
    beta = _sigmoid(x @ p(mem.lr_proj) + np.asarray(mem.lr_proj.bias[...], np.float64))[:, 0]
    alpha = _sigmoid(x @ p(mem.gate_proj) + np.asarray(mem.gate_proj.bias[...], np.float64))[:, 0]
    return q, k, v, beta, alpha


def _yang_recursion(s, q, k, v, beta, alpha):
    """Gated DeltaNet as Yang et al. 2024 write it: S <- a (I - b k k^T) S + b k v^T, read o = S^T q."""
    eye = np.eye(len(k[0]))
    outs = []
    for t in range(len(q)):
        kt = k[t][:, None]
        s = alpha[t] * (eye - beta[t] * kt @ kt.T) @ s + beta[t] * kt @ v[t][None]
        outs.append(s.T @ q[t])
    return np.array(outs), s


@pytest.mark.parametrize("path", ["chunk", "token"])
def test_gated_deltanet_matches_yang_recursion_in_float64(path):
    mem = _gated_delta_memory("gated_deltanet", path)  # built in float32, cast below
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):  # flax's norms mix in float32 stats
        mem = _float64(mem)
        x = np.random.default_rng(1).normal(size=(2, 11, 4))  # 11 = two chunks of 4 and a partial one
        y, state, aux = nnx.jit(lambda m, x: m.apply(x))(mem, jnp.asarray(x))
        s0 = np.asarray(mem.w_init[...][0], np.float64)
        for row in range(2):
            q, k, v, beta, alpha = _projections(mem, x[row])
            reads, s_end = _yang_recursion(s0, q, k, v, beta, alpha)
            rms = reads / np.sqrt(np.mean(reads**2, -1, keepdims=True) + 1e-6)
            expected = (rms * np.asarray(mem.norm.scale[...])) @ np.asarray(mem.o.kernel[...])
            np.testing.assert_allclose(y[row], expected, rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(state.memory.weights[0][row, 0], s_end, rtol=1e-9, atol=1e-10)
            assert np.min(alpha) < 0.5 < np.max(alpha)  # the gate really varies
            # surprise: the delta-rule gradient at the decayed state, || k^T (a k S - v) || per token
            s, surprise = s0, []
            for t in range(11):
                surprise.append(np.linalg.norm(k[t]) * np.linalg.norm(alpha[t] * k[t] @ s - v[t]))
                kt = k[t][:, None]
                s = alpha[t] * (np.eye(4) - beta[t] * kt @ kt.T) @ s + beta[t] * kt @ v[t][None]
            np.testing.assert_allclose(aux["surprise"][row, :, 0], surprise, rtol=1e-9)


@pytest.mark.parametrize("path", ["chunk", "token"])
def test_gated_deltanet_and_titans_decay_differ_by_beta_one_minus_alpha_k_kT_M(path):
    # one write from M0: gated  a M0 - b k^T (a k M0 - v);  titans  a M0 - b k^T (k M0 - v)
    # difference = b (1 - a) k^T k M0, and zero along any direction orthogonal to k
    mems = {decay: _gated_delta_memory(decay, path) for decay in ("gated_deltanet", "titans")}
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        x = np.random.default_rng(2).normal(size=(1, 1, 4))
        ends = {}
        for decay in ("gated_deltanet", "titans"):
            mem = _float64(mems[decay])
            end = nnx.jit(lambda m, x: m.apply(x)[1])(mem, jnp.asarray(x))
            ends[decay] = np.asarray(end.memory.weights[0][0, 0])
        m0 = np.asarray(mem.w_init[...][0], np.float64)
        _, k, _, beta, alpha = _projections(mem, x[0])
        expected = beta[0] * (1 - alpha[0]) * np.outer(k[0], k[0] @ m0)
        assert np.max(np.abs(expected)) > 1e-2  # a visible difference
        np.testing.assert_allclose(ends["gated_deltanet"] - ends["titans"], expected, rtol=1e-9, atol=1e-12)


def test_deltanet_gate_options_pick_their_decay():
    decay = lambda **kw: nn.deltanet(vocab=8, d_model=8, rngs=nnx.Rngs(0), **kw).layers[0].mixer  # noqa: E731
    assert decay(gate=True).decay == "gated_deltanet" and decay(gate=True).gate
    assert decay(gate="gated_deltanet").decay == "gated_deltanet"
    assert decay(gate="titans").decay == "titans" and decay(gate="titans").gate
    assert not decay(gate=False).gate
    with pytest.raises(ValueError, match="gate"):
        decay(gate="mamba")
    with pytest.raises(ValueError, match="decay"):
        AssociativeMemory(8, decay="before", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="gated_deltanet"):
        AssociativeMemory(8, decay="gated_deltanet", online=False, rngs=nnx.Rngs(0))


# -- the TTT layer: numpy reference ----------------------------------------------------------------------


def _gelu(z):
    return 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))


def _gelu_grad(z):
    c = np.sqrt(2 / np.pi)
    t = np.tanh(c * (z + 0.044715 * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t**2) * c * (1 + 3 * 0.044715 * z**2)


def _np_ln(z, ln):
    """Layer norm and what its backward needs: (y, x_hat, sigma)."""
    if ln is None:
        return z, None, None
    sigma = np.sqrt(np.var(z) + 1e-6)
    xhat = (z - np.mean(z)) / sigma
    return ln[0] * xhat + ln[1], xhat, sigma


def _np_ln_back(dy, xhat, sigma, ln):
    """d loss / d z from d loss / d y, the layer-norm backward written out."""
    if ln is None:
        return dy
    dx = dy * ln[0]
    return (dx - np.mean(dx) - xhat * np.mean(dx * xhat)) / sigma


def _np_forward(w, ln, x):
    """f(x) = x + LN(f_res(x)) and the intermediates of its backward."""
    if len(w) == 2:
        z = x @ w[0] + w[1]
        h = None
    else:
        z1 = x @ w[0] + w[1]
        h = (z1, _gelu(z1))
        z = h[1] @ w[2] + w[3]
    y, xhat, sigma = _np_ln(z, ln)
    return x + y, (h, xhat, sigma)


def _np_grad(w, ln, k, v):
    """The gradient of 1/2 ||f(k) - v||^2 by hand (chain rule through LN, GELU)."""
    out, (h, xhat, sigma) = _np_forward(w, ln, k)
    dz = _np_ln_back(out - v, xhat, sigma, ln)
    if len(w) == 2:
        return [np.outer(k, dz), dz]
    dz1 = (w[2] @ dz) * _gelu_grad(h[0])
    return [np.outer(k, dz1), dz1, np.outer(h[1], dz), dz]


def _np_ttt(w, g_sum, pos, q, k, v, eta, scale, ln, block):
    """Sun et al.'s mini-batch TTT, token by token: theta_i = theta_0 - s_i sum_{j<=i} eta_j grad_j(theta_0)."""
    base, g_sum = [np.array(a) for a in w], [np.array(a) for a in g_sum]
    s = np.maximum(scale, 0.0)
    outs = []
    for t in range(len(q)):
        grad = _np_grad(base, ln, k[t], v[t])
        g_sum = [a + eta[t] * g for a, g in zip(g_sum, grad)]
        cur = [b - s[pos] * a for b, a in zip(base, g_sum)]
        outs.append(_np_forward(cur, ln, q[t])[0])
        if pos == block - 1:
            base, g_sum, pos = cur, [np.zeros_like(a) for a in g_sum], 0
        else:
            pos += 1
    return np.array(outs), base, g_sum, pos


def _ttt_case(memory, layer_norm, seed=0, t=10, d=4, hidden=6, block=4):
    rng = np.random.default_rng(seed)
    shapes = [(d, d), (d,)] if memory == "linear" else [(d, hidden), (hidden,), (hidden, d), (d,)]
    w = [0.5 * rng.normal(size=s) for s in shapes]
    q, k, v = (rng.normal(size=(t, d)) for _ in range(3))
    eta = 0.3 * rng.uniform(size=t)
    scale = 1.0 / np.arange(1, block + 1) + 0.2 * rng.normal(size=block)
    scale[2] = -0.1  # clipped to 0: that position reads theta_0
    ln = (1 + 0.3 * rng.normal(size=d), 0.3 * rng.normal(size=d)) if layer_norm else None
    return w, q, k, v, eta, scale, ln


CASES = [("linear", True), ("mlp", True), ("linear", False), ("mlp", False)]


@pytest.mark.parametrize("memory,layer_norm", CASES)
@pytest.mark.parametrize("fn", [ttt_chunked, ttt_scan])
def test_ttt_paths_match_numpy_per_token_reference_in_float64(memory, layer_norm, fn):
    # 10 tokens, blocks of 4: two full blocks and a partial one of 2; then a start in the middle of a block
    w, q, k, v, eta, scale, ln = _ttt_case(memory, layer_norm)
    with jax.enable_x64(True):
        j = lambda a: jnp.asarray(a, jnp.float64)  # noqa: E731
        jln = None if ln is None else (j(ln[0]), j(ln[1]))
        state = ttt_initial_state(tuple(j(a) for a in w))
        out, state, aux = fn(4, state, *(j(a) for a in (q, k, v, eta, scale)), jln)
        ref, base, g_sum, pos = _np_ttt(w, [0 * a for a in w], 0, q, k, v, eta, scale, ln, 4)
        np.testing.assert_allclose(out, ref, rtol=1e-10, atol=1e-11)
        for got, want in zip((*state.weights, *state.grad_sum), (*base, *g_sum), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)
        assert int(state.pos) == pos == 2
        # surprise: the norm of each token's gradient at its block-start weights
        bases, b0 = [], [np.array(a) for a in w]
        for t in range(10):
            bases.append(b0)
            if t % 4 == 3:
                b0 = _np_ttt(b0, [0 * a for a in w], 0, q[t - 3 : t + 1], k[t - 3 : t + 1], v[t - 3 : t + 1],
                             eta[t - 3 : t + 1], scale, ln, 4)[1]  # fmt: skip
        norms = [np.sqrt(sum(np.sum(g**2) for g in _np_grad(bases[t], ln, k[t], v[t]))) for t in range(10)]
        np.testing.assert_allclose(aux["surprise"], norms, rtol=1e-9)
        # continue from the carried mid-block state (position 2, a non-zero gradient sum)
        out2, state2, _ = fn(4, state, *(j(a[:5]) for a in (q, k, v, eta)), j(scale), jln)
        ref2, base2, _, pos2 = _np_ttt(base, g_sum, 2, q[:5], k[:5], v[:5], eta[:5], scale, ln, 4)
        np.testing.assert_allclose(out2, ref2, rtol=1e-10, atol=1e-11)
        for got, want in zip(state2.weights, base2, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-11)
        assert int(state2.pos) == pos2 == 3


def test_ttt_block_mean_by_hand():
    # No LN, linear, W0 = 0, c0 = 0, eta = 1, s_i = 1/i: f(x) = x + xW + c, grad_j = (k_j^T r_j, r_j) with
    # r_j = f(k_j) - v_j = k_j - v_j at the zero start. With k_j = 0 the reads are c_i = -(1/i) sum r_j,
    # so o_i = q_i + c_i = q_i + mean_{j<=i}(v_j) for q = 0: the running mean of the values.
    v = jnp.array([[2.0, 0.0], [0.0, 4.0], [1.0, 1.0]])
    zeros = jnp.zeros((3, 2))
    state = ttt_initial_state((jnp.zeros((2, 2)), jnp.zeros(2)))
    scale = 1.0 / jnp.arange(1.0, 4.0)
    for fn in (ttt_chunked, ttt_scan):
        out, _, _ = fn(3, state, zeros, zeros, v, jnp.ones(3), scale, None)
        np.testing.assert_allclose(out, [[2.0, 0.0], [1.0, 2.0], [1.0, 5.0 / 3.0]], rtol=1e-6)


def test_ttt_bad_inputs_name_the_argument():
    state = ttt_initial_state((jnp.zeros((2, 2)), jnp.zeros(2)))
    x = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="scale"):
        ttt_chunked(4, state, x, x, x, jnp.ones(3), jnp.ones(3), None)
    with pytest.raises(ValueError, match="block"):
        ttt_scan(0, state, x, x, x, jnp.ones(3), jnp.ones(0), None)
    with pytest.raises(ValueError, match="lr"):
        ttt_scan(3, state, x, x, x, jnp.ones(2), jnp.ones(3), None)
    with pytest.raises(ValueError, match="memory"):
        TTTLayer(8, memory="conv", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="block"):
        TTTLayer(8, block=0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="path"):
        TTTLayer(8, path="dual", rngs=nnx.Rngs(0))


# -- the TTT layer as a module ---------------------------------------------------------------------------


def _layer(memory, path="chunk"):
    return TTTLayer(8, heads=2, memory=memory, block=4, path=path, rngs=nnx.Rngs(3))


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_ttt_layer_streams_in_any_pieces(memory):
    layer = _layer(memory)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, 13, 8))
    apply = nnx.jit(lambda m, x, state=None: m.apply(x, state))
    whole, end, _ = apply(layer, x)
    cuts = [0, 3, 4, 9, 10, 13]  # pieces of 3, 1, 5, 1, 3 tokens: starts in the middle of blocks
    drawn = [0, *sorted(np.random.default_rng(8).choice(np.arange(1, 13), 4, replace=False).tolist()), 13]
    singles = [(t, t + 1) for t in range(13)]
    for pieces in (list(zip(cuts[:-1], cuts[1:])), list(zip(drawn[:-1], drawn[1:])), singles):
        state, outs = layer.init_state(2), []
        for a, b in pieces:
            y, state, _ = apply(layer, x[:, a:b], state)
            outs.append(y)
        np.testing.assert_allclose(jnp.concatenate(outs, 1), whole, rtol=1e-4, atol=1e-5)
        for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(end), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(end.memory.pos, 1)  # 13 = 3 blocks of 4 and one token


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_ttt_layer_paths_agree_and_every_outer_parameter_learns(memory):
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 10, 8))
    graphdef, params = nnx.split(_layer(memory, "chunk"))
    graph_token = nnx.split(_layer(memory, "token"))[0]

    def loss(p, g):
        return jnp.sum(jnp.sin(nnx.merge(g, p)(x)))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l1, g1 = value_and_grad(params, graphdef)
    l2, g2 = value_and_grad(params, graph_token)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4 * scale)
    # the meta-learned pieces of Sun et al.'s layer all receive gradient: token scale, inner LN, inner init
    for name in ("scale", "ln_scale", "ln_bias"):
        assert float(jnp.max(jnp.abs(g1[name][...]))) > 1e-6, name
    for w in g1["inner"].values():
        assert float(jnp.max(jnp.abs(w[...]))) > 1e-6
    np.testing.assert_allclose(params["scale"][...], [1.0, 1 / 2, 1 / 3, 1 / 4], rtol=1e-6)  # init 1/i


@pytest.mark.parametrize("length", [8, 10])
def test_ttt_telemetry_reports_how_far_the_inner_model_moved(length):
    # 8 tokens: two full blocks, the state sits at a block start; 10: two tokens into the third block, the
    # last read used theta_0 - s_2 * (sum of those two tokens' scaled gradients)
    layer = _layer("mlp")
    x = jax.random.normal(jax.random.PRNGKey(7), (2, length, 8))
    _, end, _ = layer.apply(x)
    _, stats = nnx.jit(lambda m, x: m.telemetry(x))(layer, x)
    s = float(layer.scale[...][1]) if length == 10 else 0.0
    moved = sum(
        np.sum((np.asarray(b) - s * np.asarray(g) - np.asarray(w)[None]) ** 2, axis=tuple(range(2, b.ndim)))
        for b, g, w in zip(end.memory.weights, end.memory.grad_sum, layer._init_weights())
    )
    np.testing.assert_allclose(stats["update_norm"], np.mean(np.sqrt(moved)), rtol=1e-5)
    assert float(stats["update_norm"]) > 1e-3 and int(stats["diverged_at"]) == -1
    assert np.isfinite(float(stats["surprise_mean"]))
    np.testing.assert_array_equal(end.memory.pos, length % 4)


def test_ttt_ablation_flags_remove_their_parameters():
    layer = TTTLayer(8, block=4, layer_norm=False, token_scale=False, rngs=nnx.Rngs(0))
    assert not hasattr(layer, "ln_scale") and not hasattr(layer, "scale")
    np.testing.assert_array_equal(layer.token_scales(), 1.0)


def test_state_size_counts_ttt_weights_twice_and_gated_deltanet_once():
    # d_model 8, 2 heads of 4, conv tail 3 taps x 24 channels = 72 per layer, 2 layers.
    # TTT-linear per head: W 16 + c 4 = 20, block-start weights and gradient sum: 2 x 2 x 20 = 80.
    # TTT-MLP per head (hidden 16): 64 + 16 + 64 + 4 = 148 -> 2 x 2 x 148 = 592.
    # Gated DeltaNet: 2 heads x 16 = 32, no momentum.
    size = lambda build, **kw: nn.state_size(build(vocab=8, d_model=8, rngs=nnx.Rngs(0), **kw), 64)  # noqa: E731
    assert size(nn.ttt_linear) == 2 * (80 + 72)
    assert size(nn.ttt_mlp) == 2 * (592 + 72)
    assert size(nn.deltanet, gate=True) == 2 * (32 + 72)
    assert size(nn.minibatch_delta) == 2 * (32 + 72)


def test_minibatch_delta_is_the_old_ttt_memory():
    model = nn.minibatch_delta(vocab=8, d_model=8, memory="mlp", rngs=nnx.Rngs(0))
    mixer = model.layers[0].mixer
    assert isinstance(mixer, AssociativeMemory)
    assert (mixer.spec.memory, mixer.spec.online, mixer.spec.chunk, mixer.lr) == ("mlp", False, 16, 0.1)
    assert isinstance(nn.ttt_mlp(vocab=8, d_model=8, rngs=nnx.Rngs(0)).layers[0].mixer, TTTLayer)
    assert isinstance(TTTState, type)
