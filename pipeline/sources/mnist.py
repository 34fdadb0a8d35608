"""``mnist``: a directory holding the four standard IDX files, gzipped or not. Files are
read by offset where they are not gzipped, so any worker reads any range of rows."""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np
import tensorflow as tf

from pipeline.sources.base import DataError, IndexedSource, SourceInfo, check_indices, \
    check_split, keep

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IDX_MAGIC = {1: 2049, 3: 2051}


def find_idx(directory: str, stem: str) -> str:
    for candidate in (stem + ".gz", stem):
        path = os.path.join(directory, candidate)
        if tf.io.gfile.exists(path):
            return path
    raise DataError(f"MNIST file {stem}(.gz) not found in {directory!r}; expected the four "
                    "standard IDX files (train-images-idx3-ubyte, ... t10k-labels-idx1-ubyte)")


def _open(path: str):
    """A file object over an IDX file's bytes (decompressed when gzipped) and what closes it."""
    raw = tf.io.gfile.GFile(path, "rb")
    return (gzip.GzipFile(fileobj=raw, mode="rb"), raw) if path.endswith(".gz") else (raw, raw)


def _read_header(f, path: str, ndim: int) -> tuple:
    header = f.read(4 + 4 * ndim)
    if len(header) < 4 + 4 * ndim:
        raise DataError(f"{path!r} is too short ({len(header)} bytes) for an IDX header")
    magic = struct.unpack(">I", header[:4])[0]
    if magic != IDX_MAGIC[ndim]:
        raise DataError(f"{path!r} has IDX magic number {magic}, expected {IDX_MAGIC[ndim]} "
                        f"(uint8 data with {ndim} dimensions)")
    return struct.unpack(">" + "I" * ndim, header[4:])


def idx_header(path: str, ndim: int) -> tuple:
    f, raw = _open(path)
    try:
        return _read_header(f, path, ndim)
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path!r} is not a complete gzip file ({e})") from None
    finally:
        f.close()
        raw.close()


def idx_check(path: str, ndim: int) -> tuple:
    """The dimensions of an IDX file, after checking its header and that its (decompressed)
    size is the header's plus one byte per value: a gzip file's size is read from its
    trailer, so the check costs no decompression."""
    dims = idx_header(path, ndim)
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


def read_idx_rows(path: str, ndim: int, start: int, stop: int) -> np.ndarray:
    """Rows start..stop-1 of an IDX file (gzipped or not), read by offset."""
    f, raw = _open(path)
    try:
        dims = _read_header(f, path, ndim)
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


class Mnist(IndexedSource):
    name = "mnist"
    needs = "data_path"
    resizable = False

    def _files(self, split, where):
        check_split(split)
        if not where.path or not tf.io.gfile.isdir(where.path):
            raise DataError(f"MNIST directory {where.path!r} does not exist")
        return [find_idx(where.path, stem) for stem in IDX_FILES[split]]

    def _ids(self, split, start, stop):
        return [f"mnist/{split}/{i:05d}" for i in range(start, stop)]

    def size(self, split, where):
        image_path, label_path = self._files(split, where)
        images, labels = idx_header(image_path, 3)[0], idx_header(label_path, 1)[0]
        if images != labels:
            raise DataError(f"MNIST {split} in {where.path!r} has {images} images but "
                            f"{labels} labels")
        return images

    def info(self, split, where):
        size = self.size(split, where)
        shape = tuple(idx_header(self._files(split, where)[0], 3)[1:]) + (1,)
        return SourceInfo(self.name, shape, size, tuple(str(d) for d in range(10)))

    def stream(self, split, where, indices=None, decode=True):
        """Streamed by `tf.data` (the examples at `indices` only, when given): images
        float32 [28,28,1], ids mnist/<split>/<index>."""
        image_path, label_path = self._files(split, where)
        dims = idx_check(image_path, 3)
        labels = idx_check(label_path, 1)[0]
        if dims[0] != labels:
            raise DataError(f"MNIST {split} in {where.path!r} has {dims[0]} images but "
                            f"{labels} labels")

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
        pairs = keep(pairs.enumerate(), dims[0], check_indices(indices, dims[0]))
        return pairs.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def rows(self, split, where, start, stop):
        image_path, label_path = self._files(split, where)
        images = read_idx_rows(image_path, 3, start, stop)
        labels = read_idx_rows(label_path, 1, start, stop)
        return (images[..., None].astype(np.float32) / 255.0, labels.astype(np.int64),
                self._ids(split, start, stop))

    def sequential(self, split, where):
        return any(path.endswith(".gz") for path in self._files(split, where))

    def chunks(self, split, where, rows):
        image_path, label_path = self._files(split, where)
        dims = idx_check(image_path, 3)
        opened = [_open(image_path), _open(label_path)]
        try:
            (images, _), (labels, _) = opened
            _read_header(images, image_path, 3)
            _read_header(labels, label_path, 1)
            row = dims[1] * dims[2]
            for start in range(0, dims[0], rows):
                n = min(rows, dims[0] - start)
                pixels, classes = images.read(n * row), labels.read(n)
                if len(pixels) != n * row or len(classes) != n:
                    raise DataError(f"MNIST {split} in {where.path!r} ends before example "
                                    f"{start + n - 1} of {dims[0]}: a file is truncated")
                yield (start, np.frombuffer(pixels, np.uint8).reshape(n, *dims[1:], 1)
                       .astype(np.float32) / 255.0,
                       np.frombuffer(classes, np.uint8).astype(np.int64),
                       self._ids(split, start, start + n))
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"MNIST {split} in {where.path!r} is not complete ({e})") from None
        finally:
            for f, raw in opened:
                f.close()
                raw.close()


SOURCE = Mnist
