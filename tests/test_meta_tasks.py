"""Task families for meta-learning: sinusoids, N-way K-shot MNIST and digits, OML's incremental sine."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nestlearn.tasks import (
    FewShotClassification,
    IncrementalSine,
    SineParams,
    Sinusoid,
    TaskBatch,
    few_shot_digits,
    few_shot_mnist,
    load_digits,
    load_mnist,
)


def _ks_statistic(sample: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov-Smirnov distance between a sample and U[low, high]."""
    s = np.sort((sample - low) / (high - low))
    n = s.size
    return float(max(np.max(np.arange(1, n + 1) / n - s), np.max(s - np.arange(n) / n)))


# ----------------------------------------------------------------------------------------- sinusoid


def test_sinusoid_targets_are_the_paper_function_of_the_returned_params():
    family = Sinusoid(k_support=10, k_query=7)
    batch, params = family.sample_with_params(jax.random.key(0), 25)
    assert batch.support_x.shape == (25, 10, 1) and batch.query_x.shape == (25, 7, 1)
    assert batch.support_x.dtype == jnp.float32 and batch.support_y.dtype == jnp.float32
    a = np.asarray(params.amplitude, np.float64)[:, None, None]
    p = np.asarray(params.phase, np.float64)[:, None, None]
    for x, y in ((batch.support_x, batch.support_y), (batch.query_x, batch.query_y)):
        # y = A sin(x - phi), MAML's convention, computed here in float64 numpy.
        np.testing.assert_allclose(np.asarray(y), a * np.sin(np.asarray(x, np.float64) - p), atol=2e-5)
    # sample() is the first half of sample_with_params(), and the key split is the documented one.
    same = family.sample(jax.random.key(0), 25)
    np.testing.assert_array_equal(same.query_y, batch.query_y)
    k_params, k_points = jax.random.split(jax.random.key(0))
    again = family.tasks(k_points, family.sample_params(k_params, 25))
    np.testing.assert_array_equal(again.support_x, batch.support_x)


def test_sinusoid_draws_are_uniform_on_the_reference_ranges():
    family = Sinusoid(k_support=5, k_query=5)
    batch, params = jax.jit(family.sample_with_params, static_argnums=1)(jax.random.key(1), 4000)
    amp, phase, x = (np.asarray(v) for v in (params.amplitude, params.phase, batch.support_x))
    assert amp.min() >= 0.1 and amp.max() <= 5.0 and phase.min() >= 0.0 and phase.max() <= math.pi
    assert x.min() >= -5.0 and x.max() <= 5.0
    # KS critical value at level 0.001 is 1.95 / sqrt(n); a wrong range (e.g. [0.1, 0.5]) is far beyond it.
    assert _ks_statistic(amp, 0.1, 5.0) < 1.95 / math.sqrt(amp.size)
    assert _ks_statistic(phase, 0.0, math.pi) < 1.95 / math.sqrt(phase.size)
    assert _ks_statistic(x.ravel(), -5.0, 5.0) < 1.95 / math.sqrt(x.size)
    # Support and query are independent draws: their inputs differ.
    assert not np.allclose(batch.support_x, batch.query_x)


def test_sinusoid_samples_inside_a_compiled_scan_equal_eager_samples():
    family = Sinusoid(k_support=3, k_query=4)
    keys = jax.random.split(jax.random.key(2), 3)

    @jax.jit
    def draw_all(keys):
        return jax.lax.scan(lambda c, k: (c, family.sample(k, 5)), 0, keys)[1]

    scanned = draw_all(keys)
    for i, k in enumerate(keys):
        eager = family.sample(k, 5)
        np.testing.assert_allclose(scanned.query_y[i], eager.query_y, rtol=1e-6, atol=1e-6)
    assert isinstance(scanned, TaskBatch)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k_support": 0}, "k_support"),
        ({"k_query": 2.5}, "k_query"),
        ({"amplitude": (5.0, 0.1)}, "amplitude"),
        ({"amplitude": (-1.0, 1.0)}, "amplitude"),
        ({"phase": (0.0, float("nan"))}, "phase"),
        ({"x_range": (1.0, 1.0)}, "x_range"),
        ({"x_range": "wide"}, "x_range"),
    ],
)
def test_sinusoid_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Sinusoid(**kwargs)


# ----------------------------------------------------------------------------------- classification


@pytest.fixture(scope="module")
def digits_pair():
    return few_shot_digits(n_way=3, k_shot=2, k_query=3)


def test_digits_family_groups_by_class_and_truncates_to_the_smallest(digits_pair):
    data = load_digits()
    y = np.concatenate([data.train_y, data.test_y])
    x = np.concatenate([data.train_x, data.test_x])
    train, test = digits_pair
    assert train.classes == (0, 1, 2, 3, 4) and test.classes == (5, 6, 7, 8, 9)
    counts = np.bincount(y)
    # Each side truncates every digit to its own smallest digit; slot c holds the first n_min images of
    # digit classes[c], in data order.
    for fam in (train, test):
        n_min = int(counts[list(fam.classes)].min())
        assert fam.images.shape == (5, n_min, 64)
        for c, label in enumerate(fam.classes):
            np.testing.assert_array_equal(fam.images[c], x[y == label][:n_min])


def test_meta_train_and_meta_test_classes_are_disjoint_down_to_the_images():
    train, test = few_shot_mnist(n_way=5, k_shot=1, k_query=5)
    assert set(train.classes).isdisjoint(test.classes)
    assert set(train.classes) | set(test.classes) == set(range(10))
    rows_train = {r.tobytes() for r in np.asarray(train.images).reshape(-1, 784)}
    rows_test = {r.tobytes() for r in np.asarray(test.images).reshape(-1, 784)}
    assert rows_train.isdisjoint(rows_test)
    # A documented custom split.
    a, b = few_shot_mnist(
        n_way=2, k_shot=1, k_query=1, meta_test_classes=(0, 9), meta_train_classes=(1, 2, 3)
    )
    assert a.classes == (1, 2, 3) and b.classes == (0, 9)


def test_mnist_tasks_have_consistent_labels_and_disjoint_support_and_query():
    """Each returned image is looked up in the raw data: its digit must be the one its label stands for."""
    data = load_mnist()
    x = np.concatenate([data.train_x, data.test_x])
    y = np.concatenate([data.train_y, data.test_y])
    digit_of = {}
    for row, label in zip(x, y):
        digit_of.setdefault(row.tobytes(), set()).add(int(label))
    train, _ = few_shot_mnist(n_way=4, k_shot=3, k_query=5, meta_test_classes=(6, 7, 8, 9), data=data)
    batch = jax.jit(train.sample, static_argnums=1)(jax.random.key(3), 16)
    assert batch.support_x.shape == (16, 12, 784) and batch.query_x.shape == (16, 20, 784)
    assert batch.support_y.dtype == jnp.int32 and batch.query_y.dtype == jnp.int32
    sx, sy, qx, qy = (np.asarray(v) for v in (batch.support_x, batch.support_y, batch.query_x, batch.query_y))
    for t in range(16):
        label_to_digit = {}
        for xs, ys in ((sx[t], sy[t]), (qx[t], qy[t])):
            for row, label in zip(xs, ys):
                (digit,) = digit_of[row.tobytes()]  # every image is in the data, with one digit
                assert label_to_digit.setdefault(int(label), digit) == digit
        assert sorted(label_to_digit) == [0, 1, 2, 3]
        assert len(set(label_to_digit.values())) == 4  # distinct classes per task
        assert set(label_to_digit.values()) <= set(range(6))  # meta-train digits only
        support = {r.tobytes() for r in sx[t]}
        query = {r.tobytes() for r in qx[t]}
        assert len(support) == 12 and len(query) == 20 and support.isdisjoint(query)


def test_indices_are_distinct_and_sample_is_their_gather(digits_pair):
    """The family is a jit argument: one program serves every key, and the batch gathers the indices."""
    train, test = digits_pair
    traces = []

    @jax.jit
    def draw(fam, key):
        traces.append(1)
        return fam.sample_indices(key, 64), fam.sample(key, 64)

    (slots, rows), batch = draw(train, jax.random.key(4))
    draw(train, jax.random.key(5))
    assert len(traces) == 1  # a second key does not retrace
    slots, rows = np.asarray(slots), np.asarray(rows)
    assert slots.shape == (64, 3) and rows.shape == (64, 3, 5)
    assert all(len(set(s)) == 3 for s in slots)
    assert all(len(set(r)) == 5 for r in rows.reshape(-1, 5))
    assert rows.min() >= 0 and rows.max() < train.n_per_class
    images = np.asarray(train.images)
    for t in (0, 17, 63):
        for j in range(3):
            np.testing.assert_array_equal(
                batch.support_x[t, 2 * j : 2 * j + 2], images[slots[t, j], rows[t, j, :2]]
            )
            np.testing.assert_array_equal(
                batch.query_x[t, 3 * j : 3 * j + 3], images[slots[t, j], rows[t, j, 2:]]
            )
            np.testing.assert_array_equal(batch.support_y[t, 2 * j : 2 * j + 2], [j, j])
            np.testing.assert_array_equal(batch.query_y[t, 3 * j : 3 * j + 3], [j, j, j])


def test_class_choice_and_labelling_are_uniform():
    """Chi-square bounds with a fixed key: every (label, class) pair and every class equally often."""
    x, y = load_digits().train_x, load_digits().train_y
    family = FewShotClassification.from_arrays(x, y, classes=range(10), n_way=3, k_shot=1, k_query=1)
    n = 3000
    slots, rows = jax.jit(family.sample_indices, static_argnums=1)(jax.random.key(5), n)
    slots, rows = np.asarray(slots), np.asarray(rows)
    # Class counts: 3 draws per task over 10 classes, expected n * 3 / 10 each; chi2(9) at 0.001 is 27.9.
    counts = np.bincount(slots.ravel(), minlength=10)
    expected = n * 3 / 10
    assert ((counts - expected) ** 2 / expected).sum() < 27.9
    # Label j is class c with probability 1/10 for each (j, c): chi2 over 30 cells, 27 dof, 0.001 -> 55.5.
    table = np.stack([np.bincount(slots[:, j], minlength=10) for j in range(3)])
    assert ((table - n / 10) ** 2 / (n / 10)).sum() < 55.5
    # Rows within a class: uniform over the n_per_class images (chi2, dof n_per_class - 1, 0.001 bound).
    dof = family.n_per_class - 1
    row_counts = np.bincount(rows.ravel(), minlength=family.n_per_class)
    exp_rows = rows.size / family.n_per_class
    bound = dof + 3.1 * math.sqrt(2 * dof)  # normal approximation of the 0.001 quantile of chi2(dof)
    assert ((row_counts - exp_rows) ** 2 / exp_rows).sum() < bound


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_way": 6}, "n_way=6"),
        ({"k_shot": 0}, "k_shot"),
        ({"k_shot": 100, "k_query": 100}, "smallest class"),
        ({"meta_test_classes": (4, 12)}, "meta_test_classes"),
        ({"meta_test_classes": (4,), "meta_train_classes": (3, 4)}, "disjoint"),
    ],
)
def test_few_shot_rejects_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        few_shot_digits(**kwargs)


def test_from_arrays_rejects_missing_and_repeated_classes():
    x, y = np.zeros((6, 2), np.float32), np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match=r"classes \[7\]"):
        FewShotClassification.from_arrays(x, y, classes=(0, 7), n_way=2, k_shot=1, k_query=1)
    with pytest.raises(ValueError, match="distinct"):
        FewShotClassification.from_arrays(x, y, classes=(0, 0, 1), n_way=2, k_shot=1, k_query=1)


# ---------------------------------------------------------------------------------- incremental sine


def test_incremental_sine_layout_ids_and_targets():
    family = IncrementalSine()
    traj = jax.jit(lambda k: family.sample_trajectory(k, n_eval=20))(jax.random.key(8))
    assert traj.x.shape == (10, 40, 8, 11) and traj.y.shape == (10, 40, 8, 1)
    assert traj.eval_x.shape == (10, 20, 11) and traj.eval_y.shape == (10, 20, 1)
    x, y = np.asarray(traj.x, np.float64), np.asarray(traj.y)
    # One-hot id of function i in the first 10 inputs, x last.
    np.testing.assert_array_equal(x[..., :10], np.broadcast_to(np.eye(10)[:, None, None, :], (10, 40, 8, 10)))
    a = np.asarray(traj.params.amplitude, np.float64)[:, None, None, None]
    p = np.asarray(traj.params.phase, np.float64)[:, None, None, None]
    np.testing.assert_allclose(y, a * np.sin(x[..., 10:] + p), atol=2e-5)  # OML's + phase
    np.testing.assert_array_equal(
        np.asarray(traj.eval_x)[..., :10].argmax(-1), np.repeat(np.arange(10)[:, None], 20, 1)
    )
    # online(): 400 minibatches in arrival order, function-major.
    ox, oy = traj.online()
    assert ox.shape == (400, 8, 11)
    np.testing.assert_array_equal(ox[41], traj.x[1, 1])
    np.testing.assert_array_equal(oy[399], traj.y[9, 39])
    rx, ry = traj.remember()
    assert rx.shape == (200, 11)
    np.testing.assert_array_equal(ry[20:40], traj.eval_y[1])


def test_incremental_sine_meta_training_picks_distinct_pool_functions():
    family = IncrementalSine(n_batches=2)
    pool = family.pool(jax.random.key(9))
    assert pool.amplitude.shape == (400,)
    amp = np.asarray(pool.amplitude)
    keys = jax.random.split(jax.random.key(10), 200)
    trajs = jax.jit(jax.vmap(family.sample_trajectory, in_axes=(0, None)))(keys, pool)
    picked = np.asarray(trajs.params.amplitude)  # [200, 10]
    idx = np.searchsorted(np.sort(amp), picked)
    idx = np.argsort(amp)[idx]  # pool index of each picked function (amplitudes are distinct)
    np.testing.assert_array_equal(amp[idx], picked)
    np.testing.assert_array_equal(np.asarray(pool.phase)[idx], trajs.params.phase)
    assert all(len(set(row)) == 10 for row in idx)
    seen = np.bincount(idx.ravel(), minlength=400)
    # 2000 picks over 400 functions, 5 expected each: chi2(399) at 0.001 is about 489.
    assert ((seen - 5.0) ** 2 / 5.0).sum() < 489


def test_incremental_sine_rejects_bad_config():
    with pytest.raises(ValueError, match="n_pool=5"):
        IncrementalSine(n_pool=5)
    with pytest.raises(ValueError, match="batch_size"):
        IncrementalSine(batch_size=-1)
    family = IncrementalSine(n_functions=3)
    too_many = SineParams(amplitude=jnp.ones(4), phase=jnp.zeros(4))
    with pytest.raises(ValueError, match="at most n_functions=3"):
        family.trajectory(jax.random.key(0), too_many)
