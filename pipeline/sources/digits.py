"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 images, real, offline),
split 80/20 by a hash of each image's id."""

from __future__ import annotations

import functools

import numpy as np

from pipeline.sources.base import IndexedSource, SourceInfo, check_indices, check_split, \
    from_arrays, stable_fraction

TEST_PERCENT = 20


@functools.lru_cache(maxsize=2)
def arrays(split: str):
    """(uint8 images [N,8,8,1] in 0..16, labels [N], ids [N]) of a split."""
    check_split(split)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    ids = [f"digits/{i:04d}" for i in range(len(bunch.target))]
    in_test = np.array([stable_fraction(i) < TEST_PERCENT for i in ids])
    chosen = in_test if split == "test" else ~in_test
    images = bunch.images.astype(np.uint8)[..., None][chosen]
    return images, bunch.target[chosen], [i for i, k in zip(ids, chosen) if k]


class Digits(IndexedSource):
    name = "digits"
    resizable = False

    def info(self, split, where):
        return SourceInfo(self.name, (8, 8, 1), self.size(split, where),
                          tuple(str(d) for d in range(10)))

    def size(self, split, where):
        return len(arrays(split)[2])

    def stream(self, split, where, indices=None, decode=True):
        images, labels, ids = arrays(split)
        return from_arrays(images, labels, ids, 16.0, check_indices(indices, len(ids)))

    def rows(self, split, where, start, stop):
        images, labels, ids = arrays(split)
        return (images[start:stop].astype(np.float32) / 16.0,
                labels[start:stop].astype(np.int64), ids[start:stop])


SOURCE = Digits
