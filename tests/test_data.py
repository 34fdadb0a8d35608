"""Data sources: real digits/MNIST/CIFAR-10, synthetic folders and IDX files, bad input."""

import gzip
import os
import struct
import tarfile

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from pipeline import sources
from pipeline.config import DataConfig
from pipeline.sources import image_folder
from pipeline.sources import mnist as mnist_source

MNIST_TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def _spec_ok(ds, shape):
    spec = ds.element_spec
    assert spec["image"].shape == shape and spec["image"].dtype == tf.float32
    assert spec["label"].dtype == tf.int64 and spec["id"].dtype == tf.string


def test_digits_split_is_deterministic_disjoint_and_complete():
    train, info = sources.load("digits", "train")
    test, _ = sources.load("digits", "test")
    _spec_ok(train, (8, 8, 1))
    xtr, ytr, idtr = sources.to_numpy(train)
    xte, yte, idte = sources.to_numpy(test)
    assert len(idtr) + len(idte) == 1797
    assert not set(idtr) & set(idte)
    assert 0.15 < len(idte) / 1797 < 0.25
    assert info.num_examples == len(idtr)
    assert xtr.min() == 0.0 and xtr.max() == 1.0
    # 17 gray levels: every pixel is a multiple of 1/16.
    np.testing.assert_allclose(xtr * 16, np.round(xtr * 16), atol=1e-6)
    assert sorted(set(ytr.tolist())) == list(range(10))
    # Same split again (hash of the id, not an RNG).
    assert sources.to_numpy(sources.load("digits", "test")[0])[2] == idte


def test_indices_read_a_seeded_random_subset_in_one_pass():
    base = sources.to_numpy(sources.load("digits", "train")[0])[2]
    a = sources.random_indices(len(base), 100, seed=3)
    assert len(a) == 100 and (np.diff(a) > 0).all()
    np.testing.assert_array_equal(a, sources.random_indices(len(base), 100, seed=3))
    assert not np.array_equal(a, sources.random_indices(len(base), 100, seed=4))
    assert a.max() > len(base) // 2  # Spread over the split, not its first rows.
    ds, info = sources.load("digits", "train", indices=a)
    assert sources.to_numpy(ds)[2] == [base[i] for i in a] and info.num_examples == 100
    for bad in ([5, 3], [0, len(base)], [-1]):
        with pytest.raises(sources.DataError, match="sorted, distinct"):
            sources.load("digits", "train", indices=bad)


def test_real_mnist_counts_and_label_histograms(mnist_dir):
    for split, hist in (("train", MNIST_TRAIN_HIST), ("test", MNIST_TEST_HIST)):
        ds, info = sources.load("mnist", split, path=mnist_dir)
        _spec_ok(ds, (28, 28, 1))
        x, y, ids = sources.to_numpy(ds)
        assert x.shape == (sum(hist), 28, 28, 1) and info.num_examples == sum(hist)
        assert np.bincount(y).tolist() == hist
        assert x.min() == 0.0 and x.max() == 1.0
        assert len(set(ids)) == len(ids)


def test_real_cifar10_tarball(cifar_tarball):
    for split, n in (("train", 50_000), ("test", 10_000)):
        ds, info = sources.load("image_folder", split, path=cifar_tarball)
        _spec_ok(ds, (32, 32, 3))
        assert info.num_examples == n and len(info.class_names) == 10
        assert info.class_names == tuple(sorted(info.class_names))
        if split == "test":
            x, y, ids = sources.to_numpy(ds)
            assert x.shape == (n, 32, 32, 3) and 0.0 <= x.min() and x.max() <= 1.0
            assert np.bincount(y).tolist() == [1000] * 10
            assert len(set(ids)) == n


def _write_idx(path, array, magic, compress):
    header = struct.pack(">I", magic) + struct.pack(">" + "I" * array.ndim, *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


def _make_mnist(directory, n=6, compress=True):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, (img, lab) in mnist_source.IDX_FILES.items():
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        suffix = ".gz" if compress else ""
        _write_idx(os.path.join(directory, img + suffix), images, 2051, compress)
        _write_idx(os.path.join(directory, lab + suffix), labels, 2049, compress)
        arrays[split] = (images, labels)
    return arrays


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_idx_values_round_trip(tmp_path, compress):
    arrays = _make_mnist(str(tmp_path), compress=compress)
    x, y, ids = sources.to_numpy(sources.load("mnist", "test", path=str(tmp_path))[0])
    np.testing.assert_allclose(x[..., 0], arrays["test"][0] / 255.0, atol=1e-7)
    np.testing.assert_array_equal(y, arrays["test"][1])
    assert ids[0] == "mnist/test/00000"
    ds, info = sources.load("mnist", "test", path=str(tmp_path), indices=[1, 4])
    x2, y2, ids2 = sources.to_numpy(ds)
    np.testing.assert_array_equal(x2, x[[1, 4]])
    assert y2.tolist() == y[[1, 4]].tolist() and info.num_examples == 2
    assert ids2 == ["mnist/test/00001", "mnist/test/00004"]


def test_mnist_bad_magic_truncated_gzip_and_missing_files(tmp_path):
    _make_mnist(str(tmp_path))
    images = os.path.join(str(tmp_path), "t10k-images-idx3-ubyte.gz")
    labels = os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte.gz")
    good = open(labels, "rb").read()

    _write_idx(labels, np.zeros(6, np.uint8), 1234, True)
    with pytest.raises(sources.DataError, match=r"t10k-labels-idx1-ubyte.gz.*magic number 1234, expected 2049"):
        sources.load("mnist", "test", path=str(tmp_path))

    with open(labels, "wb") as f:
        f.write(good[: len(good) // 2])
    with pytest.raises(sources.DataError, match=r"t10k-labels-idx1-ubyte.gz.*not a complete gzip"):
        sources.load("mnist", "test", path=str(tmp_path))

    with open(labels, "wb") as f:
        f.write(good)
    _write_idx(images, np.zeros((5, 28, 28), np.uint8), 2051, True)
    with pytest.raises(sources.DataError, match="5 images but 6 labels"):
        sources.load("mnist", "test", path=str(tmp_path))

    os.remove(images)
    with pytest.raises(sources.DataError, match=r"t10k-images-idx3-ubyte\(\.gz\) not found"):
        sources.load("mnist", "test", path=str(tmp_path))
    with pytest.raises(sources.DataError, match="does not exist"):
        sources.load("mnist", "train", path=str(tmp_path / "nope"))


def _make_folder(root, sizes=None, mode="RGB"):
    """train/{cat,ant}/*.png with known pixel values; returns {relpath: array}."""
    rng = np.random.default_rng(1)
    written = {}
    for cls in ("cat", "ant"):
        os.makedirs(os.path.join(root, "train", cls))
        for i in range(3):
            h, w = (sizes or {}).get((cls, i), (6, 6))
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            arr = rng.integers(0, 256, shape, dtype=np.uint8)
            rel = f"train/{cls}/{i}.png"
            Image.fromarray(arr, mode).save(os.path.join(root, rel))
            written[rel] = arr
    return written


def test_image_folder_directory_and_tarball_agree(tmp_path):
    root = str(tmp_path / "imgs")
    written = _make_folder(root)
    tarball = str(tmp_path / "imgs.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    for path in (root, tarball):
        ds, info = sources.load("image_folder", "train", path=path)
        _spec_ok(ds, (6, 6, 3))
        assert info.class_names == ("ant", "cat") and info.num_examples == 6
        x, y, ids = sources.to_numpy(ds)
        assert y.tolist() == [0, 0, 0, 1, 1, 1]
        for img, ident in zip(x, ids):
            rel = ident[ident.index("train/"):]
            np.testing.assert_allclose(img, written[rel] / 255.0, atol=1e-6)
    # A tarball streams in archive order; indices pick by sorted name all the same.
    reversed_tar = str(tmp_path / "reversed.tar")
    with tarfile.open(reversed_tar, "w") as tar:
        for rel in sorted(written, reverse=True):
            tar.add(os.path.join(root, rel), arcname=rel)
    x, y, ids = sources.to_numpy(sources.load("image_folder", "train", path=reversed_tar)[0])
    assert ids == sorted(written, reverse=True) and y.tolist() == [1, 1, 1, 0, 0, 0]
    for path in (root, reversed_tar):
        ds, info = sources.load("image_folder", "train", path=path, indices=[0, 4])
        assert sorted(sources.to_numpy(ds)[2]) == ["train/ant/0.png", "train/cat/1.png"]
        assert info.num_examples == 2


def test_a_tarballs_listing_is_read_once_per_file_version(tmp_path, monkeypatch):
    root = str(tmp_path / "imgs")
    _make_folder(root)
    tarball = str(tmp_path / "imgs.tar.gz")
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(tarfile, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    first = image_folder.folder_listing(tarball, "train")
    assert image_folder.folder_listing(tarball, "train") == first and len(first[0]) == 6
    assert len(opened) == 1
    # Rewritten with one more image: a new size, so a new listing.
    Image.fromarray(np.zeros((6, 6, 3), np.uint8)).save(os.path.join(root, "train", "cat", "9.png"))
    with real_open(tarball, "w:gz") as tar:
        tar.add(root, arcname="imgs")
    assert len(image_folder.folder_listing(tarball, "train")[0]) == 7 and len(opened) == 2


def test_image_folder_resize_center_crop_and_grayscale(tmp_path):
    root = str(tmp_path)
    _make_folder(root, sizes={("cat", 0): (10, 20)}, mode="L")
    ds, info = sources.load("image_folder", "train", path=root, image_size=4)
    _spec_ok(ds, (4, 4, 1))
    x, _, _ = sources.to_numpy(ds)
    assert x.shape == (6, 4, 4, 1) and x.min() >= 0 and x.max() <= 1


def test_image_folder_errors_name_the_problem(tmp_path):
    root = str(tmp_path / "mixed")
    _make_folder(root, sizes={("cat", 2): (7, 6)})
    ds, _ = sources.load("image_folder", "train", path=root)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"train/cat/2.png.* is 7x6, expected the size of the first image, 6x6"):
        sources.to_numpy(ds)

    with pytest.raises(sources.DataError, match="does not exist"):
        sources.load("image_folder", "train", path=str(tmp_path / "missing"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(sources.DataError, match="no images found"):
        sources.load("image_folder", "train", path=str(tmp_path / "empty"))
    os.makedirs(os.path.join(root, "train", "bee"))
    with pytest.raises(sources.DataError, match=r"\['bee'\].*hold no"):
        sources.load("image_folder", "train", path=root)

    corrupt = str(tmp_path / "corrupt")
    os.makedirs(os.path.join(corrupt, "test", "a"))
    with open(os.path.join(corrupt, "test", "a", "x.png"), "wb") as f:
        f.write(b"not a png")
    with pytest.raises(sources.DataError, match=r"cannot decode image .*x\.png"):
        sources.load("image_folder", "test", path=corrupt)
    with pytest.raises(sources.DataError, match="image_size=0"):
        sources.load("image_folder", "test", path=corrupt, image_size=0)

    bad_tar = str(tmp_path / "bad.tar.gz")
    with open(bad_tar, "wb") as f:
        f.write(b"\x1f\x8b garbage")
    with pytest.raises(sources.DataError, match="cannot read tarball"):
        sources.load("image_folder", "train", path=bad_tar)


def test_unknown_source_split_and_options():
    with pytest.raises(sources.DataError, match="unknown data source 'svhn'"):
        sources.load("svhn", "train")
    with pytest.raises(sources.DataError, match="split='valid'"):
        sources.load("digits", "valid")
    with pytest.raises(sources.DataError, match="image_size=16 is not supported for source 'digits'"):
        sources.load("digits", "train", image_size=16)
    with pytest.raises(sources.DataError, match="tfds:imagenet2012 is not supported"):
        sources.load("tfds:imagenet2012", "train")


def test_tfds_refuses_to_download_and_fails_fast(tmp_path):
    with pytest.raises(sources.DataError, match=r"tfds:mnist is not prepared in data_dir=.*--download"):
        sources.load("tfds:mnist", "train", data_dir=str(tmp_path))


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("cifar10", (32, 32, 3)),
                                        ("celeb_a", (64, 64, 3))])
def test_tfds_plumbing_with_mock_data(tmp_path, name, shape):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=4):
        ds, info = sources.load(f"tfds:{name}", "test", data_dir=str(tmp_path), download=True)
        _spec_ok(ds, shape)
        x, y, ids = sources.to_numpy(ds)
    assert x.shape == (4,) + shape and 0 <= x.min() and x.max() <= 1
    assert ids == [f"{name}/test/{i}" for i in range(4)]
    assert (y == -1).all() if name == "celeb_a" else (y >= 0).all()


@pytest.mark.parametrize("compress", [True, False])
def test_index_ranges_read_only_their_rows_and_name_a_truncated_file(tmp_path, compress):
    arrays = _make_mnist(str(tmp_path), compress=compress)
    whole = sources.to_numpy(sources.load("mnist", "test", path=str(tmp_path))[0])
    where = DataConfig("mnist", path=str(tmp_path))
    assert sources.get("mnist").size("test", where) == len(whole[0])
    x, y, ids = sources.get("mnist").rows("test", where, 2, 5)
    np.testing.assert_array_equal(x, whole[0][2:5])
    np.testing.assert_array_equal(y, arrays["test"][1][2:5])
    assert ids == whole[2][2:5] == ["mnist/test/00002", "mnist/test/00003", "mnist/test/00004"]
    info = sources.source_info("mnist", "test", path=str(tmp_path))
    assert info.image_shape == (28, 28, 1) and info.num_examples == len(whole[0])
    digits = sources.to_numpy(sources.load("digits", "test")[0])
    x, _, ids = sources.get("digits").rows("test", DataConfig(), 10, 20)
    np.testing.assert_array_equal(x, digits[0][10:20])
    assert ids == digits[2][10:20]
    path = os.path.join(str(tmp_path), "t10k-images-idx3-ubyte")
    raw = open(path, "rb").read() if not compress else None
    if raw is not None:
        open(path, "wb").write(raw[:-100])
        with pytest.raises(sources.DataError, match="t10k-images-idx3-ubyte.*truncated"):
            sources.get("mnist").rows("test", where, 0, len(whole[0]))
    with pytest.raises(sources.DataError, match=r"rows 4..9 of .*, which holds 6"):
        mnist_source.read_idx_rows(os.path.join(str(tmp_path), "t10k-labels-idx1-ubyte"
                                        + (".gz" if compress else "")), 1, 4, 10)
