"""Sources of encoded image files in a directory or a tarball: `FileSource` and what its
subclasses share."""

from __future__ import annotations

import io
import os
import tarfile
import zlib
from typing import ClassVar, Optional, Sequence

import numpy as np
import tensorflow as tf

from pipeline.sources.base import DataError, Source, check_indices

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


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


def read_file(root: str, name: str) -> bytes:
    """The bytes of file `name` (a path relative to a directory, or a tarball's member)."""
    if is_tarball(root):
        return next(tar_members(root, name.__eq__))[1]
    with tf.io.gfile.GFile(os.path.join(root, name), "rb") as f:
        return f.read()


def probe_shape(data: bytes, name: str) -> tuple:
    """(height, width, channels) of an encoded image, read by Pillow."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            channels = 1 if im.mode in ("L", "1", "I;16", "I") else 3
            return (im.height, im.width, channels)
    except Exception as e:  # PIL raises many types for corrupt files.
        raise DataError(f"cannot decode image {name!r}: {e}") from None


def resize_center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes the short side to `size`, then center-crops to size x size."""
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    scale = size / tf.reduce_min(shape)
    new = tf.cast(tf.math.ceil(shape * scale), tf.int32)
    image = tf.image.resize(image, new, method="area", antialias=True)
    return tf.image.resize_with_crop_or_pad(image, size, size)


def decode_tensor(data, channels: int, image_size: Optional[int], crop: Optional[int] = None):
    """Encoded PNG/JPEG bytes -> float32 [H,W,channels] in [0,1], center-cropped to
    crop x crop first and then resized when asked."""
    image = tf.io.decode_image(data, channels=channels, expand_animations=False)
    image = tf.cast(image, tf.float32) / 255.0
    if crop:
        image = tf.image.resize_with_crop_or_pad(image, crop, crop)
    if image_size:
        image = tf.clip_by_value(resize_center_crop(image, image_size), 0.0, 1.0)
    return image


def decode_encoded(data: bytes, record_id: str, image_shape, resize: bool = False,
                   crop: Optional[int] = None) -> np.ndarray:
    """Eagerly decodes one encoded image to `image_shape` (`resize` to it, after a center
    crop to `crop` when given). Raises DataError naming the record when the bytes are not
    an image or the size is wrong."""
    height, width, channels = image_shape
    try:
        image = decode_tensor(tf.constant(data), channels, height if resize else None,
                              crop).numpy()
    except tf.errors.OpError as e:
        raise DataError(f"cannot decode image {record_id!r}: {e.message}") from None
    if image.shape != tuple(image_shape):
        raise DataError(f"image {record_id!r} has shape {image.shape}, expected "
                        f"{tuple(image_shape)} (resize to make sizes agree)")
    return image


def encoded_stream(root: str, names: Sequence[str], labels, paths=None) -> tf.data.Dataset:
    """{"encoded", "label", "id"} of the files `names` (with `labels`): a directory's read
    file by file in the given order from `paths` (default: root/name), a tarball's streamed
    in archive order by one pass that holds one member at a time."""
    label_of = dict(zip(names, np.asarray(labels, np.int64).tolist()))
    if is_tarball(root):
        def members():
            for name, content in tar_members(root, label_of.__contains__):
                yield {"encoded": content, "label": label_of[name], "id": name}

        return tf.data.Dataset.from_generator(members, output_signature={
            "encoded": tf.TensorSpec((), tf.string), "label": tf.TensorSpec((), tf.int64),
            "id": tf.TensorSpec((), tf.string)})
    ds = tf.data.Dataset.from_tensor_slices({
        "id": np.array(list(names), dtype=object).astype(bytes),
        "label": np.array([label_of[n] for n in names], np.int64),
        "path": list(paths) if paths is not None else [os.path.join(root, n) for n in names]})
    return ds.map(lambda ex: {"encoded": tf.io.read_file(ex["path"]), "label": ex["label"],
                              "id": ex["id"]},
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class FileSource(Source):
    """One encoded image file per example, in a directory or a tarball."""

    reads_files = True
    crop: ClassVar[Optional[int]] = None  # A center crop before resizing.

    def listing(self, split: str, where):
        """(sorted names of the split's files, relative to the root or a tarball's member
        names; their labels, int64 [N]; class names)."""
        raise NotImplementedError

    def root(self, where) -> str:
        """The directory the listed names are relative to, or the tarball holding them."""
        return where.path

    def stream(self, split, where, indices=None, decode=True):
        info = self.info(split, where)
        names, labels, _ = self.listing(split, where)
        indices = check_indices(indices, len(names))
        if indices is not None:
            names, labels = [names[i] for i in indices], np.asarray(labels)[indices]
        ds = encoded_stream(self.root(where), names, labels)
        if not decode:
            return ds
        shape, resize, root = tuple(info.image_shape), self.resizes(where), self.root(where)

        def decode_one(ex):
            image = decode_tensor(ex["encoded"], shape[-1], shape[0] if resize else None,
                                        self.crop)
            if not resize:  # Every image must have the first one's size.
                got = tf.shape(image)[:2]
                message = tf.strings.join([
                    "image ", ex["id"], f" under {root} is ", tf.strings.as_string(got[0]), "x",
                    tf.strings.as_string(got[1]), ", expected the size of the first image, "
                    f"{shape[0]}x{shape[1]} (pass image_size to resize)"])
                check = tf.debugging.Assert(tf.reduce_all(tf.equal(got, shape[:2])), [message])
                with tf.control_dependencies([check]):
                    image = tf.identity(image)
            return {"image": tf.ensure_shape(image, shape), "label": ex["label"],
                    "id": ex["id"]}

        return ds.map(decode_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def resizes(self, where) -> bool:
        """Whether decoding resizes to the info's shape."""
        return where.image_size is not None

    def decode(self, encoded: bytes, record_id: str, image_shape, where) -> np.ndarray:
        """One file's bytes decoded to `image_shape`, or DataError naming it."""
        return decode_encoded(encoded, record_id, image_shape, self.resizes(where),
                                    self.crop)
