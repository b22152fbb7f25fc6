"""In-context CMS against an independent numpy token loop; streaming in pieces; causality; HOPE's CMS modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nestlearn import nn
from nestlearn.nn import CMSChannel, ContextCMS, MLPChannel

FAST = {"xla_backend_optimization_level": 0}  # tiny one-off programs: compilation dominates
RNG = np.random.default_rng(0)


def report(name: str, value: float) -> None:
    """Print a measured error (shown with ``pytest -s``)."""
    print(f"{name}: {value:.3g}")


def build(fn):
    """``fn()`` with its parameters initialised in one compiled call."""
    graphdef = nnx.split(nnx.eval_shape(fn))[0]
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(fn())[1], compiler_options=FAST)())


def apply_fn(module):
    """``(params, x, state) -> (y, state)``: the module's :meth:`apply` as one jitted function."""
    graphdef, params = nnx.split(module)
    run = jax.jit(lambda p, x, s: nnx.merge(graphdef, p).apply(x, s), compiler_options=FAST)
    return lambda x, s: run(params, x, s)


# -- the reference: a plain numpy loop over tokens (float64), written apart from the parallel code ---------

C_GELU = np.sqrt(2.0 / np.pi)


def gelu(u):
    return 0.5 * u * (1.0 + np.tanh(C_GELU * (u + 0.044715 * u**3)))


def gelu_grad(u):
    th = np.tanh(C_GELU * (u + 0.044715 * u**3))
    return 0.5 * (1.0 + th) + 0.5 * u * (1.0 - th**2) * C_GELU * (1.0 + 3 * 0.044715 * u**2)


def f(theta, h):
    w1, b1, w2, b2 = theta
    return gelu(h @ w1 + b1) @ w2 + b2


def grad_next_step(theta, key, value):
    """Gradient of 1/2 |key + f(key) - value|^2 in (w1, b1, w2, b2), by hand."""
    w1, b1, w2, b2 = theta
    u = key @ w1 + b1
    a = gelu(u)
    e = key + a @ w2 + b2 - value
    du = (w2 @ e) * gelu_grad(u)
    return [np.outer(key, du), du, np.outer(a, e), e]


def token_loop(init, rates, periods, x):
    """Per sequence, per token: blocks applied in order; each level sums its pair gradients and, after
    every token t with (t + 1) % C(l) == 0, steps by -rate * sum. Returns outputs and the final state."""
    x = np.asarray(x, np.float64)
    batch, length, _ = x.shape
    ys = np.zeros_like(x)
    thetas, sums, prevs = [], [], []
    for b in range(batch):
        theta = [[np.array(w, np.float64) for w in level] for level in init]
        acc = [[np.zeros_like(w) for w in level] for level in theta]
        prev = [None] * len(theta)
        for t in range(length):
            h = x[b, t]
            for level in range(len(theta)):
                if t > 0:  # the pair (input at t-1, input at t); the first token has none
                    for s, g in zip(acc[level], grad_next_step(theta[level], prev[level], h)):
                        s += g
                prev[level] = h
                h = h + f(theta[level], h)
            ys[b, t] = h - x[b, t]
            for level, period in enumerate(periods):
                if (t + 1) % period == 0:
                    theta[level] = [w - rates[level] * s for w, s in zip(theta[level], acc[level])]
                    acc[level] = [np.zeros_like(s) for s in acc[level]]
        thetas.append(theta)
        sums.append(acc)
        prevs.append(prev)
    return ys, thetas, sums, prevs


def init_weights(cms):
    return [[np.asarray(w) for w in blk.weights()] for blk in cms.blocks]


def max_state_error(state, thetas, sums):
    err = 0.0
    for b in range(len(thetas)):
        for level in range(len(thetas[b])):
            for w, r in zip(state.params[level], thetas[b][level]):
                err = max(err, float(np.max(np.abs(np.asarray(w[b]) - r))))
            for w, r in zip(state.grads[level], sums[b][level]):
                err = max(err, float(np.max(np.abs(np.asarray(w[b]) - r))))
    return err


@pytest.mark.parametrize(
    "periods, length",
    [((2, 4, 8), 13), ((3, 6), 11), ((1, 1, 1), 7), ((4, 6), 14), ((5,), 5)],
)
def test_matches_the_token_loop(periods, length):
    d, hidden, batch = 4, 6, 2
    cms = build(lambda: ContextCMS(d, hidden, periods, lr=0.2, rngs=nnx.Rngs(1)))
    x = np.random.default_rng(length).normal(size=(batch, length, d)).astype(np.float32)
    rates = np.exp(np.asarray(cms.log_lr[...], np.float64))
    np.testing.assert_allclose(rates, [0.2 / (p * d) for p in periods], rtol=1e-6)
    y, state = apply_fn(cms)(jnp.asarray(x), cms.init_state(batch))
    ref, thetas, sums, prevs = token_loop(init_weights(cms), rates, periods, x)
    frozen, *_ = token_loop(init_weights(cms), np.zeros_like(rates), periods, x)
    # The in-context updates matter at this size (else the comparison would not test them) ...
    if length > min(periods):
        assert np.max(np.abs(ref - frozen)) > 1e-2
    # ... and the parallel computation follows the loop.
    assert np.max(np.abs(ref)) < 10  # a stable run: float32 and float64 may part ways in a diverging one
    err_y = float(np.max(np.abs(np.asarray(y) - ref)))
    err_s = max_state_error(state, thetas, sums)
    report(f"token loop {periods} T={length}: y", err_y)
    report(f"token loop {periods} T={length}: state", err_s)
    assert err_y < 5e-5 and err_s < 2e-4, (err_y, err_s)
    np.testing.assert_allclose(np.asarray(state.prev), np.asarray(prevs), atol=2e-5)
    assert int(state.pos) == length


def test_periods_one_update_every_token_by_hand():
    # One level, period 1, two tokens: y_0 = f(theta_0; x_0) and theta_1 = theta_0 (no pair yet);
    # y_1 = f(theta_0; x_1); then theta_2 = theta_0 - eta * grad(theta_0; x_0 -> x_1), y_2 = f(theta_2; x_2).
    cms = build(lambda: ContextCMS(3, 5, (1,), lr=(0.7,), rngs=nnx.Rngs(2)))
    x = RNG.normal(size=(1, 3, 3)).astype(np.float32)
    y, _ = apply_fn(cms)(jnp.asarray(x), cms.init_state(1))
    theta0 = [np.asarray(w, np.float64) for w in cms.blocks[0].weights()]
    xs = x[0].astype(np.float64)
    theta2 = [w - 0.7 * g for w, g in zip(theta0, grad_next_step(theta0, xs[0], xs[1]))]
    want = np.stack([f(theta0, xs[0]), f(theta0, xs[1]), f(theta2, xs[2])])
    np.testing.assert_allclose(np.asarray(y[0]), want, rtol=1e-5, atol=1e-5)


def test_pieces_and_token_by_token_equal_the_whole_stream():
    periods, d, length, batch = (2, 4, 8), 4, 21, 2
    cms = build(lambda: ContextCMS(d, 6, periods, lr=0.2, rngs=nnx.Rngs(3)))
    run = apply_fn(cms)
    x = jnp.asarray(RNG.normal(size=(batch, length, d)).astype(np.float32))
    whole, end = run(x, cms.init_state(batch))
    cuts = [0, 3, 4, 9, 10, 17, length]  # mid sub-chunk, at a boundary, one-token pieces
    outs, state = [], cms.init_state(batch)
    for a, b in zip(cuts[:-1], cuts[1:]):
        y, state = run(x[:, a:b], state)
        outs.append(y)
    pieces = jnp.concatenate(outs, axis=1)
    outs, tok_state = [], cms.init_state(batch)
    for t in range(length):
        y, tok_state = run(x[:, t : t + 1], tok_state)
        outs.append(y)
    tokens = jnp.concatenate(outs, axis=1)
    err = 0.0
    for got, st in ((pieces, state), (tokens, tok_state)):
        err = max(err, float(jnp.max(jnp.abs(got - whole))))
        for a, b in zip(jax.tree.leaves(st), jax.tree.leaves(end)):
            err = max(err, float(jnp.max(jnp.abs(a - b))))
    report("whole vs pieces vs token by token (outputs and state)", err)
    assert err < 1e-5
    assert int(state.pos) == int(tok_state.pos) == length


def test_causal_blocks_change_only_after_a_chunk_ends():
    # The channel is position-wise, so a future token can reach y_t only through the blocks' updates:
    # perturbing x_5 (periods 4, 8: chunks [4, 8) and [0, 8)) changes y_5 and nothing before y_8.
    cms = build(lambda: ContextCMS(4, 6, (4, 8), lr=0.2, rngs=nnx.Rngs(4)))
    run = apply_fn(cms)
    x = RNG.normal(size=(1, 12, 4)).astype(np.float32)
    x2 = x.copy()
    x2[0, 5] += 1.0
    y1, _ = run(jnp.asarray(x), cms.init_state(1))
    y2, _ = run(jnp.asarray(x2), cms.init_state(1))
    diff = np.max(np.abs(np.asarray(y1 - y2)), axis=-1)[0]
    assert np.all(diff[[0, 1, 2, 3, 4, 6, 7]] == 0.0), diff
    assert diff[5] > 1e-3 and np.all(diff[8:] > 1e-6), diff


def test_rates_zero_is_the_optimizer_level_channel_and_model_call_is_apply():
    cms = build(lambda: ContextCMS(4, 6, (2, 4), lr=0.0, rngs=nnx.Rngs(5)))
    chain = build(lambda: CMSChannel(4, 6, 2, rngs=nnx.Rngs(5)))
    for src, dst in zip(cms.blocks, chain.blocks):
        for name in ("up", "down"):
            getattr(dst, name).kernel[...] = getattr(src, name).kernel[...]
            getattr(dst, name).bias[...] = getattr(src, name).bias[...]
    x = jnp.asarray(RNG.normal(size=(2, 7, 4)).astype(np.float32))
    np.testing.assert_allclose(np.asarray(cms(x)), np.asarray(chain(x)), rtol=1e-6, atol=1e-6)
    model = build(lambda: nn.hope(vocab=8, d_model=8, cms_periods=(2, 4), chunk=2, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(RNG.integers(0, 8, size=(2, 6)), jnp.int32)
    np.testing.assert_array_equal(np.asarray(model(tokens)), np.asarray(model.apply(tokens)[0]))


def test_outer_gradient_through_the_updates_matches_finite_differences():
    # d/d log_lr_0 of sum(y) from jax.grad (float32) against a central difference of the float64 loop.
    periods, d = (2, 4), 3
    cms = build(lambda: ContextCMS(d, 4, periods, lr=0.2, rngs=nnx.Rngs(6)))
    x = RNG.normal(size=(1, 9, d)).astype(np.float32)
    graphdef, params = nnx.split(cms)

    def total(p):
        return jnp.sum(nnx.merge(graphdef, p)(jnp.asarray(x)))

    got = jax.jit(jax.grad(total), compiler_options=FAST)(params)
    rates = np.exp(np.asarray(cms.log_lr[...], np.float64))
    eps = 1e-5
    up, dn = rates.copy(), rates.copy()
    up[0], dn[0] = rates[0] * np.exp(eps), rates[0] * np.exp(-eps)
    fd = (
        token_loop(init_weights(cms), up, periods, x)[0].sum()
        - token_loop(init_weights(cms), dn, periods, x)[0].sum()
    ) / (2 * eps)
    g = float(got["log_lr"][...][0])
    report("d sum(y) / d log_lr_0 vs finite difference (relative)", abs(g - fd) / abs(fd))
    assert abs(fd) > 1e-3 and abs(g - fd) < 1e-3 * abs(fd) + 1e-5, (g, fd)
    # The initial weights get a gradient too (they are what the outer optimizer meta-learns).
    assert float(jnp.max(jnp.abs(got["blocks"][1]["up"]["kernel"][...]))) > 0


def test_a_pluggable_inner_loss_reaches_the_weights():
    # Twice the default loss is the default loss at twice the rates.
    double = lambda pred, key, value: 2.0 * nn.next_step_loss(pred, key, value)  # noqa: E731
    a = build(lambda: ContextCMS(4, 6, (2, 4), lr=(0.02, 0.01), inner_loss=double, rngs=nnx.Rngs(8)))
    b = build(lambda: ContextCMS(4, 6, (2, 4), lr=(0.04, 0.02), rngs=nnx.Rngs(8)))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 9, 4)).astype(np.float32))
    ya, yb = apply_fn(a)(x, a.init_state(2))[0], apply_fn(b)(x, b.init_state(2))[0]
    y0 = build(lambda: ContextCMS(4, 6, (2, 4), lr=(0.02, 0.01), rngs=nnx.Rngs(8)))(x)
    np.testing.assert_allclose(np.asarray(ya), np.asarray(yb), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(ya - y0))) > 1e-3  # and differs from the default loss at the same rates


def test_context_cms_rejects_bad_arguments():
    with pytest.raises(ValueError, match="periods"):
        ContextCMS(4, 4, (), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="periods"):
        ContextCMS(4, 4, (2, 0), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lr"):
        ContextCMS(4, 4, (2, 4), lr=(0.1,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="lr"):
        ContextCMS(4, 4, (2,), lr=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden"):
        ContextCMS(4, 0, (2,), rngs=nnx.Rngs(0))
    cms = ContextCMS(4, 4, (2,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="x must be"):
        cms.apply(jnp.zeros((1, 3, 5)))


# -- the whole model: stateful path, HOPE's CMS modes --------------------------------------------------


def test_hope_streams_in_pieces_like_the_whole_sequence():
    # chunk=1: the self-modifying memory has no chunk grid, so any cut is exact; the CMS carries its
    # position within its chunks (periods 2, 4) across the cuts.
    model = build(lambda: nn.hope(vocab=8, d_model=8, cms_periods=(2, 4), chunk=1, rngs=nnx.Rngs(7)))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).apply(t, s), compiler_options=FAST)
    tokens = jnp.asarray(RNG.integers(0, 8, size=(2, 11)), jnp.int32)
    whole, end = run(params, tokens, model.init_state(2))
    outs, state = [], model.init_state(2)
    for a, b in zip((0, 1, 6, 7), (1, 6, 7, 11)):
        y, state = run(params, tokens[:, a:b], state)
        outs.append(y)
    err = float(jnp.max(jnp.abs(jnp.concatenate(outs, axis=1) - whole)))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(end)):
        err = max(err, float(jnp.max(jnp.abs(a - b))))
    report("hope logits and state, whole vs pieces", err)
    assert err < 1e-4
    cms_end = end[0][1]
    assert isinstance(cms_end, nn.ContextCMSState) and int(cms_end.pos) == 11


def test_exact_per_token_memories_stream_at_any_cut():
    # DeltaNet's delta rule is exact per token, so its chunk grid does not matter across calls (chunk 4,
    # cut at 3); the model's state carries the memory and the short convolution's tail.
    model = build(lambda: nn.deltanet(vocab=8, d_model=8, chunk=4, rngs=nnx.Rngs(9)))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, t, s: nnx.merge(graphdef, p).apply(t, s), compiler_options=FAST)
    tokens = jnp.asarray(np.random.default_rng(9).integers(0, 8, size=(2, 11)), jnp.int32)
    whole, _ = run(params, tokens, model.init_state(2))
    first, state = run(params, tokens[:, :3], model.init_state(2))
    rest, _ = run(params, tokens[:, 3:], state)
    err = float(jnp.max(jnp.abs(jnp.concatenate([first, rest], axis=1) - whole)))
    report("deltanet logits, whole vs cut at 3", err)
    assert err < 1e-5


def test_attention_models_refuse_to_stream():
    model = nnx.eval_shape(lambda: nn.hope_attention(vocab=8, d_model=8, heads=2, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="CausalAttention.*key-value cache"):
        model.init_state(2)


def test_hope_cms_modes_and_bad_arguments():
    shape = lambda **kw: nnx.eval_shape(lambda: nn.hope(vocab=8, d_model=8, rngs=nnx.Rngs(0), **kw))  # noqa: E731
    context = shape().layers[0].channel
    assert isinstance(context, ContextCMS) and context.periods == (16, 64, 256)
    assert shape(cms_levels=2).layers[0].channel.periods == (16, 64)
    assert isinstance(shape(cms="optimizer").layers[0].channel, CMSChannel)
    assert len(shape(cms="optimizer", cms_levels=2).layers[0].channel.blocks) == 2
    assert isinstance(shape(cms=None).layers[0].channel, MLPChannel)
    att = nnx.eval_shape(
        lambda: nn.hope_attention(vocab=8, d_model=8, heads=2, cms_periods=(4, 8), rngs=nnx.Rngs(0))
    )
    assert att.layers[1].channel.periods == (4, 8)
    with pytest.raises(ValueError, match="cms must be one of"):
        shape(cms="tokens")
    with pytest.raises(ValueError, match="cms_periods"):
        shape(cms="optimizer", cms_periods=(1, 4))
    with pytest.raises(ValueError, match="cms_levels"):
        shape(cms_levels=2, cms_periods=(1, 4, 16))
