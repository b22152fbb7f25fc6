"""Sequence-model shell: causal attention against numpy, the model's gathers and CMS labels, the trainer."""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestlearn.nn import cms_labels, cms_optimizer
from nestlearn.nn._attention import CausalAttention, rotary
from nestlearn.nn._seq import CMSChannel, MLPChannel, SequenceModel, hope_attention, transformer
from nestlearn.nn._seqtrain import SeqTrainer, finite_mean, query_loss


class Batch(NamedTuple):
    tokens: jax.Array
    positions: jax.Array
    labels: jax.Array


def recall_sampler(vocab: int, pairs: int, batch: int):
    """A tiny MQAR: ``pairs`` (key, value) pairs, then every key once more in a random order.

    ``vocab / 2 - 1`` and ``pairs`` must be prime. Keys are distinct, ``1 + (a + b i) mod (vocab/2 - 1)``
    for ``i < pairs`` with random ``a`` and ``b != 0``; values are uniform in ``[vocab/2, vocab)``; query
    ``j`` asks for pair ``(c + d j) mod pairs`` (every permutation of 2 or 3 pairs). The query positions
    are the last ``pairs`` tokens, each labelled with its key's value. One ``randint`` call draws
    everything (cheap to compile).
    """
    k = vocab // 2 - 1
    lo = np.array([0, 1, 0, 1] + [vocab // 2] * pairs, np.int32)
    hi = np.array([k, k, pairs, max(pairs, 2)] + [vocab] * pairs, np.int32)
    i = jnp.arange(pairs, dtype=jnp.int32)

    def sample(key):
        r = jax.random.randint(
            key, (batch, 4 + pairs), jnp.asarray(lo)[None], jnp.asarray(hi)[None], jnp.int32
        )
        keys = 1 + (r[:, :1] + r[:, 1:2] * i[None]) % k
        vals = r[:, 4:]
        order = (r[:, 2:3] + r[:, 3:4] * i[None]) % pairs
        tokens = jnp.concatenate(
            [jnp.stack([keys, vals], 2).reshape(batch, 2 * pairs), jnp.take_along_axis(keys, order, 1)], 1
        )
        positions = jnp.broadcast_to(2 * pairs + i, (batch, pairs))
        return Batch(tokens, positions, jnp.take_along_axis(vals, order, 1))

    return sample


# Small one-off calls: compile without LLVM's optimisations (compilation dominates their time).
FAST = {"xla_backend_optimization_level": 0}
RNG = np.random.default_rng(0)  # test inputs from numpy: eager jax.random compiles per call


def build(fn):
    """``fn()``, a module, with its parameters initialised in one compiled call (eager init compiles
    every initializer separately)."""
    graphdef = nnx.split(nnx.eval_shape(fn))[0]
    return nnx.merge(graphdef, jax.jit(lambda: nnx.split(fn())[1], compiler_options=FAST)())


def jitted(module, method: str = "__call__"):
    """``module.method`` as one jitted function of its inputs (eager NNX compiles op by op, slowly)."""
    graphdef, state = nnx.split(module)
    return jax.jit(lambda *args: getattr(nnx.merge(graphdef, state), method)(*args), compiler_options=FAST)


def test_recall_sampler_by_hand():
    # Every label is the value that followed its query's key; keys are distinct within a sequence.
    b = jax.jit(recall_sampler(16, 3, 64), compiler_options=FAST)(jax.random.key(0))
    tok, pos, lab = (np.asarray(a) for a in b)
    for row in range(64):
        keys, vals = tok[row, 0:6:2], tok[row, 1:6:2]
        assert len(set(keys)) == 3 and keys.min() >= 1 and keys.max() < 8 and vals.min() >= 8
        assert sorted(tok[row, 6:]) == sorted(keys)
        for q in range(3):
            assert lab[row, q] == vals[list(keys).index(tok[row, pos[row, q]])]


# -- attention -------------------------------------------------------------------------------------


def numpy_attention(x, wq, wk, wv, wo, heads, rope):
    """Causal multi-head attention with a loop over positions; RoPE as an explicit 2x2 rotation per pair."""
    b, t, d = x.shape
    dh = d // heads
    half = dh // 2
    out = np.zeros((b, t, d), np.float64)

    def rot(v, pos):  # v: [dh]; pair (i, i + half) turns by pos * 10000^(-2i/dh)
        if not rope:
            return v
        r = v.copy()
        for i in range(half):
            a = pos * 10000.0 ** (-2.0 * i / dh)
            r[i] = np.cos(a) * v[i] - np.sin(a) * v[i + half]
            r[i + half] = np.sin(a) * v[i] + np.cos(a) * v[i + half]
        return r

    for bi in range(b):
        q, k, v = x[bi] @ wq, x[bi] @ wk, x[bi] @ wv
        for ti in range(t):
            heads_out = []
            for h in range(heads):
                sl = slice(h * dh, (h + 1) * dh)
                qt = rot(q[ti, sl], ti)
                scores = np.array([qt @ rot(k[s, sl], s) for s in range(ti + 1)]) / np.sqrt(dh)
                w = np.exp(scores - scores.max())
                w /= w.sum()
                heads_out.append(sum(w[s] * v[s, sl] for s in range(ti + 1)))
            out[bi, ti] = np.concatenate(heads_out) @ wo
    return out


@pytest.mark.parametrize("rope", [True, False])
def test_attention_matches_numpy_loop(rope):
    attn = build(lambda: CausalAttention(8, 2, rope=rope, rngs=nnx.Rngs(1)))
    x = jnp.asarray(RNG.normal(size=(2, 6, 8)), jnp.float32)
    w = [np.asarray(m.kernel[...], np.float64) for m in (attn.query, attn.key, attn.value, attn.out)]
    want = numpy_attention(np.asarray(x, np.float64), *w, heads=2, rope=rope)
    np.testing.assert_allclose(np.asarray(jitted(attn)(x)), want, rtol=2e-5, atol=2e-5)


def test_rotary_scores_depend_on_offset_only():
    # q_t . k_s after RoPE is a function of t - s: shifting both by 3 positions leaves it unchanged.
    q, k = RNG.normal(size=(2, 1, 1, 1, 8)).astype(np.float32)
    seq_q = np.broadcast_to(q, (1, 10, 1, 8))
    seq_k = np.broadcast_to(k, (1, 10, 1, 8))
    rot = jax.jit(rotary, compiler_options=FAST)
    rq, rk = np.asarray(rot(seq_q))[0, :, 0], np.asarray(rot(seq_k))[0, :, 0]
    assert rq[5] @ rk[2] == pytest.approx(rq[8] @ rk[5], rel=1e-4)
    assert abs(rq[5] @ rk[2] - rq[5] @ rk[4]) > 1e-3


def test_attention_is_causal():
    attn = build(lambda: CausalAttention(16, 4, rngs=nnx.Rngs(0)))
    x = RNG.normal(size=(2, 9, 16)).astype(np.float32)
    x2 = x.copy()
    x2[:, 5:] = RNG.normal(size=(2, 4, 16))
    f = jitted(attn)
    y, y2 = np.asarray(f(x)), np.asarray(f(x2))
    np.testing.assert_array_equal(y[:, :5], y2[:, :5])
    assert np.abs(y[:, 5:] - y2[:, 5:]).min() > 0.0


def test_attention_and_model_reject_bad_sizes():
    with pytest.raises(ValueError, match="heads must divide d_model"):
        CausalAttention(10, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="even head width"):
        CausalAttention(6, 2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab must be a positive int, got 0"):
        transformer(vocab=0, d_model=8, heads=2, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="levels must be a positive int"):
        CMSChannel(8, 8, 0, rngs=nnx.Rngs(0))


# -- the model -------------------------------------------------------------------------------------


def test_logits_at_equals_full_logits_gathered():
    model = build(lambda: transformer(vocab=20, d_model=16, heads=2, rngs=nnx.Rngs(0)))
    tokens = jnp.asarray(RNG.integers(0, 20, (3, 7)), jnp.int32)
    positions = jnp.array([[0, 6], [3, 3], [5, 1]], jnp.int32)
    full = np.asarray(jitted(model)(tokens))
    want = np.stack([full[b, np.asarray(positions[b])] for b in range(3)])
    np.testing.assert_allclose(
        np.asarray(jitted(model, "logits_at")(tokens, positions)), want, rtol=1e-5, atol=1e-5
    )


def test_model_is_causal_and_channel_can_be_absent():
    model = build(
        lambda: SequenceModel(
            vocab=12,
            d_model=8,
            n_layers=2,
            mixer=lambda d, r: CausalAttention(d, 2, rngs=r),
            channel=None,
            rngs=nnx.Rngs(0),
        )
    )
    assert all(layer.channel is None for layer in model.layers)
    tokens = jnp.array([[1, 2, 3, 4, 5]], jnp.int32)
    f = jitted(model)
    y, y2 = np.asarray(f(tokens)), np.asarray(f(jnp.array([[1, 2, 3, 7, 7]], jnp.int32)))
    np.testing.assert_array_equal(y[:, :3], y2[:, :3])
    assert np.abs(y[:, 3:] - y2[:, 3:]).max() > 1e-4


def test_cms_channel_against_numpy_and_one_level_is_the_mlp():
    x = jnp.asarray(RNG.normal(size=(2, 3, 4)), jnp.float32)
    cms = build(lambda: CMSChannel(4, 6, 2, rngs=nnx.Rngs(0)))

    def np_block(blk, h):
        u = h @ np.asarray(blk.up.kernel[...]) + np.asarray(blk.up.bias[...])
        g = 0.5 * u * (1 + np.tanh(np.sqrt(2 / np.pi) * (u + 0.044715 * u**3)))  # GELU, tanh form
        return g @ np.asarray(blk.down.kernel[...]) + np.asarray(blk.down.bias[...])

    h0 = np.asarray(x)
    h1 = h0 + np_block(cms.blocks[0], h0)
    h2 = h1 + np_block(cms.blocks[1], h1)
    np.testing.assert_allclose(np.asarray(jitted(cms)(x)), h2 - h0, rtol=1e-5, atol=1e-5)
    one = build(lambda: CMSChannel(4, 6, 1, rngs=nnx.Rngs(3)))
    mlp = build(lambda: MLPChannel(4, 6, rngs=nnx.Rngs(3)))
    np.testing.assert_allclose(np.asarray(jitted(one)(x)), np.asarray(jitted(mlp)(x)), rtol=1e-6, atol=1e-6)


def test_cms_labels_on_a_two_layer_hope_attention():
    model = nnx.eval_shape(  # shapes suffice: labels depend on paths only
        lambda: hope_attention(
            vocab=16,
            d_model=8,
            n_layers=2,
            heads=2,
            cms="optimizer",
            cms_levels=3,
            cms_hidden=8,
            rngs=nnx.Rngs(0),
        )
    )
    params = nnx.split(model, nnx.Param)[1]
    flat = jax.tree_util.tree_flatten_with_path(cms_labels(params))[0]
    got = {jax.tree_util.keystr(p): label for p, label in flat}
    for layer in range(2):
        for level in range(3):
            for name in ("up']['kernel", "up']['bias", "down']['kernel", "down']['bias"):
                path = f"['layers'][{layer}]['channel']['blocks'][{level}]['{name}'].value"
                assert got.pop(path) == f"block{level}"
    # Everything else (embedding, attention, norms, head) is "io": 4 + 2 * (4 attention + 4 norm) = 20.
    assert set(got.values()) == {"io"}
    assert len(got) == 20


def test_telemetry_collects_the_mixers_statistics_per_layer():
    class Probe(nnx.Module):  # attention that reports the mean of its (normalised) input
        def __init__(self, d, rngs):
            self.attn = CausalAttention(d, 2, rngs=rngs)

        def __call__(self, x):
            return self.attn(x)

        def telemetry(self, x):
            return self.attn(x), {"in_mean": x.mean(), "in_sq": jnp.mean(x * x)}

    model = build(
        lambda: SequenceModel(vocab=10, d_model=8, n_layers=2, mixer=Probe, channel=None, rngs=nnx.Rngs(0))
    )
    tokens = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    graphdef, state = nnx.split(model)

    @functools.partial(jax.jit, compiler_options=FAST)
    def probe(tokens):
        m = nnx.merge(graphdef, state)
        h1 = m.layers[0](m.embed(tokens))
        return m.telemetry(tokens), jnp.mean(m.layers[1].mixer_norm(h1) ** 2)

    stats, layer1_sq = probe(tokens)
    assert sorted(stats) == ["layer0/in_mean", "layer0/in_sq", "layer1/in_mean", "layer1/in_sq"]
    # Layer 0's input is LayerNorm(embedding) with scale 1 and bias 0 at init: per position mean 0 and
    # mean square var / (var + 1e-6), just under 1.
    e = np.asarray(model.embed.embedding[...])[np.asarray(tokens)]
    n = (e - e.mean(-1, keepdims=True)) / np.sqrt(e.var(-1, keepdims=True) + 1e-6)
    assert float(stats["layer0/in_mean"]) == pytest.approx(n.mean(), abs=1e-6)
    assert float(stats["layer0/in_sq"]) == pytest.approx(np.mean(n * n), rel=1e-5)
    # Layer 1's input is LayerNorm of layer 0's output.
    assert float(stats["layer1/in_sq"]) == pytest.approx(float(layer1_sq), rel=1e-5)


# -- the trainer -----------------------------------------------------------------------------------


def test_query_loss_by_hand():
    # Two valid queries, one padding (-1). Logits [0, ln 3] -> softmax [1/4, 3/4].
    logits = jnp.log(jnp.array([[[1.0, 3.0], [1.0, 3.0], [5.0, 1.0]]]))
    labels = jnp.array([[1, 0, -1]], jnp.int32)
    loss, acc = jax.jit(query_loss, compiler_options=FAST)(logits, labels)
    assert float(loss) == pytest.approx((-np.log(0.75) - np.log(0.25)) / 2, rel=1e-6)
    assert float(acc) == pytest.approx(0.5)


def test_finite_mean_leaves_diverged_runs_out():
    mean, left = finite_mean(
        np.array([[1.0, 2.0], [np.nan, 9.0], [3.0, 4.0]]), np.array([False, True, False])
    )
    np.testing.assert_allclose(mean, [2.0, 3.0])
    assert left == 1
    mean, left = finite_mean(np.array([0.5]), np.array([True]))
    assert np.isnan(mean) and left == 1
    with pytest.raises(ValueError, match="diverged must have shape"):
        finite_mean(np.zeros(3), np.zeros(2, bool))


def test_trainer_rejects_bad_config():
    model_fn = lambda r: transformer(vocab=8, d_model=8, heads=2, rngs=r)
    with pytest.raises(ValueError, match="chunk must be a positive int dividing steps=10, got 3"):
        SeqTrainer(model_fn, optax.sgd(0.1), recall_sampler(8, 2, 2), steps=10, chunk=3)
    trainer = SeqTrainer(model_fn, optax.sgd(0.1), recall_sampler(8, 2, 2), steps=2)
    with pytest.raises(
        ValueError, match="optimizer has no hyperparameter 'learning_rate'.*inject_hyperparams"
    ):
        trainer.init([0, 1], hparams={"learning_rate": [0.1, 0.2]})
    with pytest.raises(
        ValueError, match=r"hyperparameter 'lr' needs one value per run \(2\), got shape \(3,\)"
    ):
        trainer.init([0, 1], hparams={"lr": [0.1, 0.2, 0.3]})
    with pytest.raises(ValueError, match="model_fn must build a model with logits_at"):
        SeqTrainer(lambda r: nnx.Linear(2, 2, rngs=r), optax.sgd(0.1), recall_sampler(8, 2, 2), steps=1)


def test_transformer_learns_recall_in_one_compiled_chunk():
    # A d=32 Transformer with Adam 5e-3 learns the tiny MQAR (keys from 7 ids, 3 pairs, chance 1/8).
    # Measured: training accuracy ~0.96 averaged over steps 500-750, ~1.0 after; loss 1.1 -> ~0.
    sample = recall_sampler(vocab=16, pairs=3, batch=32)
    trainer = SeqTrainer(
        lambda r: transformer(vocab=16, d_model=32, n_layers=2, heads=4, rngs=r),
        optax.adam(5e-3),
        sample,
        steps=800,
        chunk=200,
        eval_batches=4,
    )
    logs = []
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes weak and strong types
        res = trainer.run_seeds([0], log=logs.append)
    assert trainer.n_traces == 1  # four chunks, one compilation
    assert [d["step"] for d in logs] == [200, 400, 600, 800]
    assert res["curve_step"].tolist() == [200, 400, 600, 800]
    assert res["eval_acc"][0] > 0.9
    assert res["curve_loss"][0, -1] < 0.2 * res["curve_loss"][0, 0]
    np.testing.assert_allclose(res["curve_loss"][0], res["loss"][0].reshape(4, 200).mean(1), rtol=1e-6)
    assert res["diverged_step"].tolist() == [-1] and not res["diverged"].any()


def test_vmapped_seeds_equal_single_runs_divergence_and_cms_periods():
    # HOPE-attention-like model (attention with telemetry, CMS channel of 2 levels) under the CMS rule:
    # block 0 every step, block 1 every 4 steps (applied at steps 3 and 7).
    class Probe(nnx.Module):
        def __init__(self, d, rngs):
            self.attn = CausalAttention(d, 2, rngs=rngs)

        def __call__(self, x):
            return self.attn(x)

        def telemetry(self, x):
            y = self.attn(x)
            return y, {"out_rms": jnp.sqrt(jnp.mean(y * y))}

    model_fn = lambda r: SequenceModel(
        vocab=8,
        d_model=8,
        n_layers=1,
        mixer=Probe,
        channel=lambda d, rr: CMSChannel(d, 8, 2, rngs=rr),
        rngs=r,
    )
    sample = recall_sampler(vocab=8, pairs=2, batch=4)
    tx = cms_optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-2), (1, 4))
    trainer = SeqTrainer(
        model_fn,
        tx,
        sample,
        steps=8,
        chunk=2,
        eval_batches=2,
        telemetry=True,
        compiler_options={"xla_backend_optimization_level": 0},  # 8 steps: compilation dominates
    )
    blocks = lambda params: params["layers"][0]["channel"]["blocks"]
    kernel = lambda params, level: np.asarray(blocks(params)[level]["up"]["kernel"][...])
    with jax.numpy_dtype_promotion("standard"):  # optax.adam mixes weak and strong types
        both = trainer.run_seeds([3, 4], hparams={"learning_rate": [1e-2, 1e30]})
        alone = trainer.run_seeds([3], hparams={"learning_rate": [1e-2]})
        # Step by step: block 1 keeps its initial value for steps 0..2 and moves at step 3.
        state = trainer.init([3], hparams={"learning_rate": [1e-2]})
        init = jax.tree.map(np.asarray, state.params)
        state, _ = trainer.run_chunk(state, [3])  # steps 0, 1
        after2 = jax.tree.map(np.asarray, state.params)
        state, _ = trainer.run_chunk(state, [3])  # steps 2, 3
        after4 = jax.tree.map(np.asarray, state.params)
        init4 = jax.tree.map(np.asarray, trainer.init([4], hparams={"learning_rate": [1e30]}).params)
    assert trainer.n_traces == 2  # one compilation per number of runs (2, then 1), whatever the chunks

    # Run 0 of the pair equals the same seed run alone.
    np.testing.assert_allclose(both["loss"][0], alone["loss"][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both["eval_acc"][0], alone["eval_acc"][0], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(both["state"].params), jax.tree.leaves(alone["state"].params)):
        np.testing.assert_allclose(np.asarray(a)[0], np.asarray(b)[0], rtol=1e-5, atol=1e-6)

    # Run 1 (learning rate 1e30) diverges at step 0: Adam's first update is about lr * sign(g) per entry,
    # so its squared norm (~1e60 n) overflows float32 to inf; the update is not applied and the run stays
    # frozen at its initial parameters for good, with NaN losses after step 0.
    assert both["diverged_step"].tolist() == [-1, 0]
    assert both["diverged"].tolist() == [False, True]
    for a, b in zip(jax.tree.leaves(both["state"].params), jax.tree.leaves(init4)):
        np.testing.assert_array_equal(np.asarray(a)[1], b[0])
    assert np.isfinite(both["loss"][1, 0]) and np.isnan(both["loss"][1, 1:]).all()
    assert np.isfinite(both["loss"][0]).all()
    mean, left = finite_mean(both["eval_acc"], both["diverged"])
    assert left == 1 and mean == both["eval_acc"][0]
    mean, left = finite_mean(both["curve_loss"], both["diverged"])
    np.testing.assert_array_equal(mean, both["curve_loss"][0])

    # The CMS periods hold through the trainer.
    np.testing.assert_array_equal(kernel(after2, 1), kernel(init, 1))
    assert np.abs(kernel(after2, 0) - kernel(init, 0)).max() > 0
    assert np.abs(kernel(after4, 1) - kernel(init, 1)).max() > 0

    # Telemetry: one value per chunk, the last equal to the model on the telemetry batch of step 8.
    assert both["telemetry"]["layer0/out_rms"].shape == (2, 4)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), 3), 8)
    params = jax.tree.map(lambda x: x[0], alone["state"].params)
    want = jax.jit(lambda p, k: trainer.apply(p).telemetry(sample(k).tokens))(params, key)["layer0/out_rms"]
    assert alone["telemetry"]["layer0/out_rms"][0, -1] == pytest.approx(float(want), rel=1e-5)
