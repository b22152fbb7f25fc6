"""Self-modifying Titans against a per-token numpy derivation written from the equations (float64).

The reference below shares no code with the library: it projects the input, generates keys, values,
rates and gates from the generating memories at the chunk-start weights, lets every memory write its own
target, and applies the update token by token, GD or DGD:

  GD:   W <- alpha W - eta grad
  DGD:  W <- (alpha I - eta x^T x) W - eta grad      (row convention x @ W, x the layer's input)

with every gradient of 0.5 |f(k) - target|^2 taken at the chunk-start weights (Nested Learning, Eqs. 83-90).
Both library paths (chunkwise and per-token) must match it, for GD and DGD, with the main memory writing
v or its own read of v, over two full chunks and a partial one.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nestlearn.nn import MemorySpec, SelfModifyingMemory, initial_state, memory_chunked, memory_scan

D, HIDDEN, CHUNK, T, BATCH, LR = 4, 6, 4, 11, 2, 0.5
NAMES = ("k", "v", "lr", "gate", "memory")


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _silu(z):
    return z * _sigmoid(z)


def _silu_prime(z):  # d/dz z sigma(z) = sigma(z) + z sigma(z) (1 - sigma(z))
    s = _sigmoid(z)
    return s + z * s * (1.0 - s)


def _unit(z):  # the library's L2 normalisation, with its epsilon 1e-6 under the root
    return z / np.sqrt(np.sum(z * z, axis=-1, keepdims=True) + 1e-6)


def _f(w, x):  # residual two-layer memory f(x) = x + silu(x W1) W2
    return x + _silu(x @ w[0]) @ w[1]


def _write(w, base, k, target, eta, alpha, inner):
    """One token's update of a two-layer memory, gradient of 0.5 |f(k) - target|^2 at ``base``."""
    z = k @ base[0]
    h = _silu(z)
    r = k + h @ base[1] - target  # d loss / d output
    g2 = np.outer(h, r)
    g1 = np.outer(k, (base[1] @ r) * _silu_prime(z))
    w1 = alpha * w[0] - eta * g1
    w2 = alpha * w[1] - eta * g2
    if inner == "dgd":  # the decay along each layer's own input at the chunk start
        w1 = w1 - eta * np.outer(k, k @ w[0])
        w2 = w2 - eta * np.outer(h, h @ w[1])
    return (w1, w2)


def _reference(layer, x, inner, main_target):
    """Outputs ``[B, T, d]`` and the final weights of every memory ``{name: (W1, W2)}`` per batch row."""
    f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
    proj = {n: f64(layer.proj[n].kernel[...]) for n in ("q", "k", "v", "lr", "gate")}
    inits = {n: f64(layer.inits[n][...]) for n in NAMES}  # [2, heads=1, d, hidden], W2 stored transposed
    lr_read, lr_bias = f64(layer.lr_read[...])[0], f64(layer.lr_bias[...])[0]
    gate_read, gate_bias = f64(layer.gate_read[...])[0], f64(layer.gate_bias[...])[0]
    scale, out_kernel = f64(layer.norm.scale[...]), f64(layer.o.kernel[...])
    ys, finals = [], []
    for xb in f64(x):
        p = {n: _unit(xb @ proj[n]) for n in proj}
        w = {n: (inits[n][0, 0], inits[n][1, 0].T) for n in NAMES}
        outs = []
        for t in range(len(xb)):
            if t % CHUNK == 0:
                base = dict(w)  # the weights that open the chunk
            k = _unit(_f(base["k"], p["k"][t]))
            v = _f(base["v"], p["v"][t])
            eta = LR * _sigmoid(_f(base["lr"], p["lr"][t]) @ lr_read + lr_bias)
            alpha = _sigmoid(_f(base["gate"], p["gate"][t]) @ gate_read + gate_bias)
            for n in NAMES:
                target = v if (n == "memory" and main_target == "v") else _f(base[n], v)
                w[n] = _write(w[n], base[n], k, target, eta, alpha, inner)
            outs.append(_f(w["memory"], p["q"][t]))
        o = np.array(outs)
        o = o / np.sqrt(np.mean(o * o, axis=-1, keepdims=True) + 1e-6) * scale  # RMSNorm
        ys.append(o @ out_kernel)
        finals.append(w)
    return np.array(ys), finals


def _layer(path, inner, main_target):
    layer = SelfModifyingMemory(
        D, heads=1, hidden=HIDDEN, chunk=CHUNK, lr=LR, conv=0, path=path, inner=inner,
        main_target=main_target, rngs=nnx.Rngs(0),
    )  # fmt: skip
    # larger second layers and a gate near 0.75 make every term of the update visible in the outputs
    keys = jax.random.split(jax.random.PRNGKey(3), len(NAMES))
    for key, n in zip(keys, NAMES):
        w = layer.inits[n][...]
        layer.inits[n][...] = w.at[1].set(0.5 * jax.random.normal(key, w[1].shape))
    layer.gate_bias[...] = jnp.ones((1,))
    layer.lr_read[...] = jnp.full((1, D), 0.5)
    return layer


X = jax.random.normal(jax.random.PRNGKey(11), (BATCH, T, D))


@pytest.mark.parametrize(
    "path,inner,main_target", list(itertools.product(["chunk", "token"], ["gd", "dgd"], ["self", "v"]))
)
def test_both_paths_match_the_per_token_numpy_derivation(path, inner, main_target):
    layer = _layer(path, inner, main_target)
    ref_y, ref_w = _reference(layer, X, inner, main_target)
    y, state, _ = jax.jit(lambda x: layer.apply(x))(X)
    np.testing.assert_allclose(y, ref_y, rtol=1e-4, atol=1e-5)
    for n in NAMES:
        for layer_index in range(2):
            got = np.asarray(state.memory[n].weights[layer_index])[:, 0]  # [batch, ...], the one head
            want = np.array([w[n][layer_index] for w in ref_w])
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(state.memory[n].pos) == T % CHUNK)


def test_the_reference_tells_the_variants_apart():
    # the comparisons above could not pass by accident: each switch moves the outputs far beyond 1e-5
    layer = _layer("chunk", "dgd", "self")
    y = {(i, m): _reference(layer, X, i, m)[0] for i in ("gd", "dgd") for m in ("self", "v")}
    assert np.max(np.abs(y["gd", "self"] - y["dgd", "self"])) > 1e-2
    assert np.max(np.abs(y["dgd", "v"] - y["dgd", "self"])) > 1e-2


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_dgd_on_the_primitive_matches_numpy(memory):
    # an associative memory with inner="dgd": W <- (alpha I - eta x^T x) W - eta grad(W at chunk start)
    spec = MemorySpec(memory, "l2", online=False, chunk=CHUNK, inner="dgd")
    ks = jax.random.split(jax.random.PRNGKey(4), 7)
    q, k = (np.asarray(_unit(np.asarray(jax.random.normal(kk, (T, D)))), np.float64) for kk in ks[:2])
    v = np.asarray(jax.random.normal(ks[2], (T, D)), np.float64)
    lr = np.asarray(0.8 * jax.random.uniform(ks[3], (T,)), np.float64)
    alpha = np.asarray(0.7 + 0.3 * jax.random.uniform(ks[4], (T,)), np.float64)
    if memory == "linear":
        w = (np.asarray(0.3 * jax.random.normal(ks[5], (D, D)), np.float64),)
    else:
        w = tuple(np.asarray(0.5 * jax.random.normal(kk, s), np.float64) for kk, s in
                  zip(ks[5:], ((D, HIDDEN), (HIDDEN, D))))  # fmt: skip
    start = initial_state(spec, tuple(jnp.asarray(a, jnp.float32) for a in w))
    ref, cur = [], w
    for t in range(T):
        if t % CHUNK == 0:
            base = cur
        if memory == "linear":
            (wc,), (wb,) = cur, base
            r = k[t] @ wb - v[t]
            cur = (alpha[t] * wc - lr[t] * np.outer(k[t], k[t] @ wc) - lr[t] * np.outer(k[t], r),)
            ref.append(q[t] @ cur[0])
        else:
            cur = _write(cur, base, k[t], v[t], lr[t], alpha[t], "dgd")
            ref.append(_f(cur, q[t]))
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    for fn in (memory_chunked, memory_scan):
        out, state, _ = fn(spec, start, *(f32(a) for a in (q, k, v, lr, alpha)))
        np.testing.assert_allclose(out, np.array(ref), rtol=1e-4, atol=1e-5)
        for got, want in zip(state.weights, cur, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_bad_inner_settings_name_the_field():
    with pytest.raises(ValueError, match="inner"):
        MemorySpec("mlp", "l2", online=False, inner="adam")
    with pytest.raises(ValueError, match="online=False"):
        MemorySpec("linear", "l2", inner="dgd")
    with pytest.raises(ValueError, match="momentum"):
        MemorySpec("mlp", "l2", online=False, momentum=True, inner="dgd")
    with pytest.raises(ValueError, match="main_target"):
        SelfModifyingMemory(4, heads=1, main_target="k", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="momentum"):  # DGD is the default: momentum needs inner="gd"
        SelfModifyingMemory(4, heads=1, momentum=True, rngs=nnx.Rngs(0))
    SelfModifyingMemory(4, heads=1, momentum=True, inner="gd", rngs=nnx.Rngs(0))  # accepted
