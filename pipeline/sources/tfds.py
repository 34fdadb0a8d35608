"""``tfds:<name>``: a TFDS dataset already prepared in `data_dir` (mnist, fashion_mnist,
cifar10, celeb_a; CelebA center-cropped to 140 and resized to 64x64). Nothing downloads
unless `download` is set."""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from pipeline.sources import celeba, files
from pipeline.sources.base import DataError, IndexedSource, SourceInfo, check_indices, \
    check_split, keep

NAMES = ("mnist", "fashion_mnist", "cifar10", "celeb_a")


class Tfds(IndexedSource):
    name = "tfds"
    needs = "data_dir"

    def __init__(self, argument: Optional[str] = None):
        if argument not in NAMES:
            raise DataError(f"tfds:{argument} is not supported, expected one of "
                            f"{['tfds:' + n for n in NAMES]}")
        self.argument = argument

    def _builder(self, where):
        import tensorflow_datasets as tfds

        builder = tfds.builder(self.argument, data_dir=where.data_dir)
        if not builder.is_prepared():
            if not where.download:
                raise DataError(f"{self.label} is not prepared in data_dir={where.data_dir!r} "
                                f"(looked for {builder.data_dir!r}); prepare it there or pass "
                                "download=True (--download) to let TFDS fetch it")
            builder.download_and_prepare()
        return builder

    def info(self, split, where):
        check_split(split)
        self.check(where)
        builder = self._builder(where)
        celeb = self.argument == "celeb_a"
        size = where.image_size or (celeba.SIZE if celeb else None)
        raw_shape = builder.info.features["image"].shape
        splits = builder.info.splits
        return SourceInfo(
            self.label, (size, size, raw_shape[-1]) if size else tuple(raw_shape),
            splits[split].num_examples if split in splits else None,
            () if celeb else tuple(builder.info.features["label"].names))

    def size(self, split, where):
        num = self.info(split, where).num_examples
        if num is None:
            raise DataError(f"{self.label} {split} does not record its size")
        return num

    def stream(self, split, where, indices=None, decode=True, subsplit=None):
        """`subsplit` (start, stop) reads only those examples (TFDS split slicing), with the
        ids they have in the whole split."""
        import tensorflow_datasets as tfds

        info = self.info(split, where)
        shape, celeb = tuple(info.image_shape), self.argument == "celeb_a"
        first = subsplit[0] if subsplit else 0
        ds = self._builder(where).as_dataset(
            split=f"{split}[{first}:{subsplit[1]}]" if subsplit else split,
            shuffle_files=False, read_config=tfds.ReadConfig(interleave_cycle_length=1))
        resize = where.image_size or (celeba.SIZE if celeb else None)

        def convert(i, ex):
            image = tf.cast(ex["image"], tf.float32) / 255.0
            if celeb:
                image = tf.image.resize_with_crop_or_pad(image, celeba.CROP, celeba.CROP)
            if resize:
                image = tf.clip_by_value(files.resize_center_crop(image, resize), 0.0, 1.0)
            label = tf.constant(-1, tf.int64) if celeb else tf.cast(ex["label"], tf.int64)
            ident = tf.strings.join([f"{self.argument}/{split}/", tf.strings.as_string(i)])
            return {"image": tf.ensure_shape(image, shape), "label": label, "id": ident}

        ds = ds.enumerate(first)
        if indices is not None:
            ds = keep(ds, self.size(split, where),
                      check_indices(indices, self.size(split, where)))
        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)

    def rows(self, split, where, start, stop):
        from pipeline.sources import to_numpy

        return to_numpy(self.stream(split, where, subsplit=(start, stop)))


SOURCE = Tfds
