"""The image experiments (split_cifar100, omniglot_fewshot, mini_imagenet_fewshot) on synthetic files
written in the real on-disk formats and read back through the real loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import numpy as np
import pytest

from nestlearn import ConfigError, continual, tasks
from nestlearn.experiment import RunDir
from nestlearn.experiment._cli import load_experiment

ROOT = Path(__file__).resolve().parents[1]
cifar = load_experiment(str(ROOT / "experiments" / "split_cifar100.py"))[1]
omniglot = load_experiment(str(ROOT / "experiments" / "omniglot_fewshot.py"))[1]
mini = load_experiment(str(ROOT / "experiments" / "mini_imagenet_fewshot.py"))[1]
image_data = cifar.image_data
fewshot = omniglot.fewshot


def _nearest_mean_accuracy(train_x, train_y, test_x, test_y) -> float:
    """Accuracy of the nearest class mean on raw pixels: a check that the synthetic classes are learnable."""
    x = train_x.reshape(len(train_x), -1).astype(np.float64)
    xt = test_x.reshape(len(test_x), -1).astype(np.float64)
    classes = np.unique(train_y)
    means = np.stack([x[train_y == c].mean(0) for c in classes])
    pred = classes[np.argmin(((xt[:, None] - means[None]) ** 2).sum(-1), 1)]
    return float((pred == test_y).mean())


# ----------------------------------------------------------------------------------- split CIFAR-100


def test_synthetic_cifar100_is_the_binary_format_and_learnable(tmp_path):
    image_data.write_cifar100(tmp_path, train_per_class=4, test_per_class=2, seed=3)
    raw = np.fromfile(tmp_path / "cifar-100-binary" / "train.bin", np.uint8).reshape(-1, 3074)
    assert raw.shape == (400, 3074)
    np.testing.assert_array_equal(raw[:, 0], raw[:, 1] // 5)  # coarse byte = fine // 5
    fine = tasks.load_cifar100(tmp_path)
    coarse = tasks.load_cifar100(tmp_path, label="coarse")
    assert fine.train_x.shape == (400, 32, 32, 3) and fine.test_x.shape == (200, 32, 32, 3)
    np.testing.assert_array_equal(np.bincount(fine.train_y), np.full(100, 4))
    np.testing.assert_array_equal(coarse.train_y, fine.train_y // 5)
    # Record 7's pixel bytes are its red, green, blue planes row by row: the loader's HWC image, transposed.
    np.testing.assert_array_equal(raw[7, 2:].reshape(3, 32, 32).transpose(1, 2, 0), fine.train_x[7])
    # Horizontal flips keep a class (the pattern is mirror-symmetric), and the classes are separable.
    assert _nearest_mean_accuracy(fine.train_x, fine.train_y, fine.test_x, fine.test_y) > 0.9  # chance 0.01


def test_split_cifar100_stream_from_synthetic_files_has_disjoint_tasks(tmp_path):
    image_data.write_cifar100(tmp_path, train_per_class=2, test_per_class=1)
    config = cifar.Config(data_root=str(tmp_path), n_tasks=20)
    stream = cifar.load_stream(config)
    assert stream.n_tasks == 20 and stream.input_shape == (32, 32, 3)
    ty, idx, n = np.asarray(stream.train_y), np.asarray(stream.train_idx), np.asarray(stream.train_n)
    seen = [set(ty[idx[t, : n[t]]].tolist()) for t in range(20)]
    assert seen[0] == {0, 1, 2, 3, 4} and seen[19] == {95, 96, 97, 98, 99}
    assert sum(len(s) for s in seen) == len(set().union(*seen)) == 100  # disjoint, and covering


def test_split_cifar100_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="data_root is empty.*cifar-100-binary"):
        cifar.Config().validate()
    with pytest.raises(ConfigError, match="n_tasks=3"):
        cifar.Config(synthetic=True, n_tasks=3).validate()
    from nestlearn import DataError

    with pytest.raises(DataError, match="missing train.bin, test.bin"):
        cifar.load_stream(cifar.Config(data_root="/nonexistent/cifar"))


def test_split_cifar100_strategies_carry_the_documented_hyperparameters():
    config = cifar.Config(synthetic=True, buffer_size=123)
    derpp, ewc, si = (cifar.strategy(n, config) for n in ("derpp", "ewc", "si"))
    assert isinstance(derpp, continual.DERPP) and (derpp.buffer_size, derpp.alpha, derpp.beta) == (
        123,
        0.2,
        0.5,
    )
    lwf = cifar.strategy("lwf", config)  # Mammoth's alpha 3.0 has no T^2 factor; continual.LwF has one
    assert (lwf.alpha * lwf.temperature**2, lwf.temperature, cifar.LR["lwf"]) == (3.0, 2.0, 0.01)
    assert ewc.online and (ewc.lam, ewc.gamma) == (10.0, 1.0)
    assert (si.c, si.xi) == (0.5, 1.0)
    assert isinstance(cifar.strategy("joint", config), continual.Joint)


def _result(R: np.ndarray, seeds=(0, 1)) -> continual.StreamResult:
    S, T = R.shape[:2]
    return continual.StreamResult(
        acc_matrix=R, acc_init=np.zeros((S, T)), curve_steps=np.arange(T + 1), curve_task=np.arange(-1, T),
        curve_acc=np.zeros((S, T + 1, T)), train_loss=np.zeros((S, T + 1)), diverged_step=np.full(S, -1),
        steps_per_task=1, task_names=tuple(map(str, range(T))), runs=tuple({"seed": s} for s in seeds),
    )  # fmt: skip


def test_split_cifar100_summary_against_the_worked_example():
    # REFERENCES.md's worked example: ACC 0.7575, Chaudhry forgetting 0.2167. A second seed with every
    # entry 0.1 higher has ACC 0.8575 and the same forgetting; mean 0.8075, s.e.m. 0.05.
    R = np.array([[0.95, 0.12, 0.10, 0.11], [0.80, 0.70, 0.15, 0.09],
                  [0.99, 0.75, 0.96, 0.13], [0.60, 0.80, 0.65, 0.98]])  # fmt: skip
    config = cifar.Config(synthetic=True)
    frame = cifar.summary({"naive": _result(np.stack([R, R + 0.1]))}, config)
    np.testing.assert_allclose(frame["acc"], [0.7575, 0.8575], atol=1e-9)
    np.testing.assert_allclose(frame["forgetting"], [0.21666667, 0.21666667], atol=1e-6)
    row = cifar.table(frame).iloc[0]
    assert row["data"] == "synthetic" and row["seeds"] == 2
    np.testing.assert_allclose([row["acc_mean"], row["acc_sem"]], [0.8075, 0.05], atol=1e-9)
    np.testing.assert_allclose(row["forgetting_sem"], 0.0, atol=1e-9)


@pytest.mark.slow
def test_split_cifar100_quick_end_to_end(tmp_path):
    """Naive and joint on synthetic split CIFAR-100 (5 tasks): joint keeps earlier tasks, naive forgets."""
    config = dataclasses.replace(
        cifar.Config(), synthetic=True, n_tasks=5, strategies=("naive", "joint"), seeds=(0,), nf=8,
        blocks=(1, 1, 1, 1), steps_per_task=60, synthetic_train_per_class=10, synthetic_test_per_class=5,
    )  # fmt: skip
    rundir = RunDir.create(
        tmp_path / "run", config, experiment="split_cifar100", quick=True, log=lambda m: None
    )
    cifar.run(config, rundir)
    table = rundir.read_table("table").set_index("strategy")
    assert set(table["data"]) == {"synthetic"}
    assert table.loc["joint", "acc_mean"] > table.loc["naive", "acc_mean"] + 0.1
    assert (rundir.path / "figures" / "split_cifar100_acc.png").is_file()


# ------------------------------------------------------------------------------------------ few-shot


def test_confidence_interval_by_hand():
    # Accuracies 1, 0, 1, 1: mean 0.75, sample std sqrt(0.25 * 4/3 * ... ) = 0.5, so 1.96 * 0.5 / 2.
    acc = np.array([[1.0, 0.0, 1.0, 1.0], [0.5, 0.5, 0.5, 0.5]])
    np.testing.assert_allclose(fewshot.confidence_interval(acc), [1.959963984540054 * 0.5 / 2, 0.0])


def test_synthetic_omniglot_tree_loads_and_splits_disjointly(tmp_path):
    image_data.write_omniglot(tmp_path, background=12, evaluation=6, drawings=6, alphabets=3)
    assert len(list((tmp_path / "images_background").glob("*/*/*.png"))) == 72
    config = dataclasses.replace(omniglot.CONFIG, data_root=str(tmp_path), n_train_classes=12, k_query=3)
    train, test, loaded = fewshot.families(config, 1)
    assert loaded.x.shape == (108, 28, 28, 1) and loaded.n_classes == 18
    assert not set(train.classes) & set(test.classes)
    assert (len(set(train.classes)), len(set(test.classes))) == (12, 6)
    assert train.n_classes == 48 and test.n_classes == 24  # four rotations of each character
    batch = test.sample(jax.random.key(0), 2)
    assert batch.support_x.shape == (2, 5, 28, 28, 1) and batch.query_x.shape == (2, 15, 28, 28, 1)
    # Characters are learnable: nearest class mean over drawings, half to fit and half to test.
    x, y = np.asarray(loaded.x), np.asarray(loaded.y)
    fit = np.arange(len(y)) % 6 < 3
    assert _nearest_mean_accuracy(x[fit], y[fit], x[~fit], y[~fit]) > 0.9  # chance 1/18


def test_synthetic_mini_imagenet_splits_resize_and_learnable(tmp_path):
    image_data.write_mini_imagenet(tmp_path, classes=(6, 2, 5), per_class=8)
    assert len(list((tmp_path / "test").glob("n*/*.jpg"))) == 40
    config = dataclasses.replace(mini.CONFIG, data_root=str(tmp_path), image_size=32, k_query=3)
    train, test, loaded = fewshot.families(config, 5)
    assert loaded["train"].x.shape == (48, 32, 32, 3)
    assert not set(loaded["train"].class_names) & set(loaded["test"].class_names)
    assert test.sample(jax.random.key(1), 3).support_x.shape == (3, 25, 32, 32, 3)
    x, y = np.asarray(loaded["test"].x), np.asarray(loaded["test"].y)
    fit = np.arange(len(y)) % 8 < 4
    assert _nearest_mean_accuracy(x[fit], y[fit], x[~fit], y[~fit]) > 0.9  # chance 1/5


def test_fewshot_config_errors():
    with pytest.raises(ConfigError, match="data_root is empty.*images_background"):
        omniglot.CONFIG.validate()
    with pytest.raises(ConfigError, match="data_root is empty.*train/, val/, test/"):
        mini.CONFIG.validate()
    with pytest.raises(ConfigError, match="multiple of chunk"):
        dataclasses.replace(omniglot.CONFIG, synthetic=True, n_iters=300, chunk=200).validate()


def test_fewshot_table_puts_published_numbers_beside_synthetic_results():
    config = dataclasses.replace(omniglot.CONFIG, synthetic=True, methods=("maml",), shots=(1,), seeds=(0, 1))
    acc = np.array([[1.0, 0.8, 0.6], [0.6, 0.6, 0.6]])
    arrays = {"maml/1shot/acc": acc, "maml/1shot/diverged_step": np.array([-1, -1])}
    frame = fewshot.per_seed(arrays, config)
    np.testing.assert_allclose(frame["acc"], [80.0, 60.0])
    np.testing.assert_allclose(frame["ci95"], [100 * 1.959963984540054 * 0.2 / np.sqrt(3), 0.0])
    row = fewshot.table(frame, config, omniglot.PUBLISHED).iloc[0]
    np.testing.assert_allclose([row["acc_mean"], row["acc_sem"]], [70.0, 10.0])
    assert (row["published"], row["published_ci"]) == (98.7, 0.4)
    assert row["data"] == "synthetic" and not row["comparable"]


def test_meta_test_accuracy_of_one_sgd_step_from_zero_is_a_prototype_classifier(tmp_path):
    # A linear model w = 0, b = 0 and one inner SGD step at rate a on a balanced N-way support set:
    # grad_w = X^T (1/N - onehot) / n and grad_b = 0, so w1 = a/n X^T (onehot - 1/N) and a query x scores
    # class c by (a/n) (sum_{i in c} <x, x_i> - (1/N) sum_i <x, x_i>): the class whose support images have
    # the largest summed inner product with x wins. test_accuracy must agree with that numpy classifier.
    image_data.write_omniglot(tmp_path, background=8, evaluation=6, drawings=6, alphabets=2)
    config = dataclasses.replace(omniglot.CONFIG, data_root=str(tmp_path), n_train_classes=8, k_query=3,
                                 test_steps=1, test_tasks=10, eval_block=4, inner_lr=0.5)  # fmt: skip
    _, test, _ = fewshot.families(config, 1)
    apply = lambda p, x: x.reshape(x.shape[0], -1) @ p["w"] + p["b"][None]  # noqa: E731
    lrn, _ = fewshot.learner("maml", config, fewshot.meta.cross_entropy_loss(apply))
    zeros = {"w": jax.numpy.zeros((2, 784, 5)), "b": jax.numpy.zeros((2, 5))}  # two "seeds", the same
    acc = fewshot.test_accuracy(lrn, apply, zeros, test, config, jax.random.key(5))
    assert acc.shape == (2, 10)
    expected = []
    for b in range(3):  # the blocks test_accuracy draws: fold_in(key, b), eval_block tasks each
        batch = test.sample(jax.random.fold_in(jax.random.key(5), b), 4)
        sx = np.asarray(batch.support_x).reshape(4, 5, -1)
        qx = np.asarray(batch.query_x).reshape(4, 15, -1)
        sy, qy = np.asarray(batch.support_y), np.asarray(batch.query_y)
        for t in range(4):
            scores = qx[t] @ sx[t].T @ np.eye(5)[sy[t]]
            expected.append((scores.argmax(1) == qy[t]).mean())
    np.testing.assert_allclose(acc[0], expected[:10], atol=1e-6)
    np.testing.assert_array_equal(acc[0], acc[1])
    assert acc.mean() > 0.6  # synthetic characters: well above chance (0.2) after one step


@pytest.mark.slow
def test_omniglot_maml_learns_synthetic_characters(tmp_path):
    """A few MAML meta-iterations on synthetic characters, then meta-test well above chance (20 %)."""
    config = dataclasses.replace(
        omniglot.CONFIG, synthetic=True, methods=("maml",), shots=(1,), seeds=(0,), n_iters=20, chunk=20,
        meta_batch=4, k_query=3, width=8, test_tasks=40, eval_block=40, synthetic_classes=(12, 0, 6),
        synthetic_per_class=6,
    )  # fmt: skip
    rundir = RunDir.create(
        tmp_path / "run", config, experiment="omniglot_fewshot", quick=True, log=lambda m: None
    )
    arrays, _ = fewshot.run_part("maml", 1, config, rundir, None)
    acc = arrays["maml/1shot/acc"]
    assert acc.shape == (1, 40)
    assert acc.mean() > 0.6  # chance is 0.2
    assert np.isfinite(arrays["maml/1shot/loss_post"]).all()


def test_synthetic_data_never_overwrites_a_real_directory(tmp_path):
    calls = []
    real = tmp_path / "real"
    real.mkdir()
    (real / "train.bin").write_bytes(b"real data")
    with pytest.raises(ConfigError, match="not empty and was not written by a synthetic run"):
        image_data.prepare(real, calls.append)
    assert (real / "train.bin").read_bytes() == b"real data" and calls == []
    fresh = tmp_path / "fresh"
    assert image_data.prepare(fresh, calls.append) == fresh
    assert image_data.prepare(fresh, calls.append) == fresh  # the marker: written once, then reused
    assert calls == [fresh] and (fresh / "SYNTHETIC").is_file()


def test_the_task_log_line_leaves_diverged_seeds_out_and_says_so():
    R = np.stack([np.full((2, 2), 0.8), np.full((2, 2), np.nan), np.full((2, 2), 0.6)])
    result = dataclasses.replace(_result(R, seeds=(0, 1, 2)), diverged_step=np.array([-1, 7, -1]))
    assert (
        cifar.seen_accuracy(result, 1)
        == "mean accuracy on seen tasks 0.700 (1 of 3 seeds diverged, left out)"
    )
    everything = dataclasses.replace(result, diverged_step=np.array([3, 7, 5]))
    assert cifar.seen_accuracy(everything, 0) == "every seed diverged (steps [3, 7, 5])"
