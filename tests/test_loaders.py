"""On-disk loaders: CIFAR binary files, image-folder trees, IDX, written here in exactly their formats."""

import gzip
import struct

import numpy as np
import pytest
from PIL import Image

from nestlearn import DataError
from nestlearn._errors import ConfigError
from nestlearn.tasks import (
    load_cifar10,
    load_cifar100,
    load_fashion_mnist,
    load_image_folder,
    load_kmnist,
    load_mini_imagenet,
    load_omniglot,
    load_tiny_imagenet,
)

# ------------------------------------------------------------------------------------------- writers
# Each writer follows the dataset's published format description, independently of the loaders.


def write_cifar(file, images_hwc, *label_columns):
    """Records of the label bytes then the 1024 red, 1024 green and 1024 blue bytes (rows top to bottom)."""
    with open(file, "wb") as f:
        for i, img in enumerate(images_hwc):
            f.write(bytes(int(col[i]) for col in label_columns))
            for channel in range(3):
                f.write(img[:, :, channel].tobytes(order="C"))


def random_images(rng, n, side=32, c=3):
    return rng.integers(0, 256, (n, side, side, c), dtype=np.uint8)


@pytest.fixture
def cifar10_dir(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "cifar-10-batches-bin"
    root.mkdir()
    parts = []
    for b in range(1, 6):
        x, y = random_images(rng, 3), rng.integers(0, 10, 3)
        write_cifar(root / f"data_batch_{b}.bin", x, y)
        parts.append((x, y))
    xt, yt = random_images(rng, 2), np.array([9, 0])
    write_cifar(root / "test_batch.bin", xt, yt)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    (root / "batches.meta.txt").write_text("\n".join(names) + "\n\n")
    return tmp_path, parts, (xt, yt), names


def test_cifar10_binary_records_read_back_exactly(cifar10_dir):
    parent, parts, (xt, yt), names = cifar10_dir
    for path in (parent, parent / "cifar-10-batches-bin"):  # the parent or the directory itself
        data = load_cifar10(path)
        np.testing.assert_array_equal(data.train_x, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(data.train_y, np.concatenate([p[1] for p in parts]))
        np.testing.assert_array_equal(data.test_x, xt)
        np.testing.assert_array_equal(data.test_y, yt)
        assert data.train_x.dtype == np.uint8 and data.train_y.dtype == np.int32
        assert data.train_x.shape == (15, 32, 32, 3) and data.class_names == tuple(names)
        assert not data.train_x.flags.writeable
    # Pixel layout: a record whose red plane is all 7 and blue plane all 200 gives channel 0 = 7, 2 = 200.
    rec = bytes([3]) + bytes([7]) * 1024 + bytes(range(256)) * 4 + bytes([200]) * 1024
    for f in ("data_batch_1.bin", "test_batch.bin"):
        (parent / "cifar-10-batches-bin" / f).write_bytes(rec)
    data = load_cifar10(parent)
    assert data.test_y.tolist() == [3]
    assert (data.test_x[0, ..., 0] == 7).all() and (data.test_x[0, ..., 2] == 200).all()
    np.testing.assert_array_equal(data.test_x[0, 0, :, 1], np.arange(32))  # row 0 of green: bytes 0..31
    np.testing.assert_array_equal(data.test_x[0, 1, :3, 1], [32, 33, 34])


def test_cifar10_errors_name_the_file_and_the_layout(cifar10_dir):
    parent, *_ = cifar10_dir
    root = parent / "cifar-10-batches-bin"
    (root / "data_batch_3.bin").unlink()
    with pytest.raises(
        DataError, match=r"missing data_batch_3\.bin: expected cifar-10-batches-bin/.*kriz/cifar"
    ):
        load_cifar10(parent)
    with pytest.raises(DataError, match="missing data_batch_1.bin, data_batch_2.bin"):
        load_cifar10(parent / "nowhere")
    write_cifar(root / "data_batch_3.bin", random_images(np.random.default_rng(1), 1), [2])
    with open(root / "data_batch_3.bin", "ab") as f:
        f.write(b"\0" * 10)  # a torn record
    with pytest.raises(
        DataError, match=r"data_batch_3\.bin has 3083 bytes, not a positive multiple of its 3073"
    ):
        load_cifar10(parent)
    write_cifar(root / "data_batch_3.bin", random_images(np.random.default_rng(1), 2), [4, 10])
    with pytest.raises(DataError, match=r"label byte 0 = 10 at record 1 \(allowed 0\.\.9"):
        load_cifar10(parent)


def test_cifar100_binary_fine_and_coarse_labels(tmp_path):
    rng = np.random.default_rng(2)
    root = tmp_path / "cifar-100-binary"
    root.mkdir()
    x, coarse, fine = random_images(rng, 4), np.array([0, 19, 5, 7]), np.array([99, 0, 42, 3])
    xt, ct, ft = random_images(rng, 2), np.array([1, 2]), np.array([10, 20])
    write_cifar(root / "train.bin", x, coarse, fine)
    write_cifar(root / "test.bin", xt, ct, ft)
    fine_data = load_cifar100(tmp_path)
    np.testing.assert_array_equal(fine_data.train_x, x)
    np.testing.assert_array_equal(fine_data.train_y, fine)
    np.testing.assert_array_equal(fine_data.test_y, ft)
    assert fine_data.n_classes == 100 and fine_data.class_names[42] == "fine_42"
    coarse_data = load_cifar100(root, label="coarse")
    np.testing.assert_array_equal(coarse_data.train_y, coarse)
    assert coarse_data.n_classes == 20
    with pytest.raises(ConfigError, match="label='medium' is unknown"):
        load_cifar100(root, label="medium")
    write_cifar(root / "test.bin", xt, [1, 20], ft)  # coarse label 20 is out of range
    with pytest.raises(DataError, match=r"test\.bin has label byte 0 = 20 at record 1 \(allowed 0\.\.19"):
        load_cifar100(root)
    (root / "train.bin").write_bytes(b"\0" * 3073)  # a CIFAR-10-sized record
    with pytest.raises(DataError, match="not a positive multiple of its 3074-byte records"):
        load_cifar100(root)
    (root / "test.bin").unlink()
    with pytest.raises(
        DataError, match=r"missing test\.bin: expected cifar-100-binary/\{train\.bin, test\.bin\}"
    ):
        load_cifar100(root)


# ------------------------------------------------------------------------------------------- folders


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_classes_sorted_labels_and_pixels_exact(tmp_path):
    rng = np.random.default_rng(3)
    imgs = {}
    # Created out of order, names of mixed case and extension: classes and files are sorted anyway.
    for cls, files in (("zebra", ["b.png", "a.PNG"]), ("ant", ["x.png"]), ("Moth", ["1.png", "0.png"])):
        for f in files:
            imgs[(cls, f)] = rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)
            save(tmp_path / cls / f, imgs[(cls, f)])
    (tmp_path / "ant" / "notes.txt").write_text("not an image")
    data = load_image_folder(tmp_path)
    assert data.class_names == ("Moth", "ant", "zebra")
    assert data.y.tolist() == [0, 0, 1, 2, 2]
    order = [("Moth", "0.png"), ("Moth", "1.png"), ("ant", "x.png"), ("zebra", "a.PNG"), ("zebra", "b.png")]
    np.testing.assert_array_equal(data.x, np.stack([imgs[k] for k in order]))
    assert data.x.dtype == np.uint8 and data.image_shape == (5, 6, 3)
    # Grayscale: Pillow's L conversion (ITU-R 601-2 luma, 299/587/114 per mille).
    gray = load_image_folder(tmp_path, grayscale=True, classes=["ant"])
    r, g, b = (imgs[("ant", "x.png")][..., i].astype(np.int64) for i in range(3))
    luma = (r * 299 + g * 587 + b * 114 + 500) // 1000
    np.testing.assert_allclose(gray.x[0, ..., 0], luma, atol=1)
    assert gray.class_names == ("ant",) and gray.x.shape == (1, 5, 6, 1)
    # Resize: a constant image stays constant; a resized image equals Pillow's own Lanczos resize.
    resized = load_image_folder(tmp_path, size=(4, 3))
    expected = np.asarray(Image.fromarray(imgs[("ant", "x.png")]).resize((3, 4), Image.Resampling.LANCZOS))
    np.testing.assert_array_equal(resized.x[2], expected)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match=r"does not exist: expected .*/<class>/\*\.png\|jpg"):
        load_image_folder(tmp_path / "absent", what="my set", where="ask the lab")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no class folders"):
        load_image_folder(tmp_path / "empty")
    save(tmp_path / "mixed" / "a" / "0.png", np.zeros((4, 4, 3), np.uint8))
    save(tmp_path / "mixed" / "b" / "0.png", np.zeros((5, 4, 3), np.uint8))
    with pytest.raises(DataError, match="images differ in size.*pass size="):
        load_image_folder(tmp_path / "mixed")
    (tmp_path / "mixed" / "c").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        load_image_folder(tmp_path / "mixed", size=4)
    (tmp_path / "mixed" / "c" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"bad\.png cannot be decoded"):
        load_image_folder(tmp_path / "mixed", size=4)
    with pytest.raises(DataError, match="no class folder 'd'"):
        load_image_folder(tmp_path / "mixed", classes=["a", "d"])
    with pytest.raises(ConfigError, match="depth must be an int >= 1"):
        load_image_folder(tmp_path / "mixed", depth=0)


def test_omniglot_nesting_and_mini_imagenet_splits(tmp_path):
    rng = np.random.default_rng(4)
    for part, alphabets in (
        ("images_background", ("Greek", "Bengali")),
        ("images_evaluation", ("Atlantean",)),
    ):
        for a in alphabets:
            for ch in ("character02", "character01"):
                for k in range(2):
                    save(
                        tmp_path / "omni" / part / a / ch / f"{k}.png",
                        rng.integers(0, 2, (10, 10), dtype=np.uint8) * 255,
                    )
    data = load_omniglot(tmp_path / "omni", size=7)
    assert data.class_names[:3] == (
        "images_background/Bengali/character01",
        "images_background/Bengali/character02",
        "images_background/Greek/character01",
    )
    assert data.class_names[4] == "images_evaluation/Atlantean/character01"
    assert data.x.shape == (12, 7, 7, 1) and data.y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5]
    with pytest.raises(DataError, match="brendenlake/omniglot"):
        load_omniglot(tmp_path / "omni", parts=("images_background", "images_extra"))

    for split, wnids in (("train", ("n02", "n01")), ("val", ("n05",)), ("test", ("n03", "n04"))):
        for w in wnids:
            for k in range(3):
                save(
                    tmp_path / "mini" / split / w / f"{w}_{k}.jpg",
                    rng.integers(0, 256, (90, 84, 3), dtype=np.uint8),
                )
    mini = load_mini_imagenet(tmp_path / "mini")
    assert mini["train"].class_names == ("n01", "n02") and mini["test"].class_names == ("n03", "n04")
    assert mini["val"].x.shape == (3, 84, 84, 3) and mini["train"].y.tolist() == [0, 0, 0, 1, 1, 1]


def test_tiny_imagenet_train_tree_and_val_annotations(tmp_path):
    rng = np.random.default_rng(5)
    root = tmp_path / "tiny-imagenet-200"
    train = {}
    for w in ("n09", "n01"):
        for k in range(2):
            train[(w, k)] = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
            save(root / "train" / w / "images" / f"{w}_{k}.png", train[(w, k)])
        (root / "train" / w / f"{w}_boxes.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / "train" / w / f"{w}_boxes.txt").write_text("bounding boxes")
    val = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    for i, v in enumerate(val):
        save(root / "val" / "images" / f"val_{i}.png", v)
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.png\tn09\t0\t0\t10\t10\nval_1.png\tn01\t1\t1\t5\t5\nval_2.png\tn09\t2\t2\t9\t9\n"
    )
    data = load_tiny_imagenet(tmp_path)  # finds tiny-imagenet-200 below the given directory
    assert data.class_names == ("n01", "n09")
    np.testing.assert_array_equal(data.train_x[0], train[("n01", 0)])
    assert data.train_y.tolist() == [0, 0, 1, 1] and data.test_y.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(data.test_x, np.stack(val))
    (root / "val" / "val_annotations.txt").write_text("val_0.png\tn77\t0\t0\t1\t1\n")
    with pytest.raises(DataError, match="line 1 names unknown class 'n77'"):
        load_tiny_imagenet(root)
    (root / "val" / "val_annotations.txt").unlink()
    with pytest.raises(
        DataError, match="missing .*val_annotations.txt: expected train/<wnid>/images.*cs231n"
    ):
        load_tiny_imagenet(root)


# ------------------------------------------------------------------------------------------- IDX


def write_idx(path, array, compress):
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("loader,names0", [(load_fashion_mnist, "T-shirt/top"), (load_kmnist, "o")])
def test_fashion_mnist_and_kmnist_from_idx(tmp_path, loader, names0):
    rng = np.random.default_rng(6)
    x, y = rng.integers(0, 256, (5, 28, 28), dtype=np.uint8), np.array([0, 9, 3, 3, 1], np.uint8)
    xt, yt = rng.integers(0, 256, (2, 28, 28), dtype=np.uint8), np.array([5, 6], np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", x, True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y, True)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", xt, False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", yt, False)
    data = loader(tmp_path)
    np.testing.assert_array_equal(data.train_x[..., 0], x)
    np.testing.assert_array_equal(data.test_y, yt)
    assert data.train_x.shape == (5, 28, 28, 1) and data.train_y.dtype == np.int32
    assert data.class_names[0] == names0 and data.n_classes == 10
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError, match=r"missing t10k-labels-idx1-ubyte\[\.gz\] \(.*, from github\.com/"):
        loader(tmp_path)
    with pytest.raises(DataError, match="does not exist: expected train-images-idx3-ubyte"):
        loader(tmp_path / "absent")
