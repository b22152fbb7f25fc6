"""Streaming: a sequence fed whole, in random pieces or token by token gives the same outputs and state.

Mini-batch memories (TTT, Titans, self-modifying Titans, HOPE) take the gradients of a block of ``chunk``
tokens at the weights that opened the block; the state carries the block's position and those weights,
so cutting a sequence anywhere (not only at multiples of ``chunk``) must not change the algorithm.
Lengths here are never multiples of the chunk, and the cut points are drawn at random (seeded).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nestlearn import nn
from nestlearn.nn import MemorySpec, MemoryState, initial_state, memory_chunked, memory_scan

CHUNK, LENGTH = 4, 11  # 11 = two full blocks and a partial one


def _cuts(length, seed, pieces=3):
    """Random cut points (sorted, distinct, inside the sequence) from a seeded generator."""
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(np.arange(1, length), size=pieces, replace=False).tolist())


def _pieces(length, cuts):
    edges = [0, *cuts, length]
    return list(zip(edges[:-1], edges[1:]))


def _inputs(t, d=4, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    unit = lambda z: z / jnp.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (t, d))), unit(jax.random.normal(ks[1], (t, d)))
    v = jax.random.normal(ks[2], (t, d))
    lr = 0.9 * jax.random.uniform(ks[3], (t,))
    retention = 0.7 + 0.3 * jax.random.uniform(ks[4], (t,))
    beta = 0.8 * jax.random.uniform(ks[5], (t,))
    return q, k, v, lr, retention, beta


def _weights(spec, d=4, hidden=6, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    if spec.memory == "linear":
        return (0.3 * jax.random.normal(k1, (d, d)),)
    return (0.5 * jax.random.normal(k1, (d, hidden)), 0.5 * jax.random.normal(k2, (hidden, d)))


SPECS = {
    "linear_attention": MemorySpec("linear", "dot", chunk=CHUNK),
    "deltanet": MemorySpec("linear", "l2", chunk=CHUNK),
    "ttt_linear": MemorySpec("linear", "l2", online=False, chunk=CHUNK),
    "ttt_linear_dgd": MemorySpec("linear", "l2", online=False, chunk=CHUNK, inner="dgd"),
    "ttt_mlp": MemorySpec("mlp", "l2", online=False, chunk=CHUNK),
    "titans": MemorySpec("mlp", "l2", momentum=True, online=False, chunk=CHUNK),
    "mlp_dgd": MemorySpec("mlp", "l2", online=False, chunk=CHUNK, inner="dgd"),
}


def _assert_states_close(got, want, tol=2e-5):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_primitive_streams_in_pieces_and_tokens_like_whole(name):
    spec = SPECS[name]
    q, k, v, lr, retention, beta = _inputs(LENGTH)
    b = beta if spec.momentum else None
    start = initial_state(spec, _weights(spec))
    ref_out, ref_state, _ = memory_scan(spec, start, q, k, v, lr, retention, b)
    if not spec.online:
        assert int(ref_state.pos) == LENGTH % CHUNK  # the state knows where it stands in its block
    for fn in (jax.jit(memory_chunked, static_argnums=0), jax.jit(memory_scan, static_argnums=0)):
        # the fast path (no block fields: a reset known at trace time) and the filled initial state agree
        out, state, _ = fn(spec, MemoryState(start.weights, start.momentum), q, k, v, lr, retention, b)
        np.testing.assert_allclose(out, ref_out, rtol=2e-5, atol=2e-5)
        _assert_states_close(state, ref_state)
        for cuts in (_cuts(LENGTH, seed=7), list(range(1, LENGTH))):  # random pieces; token by token
            state, outs = start, []
            for lo, hi in _pieces(LENGTH, cuts):
                sl = lambda z: None if z is None else z[lo:hi]  # noqa: E731, B023
                out, state, _ = fn(spec, state, *(sl(z) for z in (q, k, v, lr, retention, b)))
                outs.append(out)
            np.testing.assert_allclose(jnp.concatenate(outs), ref_out, rtol=2e-5, atol=2e-5)
            _assert_states_close(state, ref_state)
        # ending on a block boundary (8 = 2 blocks): one state whether fed whole or cut inside a block
        ref8 = fn(spec, MemoryState(start.weights, start.momentum), *(z[:8] for z in (q, k, v, lr, retention)),
                  None if b is None else b[:8])[1]  # fmt: skip
        mid = fn(spec, start, *(z[:3] for z in (q, k, v, lr, retention)), None if b is None else b[:3])[1]
        end = fn(spec, mid, *(z[3:8] for z in (q, k, v, lr, retention)), None if b is None else b[3:8])[1]
        _assert_states_close(end, ref8)


def test_token_by_token_is_not_the_online_rule():
    # The bug this guards against: a mini-batch memory fed one token per call used to restart its block at
    # every call, i.e. it silently ran online gradient descent. The two rules differ by far more than float
    # error here, and the streamed run must follow the mini-batch one.
    mini = SPECS["ttt_linear"]
    online = MemorySpec("linear", "l2", chunk=CHUNK)
    q, k, v, lr, retention, _ = _inputs(LENGTH, seed=3)
    w = _weights(mini)
    whole, _, _ = memory_chunked(mini, initial_state(mini, w), q, k, v, lr, retention)
    per_token, _, _ = memory_scan(online, initial_state(online, w), q, k, v, lr, retention)
    assert float(jnp.max(jnp.abs(whole - per_token))) > 1e-2
    state, outs = initial_state(mini, w), []
    chunked = jax.jit(memory_chunked, static_argnums=0)
    for t in range(LENGTH):
        out, state, _ = chunked(mini, state, *(z[t : t + 1] for z in (q, k, v, lr, retention)))
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs), whole, rtol=2e-5, atol=2e-5)


MODELS = [
    "linear_attention",
    "deltanet",
    "ttt_linear",
    "ttt_mlp",
    "titans",
    "self_modifying_titans",
    "hope",
]


def _mixer(name, path):
    extra = {"lr": 0.5} if name in ("ttt_mlp", "titans", "self_modifying_titans", "hope") else {}
    model = getattr(nn, name)(
        vocab=8, d_model=8, n_layers=1, heads=2, chunk=CHUNK, path=path, **extra, rngs=nnx.Rngs(0)
    )
    return model.layers[0].mixer


def _streamers(mixer):
    """Jitted ``apply`` from a state (or a reset), and a jitted ``lax.scan`` over tokens with the state as
    its carry (recurrent inference: ``pos`` is traced, so the carry keeps one structure)."""
    graphdef, params = nnx.split(mixer)

    @jax.jit
    def apply(x, state=None):
        return nnx.merge(graphdef, params).apply(x, state)[:2]

    @jax.jit
    def tokens(x):
        m = nnx.merge(graphdef, params)

        def step(state, xt):
            y, state, _ = m.apply(xt[:, None], state)
            return state, y[:, 0]

        state, ys = jax.lax.scan(step, m.init_state(x.shape[0]), jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), state

    return apply, tokens


@pytest.mark.parametrize("path", ["chunk", "token"])
@pytest.mark.parametrize("name", MODELS)
def test_every_memory_model_streams_like_whole(name, path):
    mixer = _mixer(name, path)
    apply, tokens = _streamers(mixer)
    x = jax.random.normal(jax.random.PRNGKey(5), (2, LENGTH, 8))
    whole, ref_state = apply(x, mixer.init_state(2))
    fast, fast_state = apply(x)  # from a reset known at trace time (no realignment)
    np.testing.assert_allclose(fast, whole, rtol=2e-5, atol=2e-5)
    _assert_states_close(fast_state, ref_state)
    state, outs = mixer.init_state(2), []
    for lo, hi in _pieces(LENGTH, _cuts(LENGTH, MODELS.index(name) + (10 if path == "token" else 0), 2)):
        out, state = apply(x[:, lo:hi], state)
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), whole, rtol=5e-5, atol=5e-5)
    _assert_states_close(state, ref_state, tol=5e-5)
    ys, state = tokens(x)  # token by token
    np.testing.assert_allclose(ys, whole, rtol=5e-5, atol=5e-5)
    _assert_states_close(state, ref_state, tol=5e-5)
