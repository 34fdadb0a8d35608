"""``image_folder`` (alias ``cifar10``): ``<split>/<class>/<image>`` PNG/JPEG files in a
directory or a ``.tar.gz``; class folder names sorted to labels. Without `image_size`,
every image must have the first one's size."""

from __future__ import annotations

import functools
import os
import tarfile
import zlib
from typing import Optional

import numpy as np
import tensorflow as tf

from pipeline.sources import files
from pipeline.sources.base import DataError, SourceInfo, check_split
from pipeline.sources.files import FileSource


def split_class(relpath: str, split: str) -> Optional[str]:
    """The class of `.../<split>/<class>/<file>` (an image), or None when the path is elsewhere."""
    parts = relpath.replace("\\", "/").split("/")
    if (len(parts) >= 3 and parts[-3] == split
            and relpath.lower().endswith(files.IMAGE_EXTENSIONS)):
        return parts[-2]
    return None


@functools.lru_cache(maxsize=8)
def _tarball_listing(root: str, split: str, length: int, mtime_nsec: int):
    """((member name, class) of the split's files, every class folder of the split) of a
    tarball: one pass over the whole archive, kept per file version (its size and
    modification time) since reading a split lists it again."""
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


def folder_listing(root: str, split: str):
    """(sorted relative paths of the split's images, in a tarball its member names; sorted
    class names) of a directory or tarball, without reading any image. Raises DataError for
    a missing root, empty class folders or no images."""
    entries = []
    if tf.io.gfile.isdir(root):
        all_classes = set()
        for dirpath, subdirs, names in tf.io.gfile.walk(root):
            if os.path.basename(os.path.normpath(dirpath)) == split:
                all_classes.update(subdirs)
            for name in names:
                rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
                cls = split_class(rel, split)
                if cls is not None:
                    entries.append((rel, cls))
    elif files.is_tarball(root):
        stat = tf.io.gfile.stat(root)
        entries, all_classes = _tarball_listing(root, split, stat.length, stat.mtime_nsec)
    else:
        raise DataError(f"image folder {root!r} does not exist (expected a directory or a "
                        ".tar.gz of <split>/<class>/<image> files)")
    found = {cls for _, cls in entries}
    empty = sorted(set(all_classes) - found)
    if empty:
        raise DataError(f"class folder(s) {empty} of split {split!r} in {root!r} hold no "
                        f"{'/'.join(files.IMAGE_EXTENSIONS)} images")
    if not entries:
        raise DataError(f"no images found under {root!r} for split {split!r}; expected "
                        f"<split>/<class>/<image> with extensions {files.IMAGE_EXTENSIONS}")
    return sorted(e[0] for e in entries), sorted(found)


class ImageFolder(FileSource):
    name = "image_folder"
    aliases = ("cifar10",)  # A CIFAR-10 tarball or folder is an image folder.
    needs = "data_path"

    def listing(self, split, where):
        check_split(split)
        names, classes = folder_listing(where.path, split)
        index = {cls: i for i, cls in enumerate(classes)}
        labels = np.array([index[split_class(n, split)] for n in names], np.int64)
        return names, labels, tuple(classes)

    def info(self, split, where):
        """From the listing and the first image (no other image is read)."""
        self.check(where)
        names, _, classes = self.listing(split, where)
        first = files.read_file(where.path, names[0])
        height, width, channels = files.probe_shape(first, os.path.join(where.path, names[0]))
        size = where.image_size
        shape = (size, size, channels) if size else (height, width, channels)
        return SourceInfo(self.name, shape, len(names), classes)


SOURCE = ImageFolder
