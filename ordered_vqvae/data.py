"""Image data sources as `tf.data` pipelines.

Every source yields dicts ``{"image": float32 [H,W,C] in [0,1], "label": int64,
"id": string}`` with the image shape known statically, in a deterministic order
(the split's own order: files sorted by path, a tarball's members in archive order).
Every source streams: memory holds a few elements, not the split. `indices` reads only
those examples of the split (by their index in its sorted listing), still in one pass.
Sources:

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (real, offline).
- ``mnist``: a directory holding the four standard IDX files, gzipped or not.
- ``image_folder``: a directory or ``.tar.gz`` of ``<split>/<class>/<file>`` images.
- ``celeba``: CelebA's own files (``img_align_celeba/`` and its partition file), in a
  directory or a tarball; center-cropped to 140 and resized to 64x64, as TFDS does.
- ``tfds:<name>``: a TFDS dataset already prepared under ``data_dir``.

Nothing here downloads unless ``download=True`` is passed for a TFDS source.
"""

from __future__ import annotations

import dataclasses
import functools
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


def random_indices(num_examples: int, limit: int, seed: int) -> np.ndarray:
    """The sorted indices of `limit` of `num_examples` examples chosen at random with
    `seed` (the first `limit` of a seeded permutation)."""
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:limit])


def _check_indices(indices, num_examples: int) -> Optional[np.ndarray]:
    if indices is None:
        return None
    indices = np.asarray(indices, np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= num_examples
                         or (np.diff(indices) <= 0).any()):
        raise DataError(f"indices {indices.min()}..{indices.max()} (sorted, distinct) are "
                        f"expected within the split's {num_examples} examples")
    return indices


def _keep(enumerated: tf.data.Dataset, num_examples: int, indices) -> tf.data.Dataset:
    """The (index, element) pairs of `enumerated` whose index is in `indices` (all when
    None); the stream stops after the last one."""
    if indices is None:
        return enumerated
    mask = np.zeros(num_examples, bool)
    mask[indices] = True
    mask = tf.constant(mask)
    return enumerated.filter(lambda i, *_: mask[i]).take(len(indices))


def _from_arrays(images_u8: np.ndarray, labels: np.ndarray, ids: Sequence[str],
                 scale: float, indices=None) -> tf.data.Dataset:
    """Dataset over in-memory uint8 images [N,H,W,C] (those at `indices`); scaling happens
    lazily."""
    pick = slice(None) if indices is None else indices
    ds = tf.data.Dataset.from_tensor_slices({
        "image": images_u8[pick], "label": labels.astype(np.int64)[pick],
        "id": np.asarray(ids, dtype=object).astype(bytes)[pick]})

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


def _idx_check(path: str, ndim: int) -> tuple:
    """The dimensions of an IDX file, after checking its header and that its (decompressed)
    size is the header's plus one byte per value: a gzip file's size is read from its
    trailer, so the check costs no decompression."""
    dims = _idx_header(path, ndim)
    expected = 4 + 4 * ndim + int(np.prod(dims, dtype=np.int64))
    if path.endswith(".gz"):
        with tf.io.gfile.GFile(path, "rb") as f:
            f.seek(max(f.size() - 4, 0))
            size = struct.unpack("<I", f.read(4).rjust(4, b"\0"))[0]
        if size != expected % 2**32:
            raise DataError(f"{path!r} is not a complete gzip file (its trailer records {size} "
                            f"bytes, expected {expected} for shape {dims})")
    else:
        size = tf.io.gfile.stat(path).length
        if size != expected:
            raise DataError(f"{path!r} holds {size} bytes, expected {expected} for shape "
                            f"{dims}: it is truncated or has trailing data")
    return dims


def load_mnist(directory: str, split: str, indices=None) -> tf.data.Dataset:
    """A split of the four IDX files (gzipped or not), streamed by `tf.data` (the examples
    at `indices` only, when given): images float32 [28,28,1], ids mnist/<split>/<index>."""
    _check_split(split)
    if not directory or not tf.io.gfile.isdir(directory):
        raise DataError(f"MNIST directory {directory!r} does not exist")
    image_path, label_path = (_find_idx(directory, stem) for stem in _IDX_FILES[split])
    dims = _idx_check(image_path, 3)
    labels = _idx_check(label_path, 1)[0]
    if dims[0] != labels:
        raise DataError(f"MNIST {split} in {directory!r} has {dims[0]} images but {labels} labels")

    def records(path, ndim, row):
        return tf.data.FixedLengthRecordDataset(
            path, row, header_bytes=4 + 4 * ndim,
            compression_type="GZIP" if path.endswith(".gz") else "")

    def convert(i, pair):
        image, label = (tf.io.decode_raw(x, tf.uint8) for x in pair)
        return {"image": tf.cast(tf.reshape(image, (*dims[1:], 1)), tf.float32) / 255.0,
                "label": tf.cast(label[0], tf.int64),
                "id": tf.strings.join([f"mnist/{split}/",
                                       tf.strings.as_string(i, width=5, fill="0")])}

    pairs = tf.data.Dataset.zip((records(image_path, 3, dims[1] * dims[2]),
                                 records(label_path, 1, 1)))
    pairs = _keep(pairs.enumerate(), dims[0], _check_indices(indices, dims[0]))
    return pairs.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


# ----------------------------------------------------------------------------- image folder


def split_class(relpath: str, split: str) -> Optional[str]:
    """The class of `.../<split>/<class>/<file>` (an image), or None when the path is elsewhere."""
    parts = relpath.replace("\\", "/").split("/")
    if len(parts) >= 3 and parts[-3] == split and relpath.lower().endswith(IMAGE_EXTENSIONS):
        return parts[-2]
    return None


def is_tarball(path: str) -> bool:
    return bool(path) and path.endswith((".tar.gz", ".tgz", ".tar")) and tf.io.gfile.exists(path)


def tar_members(path: str, accept):
    """Yields (name, bytes) of a tarball's files whose name `accept(name)` takes, in the
    tarball's order, one member in memory at a time."""
    try:
        with tf.io.gfile.GFile(path, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                if member.isfile() and accept(member.name):
                    yield member.name, tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read tarball {path!r}: {e}") from None


def tarball_members(path: str, split: str, names: Optional[set] = None):
    """Yields (member name, class, bytes) of a tarball's split images (only those in `names`
    when given), one member in memory at a time."""
    for name, content in tar_members(path, lambda n: split_class(n, split) is not None
                                     and (names is None or n in names)):
        yield name, split_class(name, split), content


def folder_listing(root: str, split: str):
    """(sorted relative paths of the split's images, in a tarball its member names; sorted
    class names) of a directory or tarball, without reading any image. Raises DataError for
    a missing root, empty class folders or no images."""
    entries = []
    if tf.io.gfile.isdir(root):
        all_classes = set()
        for dirpath, subdirs, files in tf.io.gfile.walk(root):
            if os.path.basename(os.path.normpath(dirpath)) == split:
                all_classes.update(subdirs)
            for name in files:
                rel = os.path.relpath(os.path.join(dirpath, name), root)
                cls = split_class(rel, split)
                if cls is not None:
                    entries.append((rel, cls))
    elif is_tarball(root):
        stat = tf.io.gfile.stat(root)
        entries, all_classes = _tarball_listing(root, split, stat.length, stat.mtime_nsec)
    else:
        raise DataError(f"image folder {root!r} does not exist (expected a directory or a "
                        ".tar.gz of <split>/<class>/<image> files)")
    found = {cls for _, cls in entries}
    empty = sorted(set(all_classes) - found)
    if empty:
        raise DataError(f"class folder(s) {empty} of split {split!r} in {root!r} hold no "
                        f"{'/'.join(IMAGE_EXTENSIONS)} images")
    if not entries:
        raise DataError(f"no images found under {root!r} for split {split!r}; expected "
                        f"<split>/<class>/<image> with extensions {IMAGE_EXTENSIONS}")
    return sorted(e[0] for e in entries), sorted(found)


@functools.lru_cache(maxsize=8)
def _tarball_listing(root: str, split: str, length: int, mtime_nsec: int):
    """((member name, class) of the split's files, every class folder of the split) of a
    tarball: one pass over the whole archive, so kept per file version (its size and
    modification time), since picking a subset reads the listing again to read the split."""
    entries, all_classes = [], set()
    try:
        with tf.io.gfile.GFile(root, "rb") as raw, tarfile.open(fileobj=raw, mode="r:*") as tar:
            for member in tar:
                parts = member.name.rstrip("/").split("/")
                if member.isdir() and len(parts) >= 2 and parts[-2] == split:
                    all_classes.add(parts[-1])
                if not member.isfile():
                    continue
                cls = split_class(member.name, split)
                if cls is not None:
                    all_classes.add(cls)
                    entries.append((member.name, cls))
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read tarball {root!r}: {e}") from None
    return tuple(entries), frozenset(all_classes)


def folder_patterns(root: str, split: str) -> list:
    """Glob patterns, one per class folder of the split, that match its files (a directory)."""
    patterns = []
    for dirpath, subdirs, _ in tf.io.gfile.walk(root):
        if os.path.basename(os.path.normpath(dirpath)) == split:
            patterns += [os.path.join(dirpath, d, "*") for d in sorted(subdirs)]
    return patterns


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


def _decode_tensor(data, channels: int, image_size: Optional[int], crop: Optional[int] = None):
    """Encoded PNG/JPEG bytes -> float32 [H,W,channels] in [0,1], center-cropped to
    crop x crop first and then resized when asked."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image = tf.cast(image, tf.float32) / 255.0
    if crop:
        image = tf.image.resize_with_crop_or_pad(image, crop, crop)
    if image_size:
        image = tf.clip_by_value(_resize_center_crop(image, image_size), 0.0, 1.0)
    return image


def decode_encoded(data: bytes, record_id: str, image_shape, resize: bool = False,
                   crop: Optional[int] = None) -> np.ndarray:
    """Eagerly decodes one encoded image to `image_shape` (the SourceInfo's of a
    `decode=False` load; `resize` as its image_size was given; `crop` a center crop before,
    as for CelebA). Raises DataError naming the record when the bytes are not an image or
    the size is wrong."""
    height, width, channels = image_shape
    try:
        image = _decode_tensor(tf.constant(data), channels, height if resize else None,
                               crop).numpy()
    except tf.errors.OpError as e:
        raise DataError(f"cannot decode image {record_id!r}: {e.message}") from None
    if image.shape != tuple(image_shape):
        raise DataError(f"image {record_id!r} has shape {image.shape}, expected "
                        f"{tuple(image_shape)} (resize to make sizes agree)")
    return image


def _folder_info(root: str, split: str, image_size: Optional[int]):
    """(SourceInfo, sorted image paths) of an image folder's split, from its listing and
    its first image (no other image is read)."""
    _check_split(split)
    if image_size is not None and (int(image_size) != image_size or image_size < 1):
        raise DataError(f"image_size={image_size!r}, expected a positive integer")
    files, classes = folder_listing(root, split)
    if is_tarball(root):
        first = next(tarball_members(root, split, {files[0]}))[2]
    else:
        with tf.io.gfile.GFile(os.path.join(root, files[0]), "rb") as f:
            first = f.read()
    height, width, channels = _probe_image(first, os.path.join(root, files[0]))
    shape = (image_size, image_size, channels) if image_size else (height, width, channels)
    return SourceInfo("image_folder", shape, len(files), tuple(classes)), files


def _tarball_stream(root: str, accept, label) -> tf.data.Dataset:
    """{"encoded", "label", "id"} of a tarball's members that `accept(name)` takes, in
    archive order, read by one pass that holds one member at a time (`label(name)`)."""
    def members():
        for name, content in tar_members(root, accept):
            yield {"encoded": content, "label": label(name), "id": name}

    return tf.data.Dataset.from_generator(members, output_signature={
        "encoded": tf.TensorSpec((), tf.string), "label": tf.TensorSpec((), tf.int64),
        "id": tf.TensorSpec((), tf.string)})


def load_image_folder(root: str, split: str, image_size: Optional[int] = None,
                      decode: bool = True, indices=None):
    """A dataset over `<split>/<class>/<file>` images (those at `indices` of the sorted
    listing, when given): a directory's read file by file in path order, a tarball's
    streamed in archive order.

    With `decode=False` elements carry the encoded file bytes as "encoded" instead of
    "image" (decode each with `decode_encoded`), so that one corrupt file can be set aside
    rather than stopping the whole dataset.
    """
    info, files = _folder_info(root, split, image_size)
    shape, classes = info.image_shape, info.class_names
    height, width, channels = shape if not image_size else (None, None, shape[-1])
    index = {cls: i for i, cls in enumerate(classes)}
    indices = _check_indices(indices, len(files))
    if indices is not None:
        files = [files[i] for i in indices]
        info = dataclasses.replace(info, num_examples=len(files))
    if is_tarball(root):
        wanted = set(files)
        ds = _tarball_stream(root, wanted.__contains__, lambda n: index[split_class(n, split)])
    else:
        ds = tf.data.Dataset.from_tensor_slices({
            "id": np.array(files, dtype=object).astype(bytes),
            "label": np.array([index[split_class(f, split)] for f in files], np.int64),
            "path": [os.path.join(root, f) for f in files]})
        ds = ds.map(lambda ex: {"encoded": tf.io.read_file(ex["path"]), "label": ex["label"],
                                "id": ex["id"]},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

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

    if decode:
        ds = ds.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds, info


# ----------------------------------------------------------------------------- celeba
# CelebA as distributed: img_align_celeba/000001.jpg ... 202599.jpg (178x218) and
# list_eval_partition.txt ("000001.jpg 0": 0 train, 1 validation, 2 test), in a directory
# or a tarball. Images are center-cropped to 140x140 and resized, as TFDS's loader does.

CELEBA_FOLDER = "img_align_celeba"
CELEBA_PARTITION = "list_eval_partition.txt"
CELEBA_SPLIT_CODES = {"train": "0", "test": "2"}  # The validation part (1) is not used.
CELEBA_RANGES = {"train": (1, 162770), "test": (182638, 202599)}  # The same, by number.


def _celeba_partition(text: str, where: str) -> dict:
    partition = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{where} line {number} is {line!r}, expected '<file> <0|1|2>'")
        partition[parts[0]] = parts[1]
    return partition


def celeba_files(root: str, split: str):
    """(sorted member names of the split's images, payload per name: the full path in a
    directory, None in a tarball). The split comes from list_eval_partition.txt when the
    root (or, for a tarball, the tarball or its directory) holds one, else from the
    official ranges of image numbers."""
    _check_split(split)
    names, partition, where = [], None, None
    if tf.io.gfile.isdir(root):
        images = root if os.path.basename(os.path.normpath(root)) == CELEBA_FOLDER else \
            os.path.join(root, CELEBA_FOLDER)
        if not tf.io.gfile.isdir(images):
            raise DataError(f"CelebA folder {root!r} holds no {CELEBA_FOLDER}/ directory")
        names = [f"{CELEBA_FOLDER}/{n}" for n in tf.io.gfile.listdir(images)
                 if n.lower().endswith(".jpg")]
        for candidate in (os.path.join(root, CELEBA_PARTITION),
                          os.path.join(os.path.dirname(os.path.normpath(images)),
                                       CELEBA_PARTITION)):
            if tf.io.gfile.exists(candidate):
                with tf.io.gfile.GFile(candidate) as f:
                    partition, where = _celeba_partition(f.read(), candidate), candidate
                break
        base = os.path.dirname(os.path.normpath(images))
        payload = {n: os.path.join(base, n) for n in names}
    elif is_tarball(root):
        try:
            with tf.io.gfile.GFile(root, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for member in tar:
                    parts = member.name.split("/")
                    if not member.isfile():
                        continue
                    if parts[-1] == CELEBA_PARTITION:
                        where = f"{root}:{member.name}"
                        partition = _celeba_partition(
                            tar.extractfile(member).read().decode(), where)
                    elif (len(parts) >= 2 and parts[-2] == CELEBA_FOLDER
                          and parts[-1].lower().endswith(".jpg")):
                        names.append(member.name)
        except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
            raise DataError(f"cannot read tarball {root!r}: {e}") from None
        beside = os.path.join(os.path.dirname(root), CELEBA_PARTITION)
        if partition is None and tf.io.gfile.exists(beside):
            with tf.io.gfile.GFile(beside) as f:
                partition, where = _celeba_partition(f.read(), beside), beside
        payload = {n: None for n in names}
    else:
        raise DataError(f"CelebA path {root!r} does not exist (expected a directory or a "
                        f".tar.gz holding {CELEBA_FOLDER}/*.jpg)")
    if partition is not None:
        code = CELEBA_SPLIT_CODES[split]
        kept = [n for n in names if partition.get(n.split("/")[-1]) == code]
    else:
        low, high = CELEBA_RANGES[split]
        kept = [n for n in names
                if n.split("/")[-1][:-4].isdigit() and low <= int(n.split("/")[-1][:-4]) <= high]
    if not kept:
        raise DataError(f"no CelebA {split} images under {root!r} ({len(names)} images in "
                        f"{CELEBA_FOLDER}/; split from "
                        f"{where or 'the official ranges of image numbers'})")
    kept.sort()
    return kept, payload


def load_celeba(root: str, split: str, image_size: Optional[int] = None,
                decode: bool = True, indices=None):
    """CelebA from its files (see `celeba_files`; those at `indices` of its sorted names,
    when given) as a dataset of 64x64 (or image_size) RGB images, label -1, id the member
    name: a directory's read file by file in name order, a tarball's streamed in archive
    order."""
    size = image_size or CELEBA_SIZE
    names, payload = celeba_files(root, split)
    indices = _check_indices(indices, len(names))
    if indices is not None:
        names = [names[i] for i in indices]
    shape = (size, size, 3)
    if is_tarball(root):
        ds = _tarball_stream(root, set(names).__contains__, lambda n: -1)
    else:
        ds = tf.data.Dataset.from_tensor_slices({
            "id": np.array(names, dtype=object).astype(bytes),
            "path": [payload[n] for n in names]})
        ds = ds.map(lambda ex: {"encoded": tf.io.read_file(ex["path"]),
                                "label": tf.constant(-1, tf.int64), "id": ex["id"]},
                    num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def decode_one(ex):
        image = _decode_tensor(ex["encoded"], 3, size, CELEBA_CROP)
        return {"image": tf.ensure_shape(image, shape), "label": ex["label"], "id": ex["id"]}

    if decode:
        ds = ds.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds, SourceInfo("celeba", shape, len(names), ())


# ----------------------------------------------------------------------------- tfds


def load_tfds(name: str, split: str, data_dir: Optional[str], download: bool = False,
              image_size: Optional[int] = None, subsplit: Optional[tuple] = None,
              indices=None):
    """A prepared TFDS dataset; refuses to download unless `download` is True. `subsplit`
    (start, stop) reads only those examples of the split (TFDS split slicing), with the
    ids they have in the whole split; `indices` only those of the whole split."""
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
    read_config = tfds.ReadConfig(interleave_cycle_length=1)
    first = subsplit[0] if subsplit else 0
    ds = builder.as_dataset(split=f"{tfds_split}[{first}:{subsplit[1]}]" if subsplit
                            else tfds_split, shuffle_files=False, read_config=read_config)
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

    ds = ds.enumerate(first)
    if indices is not None:
        if num is None:
            raise DataError(f"tfds:{name} {split} does not record its size, so examples "
                            "cannot be picked by index")
        indices = _check_indices(indices, num)
        ds, num = _keep(ds, num, indices), len(indices)
    ds = ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds, SourceInfo(name=f"tfds:{name}", image_shape=shape, num_examples=num,
                          class_names=class_names)


# ----------------------------------------------------------------------------- entry point


def load(source: str, split: str, *, path: Optional[str] = None, data_dir: Optional[str] = None,
         image_size: Optional[int] = None, download: bool = False, decode: bool = True,
         indices=None):
    """Loads a split of a source.

    Args:
      source: "digits", "mnist", "image_folder", "celeba" or "tfds:<name>".
      split: "train" or "test".
      path: the MNIST IDX directory, the image folder / tarball, or CelebA's directory or
        tarball (img_align_celeba/ and list_eval_partition.txt).
      data_dir: the TFDS data directory (tfds sources only).
      image_size: resize (short side) and center-crop to this square size.
      download: let TFDS download and prepare a missing dataset.
      decode: False gives image_folder and celeba elements "encoded" bytes instead of
        "image" (other sources always decode).
      indices: read only the examples at these sorted, distinct indices of the split (in
        its sorted listing), in one pass; SourceInfo.num_examples counts them.

    Returns:
      (dataset, SourceInfo). Elements: {"image": float32 [H,W,C] in [0,1],
      "label": int64 (-1 when unlabelled), "id": string}.
    """
    if image_size is not None and source in ("digits", "mnist"):
        raise DataError(f"image_size={image_size} is not supported for source {source!r}; its "
                        "images have a fixed size")
    if source == "digits":
        images, labels, ids = load_digits_arrays(split)
        indices = _check_indices(indices, len(ids))
        info = SourceInfo("digits", images.shape[1:], len(ids) if indices is None
                          else len(indices), tuple(str(d) for d in range(10)))
        return _from_arrays(images, labels, ids, 16.0, indices), info
    if source == "mnist":
        info = source_info(source, split, path=path)
        ds = load_mnist(path, split, indices)
        if indices is not None:
            info = dataclasses.replace(info, num_examples=len(indices))
        return ds, info
    if source == "image_folder":
        if not path:
            raise DataError("source 'image_folder' needs a path (directory or .tar.gz)")
        return load_image_folder(path, split, image_size, decode, indices)
    if source == "celeba":
        if not path:
            raise DataError("source 'celeba' needs a path (a directory or .tar.gz holding "
                            f"{CELEBA_FOLDER}/)")
        return load_celeba(path, split, image_size, decode, indices)
    if source.startswith("tfds:"):
        return load_tfds(source[len("tfds:"):], split, data_dir, download, image_size,
                         indices=indices)
    raise DataError(f"unknown data source {source!r}, expected one of 'digits', 'mnist', "
                    f"'image_folder', 'celeba', 'tfds:<name>' with name in {TFDS_NAMES}")


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


# ----------------------------------------------------------------------------- reading in pieces
# The extraction job reads a split in pieces that a Beam runner spreads over its workers:
# index ranges for in-memory, IDX and TFDS sources, one file each for image folders.


def split_size(source: str, split: str, path: Optional[str] = None,
               data_dir: Optional[str] = None, download: bool = False) -> int:
    """The number of examples of an index-addressed source's split (digits, mnist, tfds:*),
    read from headers and metadata only."""
    _check_split(split)
    if source == "digits":
        return len(load_digits_arrays(split)[2])
    if source == "mnist":
        if not path or not tf.io.gfile.isdir(path):
            raise DataError(f"MNIST directory {path!r} does not exist")
        image_stem, label_stem = _IDX_FILES[split]
        images = _idx_header(_find_idx(path, image_stem), 3)[0]
        labels = _idx_header(_find_idx(path, label_stem), 1)[0]
        if images != labels:
            raise DataError(f"MNIST {split} in {path!r} has {images} images but {labels} labels")
        return images
    if source.startswith("tfds:"):
        _, info = load_tfds(source[len("tfds:"):], split, data_dir, download)
        if info.num_examples is None:
            raise DataError(f"{source} {split} does not record its size")
        return info.num_examples
    raise DataError(f"source {source!r} is not read by index ranges")


def load_range(source: str, split: str, start: int, stop: int, *, path: Optional[str] = None,
               data_dir: Optional[str] = None, image_size: Optional[int] = None,
               download: bool = False):
    """Examples start..stop-1 of a split (in `load`'s order, with its ids) as
    (images float32 [n,H,W,C], labels int64 [n], ids), reading only those examples where
    the format allows (IDX rows by offset, TFDS by split slicing)."""
    if source == "digits":
        images, labels, ids = load_digits_arrays(split)
        return (images[start:stop].astype(np.float32) / 16.0, labels[start:stop].astype(np.int64),
                ids[start:stop])
    if source == "mnist":
        image_stem, label_stem = _IDX_FILES[split]
        images = read_idx_rows(_find_idx(path, image_stem), 3, start, stop)
        labels = read_idx_rows(_find_idx(path, label_stem), 1, start, stop)
        return (images[..., None].astype(np.float32) / 255.0, labels.astype(np.int64),
                [f"mnist/{split}/{i:05d}" for i in range(start, stop)])
    if source.startswith("tfds:"):
        ds, _ = load_tfds(source[len("tfds:"):], split, data_dir, download,
                          image_size=image_size, subsplit=(start, stop))
        return to_numpy(ds)
    raise DataError(f"source {source!r} is not read by index ranges")


def _idx_open(path: str):
    """A file object over an IDX file's bytes (decompressed when gzipped) and what closes it."""
    raw = tf.io.gfile.GFile(path, "rb")
    return (gzip.GzipFile(fileobj=raw, mode="rb"), raw) if path.endswith(".gz") else (raw, raw)


def _idx_read_header(f, path: str, ndim: int) -> tuple:
    header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{path!r} is too short ({len(header)} bytes) for an IDX header")
    magic = struct.unpack(">I", header[:4])[0]
    if magic != _IDX_MAGIC[ndim]:
        raise DataError(f"{path!r} has IDX magic number {magic}, expected {_IDX_MAGIC[ndim]} "
                        f"(uint8 data with {ndim} dimensions)")
    return struct.unpack(">" + "I" * ndim, header[4:])


def _idx_header(path: str, ndim: int) -> tuple:
    f, raw = _idx_open(path)
    try:
        return _idx_read_header(f, path, ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path!r} is not a complete gzip file ({e})") from None
    finally:
        f.close()
        raw.close()


def read_idx_rows(path: str, ndim: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of an IDX file (gzipped or not), read by offset."""
    f, raw = _idx_open(path)
    try:
        dims = _idx_read_header(f, path, ndim)
        if not 0 <= start <= stop <= dims[0]:
            raise DataError(f"rows {start}..{stop - 1} of {path!r}, which holds {dims[0]}")
        row = int(np.prod(dims[1:], dtype=np.int64))
        f.seek(4 + 4 * ndim + start * row)  # Gzip streams skip by decompressing.
        body = f.read((stop - start) * row)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path!r} is not a complete gzip file ({e})") from None
    finally:
        f.close()
        raw.close()
    if len(body) != (stop - start) * row:
        raise DataError(f"{path!r} ends before row {stop - 1} of its {dims[0]}: it is truncated")
    return np.frombuffer(body, np.uint8).reshape((stop - start,) + tuple(dims[1:]))


def mnist_gzipped(directory: str, split: str) -> bool:
    """Whether a split's IDX files are gzipped (so that only a sequential read reaches a row)."""
    return any(_find_idx(directory, stem).endswith(".gz") for stem in _IDX_FILES[split])


def mnist_chunks(directory: str, split: str, rows: int):
    """Yields (first index, images float32 [n,H,W,1], labels int64 [n]) of an MNIST split in
    order, `rows` at a time, from one sequential read of each IDX file (the way to read a
    gzipped one: it has no random access)."""
    image_path, label_path = (_find_idx(directory, stem) for stem in _IDX_FILES[split])
    dims = _idx_check(image_path, 3)
    opened = [_idx_open(image_path), _idx_open(label_path)]
    try:
        (images, _), (labels, _) = opened
        _idx_read_header(images, image_path, 3)
        _idx_read_header(labels, label_path, 1)
        row = dims[1] * dims[2]
        for start in range(0, dims[0], rows):
            n = min(rows, dims[0] - start)
            pixels, classes = images.read(n * row), labels.read(n)
            if len(pixels) != n * row or len(classes) != n:
                raise DataError(f"MNIST {split} in {directory!r} ends before example "
                                f"{start + n - 1} of {dims[0]}: a file is truncated")
            yield (start, np.frombuffer(pixels, np.uint8).reshape(n, *dims[1:], 1)
                   .astype(np.float32) / 255.0, np.frombuffer(classes, np.uint8).astype(np.int64))
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"MNIST {split} in {directory!r} is not complete ({e})") from None
    finally:
        for f, raw in opened:
            f.close()
            raw.close()


def image_folder_info(root: str, split: str, image_size: Optional[int] = None) -> SourceInfo:
    """The SourceInfo of an image folder's split from its listing and its first image (no
    other image is read)."""
    return _folder_info(root, split, image_size)[0]


def source_info(source: str, split: str, *, path: Optional[str] = None,
                data_dir: Optional[str] = None, image_size: Optional[int] = None) -> SourceInfo:
    """A split's SourceInfo from headers, listings and metadata: no split is loaded."""
    if source == "image_folder":
        if not path:
            raise DataError("source 'image_folder' needs a path (directory or .tar.gz)")
        return image_folder_info(path, split, image_size)
    if source == "celeba":
        size = image_size or CELEBA_SIZE
        return SourceInfo("celeba", (size, size, 3), len(celeba_files(path, split)[0]), ())
    if source in ("digits", "mnist"):
        size = split_size(source, split, path)
        shape = ((8, 8, 1) if source == "digits" else
                 tuple(_idx_header(_find_idx(path, _IDX_FILES[split][0]), 3)[1:]) + (1,))
        return SourceInfo(source, shape, size, tuple(str(d) for d in range(10)))
    return load(source, split, path=path, data_dir=data_dir, image_size=image_size)[1]
