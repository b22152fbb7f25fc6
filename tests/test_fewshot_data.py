"""N-way K-shot families from any labelled data: class splits, uint8 images, rotations, meta-training."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from nestlearn import ConfigError
from nestlearn.meta import MAML, MetaTrainer, cross_entropy_loss, functional
from nestlearn.tasks import (
    FewShotClassification,
    ImageData,
    LabelledImages,
    few_shot_tasks,
    mini_imagenet_few_shot,
    omniglot_few_shot,
    stream_from_pool,
)
from nestlearn.tasks._fewshot import MINI_IMAGENET_MEAN, MINI_IMAGENET_STD


def labelled(n_classes=12, per_class=6, side=5, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.repeat(np.arange(n_classes), per_class)).astype(np.int32)
    return rng.integers(0, 256, (y.size, side, side, channels), dtype=np.uint8), y


def test_class_split_is_disjoint_and_follows_the_documented_draw():
    x, y = labelled()
    train, test = few_shot_tasks((x, y), n_way=3, k_shot=1, k_query=2, meta_test_classes=4, seed=7)
    expected_test = np.sort(np.random.default_rng(7).permutation(np.arange(12))[-4:])
    assert test.classes == tuple(int(c) for c in expected_test)
    assert set(train.classes) == set(range(12)) - set(test.classes)
    assert train.n_classes == 8 and test.n_classes == 4 and train.input_shape == (5, 5, 1)
    assert train.images.dtype == jnp.uint8  # pixels stay uint8 on device
    # Default: a fifth of the classes (at least n_way) held out.
    assert few_shot_tasks((x, y), n_way=3, k_shot=1, k_query=2)[1].n_classes == 3
    with pytest.raises(ConfigError, match=r"disjoint, both hold \[2\]"):
        few_shot_tasks((x, y), n_way=2, meta_test_classes=[1, 2], meta_train_classes=[2, 3, 4])
    with pytest.raises(ConfigError, match="meta-test classes: n_way=5 needs at least 5 classes, got 2"):
        few_shot_tasks((x, y), n_way=5, k_shot=1, k_query=1, meta_test_classes=[0, 1])
    with pytest.raises(ConfigError, match="meta-train classes: k_shot \\+ k_query = 9 exceeds the 6 images"):
        few_shot_tasks((x, y), n_way=2, k_shot=4, k_query=5)
    with pytest.raises(ConfigError, match="source must be an"):
        few_shot_tasks("images/", n_way=2)


def test_tasks_gather_scaled_images_and_sample_under_jit_and_vmap():
    x, y = labelled()
    train, _ = few_shot_tasks((x, y), n_way=3, k_shot=2, k_query=1, meta_test_classes=[0, 1, 2])
    slots, rows = jax.jit(train.sample_indices, static_argnums=1)(jax.random.key(0), 4)
    batch = jax.jit(train.gather)(slots, rows)
    assert batch.support_x.shape == (4, 6, 5, 5, 1) and batch.query_x.shape == (4, 3, 5, 5, 1)
    assert batch.support_x.dtype == jnp.float32
    batch, slots, rows = jax.tree.map(np.asarray, (batch, slots, rows))
    by_class = {c: x[y == c] for c in train.classes}
    for t in range(4):
        for j in range(3):
            c = train.classes[int(slots[t, j])]
            np.testing.assert_allclose(
                batch.support_x[t, 2 * j : 2 * j + 2], by_class[c][rows[t, j, :2]] / 255.0, rtol=1e-6
            )
            np.testing.assert_allclose(
                batch.query_x[t, j], by_class[c][int(rows[t, j, 2])] / 255.0, rtol=1e-6
            )
    np.testing.assert_array_equal(batch.support_y[0], [0, 0, 1, 1, 2, 2])
    # Under vmap over keys (one task batch per seed), each equals its own unbatched draw.
    keys = jax.random.split(jax.random.key(1), 2)
    both = jax.jit(jax.vmap(lambda k: train.sample(k, 3)))(keys)
    np.testing.assert_array_equal(both.query_x[1], jax.jit(lambda k: train.sample(k, 3))(keys[1]).query_x)
    assert not np.array_equal(both.query_x[0], both.query_x[1])


def test_rotated_classes_are_quarter_turns_and_normalisation_matches_numpy():
    x, y = labelled(n_classes=3, per_class=4)
    fam = FewShotClassification.from_arrays(
        x, y, classes=(0, 1, 2), n_way=5, k_shot=1, k_query=1, rotations=4, mean=0.5, std=0.25
    )
    assert fam.n_classes == 12
    slots = jnp.array([[0, 4, 8, 11, 5]])  # class 0 unturned; class 1 once; class 2 twice; 2 thrice; 2 once
    rows = jnp.array([[[0, 1], [2, 3], [1, 0], [3, 3], [0, 2]]])
    batch = jax.tree.map(np.asarray, jax.jit(fam.gather)(slots, rows))
    for j, (c, k) in enumerate([(0, 0), (1, 1), (2, 2), (2, 3), (2, 1)]):
        img = x[y == c][int(rows[0, j, 0])]
        expected = (np.rot90(img, k, axes=(0, 1)) / 255.0 - 0.5) / 0.25
        np.testing.assert_allclose(batch.support_x[0, j], expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match=r"rotations=4 needs square images \[n, H, H, C\]"):
        FewShotClassification.from_arrays(
            x[:, :4], y, classes=(0, 1), n_way=2, rotations=4, k_shot=1, k_query=1
        )
    with pytest.raises(ConfigError, match="rotations must be 1 or 4"):
        FewShotClassification.from_arrays(x, y, classes=(0, 1), n_way=2, rotations=2, k_shot=1, k_query=1)


def test_every_source_kind_gives_the_same_family():
    x, y = labelled(n_classes=6, per_class=4)
    half = x.shape[0] // 2
    kinds = {
        "pair": (x, y),
        "labelled": LabelledImages(x, y, tuple("abcdef"), "synthetic"),
        "imagedata": ImageData(x[:half], y[:half], x[half:], y[half:], tuple("abcdef"), "synthetic"),
        "stream": stream_from_pool(x[:half], y[:half], x[half:], y[half:], task_classes=[range(6)]),
    }
    families = {
        k: few_shot_tasks(v, n_way=2, k_shot=1, k_query=1, meta_test_classes=[4, 5]) for k, v in kinds.items()
    }
    for name, (train, test) in families.items():
        np.testing.assert_array_equal(train.images, families["pair"][0].images, err_msg=name)
        assert test.classes == (4, 5)


def test_omniglot_and_mini_imagenet_builders():
    x, y = labelled(n_classes=10, per_class=20, side=6)
    names = tuple(f"images_background/A/character{i:02d}" for i in range(10))
    train, test = omniglot_few_shot(
        5, 1, 3, data=LabelledImages(x, y, names, "synthetic"), n_train_characters=6
    )
    perm = np.random.default_rng(0).permutation(10)
    assert train.classes == tuple(sorted(int(c) for c in perm[:6])) and test.classes == tuple(
        sorted(int(c) for c in perm[6:])
    )
    assert train.n_classes == 24 and test.n_classes == 16 and train.rotations == 4
    with pytest.raises(ConfigError, match="either data or path"):
        omniglot_few_shot()

    split = lambda seed, n: LabelledImages(
        *labelled(n_classes=n, per_class=4, side=4, channels=3, seed=seed), (), "s"
    )
    data = {"train": split(1, 6), "test": split(2, 5)}
    mtrain, mtest = mini_imagenet_few_shot(5, 1, 2, data=data)
    assert mtrain.n_classes == 6 and mtest.n_classes == 5
    b = jax.jit(mtest.gather)(jnp.arange(5)[None], jnp.zeros((1, 5, 3), jnp.int32))
    first = data["test"].x[data["test"].y == 0][0]
    np.testing.assert_allclose(
        b.support_x[0, 0],
        (first / 255.0 - np.array(MINI_IMAGENET_MEAN)) / np.array(MINI_IMAGENET_STD),
        rtol=1e-5,
    )
    with pytest.raises(ConfigError, match="data has no 'val' split"):
        mini_imagenet_few_shot(data=data, test_split="val")


class Flat(nnx.Module):
    def __init__(self, d, c, *, rngs):
        self.linear = nnx.Linear(d, c, rngs=rngs)

    def __call__(self, x):
        return self.linear(x.reshape(x.shape[0], -1))


@jax.numpy_dtype_promotion("standard")  # optax's Adam: float ** int32 step count
def test_meta_trainer_consumes_image_families():
    x, y = labelled(n_classes=8, per_class=6, side=4)
    train, _ = few_shot_tasks((x, y), n_way=3, k_shot=1, k_query=2, meta_test_classes=3)
    apply, params = functional(Flat(16, 3, rngs=nnx.Rngs(0)))
    loss = cross_entropy_loss(apply)
    maml = MAML(loss, optax.sgd(0.1), steps=1)
    sample = lambda key, family: family.sample(key, 2)  # the family is an argument, not a constant
    fast = {"xla_backend_optimization_level": 0}  # compiles faster on CPU; two iterations need no speed
    trainer = MetaTrainer(
        maml, optax.adam(1e-2), sample, n_iters=2, compiler_options=fast, task_data=train, loss_pre=True
    )
    # Two seeds in one program (what train() runs): the family shared, one key per seed.
    key = jax.random.key(3)
    keys = jnp.stack([key, jax.random.key(4)])
    states = jax.vmap(trainer.init)(jax.tree.map(lambda a: jnp.stack([a, a]), maml.init(params)))
    states, seeds = trainer.train(states, keys, n_chunks=1, progress=False)
    assert seeds["loss_post"].shape == (2, 2) and np.isfinite(seeds["loss_post"]).all()
    np.testing.assert_array_equal(states.step, [2, 2])
    # The first iteration's pre-adaptation loss is the query loss of the initial parameters on the tasks
    # sampled from fold_in(key, 0), computed here independently.
    tasks = sample(jax.random.fold_in(key, 0), train)
    direct = jax.jit(jax.vmap(loss, in_axes=(None, 0, 0)))(params, tasks.query_x, tasks.query_y).mean()
    np.testing.assert_allclose(seeds["loss_pre"][0, 0], direct, rtol=1e-5)
    assert seeds["loss_pre"][1, 0] != seeds["loss_pre"][0, 0]  # the other seed drew other tasks
