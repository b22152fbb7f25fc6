"""The associative-memory primitive: per-token and chunkwise paths agree, and both match hand derivations."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nestlearn import nn
from nestlearn.nn import (
    AssociativeMemory,
    MemorySpec,
    SelfModifyingMemory,
    ShortConv,
    initial_state,
    memory_chunked,
    memory_scan,
)
from nestlearn.nn._assoc import unit_lower_inverse


def _inputs(t, d=6, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 6)
    unit = lambda z: z / jnp.linalg.norm(z, axis=1, keepdims=True)  # noqa: E731
    q, k = unit(jax.random.normal(ks[0], (t, d))), unit(jax.random.normal(ks[1], (t, d)))
    v = jax.random.normal(ks[2], (t, d))
    lr = 0.9 * jax.random.uniform(ks[3], (t,))
    retention = 0.8 + 0.2 * jax.random.uniform(ks[4], (t,))
    beta = 0.8 * jax.random.uniform(ks[5], (t,))
    return q, k, v, lr, retention, beta


def _weights(spec, d=6, hidden=10, seed=1):
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    if spec.memory == "linear":
        return (0.3 * jax.random.normal(k1, (d, d)),)
    return (0.3 * jax.random.normal(k1, (d, hidden)), 0.3 * jax.random.normal(k2, (hidden, d)))


SPECS = [
    MemorySpec("linear", "l2", chunk=8),  # DeltaNet: exact per-token delta rule, triangular solve per chunk
    MemorySpec("linear", "dot", chunk=8),  # linear attention with a gate
    MemorySpec("linear", "l2", momentum=True, chunk=8),  # delta rule with momentum, still exact
    MemorySpec("linear", "l2", online=False, chunk=8),  # TTT-linear: mini-batch gradient descent
    MemorySpec("mlp", "l2", momentum=True, online=False, chunk=8),  # Titans' neural memory
    MemorySpec("mlp", "dot", online=False, chunk=8),
]


@pytest.mark.parametrize("spec,length", list(itertools.product(SPECS, (5, 21))))
def test_chunkwise_path_equals_per_token_path(spec, length):
    # 5 < chunk (one padded chunk); 21 = two full chunks and a partial one of 5
    q, k, v, lr, retention, beta = _inputs(length)
    state = initial_state(spec, _weights(spec))
    if spec.momentum:  # a non-zero carried momentum exercises the s_i terms
        state = state.replace(momentum=tuple(0.1 * jnp.ones_like(w) for w in state.weights))
    b = beta if spec.momentum else None
    out1, state1, aux1 = jax.jit(memory_scan, static_argnums=0)(spec, state, q, k, v, lr, retention, b)
    out2, state2, aux2 = jax.jit(memory_chunked, static_argnums=0)(spec, state, q, k, v, lr, retention, b)
    np.testing.assert_allclose(out2, out1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(aux2["surprise"], aux1["surprise"], rtol=1e-4, atol=1e-5)
    for a, c in zip(jax.tree.leaves(state2), jax.tree.leaves(state1), strict=True):
        np.testing.assert_allclose(a, c, rtol=1e-4, atol=1e-5)


def _numpy_reference(spec, w, s, q, k, v, lr, retention, beta):
    """The linear-memory recurrence written out with numpy, one token at a time (online gradients)."""
    w, s = np.array(w, np.float64), np.array(s, np.float64)
    outs = []
    for t in range(len(q)):
        r = k[t] @ w - v[t] if spec.objective == "l2" else -v[t]  # d loss / d output at W_{t-1}
        g = np.outer(k[t], r)
        s = beta[t] * s - lr[t] * g
        w = retention[t] * w + s
        outs.append(q[t] @ w)
    return np.array(outs), w, s


@pytest.mark.parametrize("objective", ["l2", "dot"])
def test_linear_memory_with_momentum_matches_numpy_recurrence(objective):
    spec = MemorySpec("linear", objective, momentum=True, chunk=4)
    q, k, v, lr, retention, beta = (np.asarray(x, np.float64) for x in _inputs(11, seed=3))
    w0 = np.asarray(_weights(spec)[0])
    s0 = np.full_like(w0, 0.05)
    ref_out, ref_w, ref_s = _numpy_reference(spec, w0, s0, q, k, v, lr, retention, beta)
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    state = initial_state(spec, (f32(w0),)).replace(momentum=(f32(s0),))
    out, state, _ = memory_chunked(spec, state, *(f32(x) for x in (q, k, v, lr, retention, beta)))
    np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.weights[0], ref_w, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(state.momentum[0], ref_s, rtol=1e-4, atol=1e-5)


def test_delta_rule_overwrites_and_hebbian_rule_adds():
    # Two writes to the same unit key e1 with lr 1 and no forgetting, from W = 0:
    #   delta rule:  W1 = e1^T v1;  r2 = e1 W1 - v2 = v1 - v2;  W2 = W1 - e1^T (v1 - v2) = e1^T v2
    #   Hebbian:     W2 = e1^T v1 + e1^T v2
    # so reading key e1 after the second write gives v2 (overwritten) or v1 + v2 (superposed).
    k = jnp.array([[1.0, 0.0], [1.0, 0.0]])
    v = jnp.array([[2.0, -1.0], [0.5, 3.0]])
    ones = jnp.ones(2)
    for objective, expected in (("l2", [0.5, 3.0]), ("dot", [2.5, 2.0])):
        spec = MemorySpec("linear", objective, chunk=2)
        for fn in (memory_scan, memory_chunked):
            out, _, _ = fn(spec, initial_state(spec, (jnp.zeros((2, 2)),)), k, k, v, ones, ones)
            np.testing.assert_allclose(out[1], expected, atol=1e-6)


def test_gated_linear_attention_closed_form():
    # dot objective, lr 1, W0 = 0: o_t = sum_{j<=t} (prod_{l=j+1..t} a_l) (q_t . k_j) v_j
    spec = MemorySpec("linear", "dot", chunk=4)
    q, k, v, _, retention, _ = _inputs(10, seed=5)
    qn, kn, vn, an = (np.asarray(x, np.float64) for x in (q, k, v, retention))
    decay = np.array([[np.prod(an[j + 1 : t + 1]) if j <= t else 0.0 for j in range(10)] for t in range(10)])
    expected = (decay * (qn @ kn.T)) @ vn
    out, _, _ = memory_chunked(
        spec, initial_state(spec, (jnp.zeros((6, 6)),)), q, k, v, jnp.ones(10), retention
    )
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


MODULES = {
    "deltanet": lambda path: AssociativeMemory(12, heads=2, chunk=8, path=path, rngs=nnx.Rngs(0)),
    "titans": lambda path: AssociativeMemory(
        12, heads=2, memory="mlp", online=False, momentum=True, lr=0.2, chunk=8, path=path, rngs=nnx.Rngs(0)
    ),
    "self-modifying": lambda path: SelfModifyingMemory(12, heads=2, chunk=8, path=path, rngs=nnx.Rngs(0)),
}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_paths_agree_in_value_and_outer_gradient(name):
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 19, 12))
    graphdef, params = nnx.split(MODULES[name]("chunk"))
    graph_token = nnx.split(MODULES[name]("token"))[0]

    def loss(p, g):
        return jnp.sum(jnp.sin(nnx.merge(g, p)(x)))

    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    l1, g1 = value_and_grad(params, graphdef)
    l2, g2 = value_and_grad(params, graph_token)
    np.testing.assert_allclose(l1, l2, rtol=1e-5)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2), strict=True):
        np.testing.assert_allclose(a, b, atol=2e-4 * scale)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_state_carries_across_calls_and_resets(name):
    mem = MODULES[name]("chunk")
    x = jax.random.normal(jax.random.PRNGKey(4), (2, 24, 12))
    apply = nnx.jit(lambda m, x, state=None: m.apply(x, state))
    whole, end, _ = apply(mem, x)
    first, mid, _ = apply(mem, x[:, :13])  # 13: inside a block (chunk 8); the state carries its position
    second, end2, _ = apply(mem, x[:, 13:], mid)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), whole, rtol=1e-4, atol=1e-5)
    for a, b in zip(jax.tree.leaves(end2), jax.tree.leaves(end), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # a reset is the meta-learned initial state (the parameters, per sequence), whatever was written since
    reset = mem.init_state(2)
    if isinstance(mem, AssociativeMemory):
        pairs = zip(reset.memory.weights, mem._init_weights(), strict=True)
    else:
        names = sorted(reset.memory)
        pairs = zip(
            [w for n in names for w in reset.memory[n].weights], [w for n in names for w in mem._weights(n)]
        )
    for got, param in pairs:
        for row in range(2):
            np.testing.assert_array_equal(got[row], param)
    np.testing.assert_array_equal(reset.tail, 0.0)  # the convolution forgets its last inputs too
    assert not all(
        np.allclose(a, b) for a, b in zip(jax.tree.leaves(end), jax.tree.leaves(mem.init_state(2)))
    )


def test_stopping_write_gradients_cuts_the_key_projection_off():
    x = jax.random.normal(jax.random.PRNGKey(6), (2, 12, 12))
    grads = {}
    for stop in (False, True):
        mem = AssociativeMemory(12, heads=2, chunk=4, stop_write_grad=stop, rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(mem)
        grads[stop] = jax.jit(jax.grad(lambda p, g=graphdef: jnp.sum(nnx.merge(g, p)(x) ** 2)))(params)
    # keys only enter through writes: their projection learns only when writes are backpropagated through
    assert float(jnp.max(jnp.abs(grads[False]["k"]["kernel"][...]))) > 1e-3
    np.testing.assert_array_equal(grads[True]["k"]["kernel"][...], 0.0)
    assert float(jnp.max(jnp.abs(grads[True]["q"]["kernel"][...]))) > 1e-3


def test_diverging_inner_loop_is_reported_with_its_token():
    # Unnormalised keys of norm 10 and lr 1: the delta rule multiplies the memory along k by (1 - 100)
    # per write, so the reads overflow float32 after a few dozen tokens; each path reports the same token.
    spec = MemorySpec("linear", "l2", chunk=8)
    t = 40
    k = jnp.tile(jnp.array([[10.0, 0.0]]), (t, 1))
    v = jnp.ones((t, 2))
    ones = jnp.ones(t)
    state = initial_state(spec, (jnp.zeros((2, 2)),))
    out_scan, _, _ = memory_scan(spec, state, k, k, v, ones, ones)
    first_bad = int(np.argmax(~np.all(np.isfinite(np.asarray(out_scan)), axis=1)))
    assert 5 < first_bad < t
    mem = AssociativeMemory(
        2, heads=1, normalize=False, gate=False, lr_from_input=False, conv=0, chunk=8, rngs=nnx.Rngs(0)
    )
    mem.q.kernel[...] = mem.k.kernel[...] = jnp.eye(2)
    mem.v.kernel[...] = jnp.zeros((2, 2))
    x = jnp.concatenate([k[None], k[None]], axis=0)
    telemetry = nnx.jit(lambda m, x: m.telemetry(x)[1])
    stats = telemetry(mem, x)
    # with v = 0 the target is 0: r = k W, W <- W (I - k k^T) from a zero memory stays zero, no divergence
    assert int(stats["diverged_at"]) == -1
    mem.w_init[...] = 0.01 * jnp.eye(2)  # a non-zero start along k grows by a factor -99 per token
    stats = telemetry(mem, x)
    assert int(stats["diverged_at"]) >= 0
    assert np.isfinite(float(stats["surprise_mean"]))  # the mean is over the finite tokens only


def test_bad_specs_name_the_field():
    with pytest.raises(ValueError, match="online"):
        MemorySpec("mlp", "l2", online=True)
    with pytest.raises(ValueError, match="objective"):
        MemorySpec("linear", "cosine")
    with pytest.raises(ValueError, match="chunk"):
        MemorySpec(chunk=0)
    with pytest.raises(ValueError, match="path"):
        AssociativeMemory(4, path="parallel", rngs=nnx.Rngs(0))
    spec = MemorySpec(momentum=True)
    q = jnp.ones((3, 2))
    with pytest.raises(ValueError, match="beta"):
        memory_chunked(spec, initial_state(spec, (jnp.zeros((2, 2)),)), q, q, q, jnp.ones(3), jnp.ones(3))


@pytest.mark.parametrize("n", [1, 5, 16, 24])
def test_unit_lower_inverse_matches_numpy(n):
    # n = 5 and 24 are padded to 8 and 32 internally; entries of size 0.3 keep the inverse well scaled
    rng = np.random.default_rng(n)
    m = np.tril(0.3 * rng.normal(size=(3, n, n)), -1) + np.eye(n)
    np.testing.assert_allclose(unit_lower_inverse(jnp.asarray(m, jnp.float32)), np.linalg.inv(m), atol=2e-5)


def test_short_conv_is_causal_depthwise_and_carries_its_tail():
    conv = ShortConv(3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(8), (2, 9, 3))
    y, tail = conv(x, conv.init_tail(2))
    w, xn = np.asarray(conv.weight[...], np.float64), np.asarray(x, np.float64)
    # y_t = silu(sum_j w[j] * x_{t-j}) over the taps that exist (zeros before the sequence)
    pre = sum(w[j] * np.pad(xn, ((0, 0), (j, 0), (0, 0)))[:, :9] for j in range(4))
    np.testing.assert_allclose(y, pre / (1 + np.exp(-pre)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(tail, x[:, -3:])
    y1, mid = conv(x[:, :5], conv.init_tail(2))
    y2, _ = conv(x[:, 5:], mid)
    np.testing.assert_allclose(jnp.concatenate([y1, y2], 1), y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "build",
    [
        nn.linear_attention,
        nn.deltanet,
        nn.minibatch_delta,
        nn.ttt_linear,
        nn.ttt_mlp,
        nn.titans,
        nn.self_modifying_titans,
        nn.hope,
    ],
)
def test_no_parameter_is_weakly_typed(build):
    # A weakly typed parameter turns strongly typed after the first optimizer update, so a jitted training
    # chunk is traced (and compiled) again on its second call.
    params = nnx.state(build(vocab=8, d_model=8, rngs=nnx.Rngs(0)), nnx.Param)
    weak = [jax.tree_util.keystr(p) for p, x in jax.tree_util.tree_leaves_with_path(params) if x.weak_type]
    assert not weak, weak
