"""``celeba``: CelebA as distributed, ``img_align_celeba/000001.jpg`` ... ``202599.jpg``
(178x218) and ``list_eval_partition.txt`` ("000001.jpg 0": 0 train, 1 validation, 2 test),
in a directory or a tarball. The split comes from the partition file when the root (or,
for a tarball, the tarball or its directory) holds one, else from the official ranges of
image numbers; the validation part is not used. Images are center-cropped to 140x140 and
resized to 64x64 (or `image_size`), as TFDS's loader does."""

from __future__ import annotations

import functools
import os
import tarfile
import zlib

import numpy as np
import tensorflow as tf

from pipeline.sources import files
from pipeline.sources.base import DataError, SourceInfo, check_split
from pipeline.sources.files import FileSource

FOLDER = "img_align_celeba"
PARTITION = "list_eval_partition.txt"
SPLIT_CODES = {"train": "0", "test": "2"}
RANGES = {"train": (1, 162770), "test": (182638, 202599)}  # The same, by number.
CROP = 140  # Center crop of the 178x218 frames before resizing.
SIZE = 64


def _partition(text: str, where: str) -> dict:
    partition = {}
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
            raise DataError(f"{where} line {number} is {line!r}, expected '<file> <0|1|2>'")
        partition[parts[0]] = parts[1]
    return partition


def _read_partition(path: str):
    with tf.io.gfile.GFile(path) as f:
        return _partition(f.read(), path), path


def _directory(root: str):
    """(image names relative to the base, the base, partition or None, where it was read)."""
    images = root if os.path.basename(os.path.normpath(root)) == FOLDER else \
        os.path.join(root, FOLDER)
    if not tf.io.gfile.isdir(images):
        raise DataError(f"CelebA folder {root!r} holds no {FOLDER}/ directory")
    names = [f"{FOLDER}/{n}" for n in tf.io.gfile.listdir(images) if n.lower().endswith(".jpg")]
    base = os.path.dirname(os.path.normpath(images))
    for candidate in (os.path.join(root, PARTITION), os.path.join(base, PARTITION)):
        if tf.io.gfile.exists(candidate):
            return (names, base, *_read_partition(candidate))
    return names, base, None, None


@functools.lru_cache(maxsize=4)
def _tarball(root: str, length: int, mtime_nsec: int):
    """(image member names, partition or None, where it was read): one pass over the
    archive, kept per file version since reading a split lists it again."""
    names, partition, where = [], None, None
    try:
        with tf.io.gfile.GFile(root, "rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                parts = member.name.split("/")
                if not member.isfile():
                    continue
                if parts[-1] == PARTITION:
                    where = f"{root}:{member.name}"
                    partition = _partition(tar.extractfile(member).read().decode(), where)
                elif (len(parts) >= 2 and parts[-2] == FOLDER
                      and parts[-1].lower().endswith(".jpg")):
                    names.append(member.name)
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read tarball {root!r}: {e}") from None
    beside = os.path.join(os.path.dirname(root), PARTITION)
    if partition is None and tf.io.gfile.exists(beside):
        partition, where = _read_partition(beside)
    return names, partition, where


def celeba_files(root: str, split: str):
    """(sorted names of the split's images, relative to `celeba_root(root)`)."""
    check_split(split)
    if tf.io.gfile.isdir(root):
        names, _, partition, where = _directory(root)
    elif files.is_tarball(root):
        stat = tf.io.gfile.stat(root)
        names, partition, where = _tarball(root, stat.length, stat.mtime_nsec)
    else:
        raise DataError(f"CelebA path {root!r} does not exist (expected a directory or a "
                        f".tar.gz holding {FOLDER}/*.jpg)")
    if partition is not None:
        kept = [n for n in names if partition.get(n.split("/")[-1]) == SPLIT_CODES[split]]
    else:
        low, high = RANGES[split]
        stems = (n.split("/")[-1][:-4] for n in names)
        kept = [n for n, s in zip(names, stems) if s.isdigit() and low <= int(s) <= high]
    if not kept:
        raise DataError(f"no CelebA {split} images under {root!r} ({len(names)} images in "
                        f"{FOLDER}/; split from "
                        f"{where or 'the official ranges of image numbers'})")
    return sorted(kept)


class CelebA(FileSource):
    name = "celeba"
    needs = "data_path"
    crop = CROP

    def root(self, where):
        return where.path if files.is_tarball(where.path) else _directory(where.path)[1]

    def resizes(self, where):
        return True

    def listing(self, split, where):
        names = celeba_files(where.path, split)
        return names, np.full(len(names), -1, np.int64), ()

    def info(self, split, where):
        self.check(where)
        size = where.image_size or SIZE
        return SourceInfo(self.name, (size, size, 3), len(celeba_files(where.path, split)), ())


SOURCE = CelebA
