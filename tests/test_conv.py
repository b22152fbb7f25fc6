"""Conv-4 and the reduced ResNet-18: parameter counts by hand, forward passes against numpy, BatchNorm
statistics, a finite-difference gradient check, and one run in each family (continual, meta)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestlearn import continual, meta, nn
from nestlearn.tasks import TaskStream
from nestlearn.tasks._meta import TaskBatch
from nestlearn.tasks._stream import identity_features


def n_params(model_fn) -> int:
    abstract = nnx.eval_shape(model_fn)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


# -- parameter counts, derived by hand ------------------------------------------------------------


def resnet18_count(c: int, nf: int, n_classes: int) -> int:
    """Reduced ResNet-18 by hand: 3x3 convs without bias, BN = 2 per channel, 1x1 projections where the
    stage changes width, a linear head."""
    conv = lambda k, cin, cout: k * k * cin * cout
    bn = lambda ch: 2 * ch
    total = conv(3, c, nf) + bn(nf)  # stem
    cin = nf
    for stage in range(4):
        cout = nf * 2**stage
        for _ in range(2):
            total += conv(3, cin, cout) + bn(cout) + conv(3, cout, cout) + bn(cout)
            if cin != cout:  # first block of stages 2-4: 1x1 stride-2 projection + BN
                total += conv(1, cin, cout) + bn(cout)
            cin = cout
    return total + 8 * nf * n_classes + n_classes


def test_resnet18_parameter_count_matches_hand_derivation_and_gem_figure():
    # nf=20, 32x32x3, 100 classes (GEM's CIFAR-100):
    #   stem 3*3*3*20 + 40 = 580; stage 1: 2 * (2*3600 + 80) = 14,560;
    #   stage 2: (7,200 + 14,400 + 160 + 800 + 80) + (2*14,400 + 160) = 51,600;
    #   stage 3: (28,800 + 57,600 + 320 + 3,200 + 160) + (2*57,600 + 320) = 205,600;
    #   stage 4: (115,200 + 230,400 + 640 + 12,800 + 320) + (2*230,400 + 640) = 820,800;
    #   head 160*100 + 100 = 16,100.  Total 1,109,240 (≈ 1.1 M, the reduced ResNet-18's known size).
    assert resnet18_count(3, 20, 100) == 580 + 14_560 + 51_600 + 205_600 + 820_800 + 16_100 == 1_109_240
    assert n_params(lambda: nn.ResNet18((32, 32, 3), 100, rngs=nnx.Rngs(0))) == 1_109_240
    assert n_params(lambda: nn.ResNet18((32, 32, 3), 10, nf=64, rngs=nnx.Rngs(0))) == resnet18_count(
        3, 64, 10
    )
    assert resnet18_count(3, 64, 10) == 11_173_962  # torchvision-style ResNet-18 for CIFAR-10 (DER++'s)


def test_conv4_parameter_counts_and_output_shapes():
    # Omniglot, 64 filters, 5-way: conv1 3*3*1*64 + 64 = 640, three convs 3*3*64*64 + 64 = 36,928,
    # 4 BN of 128, head 64*5 + 5 = 325 (28 -> 14 -> 7 -> 3 -> 1, so 64 features).
    assert n_params(lambda: nn.Conv4((28, 28, 1), 5, rngs=nnx.Rngs(0))) == 640 + 3 * 36_928 + 4 * 128 + 325
    # mini-ImageNet, MAML's 32 filters: 896 + 3 * 9,248 + 4 * 64 + (5*5*32)*5 + 5 = 32,901.
    mini = lambda: nn.Conv4((84, 84, 3), 5, width=32, rngs=nnx.Rngs(0))
    assert n_params(mini) == 896 + 3 * 9_248 + 4 * 64 + 800 * 5 + 5 == 32_901
    # Without BatchNorm the 4 BN layers' 2*width parameters go.
    no_bn = lambda: nn.Conv4((84, 84, 3), 5, width=32, batch_norm=False, rngs=nnx.Rngs(0))
    assert n_params(no_bn) == 32_901 - 4 * 64
    # Output shapes (abstract: nothing computed).
    out = lambda m, x: nnx.eval_shape(lambda: m()(jnp.zeros(x))).shape
    assert out(lambda: nn.Conv4((28, 28, 1), 5, rngs=nnx.Rngs(0)), (7, 28, 28, 1)) == (7, 5)
    assert out(mini, (7, 84, 84, 3)) == (7, 5)
    embed = lambda: nn.Conv4((84, 84, 3), None, width=32, rngs=nnx.Rngs(0))  # ProtoNets' embedding
    assert out(embed, (7, 84, 84, 3)) == (7, 800)
    assert out(lambda: nn.Conv4((28, 28, 1), None, rngs=nnx.Rngs(0)), (7, 28 * 28)) == (7, 64)  # flat input
    assert out(lambda: nn.ResNet18((64, 64, 3), None, rngs=nnx.Rngs(0)), (2, 64, 64, 3)) == (2, 160)


def test_anil_default_head_is_the_linear_head():
    # ANIL's default head is "the last layer" of the parameter pytree: the linear head, not a BatchNorm.
    from nestlearn.meta._maml import _head_mask

    for make in (
        lambda: nn.Conv4((28, 28, 1), 5, rngs=nnx.Rngs(0)),
        lambda: nn.ResNet18((32, 32, 3), 10, rngs=nnx.Rngs(0)),
    ):
        params = nnx.state(nnx.eval_shape(make), nnx.Param)
        paths = [meta.plain_path(k) for k, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
        mask = _head_mask(params, None)
        assert [p for p, m in zip(paths, mask) if m] == [("head", "bias"), ("head", "kernel")]


def test_bad_shapes_get_clear_errors():
    with pytest.raises(ValueError, match=r"input_shape must be \(height, width, channels\)"):
        nn.Conv4((28, 28), 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="too small for 4"):
        nn.Conv4((8, 8, 1), 5, rngs=nnx.Rngs(0))
    net = nn.Conv4((16, 16, 1), 2, width=2, rngs=nnx.Rngs(0))
    with pytest.raises(
        ValueError, match=r"expected images of shape \(16, 16, 1\).*got inputs of shape \(2, 15\)"
    ):
        net(jnp.zeros((2, 15)))
    with pytest.raises(ValueError, match="MLP takes inputs whose trailing dimensions hold 784"):
        nn.MLP(784, (4,), 2, rngs=nnx.Rngs(0))(jnp.zeros((2, 27, 28, 1)))


def test_mlp_flattens_images_and_keeps_sequences():
    mlp = nn.MLP(12, (5,), 3, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (4, 2, 3, 2))
    apply, params = meta.functional(mlp)
    np.testing.assert_allclose(apply(params, x), apply(params, x.reshape(4, 12)), rtol=1e-6)
    assert jax.eval_shape(apply, params, jnp.zeros((4, 7, 12))).shape == (4, 7, 3)  # [batch, time, d] kept


# -- forward passes against an independent numpy implementation ---------------------------------


def np_conv(x, w, b, stride, pad):
    """NHWC cross-correlation, PyTorch's symmetric zero padding."""
    x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    kh, kw = w.shape[:2]
    h, wd = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    out = np.zeros((x.shape[0], h, wd, w.shape[3]))
    for i in range(kh):
        for j in range(kw):
            out += x[:, i : i + stride * h : stride, j : j + stride * wd : stride, :] @ w[i, j]
    return out + (0 if b is None else b)


def np_bn(x, p):
    mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    return (x - mean) / np.sqrt(var + 1e-5) * p["scale"] + p["bias"], mean, var


def np_pool(x):
    h, w = x.shape[1] // 2, x.shape[2] // 2
    x = x[:, : 2 * h, : 2 * w]
    return x.reshape(x.shape[0], h, 2, w, 2, x.shape[3]).max((2, 4))


def as_np(state):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(state))


def test_conv4_forward_and_batchnorm_statistics_match_numpy():
    net = nn.Conv4((7, 7, 2), 3, width=3, depth=2, rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(2), (5, 7, 7, 2)), np.float64)
    p = as_np(nnx.state(net, nnx.Param))
    h, means, vars_ = x, [], []
    for i in range(2):  # 7 -> 3 -> 1 (floor pooling)
        h = np_conv(h, p["body"]["convs"][i]["kernel"], p["body"]["convs"][i]["bias"], 1, 1)
        h, m, v = np_bn(h, p["body"]["norms"][i])
        means.append(m)
        vars_.append(v)
        h = np_pool(np.maximum(h, 0))
    want = h.reshape(5, -1) @ p["head"]["kernel"] + p["head"]["bias"]
    got = nnx.jit(lambda m, a: m(a))(net, jnp.asarray(x, jnp.float32))  # train mode: batch statistics
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # The running averages moved by PyTorch's momentum 0.1 (Flax 0.9) toward the batch's (biased) stats.
    for i in range(2):
        np.testing.assert_allclose(net.body.norms[i].mean[...], 0.1 * means[i], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(net.body.norms[i].var[...], 0.9 + 0.1 * vars_[i], rtol=1e-4)
    # Eval mode uses the running averages and leaves them alone.
    net.eval()
    before = np.asarray(net.body.norms[0].mean[...])
    e = np_conv(x, p["body"]["convs"][0]["kernel"], p["body"]["convs"][0]["bias"], 1, 1)
    e = (e - 0.1 * means[0]) / np.sqrt(0.9 + 0.1 * vars_[0] + 1e-5) * p["body"]["norms"][0]["scale"]
    e = np_pool(np.maximum(e + p["body"]["norms"][0]["bias"], 0))
    e = np_conv(e, p["body"]["convs"][1]["kernel"], p["body"]["convs"][1]["bias"], 1, 1)
    e = (e - 0.1 * means[1]) / np.sqrt(0.9 + 0.1 * vars_[1] + 1e-5) * p["body"]["norms"][1]["scale"]
    e = np_pool(np.maximum(e + p["body"]["norms"][1]["bias"], 0)).reshape(5, -1)
    got = nnx.jit(lambda m, a: m(a))(net, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(got, e @ p["head"]["kernel"] + p["head"]["bias"], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(net.body.norms[0].mean[...], before)


def test_resnet_forward_matches_numpy_with_pytorch_padding():
    # Stride-2 convolutions on an even size: PyTorch pads (1, 1) where Flax's "SAME" would pad (0, 1).
    net = nn.ResNet18((6, 6, 2), 3, nf=2, blocks=(1, 1), rngs=nnx.Rngs(0))
    x = np.asarray(jax.random.normal(jax.random.key(3), (4, 6, 6, 2)), np.float64)
    p = as_np(nnx.state(net, nnx.Param))
    relu = lambda a: np.maximum(a, 0)
    h = relu(np_bn(np_conv(x, p["body"]["stem"]["kernel"], None, 1, 1), p["body"]["stem_bn"])[0])
    b0, b1 = p["body"]["blocks"][0], p["body"]["blocks"][1]
    out = relu(np_bn(np_conv(h, b0["conv1"]["kernel"], None, 1, 1), b0["bn1"])[0])
    h = relu(np_bn(np_conv(out, b0["conv2"]["kernel"], None, 1, 1), b0["bn2"])[0] + h)  # identity shortcut
    out = relu(np_bn(np_conv(h, b1["conv1"]["kernel"], None, 2, 1), b1["bn1"])[0])  # 6x6 -> 3x3
    out = np_bn(np_conv(out, b1["conv2"]["kernel"], None, 1, 1), b1["bn2"])[0]
    short = np_bn(np_conv(h, b1["proj"]["kernel"], None, 2, 0), b1["proj_bn"])[0]
    h = relu(out + short).mean((1, 2))
    want = h @ p["head"]["kernel"] + p["head"]["bias"]
    apply, params = meta.functional(net)  # train mode, the model itself untouched
    apply = jax.jit(apply)
    np.testing.assert_allclose(apply(params, jnp.asarray(x, jnp.float32)), want, rtol=1e-4, atol=1e-5)
    # Flat inputs (a flat stream's rows) give the same logits.
    flat = jnp.asarray(x.reshape(4, -1), jnp.float32)
    np.testing.assert_allclose(apply(params, flat), want, rtol=1e-4, atol=1e-5)


def test_conv4_gradient_matches_finite_differences():
    net = nn.Conv4((6, 6, 1), 3, width=2, depth=2, rngs=nnx.Rngs(0))
    apply, params = meta.functional(net)  # train-mode BN: batch statistics, differentiated through
    loss = meta.cross_entropy_loss(apply)
    x = jax.random.normal(jax.random.key(4), (6, 6, 6, 1))
    y = jnp.array([0, 1, 2, 0, 1, 2], jnp.int32)
    loss = jax.jit(loss)
    g = jax.jit(jax.grad(loss))(params, x, y)
    v = jax.tree.map(lambda a, k: jax.random.normal(k, a.shape), params, _keys(params, 5))
    eps = 1e-2
    shift = lambda s: jax.tree.map(lambda a, d: a + s * eps * d, params, v)
    fd = (loss(shift(1.0), x, y) - loss(shift(-1.0), x, y)) / (2 * eps)
    directional = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(v)))
    assert float(jnp.abs(directional)) > 1e-2  # a real slope, not a flat spot
    np.testing.assert_allclose(float(fd), float(directional), rtol=3e-2)


def _keys(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    return treedef.unflatten(list(jax.random.split(jax.random.key(seed), len(leaves))))


# -- the families -----------------------------------------------------------------------------


def image_stream(n_tasks=2, n=64, m=32, side=8, seed=0) -> TaskStream:
    """Two-class tasks of 8x8x1 images: class c of task t lights quadrant 2t + c (plus noise)."""
    rng = np.random.default_rng(seed)
    n_classes = 2 * n_tasks

    def pool(k):
        y = np.tile(np.arange(n_classes), k // n_classes + 1)[:k]
        x = 0.3 * rng.normal(size=(k, side, side, 1))
        h = side // 2
        for i, c in enumerate(y):
            q = c % 4
            x[i, (q // 2) * h : (q // 2 + 1) * h, (q % 2) * h : (q % 2 + 1) * h] += 1.0
        return x.reshape(k, -1).astype(np.float32), y.astype(np.int32)

    (x, y), (xt, yt) = pool(n * n_tasks), pool(m * n_tasks)
    rows = lambda yy, k: np.stack([np.flatnonzero(yy // 2 == t)[:k] for t in range(n_tasks)])
    fi, fw = identity_features(n_tasks, side * side)
    mask = np.zeros((n_tasks, n_classes), bool)
    for t in range(n_tasks):
        mask[t, 2 * t : 2 * t + 2] = True
    return TaskStream(
        train_x=jnp.asarray(x),
        train_y=jnp.asarray(y),
        test_x=jnp.asarray(xt),
        test_y=jnp.asarray(yt),
        train_idx=jnp.asarray(rows(y, n // 2), jnp.int32),
        train_n=jnp.full((n_tasks,), n // 2, jnp.int32),
        test_idx=jnp.asarray(rows(yt, m // 2), jnp.int32),
        test_n=jnp.full((n_tasks,), m // 2, jnp.int32),
        feature_idx=fi,
        feature_w=fw,
        label_map=jnp.tile(jnp.arange(n_classes, dtype=jnp.int32), (n_tasks, 1)),
        class_mask=jnp.asarray(mask),
        name="quadrants",
        task_names=("q01", "q23"),
        n_classes=n_classes,
    )


@pytest.mark.parametrize(
    "model",
    [
        lambda rngs: nn.Conv4((8, 8, 1), 4, width=4, depth=2, rngs=rngs),
        # im2col: the same function (test_im2col_...), without XLA CPU's slow conv gradients inside scan.
        # Slow (its compilation): the Learner path is covered by conv4, ResNet's function by the numpy test.
        pytest.param(
            lambda rngs: nn.ResNet18((8, 8, 1), 4, nf=4, blocks=(1, 1), impl="im2col", rngs=rngs),
            marks=pytest.mark.slow,
        ),
    ],
    ids=["conv4", "resnet"],
)
def test_backbone_learns_a_continual_image_stream_and_carries_batch_stats(model):
    stream = image_stream()
    config = continual.TrainConfig(steps_per_task=25, batch_size=16)
    learner = continual.Learner(model, optax.sgd(0.05, momentum=0.9), continual.Naive(), config)
    state = learner.init(stream, [0, 1])
    before = [np.asarray(a) for a in jax.tree.leaves(state.model_state)]  # state is donated below
    state, out = learner.run_task(state, stream, 0)
    # Task 0 (task-incremental head) learned from chance (0.5) to near-perfect, for both seeds.
    assert np.all(np.asarray(out.acc_row)[:, 0] >= 0.9), out.acc_row
    # Train-mode BatchNorm moved the running averages carried in model_state (means start at 0).
    after = [np.asarray(a) for a in jax.tree.leaves(state.model_state)]
    assert any(not np.allclose(a, b) for a, b in zip(before, after))
    # Evaluation is in eval mode: it reads the running averages and does not change them.
    acc = learner.evaluate(state, stream)
    np.testing.assert_allclose(np.asarray(acc)[:, 0], np.asarray(out.acc_row)[:, 0])
    for a, b in zip(after, jax.tree.leaves(state.model_state)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "batch_norm, impl, first_order",
    [pytest.param(True, "im2col", True, marks=pytest.mark.slow), (False, "lax", False)],
)
def test_conv4_maml_meta_steps_reduce_the_query_loss(batch_norm, impl, first_order):
    # 3-way tasks on 8x8 images (a class lights one quadrant); MAML with one inner SGD step, BN in train
    # mode inside the inner loop (batch statistics of the support / query set, as MAML does). With BN,
    # first-order MAML (second order through BN compiles for minutes on a loaded CPU); without, second order.
    net = nn.Conv4((8, 8, 1), 3, width=4, depth=2, batch_norm=batch_norm, impl=impl, rngs=nnx.Rngs(0))
    apply, params = meta.functional(net)
    maml = meta.MAML(meta.cross_entropy_loss(apply), optax.sgd(0.1), steps=1, first_order=first_order)
    stream = image_stream(n_tasks=2)
    x = np.asarray(stream.train_x).reshape(-1, 8, 8, 1)
    y = np.asarray(stream.train_y)
    sel = lambda c, k, off: np.flatnonzero(y == c)[off : off + k]
    perms = [(0, 1, 2), (2, 0, 1), (1, 3, 0), (3, 2, 1)]  # classes per task; label = position
    sx, sy, qx, qy = [], [], [], []
    for classes in perms:
        s = np.concatenate([sel(c, 2, 0) for c in classes])
        q = np.concatenate([sel(c, 4, 2) for c in classes])
        sx.append(x[s])
        qx.append(x[q])
        sy.append(np.repeat(np.arange(3), 2))
        qy.append(np.repeat(np.arange(3), 4))
    tasks = TaskBatch(*(jnp.asarray(np.stack(a)) for a in (sx, np.int32(sy), qx, np.int32(qy))))
    outer = optax.sgd(0.05, momentum=0.9)  # (optax.adam trips strict dtype promotion on its int count)
    mp = maml.init(params)
    opt = outer.init(mp)

    @jax.jit
    def step(mp, opt):
        g, metrics = maml.meta_grad(mp, tasks)
        upd, opt = outer.update(g, opt, mp)
        return optax.apply_updates(mp, upd), opt, metrics

    first = None
    for _ in range(15):
        mp, opt, metrics = step(mp, opt)
        first = float(metrics["loss_post"]) if first is None else first
    last = float(maml.meta_grad(mp, tasks)[1]["loss_post"])
    assert np.isfinite(last) and last < 0.5 * first, (first, last)


def test_im2col_convolutions_equal_lax_in_value_and_gradient():
    # Same parameters, same function: strided 3x3, 1x1 projections, odd sizes, with and without bias.
    for make in (
        lambda impl: nn.ResNet18((7, 7, 3), 4, nf=3, blocks=(1, 1), impl=impl, rngs=nnx.Rngs(0)),
        lambda impl: nn.Conv4((9, 9, 2), 3, width=3, depth=2, impl=impl, rngs=nnx.Rngs(0)),
    ):
        (apply_a, params), (apply_b, params_b) = meta.functional(make("lax")), meta.functional(make("im2col"))
        assert jax.tree.structure(params) == jax.tree.structure(params_b)
        x = jax.random.normal(jax.random.key(6), (5, *make("lax").input_shape))
        y = jnp.array([0, 1, 2, 0, 1], jnp.int32)
        f = lambda apply: jax.jit(jax.value_and_grad(meta.cross_entropy_loss(apply)))
        (la, ga), (lb, gb) = f(apply_a)(params, x, y), f(apply_b)(params, x, y)
        np.testing.assert_allclose(lb, la, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
            np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'lax', 'im2col'\)"):
        nn.Conv4((28, 28, 1), 5, impl="fft", rngs=nnx.Rngs(0))


@pytest.mark.slow  # compilation-bound; MAML with BN is covered by the Conv4 test, ResNet by the numpy test
def test_resnet_first_order_maml_gradient_is_the_query_gradient_at_the_adapted_parameters():
    # FOMAML's meta-gradient for one task: grad L_query(phi) at phi = theta - lr * grad L_support(theta),
    # BN in train mode (batch statistics) in both losses; computed here by hand and compared.
    net = nn.ResNet18((8, 8, 1), 3, nf=2, blocks=(1, 1), impl="im2col", rngs=nnx.Rngs(0))
    apply, params = meta.functional(net)
    loss = meta.cross_entropy_loss(apply)
    maml = meta.MAML(loss, optax.sgd(0.5), steps=1, first_order=True)
    k = jax.random.split(jax.random.key(7), 2)
    sx, qx = jax.random.normal(k[0], (1, 6, 8, 8, 1)), jax.random.normal(k[1], (1, 9, 8, 8, 1))
    sy, qy = jnp.array([[0, 1, 2, 0, 1, 2]], jnp.int32), jnp.array([[0, 1, 2] * 3], jnp.int32)
    g, _ = jax.jit(maml.meta_grad)(params, TaskBatch(sx, sy, qx, qy))

    @jax.jit
    def by_hand(p):
        phi = jax.tree.map(lambda a, b: a - 0.5 * b, p, jax.grad(loss)(p, sx[0], sy[0]))
        return jax.grad(loss)(phi, qx[0], qy[0])

    want = by_hand(params)
    assert float(optax.tree.norm(want)) > 1e-3
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
