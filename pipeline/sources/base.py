"""What every data source implements, and the pieces they share.

A source turns a split ("train" or "test") of some images into
``{"image": float32 [H,W,C] in [0,1], "label": int64, "id": string}`` elements, in a
deterministic order (the split's own: files sorted by path, a tarball's members in
archive order). Every source streams: memory holds a few elements, not the split.

There are two kinds, and a new source subclasses one of them:

- `IndexedSource`: examples addressed by index (in-memory arrays, IDX files, TFDS). It
  implements `size`, `rows` and `stream`; the extraction job reads it in index ranges.
- `FileSource`: one encoded image file per example (folders, tarballs). It implements
  `listing` and `stream`; the extraction job reads its files one each and decodes them on
  the workers, so a corrupt file is set aside rather than stopping the job.

Methods take `where`: the run's `pipeline.config.DataConfig`, or a `Where` (its `path`,
`data_dir`, `image_size`, `download`).
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import ClassVar, Optional

import numpy as np
import tensorflow as tf

SPLITS = ("train", "test")


class DataError(ValueError):
    """A data source was given a bad path, file or value."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Static facts about a split: read from listings and headers, not by loading it."""

    name: str
    image_shape: tuple
    num_examples: Optional[int]
    class_names: tuple


@dataclasses.dataclass(frozen=True)
class Where:
    """Where a source reads from, for a load outside a pipeline run (which passes its
    DataConfig, the same fields and the examples it picks)."""

    path: Optional[str] = None
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    download: bool = False

    def indices(self, split: str, num_examples: int):
        return None


class Source:
    """One kind of image data, registered under `name` (and `aliases`) in
    `pipeline.sources`. A source named with an argument ("tfds:mnist") is built with it."""

    name: ClassVar[str]
    aliases: ClassVar[tuple] = ()
    needs: ClassVar[str] = ""          # The flag it needs, "" for none ("data_path", "data_dir").
    resizable: ClassVar[bool] = True   # Whether image_size applies.
    reads_files: ClassVar[bool] = False  # FileSource: records of encoded bytes to decode.

    def __init__(self, argument: Optional[str] = None):
        if argument is not None:
            raise DataError(f"source {self.name!r} takes no argument, got "
                            f"{self.name}:{argument}")
        self.argument = argument

    @property
    def label(self) -> str:
        return self.name if self.argument is None else f"{self.name}:{self.argument}"

    def check(self, where) -> None:
        """Raises DataError for a `where` this source cannot read, before any work."""
        if self.needs == "data_path" and not where.path:
            raise DataError(f"source {self.label!r} needs a path (--data_path)")
        if where.image_size is not None:
            if not self.resizable:
                raise DataError(f"image_size={where.image_size} is not supported for source "
                                f"{self.label!r}; its images have a fixed size")
            if int(where.image_size) != where.image_size or where.image_size < 1:
                raise DataError(f"image_size={where.image_size!r}, expected a positive integer")

    def info(self, split: str, where) -> SourceInfo:
        """The split's shape, size and classes, from listings and headers."""
        raise NotImplementedError

    def stream(self, split: str, where, indices=None, decode: bool = True) -> tf.data.Dataset:
        """The split as a tf.data stream (only the examples at the sorted, distinct
        `indices`, when given, still in one pass). `decode=False`: file sources give
        "encoded" bytes instead of "image"."""
        raise NotImplementedError


class IndexedSource(Source):
    """Examples addressed by index: read in ranges, by any worker."""

    def size(self, split: str, where) -> int:
        """The number of examples of the split, from headers and metadata."""
        raise NotImplementedError

    def rows(self, split: str, where, start: int, stop: int):
        """Examples start..stop-1 as (images float32 [n,H,W,C], labels int64 [n], ids)."""
        raise NotImplementedError

    def sequential(self, split: str, where) -> bool:
        """Whether only a sequential read reaches a row (a gzip stream): then `chunks`."""
        return False

    def chunks(self, split: str, where, rows: int):
        """Yields (first index, images, labels) of the split in order, `rows` at a time,
        from one sequential read."""
        raise NotImplementedError


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not supported, expected one of {SPLITS}")


def stable_fraction(key: str) -> int:
    """A deterministic bucket in 0..99 from a string id (CRC32, stable across runs)."""
    return zlib.crc32(key.encode("utf-8")) % 100


def random_indices(num_examples: int, limit: int, seed: int) -> np.ndarray:
    """The sorted indices of `limit` of `num_examples` examples chosen at random with
    `seed` (the first `limit` of a seeded permutation)."""
    return np.sort(np.random.default_rng(seed).permutation(num_examples)[:limit])


def check_indices(indices, num_examples: int) -> Optional[np.ndarray]:
    if indices is None:
        return None
    indices = np.asarray(indices, np.int64)
    if len(indices) and (indices.min() < 0 or indices.max() >= num_examples
                         or (np.diff(indices) <= 0).any()):
        raise DataError(f"indices {indices.min()}..{indices.max()} (sorted, distinct) are "
                        f"expected within the split's {num_examples} examples")
    return indices


def keep(enumerated: tf.data.Dataset, num_examples: int, indices) -> tf.data.Dataset:
    """The (index, element) pairs of `enumerated` whose index is in `indices` (all when
    None); the stream stops after the last one."""
    if indices is None:
        return enumerated
    mask = np.zeros(num_examples, bool)
    mask[indices] = True
    mask = tf.constant(mask)
    return enumerated.filter(lambda i, *_: mask[i]).take(len(indices))


def from_arrays(images_u8: np.ndarray, labels: np.ndarray, ids, scale: float,
                indices=None) -> tf.data.Dataset:
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
