"""Image data sources, one module each, looked up by name.

Every module of this package that defines ``SOURCE`` (a `base.Source` subclass) is a
source, registered under its `name` and `aliases`: adding a source is one new file here
(and its test). A name with an argument, ``tfds:mnist``, builds the source with it.

    from pipeline import sources
    ds, info = sources.load("mnist", "test", path="data/mnist")

Elements: ``{"image": float32 [H,W,C] in [0,1], "label": int64 (-1 unlabelled),
"id": string}``. Nothing downloads unless ``download=True`` is passed (TFDS).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import pkgutil
from typing import Optional

import numpy as np

from pipeline.sources.base import SPLITS, DataError, Source, SourceInfo, Where, random_indices

__all__ = ["SPLITS", "DataError", "Source", "SourceInfo", "Where", "random_indices",
           "registry", "get", "names", "load", "source_info", "to_numpy"]


_SHARED = ("base", "files", "beam_reads")  # The pieces sources share, not sources.


@functools.lru_cache(maxsize=1)
def registry() -> dict:
    """{name or alias: Source class} of every module here that defines SOURCE."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if module.name in _SHARED:
            continue
        source = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SOURCE", None)
        if source is not None:
            for name in (source.name, *source.aliases):
                if name in found:
                    raise RuntimeError(f"source name {name!r} is taken by {found[name]} and "
                                       f"{source}")
                found[name] = source
    return found


def names() -> list:
    """The names a user can give (``tfds`` as ``tfds:<name>``), aliases included."""
    return sorted(f"{n}:<name>" if n == "tfds" else n for n in registry())


def get(source: str) -> Source:
    """The source named `source` ("mnist", "tfds:cifar10", ...), or DataError listing them."""
    name, _, argument = source.partition(":")
    cls = registry().get(name)
    if cls is None:
        raise DataError(f"unknown data source {source!r}, expected one of {', '.join(names())}")
    return cls(argument or None)


def load(source: str, split: str, *, path: Optional[str] = None, data_dir: Optional[str] = None,
         image_size: Optional[int] = None, download: bool = False, decode: bool = True,
         indices=None):
    """A split of a source as (tf.data.Dataset, SourceInfo).

    Args:
      source: a registered name (see `names()`).
      split: "train" or "test".
      path: the source's files (an MNIST directory, an image folder or tarball, CelebA's).
      data_dir: the TFDS data directory (tfds sources only).
      image_size: resize (short side) and center-crop to this square size.
      download: let TFDS download and prepare a missing dataset.
      decode: False gives file sources' elements "encoded" bytes instead of "image".
      indices: read only the examples at these sorted, distinct indices of the split (in
        its sorted listing), in one pass; SourceInfo.num_examples counts them.
    """
    where = Where(path, data_dir, image_size, download)
    chosen = get(source)
    chosen.check(where)
    info = chosen.info(split, where)
    ds = chosen.stream(split, where, indices=indices, decode=decode)
    if indices is not None:
        info = dataclasses.replace(info, num_examples=len(indices))
    return ds, info


def source_info(source: str, split: str, *, path: Optional[str] = None,
                data_dir: Optional[str] = None, image_size: Optional[int] = None) -> SourceInfo:
    """A split's SourceInfo from headers, listings and metadata: no split is loaded."""
    where = Where(path, data_dir, image_size)
    chosen = get(source)
    chosen.check(where)
    return chosen.info(split, where)


def to_numpy(ds, limit: Optional[int] = None, batch_size: int = 1024):
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
