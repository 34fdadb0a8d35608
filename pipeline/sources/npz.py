"""``npz``: images as NumPy arrays in one ``.npz`` file, the layout of Keras's dataset
files (``keras.datasets.mnist``'s ``mnist.npz``): ``x_train`` and ``x_test`` uint8
[N,H,W] or [N,H,W,C] (or floats in [0,1]), with optional ``y_train`` and ``y_test``
integer labels (-1 without them)."""

from __future__ import annotations

import functools
import zipfile

import numpy as np
import tensorflow as tf

from pipeline.sources.base import DataError, IndexedSource, SourceInfo, check_indices, \
    check_split, from_arrays


@functools.lru_cache(maxsize=4)
def _arrays(path: str, split: str):
    """(images [N,H,W,C] as stored, labels int64 [N]) of a split, read once per process."""
    check_split(split)
    if not path or not tf.io.gfile.exists(path):
        raise DataError(f"npz file {path!r} does not exist")
    try:
        with tf.io.gfile.GFile(path, "rb") as f, np.load(f, allow_pickle=False) as npz:
            if f"x_{split}" not in npz.files:
                raise DataError(f"{path!r} holds {sorted(npz.files)}, expected x_{split} "
                                f"(and y_{split}) as in Keras's dataset files")
            images = npz[f"x_{split}"]
            labels = npz[f"y_{split}"] if f"y_{split}" in npz.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"cannot read npz file {path!r}: {e}") from None
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"x_{split} in {path!r} has shape {images.shape}, expected "
                        "[N,H,W] or [N,H,W,C] with C 1 or 3")
    if images.dtype != np.uint8 and not (np.issubdtype(images.dtype, np.floating)
                                         and np.isfinite(images).all()
                                         and images.min() >= 0 and images.max() <= 1):
        raise DataError(f"x_{split} in {path!r} is {images.dtype}, expected uint8 or "
                        "finite floats in [0, 1]")
    labels = (np.full(len(images), -1, np.int64) if labels is None
              else np.asarray(labels).reshape(-1).astype(np.int64))
    if len(labels) != len(images):
        raise DataError(f"{path!r} has {len(images)} x_{split} images but {len(labels)} "
                        f"y_{split} labels")
    return images, labels


class Npz(IndexedSource):
    name = "npz"
    needs = "data_path"
    resizable = False

    def _scale(self, images) -> float:
        return 255.0 if images.dtype == np.uint8 else 1.0

    def _ids(self, split, start, stop):
        return [f"{split}/{i:05d}" for i in range(start, stop)]

    def size(self, split, where):
        return len(_arrays(where.path, split)[0])

    def info(self, split, where):
        images, labels = _arrays(where.path, split)
        classes = tuple(str(c) for c in range(labels.max() + 1)) if labels.min() >= 0 else ()
        return SourceInfo(self.name, images.shape[1:], len(images), classes)

    def stream(self, split, where, indices=None, decode=True):
        images, labels = _arrays(where.path, split)
        return from_arrays(images, labels, self._ids(split, 0, len(images)),
                           self._scale(images), check_indices(indices, len(images)))

    def rows(self, split, where, start, stop):
        images, labels = _arrays(where.path, split)
        return (images[start:stop].astype(np.float32) / self._scale(images),
                labels[start:stop], self._ids(split, start, stop))


SOURCE = Npz
