"""Streams from user arrays and image streams: validation, scenarios, normalisation and augmentation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestlearn import ConfigError, DataError, continual
from nestlearn.tasks import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageData,
    MnistData,
    channel_stats,
    incremental_cifar100,
    split_cifar10,
    split_cifar100,
    split_mnist,
    stream_from_pool,
    stream_from_tasks,
)


def fake_cifar(n_classes=10, per_class=4, test_per_class=2, side=8, seed=0):
    """Small uint8 images in CIFAR's layout (the builders do not depend on the 32x32 size)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(n_classes), per_class)
    yt = np.repeat(np.arange(n_classes), test_per_class)
    return ImageData(
        train_x=rng.integers(0, 256, (y.size, side, side, 3), dtype=np.uint8),
        train_y=rng.permutation(y).astype(np.int32),
        test_x=rng.integers(0, 256, (yt.size, side, side, 3), dtype=np.uint8),
        test_y=yt.astype(np.int32),
        class_names=tuple(f"c{i}" for i in range(n_classes)),
        source="synthetic",
    )


# ------------------------------------------------------------------------------------------ from arrays


def test_pool_constructor_reproduces_split_mnist_in_all_scenarios():
    """split_mnist re-expressed through stream_from_pool: the same tasks, labels, masks and inputs."""
    rng = np.random.default_rng(0)
    data = MnistData(
        train_x=rng.random((60, 12), np.float32), train_y=rng.permutation(np.arange(60) % 10).astype(np.int32),
        test_x=rng.random((30, 12), np.float32), test_y=rng.permutation(np.arange(30) % 10).astype(np.int32),
        source="synthetic",
    )  # fmt: skip
    pairs = [(2 * t, 2 * t + 1) for t in range(5)]
    for scenario in ("task", "domain", "class"):
        ref = split_mnist(scenario, data=data)
        new = stream_from_pool(
            data.train_x, data.train_y, data.test_x, data.test_y, task_classes=pairs, scenario=scenario,
            name="split_mnist",
        )  # fmt: skip
        assert new.name == ref.name and new.task_names == ref.task_names and new.n_classes == ref.n_classes
        for field in ("train_idx", "train_n", "test_idx", "test_n", "class_mask"):
            np.testing.assert_array_equal(getattr(new, field), getattr(ref, field), err_msg=field)
        for t, p in enumerate(pairs):  # the labels a task holds map alike (others are never looked up)
            np.testing.assert_array_equal(new.label_map[t, list(p)], ref.label_map[t, list(p)])
        assert new.input_shape == (12,) and new.input_dim == 12
    task, pos = jnp.array([0, 3, 4]), jnp.array([0, 5, 7])  # class scenario: the same examples
    for a, b in zip(new.train_examples(task, pos), ref.train_examples(task, pos)):
        np.testing.assert_array_equal(a, b)


def test_per_task_constructor_pools_tasks_and_maps_labels():
    rng = np.random.default_rng(1)
    tasks = []
    for t in range(3):  # task t: labels 2t, 2t+1 (class-incremental), images 4x4x1 uint8
        x = rng.integers(0, 256, (6, 4, 4), dtype=np.uint8)
        tasks.append((x, np.array([2 * t, 2 * t + 1] * 3), x[:2], np.array([2 * t + 1, 2 * t])))
    stream = stream_from_tasks(tasks, scenario="domain", name="mine")
    assert stream.n_tasks == 3 and stream.n_classes == 2 and stream.input_shape == (4, 4, 1)
    assert stream.train_x.dtype == jnp.uint8 and stream.name == "mine/domain"
    np.testing.assert_array_equal(stream.train_n, [6, 6, 6])
    np.testing.assert_array_equal(stream.train_idx[2], np.arange(12, 18))
    x, y = stream.train_examples(jnp.array([2, 2]), jnp.array([0, 1]))
    np.testing.assert_array_equal(y, [0, 1])  # labels 4, 5 are the task's 0th and 1st class
    np.testing.assert_allclose(x, tasks[2][0][:2, :, :, None] / np.float32(255.0), rtol=1e-6)
    tstream = stream_from_tasks(tasks, scenario="task")
    np.testing.assert_array_equal(tstream.class_mask[1], [0, 0, 1, 1, 0, 0])
    np.testing.assert_array_equal(tstream.label_map[1], np.arange(6))


@pytest.mark.parametrize(
    "change,error,pattern",
    [
        (dict(train_y=np.array([0, 1, 2, 7]), n_labels=4), DataError, r"train_y has label 7 at index 3, outside 0\.\.3"),
        (dict(train_y=np.array([0, 1, -1, 2])), DataError, "train_y has label -1 at index 2"),
        (dict(train_y=np.array([0.0, 1, 2, 3])), DataError, "train_y must hold integer labels, got dtype float64"),
        (dict(train_y=np.array([0, 1, 2])), DataError, r"train_y has shape \(3,\): expected \(4,\)"),
        (dict(train_x=np.zeros((4, 2, 2, 2, 2))), DataError, r"train_x has shape \(4, 2, 2, 2, 2\): expected"),
        (dict(train_x=np.zeros((4, 3), np.int64)), DataError, "train_x has integer dtype int64: give uint8"),
        (dict(test_x=np.zeros((2, 5), np.float32)), DataError, r"train_x examples have shape \(3,\) but test_x"),
        (dict(test_x=np.array([[0, 1, np.nan]] * 2)), DataError, r"test_x holds a non-finite value nan at index \(0, 2\)"),
        (dict(task_classes=[(0, 1), (2, 9)]), ConfigError, r"task_classes\[1\] = \[2, 9\] must be non-empty classes in 0\.\.3"),
        (dict(task_classes=[(0,), (3,)]), DataError, r"task 1 \(classes \[3\]\) has 1 training and 0 test"),
        (dict(scenario="online"), ConfigError, "scenario='online' is unknown"),
        (dict(task_classes=None, train_rows=[[0, 9]], test_rows=[[0]]), ConfigError, r"train_rows\[0\] has row 9, outside the pool's 0\.\.3"),
        (dict(train_rows=[[0]], test_rows=[[0]]), ConfigError, "either task_classes or train_rows"),
        (dict(crop_padding=4), ConfigError, r"crop_padding and flip augment images: the pool is flat"),
        (dict(mean=[0.5, 0.5], std=[1.0, 1.0]), ConfigError, r"mean has shape \(2,\): expected a scalar or \(3,\)"),
        (dict(mean=0.5, std=0.0), ConfigError, "std must be finite and positive"),
    ],
)  # fmt: skip
def test_pool_constructor_rejects_bad_input_naming_it(change, error, pattern):
    args = dict(
        train_x=np.zeros((4, 3), np.float32), train_y=np.array([0, 1, 2, 3]),
        test_x=np.zeros((2, 3), np.float32), test_y=np.array([0, 2]),
        task_classes=[(0, 1), (2, 3)],
    )  # fmt: skip
    args.update(change)
    with pytest.raises(error, match=pattern):
        stream_from_pool(
            args.pop("train_x"), args.pop("train_y"), args.pop("test_x"), args.pop("test_y"), **args
        )


def test_per_task_constructor_names_the_task():
    good = (np.zeros((2, 3), np.float32), np.array([0, 1]), np.zeros((1, 3), np.float32), np.array([0]))
    with pytest.raises(DataError, match=r"tasks\[1\] y_test has shape \(2,\): expected \(1,\)"):
        stream_from_tasks([good, (good[0], good[1], good[2], np.array([0, 1]))])
    with pytest.raises(DataError, match=r"tasks\[1\] x_train has examples \(4,\) float32, but tasks\[0\]"):
        stream_from_tasks([good, (np.zeros((2, 4)), good[1], good[2], good[3])])
    with pytest.raises(ConfigError, match=r"tasks\[0\] must be a tuple"):
        stream_from_tasks([good[:3]])
    with pytest.raises(ConfigError, match="tasks is empty"):
        stream_from_tasks([])


# ------------------------------------------------------------------------------------------ CIFAR builders


def test_split_cifar_scenarios_and_class_order():
    data = fake_cifar()
    s = split_cifar10("task", data=data, augment=False)
    assert s.n_tasks == 5 and s.n_classes == 10 and s.input_shape == (8, 8, 3)
    assert s.train_x.dtype == jnp.uint8 and s.crop_padding == 0 and not s.flip
    np.testing.assert_array_equal(s.class_mask[2], np.isin(np.arange(10), [4, 5]))
    rows = np.asarray(s.train_idx[2][: int(s.train_n[2])])
    np.testing.assert_array_equal(rows, np.flatnonzero(np.isin(data.train_y, [4, 5])))
    d = split_cifar10("domain", data=data)
    assert d.n_classes == 2 and d.crop_padding == 4 and d.flip
    np.testing.assert_array_equal(d.label_map[3], [0, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # 6 -> 0, 7 -> 1
    c100 = fake_cifar(n_classes=100, per_class=1, test_per_class=1)
    for n_tasks in (10, 20):
        s = split_cifar100("class", n_tasks, data=c100, class_order=np.arange(100)[::-1])
        assert s.n_tasks == n_tasks and s.n_classes == 100 and bool(s.class_mask.all())
        first = np.sort(np.asarray(s.train_y)[np.asarray(s.train_idx[0][: int(s.train_n[0])])])
        np.testing.assert_array_equal(first, np.arange(100 - 100 // n_tasks, 100))
    with pytest.raises(ConfigError, match="n_tasks=3 must divide the 10 classes"):
        split_cifar10("class", 3, data=data)
    with pytest.raises(ConfigError, match="either data or path"):
        split_cifar10("class")
    with pytest.raises(ConfigError, match="class_order must be a permutation of 0..9"):
        split_cifar10("class", data=data, class_order=[0] * 10)


def test_incremental_cifar100_adds_classes_cumulatively():
    data = fake_cifar(n_classes=100, per_class=2, test_per_class=1)
    s = incremental_cifar100(5, data=data, seed=3)
    order = np.random.default_rng(3).permutation(100)
    assert s.n_tasks == 20 and s.task_names[1] == "10 classes"
    np.testing.assert_array_equal(s.train_n, 10 * np.arange(1, 21))  # 5 classes x 2 images more per task
    seen = np.unique(np.asarray(s.test_y)[np.asarray(s.test_idx[3][: int(s.test_n[3])])])
    np.testing.assert_array_equal(seen, np.sort(order[:20]))


def test_normalisation_matches_numpy_and_channel_stats():
    data = fake_cifar()
    s = split_cifar10("class", data=data)
    x, y, valid = jax.jit(s.test_set)(jnp.asarray(1))
    rows = np.flatnonzero(np.isin(data.test_y, [2, 3]))
    expected = (data.test_x[rows] / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    np.testing.assert_allclose(np.asarray(x)[np.asarray(valid)], expected, rtol=1e-5, atol=1e-5)
    assert x.dtype == jnp.float32 and x.shape[1:] == (8, 8, 3)
    xs, _ = jax.jit(s.train_examples)(jnp.zeros(3, jnp.int32), jnp.arange(3))  # un-augmented as well
    r0 = np.flatnonzero(np.isin(data.train_y, [0, 1]))[:3]
    np.testing.assert_allclose(
        xs, (data.train_x[r0] / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD), rtol=1e-5, atol=1e-5
    )
    mean, std = channel_stats(data.train_x)
    flat = data.train_x.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, flat.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, flat.std(0), rtol=1e-10)


# ------------------------------------------------------------------------------------------ augmentation


def test_augmentation_is_a_padded_crop_and_flip_per_example():
    data = fake_cifar(side=6)
    s = split_cifar10("class", data=data)
    x, _ = jax.jit(s.train_examples)(jnp.zeros(16, jnp.int32), jnp.arange(16) % int(s.train_n[0]))
    augment = jax.jit(s.augment)
    aug = np.asarray(augment(jax.random.key(0), x))
    # Reference: each output must be one of the 9 x 9 windows of the raw image zero-padded by 4 pixels
    # (then normalised), mirrored or not.
    raw = data.train_x[np.asarray(s.train_idx[0])[np.arange(16) % int(s.train_n[0])]] / 255.0
    padded = np.pad(raw, ((0, 0), (4, 4), (4, 4), (0, 0)))
    norm = (padded - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    offsets, flips = [], []
    for i in range(16):
        found = [
            (r, c, f)
            for r in range(9)
            for c in range(9)
            for f in (0, 1)
            if np.allclose(
                (norm[i, r : r + 6, c : c + 6, :][:, ::-1] if f else norm[i, r : r + 6, c : c + 6]),
                aug[i],
                atol=1e-5,
            )
        ]
        assert found, f"example {i} is not a padded crop (or its mirror)"
        offsets.append(found[0][:2])
        flips.append(found[0][2])
    assert len(set(offsets)) > 4 and 0 < sum(flips) < 16  # per-example draws, not one for the batch
    # Deterministic per key, different across keys; per run under vmap (two runs, two crops).
    np.testing.assert_array_equal(aug, augment(jax.random.key(0), x))
    keys = jax.random.split(jax.random.key(1), 2)
    runs = jax.jit(jax.vmap(s.augment, in_axes=(0, None)))(keys, x)
    assert not np.allclose(runs[0], runs[1])
    np.testing.assert_allclose(runs[1], augment(keys[1], x), rtol=1e-6)
    # No augmentation asked: the identity.
    plain = split_cifar10("class", data=data, augment=False)
    np.testing.assert_array_equal(plain.augment(jax.random.key(0), x), x)


class Flat(nnx.Module):
    """A linear classifier on flattened images (the smallest model that takes NHWC inputs)."""

    def __init__(self, d, c, *, rngs):
        self.linear = nnx.Linear(d, c, rngs=rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


def test_engine_trains_on_uint8_image_streams_with_augmentation_and_replay():
    data = fake_cifar(per_class=6, side=4)
    model = lambda rngs: Flat(4 * 4 * 3, 10, rngs=rngs)
    config = continual.TrainConfig(steps_per_task=3, batch_size=4)
    runs = {}
    for augment in (False, True):
        stream = split_cifar10("class", 2, data=data, augment=augment)
        learner = continual.Learner(model, optax.sgd(0.05), continual.Replay(buffer_size=8), config)
        runs[augment] = learner.run(stream, seeds=[0, 1], progress=False)
    a, b = runs[False], runs[True]
    assert a.acc_matrix.shape == (2, 2, 2) and np.isfinite(b.acc_matrix).all()
    # Evaluation is never augmented: before training the same seeds score the same on both streams.
    np.testing.assert_array_equal(a.acc_init, b.acc_init)
    # Training is: the same seeds and batches give other losses once crops and flips apply.
    assert not np.allclose(a.train_loss[:, 1:], b.train_loss[:, 1:])
    with pytest.raises(ConfigError, match=r"does not take the stream's inputs of shape \(4, 4, 3\)"):
        continual.Learner(
            lambda rngs: nnx.Linear(5, 10, rngs=rngs), optax.sgd(0.1), continual.Naive(), config
        ).init(split_cifar10("class", data=data), [0])


def test_batched_evaluation_equals_whole_test_sets():
    data = fake_cifar(per_class=3, test_per_class=5, side=4)  # 10 test images per task, batches of 3
    stream = split_cifar10("task", data=data)
    model = lambda rngs: Flat(4 * 4 * 3, 10, rngs=rngs)
    whole = continual.Learner(model, optax.sgd(0.1), continual.Naive(), continual.TrainConfig(2, 4))
    batched = continual.Learner(
        model, optax.sgd(0.1), continual.Naive(), continual.TrainConfig(2, 4, eval_batch_size=3)
    )
    state = whole.init(stream, [0, 1])
    acc = np.asarray(whole.evaluate(state, stream))
    np.testing.assert_array_equal(np.asarray(batched.evaluate(state, stream)), acc)
    # And both equal the accuracy computed here from the model's logits, task by task.
    x, y = data.test_x, data.test_y
    xn = (x / 255.0 - np.array(CIFAR10_MEAN)) / np.array(CIFAR10_STD)
    for s in range(2):
        params = jax.tree.map(lambda a: a[s], state.params)
        logits = np.asarray(
            whole.apply(params, jnp.asarray(xn, jnp.float32), jax.tree.map(lambda a: a[s], state.model_state))
        )
        for t in range(5):
            rows = np.isin(y, [2 * t, 2 * t + 1])
            pred = 2 * t + np.argmax(logits[rows][:, 2 * t : 2 * t + 2], 1)
            np.testing.assert_allclose(acc[s, t], np.mean(pred == y[rows]), rtol=1e-6)
    with pytest.raises(ConfigError, match="eval_batch_size must be a positive integer or None, got 0"):
        continual.TrainConfig(2, 4, eval_batch_size=0)
