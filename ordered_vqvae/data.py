"""Image data sources as `tf.data` pipelines.

Every source yields dicts ``{"image": float32 [H,W,C] in [0,1], "label": int64,
"id": string}`` with the image shape known statically, in a deterministic order
(optionally a seeded permutation). Sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (real, offline).
- ``mnist``: a directory holding the four standard IDX files, gzipped or not.
- ``image_folder``: a directory or ``.tar.gz`` of ``<split>/<class>/<file>`` images.
- ``tfds:<name>``: a TFDS dataset already prepared under ``data_dir``.

Nothing here downloads unless ``download=True`` is passed for a TFDS source.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import os
import struct
import tarfile
import zlib
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DIGITS_TEST_PERCENT = 20
TFDS_NAMES = ("mnist", "fashion_mnist", "cifar10", "celeb_a")
CELEBA_CROP = 140  # Center crop of the 178x218 CelebA frames before resizing.
CELEBA_SIZE = 64


class DataError(ValueError):
    """A data source was given a bad path, file or value."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Static facts about a loaded source."""

    name: str
    image_shape: tuple
    num_examples: Optional[int]
    class_names: tuple


def stable_fraction(key: str) -> int:
    """A deterministic bucket in 0..99 from a string id (CRC32, stable across runs)."""
    return zlib.crc32(key.encode("utf-8")) % 100


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not supported, expected one of {SPLITS}")


def _permutation(n: int, shuffle: bool, seed: int) -> np.ndarray:
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng(seed).permutation(n)


def _from_arrays(images_u8: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                 scale: float, shuffle: bool, seed: int) -> tf.data.Dataset:
    """Dataset over in-memory uint8 images [N,H,W,C]; scaling happens lazily."""
    order = _permutation(len(ids), shuffle, seed)
    ds = tf.data.Dataset.from_tensor_slices({
        "image": images_u8[order],
        "label": labels[order].astype(np.int64),
        "id": np.asarray(ids, dtype=object)[order].astype(bytes),
    })

    def to_float(ex):
        ex["image"] = tf.cast(ex["image"], tf.float32) / scale
        return ex

    return ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ----------------------------------------------------------------------------- digits


def load_digits_arrays(split: str):
    """Returns (uint8 images [N,8,8,1] in 0..16, labels [N], ids [N]) for a split."""
    _check_split(split)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ids = [f"digits/{i:04d}" for i in range(len(bunch.target))]
    in_test = np.array([stable_fraction(i) < DIGITS_TEST_PERCENT for i in ids])
    keep = in_test if split == "test" else ~in_test
    images = bunch.images.astype(np.uint8)[..., None][keep]
    return images, bunch.target[keep], [i for i, k in zip(ids, keep) if k]


# ----------------------------------------------------------------------------- mnist

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_MAGIC = {1: 2049, 3: 2051}


def _find_idx(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if tf.io.gfile.exists(path):
            return path
    raise DataError(f"MNIST file {stem}(.gz) not found in {directory!r}; expected the four "
                    "standard IDX files (train-images-idx3-ubyte, ... t10k-labels-idx1-ubyte)")


def read_idx(path: str, ndim: int) -> np.ndarray:
    """Reads one IDX file (gzipped or not) holding a uint8 array of `ndim` dimensions."""
    with tf.io.gfile.GFile(path, "rb") as f:
        raw = f.read()
    if path.endswith(".gz"):
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path!r} is not a complete gzip file ({e})") from None
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path!r} is too short ({len(raw)} bytes) for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path!r} has IDX magic number {magic}, expected {_IDX_MAGIC[ndim]} "
                        f"(uint8 data with {ndim} dimensions)")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    body = raw[4 + 4 * ndim:]
    expected = int(np.prod(dims))
    if len(body) != expected:
        raise DataError(f"{path!r} holds {len(body)} data bytes, expected {expected} for shape {dims}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def load_mnist_arrays(directory: str, split: str):
    """Returns (uint8 images [N,28,28,1], labels [N], ids [N]) from IDX files."""
    _check_split(split)
    if not directory or not tf.io.gfile.isdir(directory):
        raise DataError(f"MNIST directory {directory!r} does not exist")
    image_stem, label_stem = _IDX_FILES[split]
    images = read_idx(_find_idx(directory, image_stem), 3)
    labels = read_idx(_find_idx(directory, label_stem), 1)
    if len(images) != len(labels):
        raise DataError(f"MNIST {split} in {directory!r} has {len(images)} images but "
                        f"{len(labels)} labels")
    ids = [f"mnist/{split}/{i:05d}" for i in range(len(labels))]
    return images[..., None], labels, ids


# ----------------------------------------------------------------------------- image folder


def _split_and_class(relpath: str, split: str) -> Optional[str]:
    """The class of `.../<split>/<class>/<file>`, or None when the path is elsewhere."""
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-3] == split and relpath.lower().endswith(IMAGE_EXTENSIONS):
        return parts[-2]
    return None


def _folder_entries(root: str, split: str):
    """(relative path, class, encoded bytes or None) for a split of a directory or tarball."""
    entries = []
    if tf.io.gfile.isdir(root):
        for dirpath, _, files in tf.io.gfile.walk(root):
            for name in files:
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, root)
                cls = _split_and_class(rel, split)
                if cls is not None:
                    entries.append((rel, cls, full))
        all_classes = _class_dirs(root, split)
    elif root.endswith((".tar.gz", ".tgz", ".tar")) and tf.io.gfile.exists(root):
        all_classes = set()
        try:
            with tf.io.gfile.GFile(root, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
                for member in tar:
                    parts = member.name.rstrip("/").split("/")
                    if member.isdir() and len(parts) >= 2 and parts[-2] == split:
                        all_classes.add(parts[-1])
                    if not member.isfile():
                        continue
                    cls = _split_and_class(member.name, split)
                    if cls is not None:
                        all_classes.add(cls)
                        entries.append((member.name, cls, tar.extractfile(member).read()))
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read tarball {root!r}: {e}") from None
    else:
        raise DataError(f"image folder {root!r} does not exist (expected a directory or a "
                        ".tar.gz of <split>/<class>/<image> files)")
    found = {cls for _, cls, _ in entries}
    empty = sorted(set(all_classes) - found)
    if empty:
        raise DataError(f"class folder(s) {empty} of split {split!r} in {root!r} hold no "
                        f"{'/'.join(IMAGE_EXTENSIONS)} images")
    if not entries:
        raise DataError(f"no images found under {root!r} for split {split!r}; expected "
                        f"<split>/<class>/<image> with extensions {IMAGE_EXTENSIONS}")
    entries.sort(key=lambda e: e[0])
    return entries


def _class_dirs(root: str, split: str) -> set:
    classes = set()
    for dirpath, subdirs, _ in tf.io.gfile.walk(root):
        if os.path.basename(os.path.normpath(dirpath)) == split:
            classes.update(subdirs)
    return classes


def _probe_image(data: bytes, name: str):
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            channels = 1 if im.mode in ("L", "1", "I;16", "I") else 3
            return (im.height, im.width, channels)
    except Exception as e:  # PIL raises many types for corrupt files.
        raise DataError(f"cannot decode image {name!r}: {e}") from None


def _resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the short side to `size`, then center-crops to size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="area", antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size, size)


def _decode_tensor(data, channels: int, image_size: Optional[int]):
    """Encoded PNG/JPEG bytes -> float32 [H,W,channels] in [0,1], resized when asked."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image = tf.cast(image, tf.float32) / 255.0
    if image_size:
        image = tf.clip_by_value(_resize_center_crop(image, image_size), 0.0, 1.0)
    return image


def decode_encoded(data: bytes, record_id: str, image_shape, resize: bool = False) -> np.ndarray:
    """Eagerly decodes one encoded image to `image_shape` (the SourceInfo's of a
    `decode=False` load; `resize` as its image_size was given). Raises DataError naming
    the record when the bytes are not an image or the size is wrong."""
    height, width, channels = image_shape
    try:
        image = _decode_tensor(tf.constant(data), channels, height if resize else None).numpy()
    except tf.errors.OpError as e:
        raise DataError(f"cannot decode image {record_id!r}: {e.message}") from None
    if image.shape != tuple(image_shape):
        raise DataError(f"image {record_id!r} has shape {image.shape}, expected "
                        f"{tuple(image_shape)} (resize to make sizes agree)")
    return image


def load_image_folder(root: str, split: str, image_size: Optional[int] = None,
                      shuffle: bool = False, seed: int = 0, decode: bool = True):
    """A dataset over `<split>/<class>/<file>` images in a directory or tarball.

    With `decode=False` elements carry the encoded file bytes as "encoded" instead of
    "image" (decode each with `decode_encoded`), so that one corrupt file can be set aside
    rather than stopping the whole dataset.
    """
    _check_split(split)
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise DataError(f"image_size={image_size!r}, expected a positive integer")
    entries = _folder_entries(root, split)
    classes = sorted({cls for _, cls, _ in entries})
    in_memory = not isinstance(entries[0][2], str)
    first = entries[0][2] if in_memory else tf.io.gfile.GFile(entries[0][2], "rb").read()
    height, width, channels = _probe_image(first, os.path.join(root, entries[0][0]))
    shape = (image_size, image_size, channels) if image_size else (height, width, channels)
    info = SourceInfo(name="image_folder", image_shape=shape, num_examples=len(entries),
                      class_names=tuple(classes))

    order = _permutation(len(entries), shuffle, seed)
    rels = np.array([e[0] for e in entries], dtype=object)[order].astype(bytes)
    labels = np.array([classes.index(e[1]) for e in entries], np.int64)[order]
    payload = np.array([e[2] for e in entries], dtype=object)[order]
    if not in_memory:
        payload = payload.astype(str)
    ds = tf.data.Dataset.from_tensor_slices({"id": rels, "label": labels, "payload": payload})

    def read(ex):
        data = ex["payload"] if in_memory else tf.io.read_file(ex["payload"])
        return {"encoded": data, "label": ex["label"], "id": ex["id"]}

    def decode_one(ex):
        image = _decode_tensor(ex["encoded"], channels, image_size)
        if not image_size:
            got = tf.shape(image)[:2]
            same = tf.reduce_all(tf.equal(got, [height, width]))
            message = tf.strings.join([
                "image ", ex["id"], f" under {root} is ", tf.strings.as_string(got[0]), "x",
                tf.strings.as_string(got[1]), ", expected the size of the first image, "
                f"{height}x{width} (pass image_size to resize)"])
            check = tf.debugging.Assert(same, [message])
            with tf.control_dependencies([check]):
                image = tf.identity(image)
        return {"image": tf.ensure_shape(image, shape), "label": ex["label"], "id": ex["id"]}

    ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if decode:
        ds = ds.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds, info


# ----------------------------------------------------------------------------- tfds


def load_tfds(name: str, split: str, data_dir: Optional[str], download: bool = False,
              image_size: Optional[int] = None, shuffle: bool = False, seed: int = 0):
    """A prepared TFDS dataset; refuses to download unless `download` is True."""
    _check_split(split)
    if name not in TFDS_NAMES:
        raise DataError(f"tfds:{name} is not supported, expected one of "
                        f"{['tfds:' + n for n in TFDS_NAMES]}")
    import tensorflow_datasets as tfds

    builder = tfds.builder(name, data_dir=data_dir)
    if not builder.is_prepared():
        if not download:
            raise DataError(f"tfds:{name} is not prepared in data_dir={data_dir!r} (looked for "
                            f"{builder.data_dir!r}); prepare it there or pass download=True "
                            "(--download) to let TFDS fetch it")
        builder.download_and_prepare()
    tfds_split = {"train": "train", "test": "test"}[split]
    read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=1)
    ds = builder.as_dataset(split=tfds_split, shuffle_files=shuffle, read_config=read_config)
    if shuffle:
        ds = ds.shuffle(10_000, seed=seed, reshuffle_each_iteration=False)
    splits = builder.info.splits
    num = splits[tfds_split].num_examples if tfds_split in splits else None
    is_celeba = name == "celeb_a"
    size = image_size or (CELEBA_SIZE if is_celeba else None)
    raw_shape = builder.info.features["image"].shape
    shape = (size, size, raw_shape[-1]) if size else tuple(raw_shape)
    class_names = () if is_celeba else tuple(builder.info.features["label"].names)

    def convert(i, ex):
        image = tf.cast(ex["image"], tf.float32) / 255.0
        if is_celeba:
            image = tf.image.resize_with_crop_or_pad(image, CELEBA_CROP, CELEBA_CROP)
        if size:
            image = tf.clip_by_value(_resize_center_crop(image, size), 0.0, 1.0)
        label = tf.constant(-1, tf.int64) if is_celeba else tf.cast(ex["label"], tf.int64)
        ident = tf.strings.join([f"{name}/{split}/", tf.strings.as_string(i)])
        return {"image": tf.ensure_shape(image, shape), "label": label, "id": ident}

    ds = ds.enumerate().map(convert, num_parallel_calls=tf.data.AUTOTUNE,
                                              deterministic=True)
    return ds, SourceInfo(name=f"tfds:{name}", image_shape=shape, num_examples=num,
                          class_names=class_names)


# ----------------------------------------------------------------------------- entry point


def load(source: str, split: str, *, path: Optional[str] = None, data_dir: Optional[str] = None,
         image_size: Optional[int] = None, shuffle: bool = False, seed: int = 0,
         download: bool = False, decode: bool = True):
    """Loads a split of a source.

    Args:
      source: "digits", "mnist", "image_folder" or "tfds:<name>".
      split: "train" or "test".
      path: the MNIST IDX directory, or the image folder / tarball.
      data_dir: the TFDS data directory (tfds sources only).
      image_size: resize (short side) and center-crop to this square size.
      shuffle, seed: a deterministic, seeded permutation of the whole split.
      download: let TFDS download and prepare a missing dataset.
      decode: False gives image_folder elements "encoded" bytes instead of "image"
        (other sources always decode).

    Returns:
      (dataset, SourceInfo). Elements: {"image": float32 [H,W,C] in [0,1],
      "label": int64 (-1 when unlabelled), "id": string}.
    """
    if image_size is not None and source in ("digits", "mnist"):
        raise DataError(f"image_size={image_size} is not supported for source {source!r}; its "
                        "images have a fixed size")
    if source == "digits":
        images, labels, ids = load_digits_arrays(split)
        info = SourceInfo("digits", images.shape[1:], len(ids), tuple(str(d) for d in range(10)))
        return _from_arrays(images, labels, ids, 16.0, shuffle, seed), info
    if source == "mnist":
        images, labels, ids = load_mnist_arrays(path, split)
        info = SourceInfo("mnist", images.shape[1:], len(ids), tuple(str(d) for d in range(10)))
        return _from_arrays(images, labels, ids, 255.0, shuffle, seed), info
    if source == "image_folder":
        if not path:
            raise DataError("source 'image_folder' needs a path (directory or .tar.gz)")
        return load_image_folder(path, split, image_size, shuffle, seed, decode)
    if source.startswith("tfds:"):
        return load_tfds(source[len("tfds:"):], split, data_dir, download, image_size, shuffle, seed)
    raise DataError(f"unknown data source {source!r}, expected one of 'digits', 'mnist', "
                    f"'image_folder', 'tfds:<name>' with name in {TFDS_NAMES}")


def to_numpy(ds: tf.data.Dataset, limit: Optional[int] = None, batch_size: int = 1024):
    """Materialises (images float32 [N,H,W,C], labels int64 [N], ids list[str])."""
    if limit is not None:
        ds = ds.take(limit)
    images, labels, ids = [], [], []
    for batch in ds.batch(batch_size).as_numpy_iterator():
        images.append(batch["image"])
        labels.append(batch["label"])
        ids.extend(i.decode() for i in batch["id"])
    if not images:
        raise DataError("the dataset is empty")
    return np.concatenate(images), np.concatenate(labels), ids
