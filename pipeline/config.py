"""The whole pipeline's configuration, as code: data, autoencoder, prior, extraction, report."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ordered_vqvae.configs import PRESETS, AutoencoderConfig, PriorConfig, preset, prior_preset
from ordered_vqvae.validation import check_choice

# The prior precisions a SavedModel can hold (its signatures' key/value cache is float32).
EXPORT_DTYPES = ("float32", "bfloat16_weights")



# Preset families: `--preset=cpu` or `--preset=reference` picks the family's preset for the
# images' shape; a preset's own name (`--preset=cifar10`) picks it whatever the shape.
PRESET_FAMILIES = ("cpu", "reference")


def preset_for_shape(shape, family: str = "reference") -> str:
    """The architecture preset for images of `shape` (H, W, C): the one made for the
    nearest of the reference sizes (8x8 and 28x28 grey, 32x32 and 64x64 colour), in its
    `family`: "reference" (the paper's sizes) or "cpu" (sized for a few CPU cores, where
    the family has one for that size)."""
    check_choice("preset family", family, PRESET_FAMILIES)
    height, width, channels = shape
    if channels == 1:
        name = "digits" if max(height, width) <= 16 else "mnist"
    else:
        name = "cifar10" if max(height, width) <= 48 else "celeb_a"
    return f"{name}_cpu" if family == "cpu" and f"{name}_cpu" in PRESETS else name


def default_preset_family() -> str:
    """"reference" where TensorFlow sees a GPU, else "cpu"."""
    import tensorflow as tf

    return "reference" if tf.config.list_physical_devices("GPU") else "cpu"


def resolve_preset(name: Optional[str], shape) -> str:
    """The preset a --preset value (a family, a preset's name, or None for the machine's
    family) gives images of `shape`."""
    if name is None or name in PRESET_FAMILIES:
        return preset_for_shape(shape, name or default_preset_family())
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected a family ({', '.join(PRESET_FAMILIES)})"
                         f" or a preset ({', '.join(sorted(PRESETS))})")
    return name


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from: a source of `pipeline.sources` and its arguments."""

    source: str = "digits"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    download: bool = False
    max_train: Optional[int] = None  # Seeded random choices of this many training
    max_test: Optional[int] = None   # and test examples (any listing order, class-sorted
    subset_seed: int = 0             # folders included); the seed of both choices.

    def splits(self) -> dict:
        """{split: SourceInfo} of train and test from listings and headers (no split is
        loaded): a missing split, or splits whose images differ in shape, raise DataError
        before any work."""
        from pipeline import sources

        infos = {split: self.info(split) for split in sources.SPLITS}
        shapes = {split: tuple(info.image_shape) for split, info in infos.items()}
        if shapes["train"] != shapes["test"]:
            raise sources.DataError(f"{self.source} train images are {_shape_text(shapes['train'])}"
                                 f" but test images {_shape_text(shapes['test'])}; pass "
                                 "--image_size=N to resize both")
        return infos

    def reader(self):
        """The `pipeline.sources.Source` these images come from, after its input checks."""
        from pipeline import sources

        chosen = sources.get(self.source)
        chosen.check(self)
        return chosen

    def info(self, split: str):
        """The split's SourceInfo (shape, size, classes) from listings and headers."""
        return self.reader().info(split, self)

    def image_shape(self) -> tuple:
        """The shape of the training images: the first one's, or `image_size` square."""
        return tuple(self.info("train").image_shape)

    def limit(self, split: str) -> Optional[int]:
        return self.max_train if split == "train" else self.max_test

    def cache_inputs(self) -> dict:
        """The fields the stages' cache hashes. With max_test set, a tag names the seeded
        choice of test examples, so a cache made under another rule (the first max_test,
        class-sorted in image folders) does not match and its stages rerun."""
        fields = dataclasses.asdict(self)
        return fields if self.max_test is None else {**fields, "test_choice": "seeded"}

    def indices(self, split: str, num_examples: int, sample: Optional[int] = None):
        """Which of a split's `num_examples` examples (by index in its sorted listing) the
        pipeline uses: max_train / max_test chosen at random with subset_seed, None for all.
        Training and extraction read the same ones. `sample`: a further seeded choice of at
        most this many of those (validation images, report grids, the FD floor)."""
        from pipeline.sources import random_indices

        picked = None
        limit = self.limit(split)
        if limit is not None and limit < num_examples:
            picked = random_indices(num_examples, limit, self.subset_seed)
        pool = num_examples if picked is None else len(picked)
        if sample is not None and sample < pool:
            chosen = random_indices(pool, sample, self.subset_seed)
            picked = chosen if picked is None else picked[chosen]
        return picked

    def dataset(self, split: str, sample: Optional[int] = None):
        """The split's examples that `indices` picks, as a tf.data stream of {"image",
        "label", "id"} read in one pass in the split's own order."""
        from pipeline.sources import DataError

        size = None
        if self.limit(split) is not None or sample is not None:
            size = self.info(split).num_examples
            if size is None and self.limit(split) is not None:
                raise DataError(f"{self.source} {split} does not record its size, so "
                                f"{self.limit(split)} of its examples cannot be picked")
        ds = self.reader().stream(split, self, indices=None if size is None
                                  else self.indices(split, size, sample))
        if size is None and sample is not None:
            ds = ds.take(sample)  # A source of unknown size: its first `sample`.
        return ds

    def image_batches(self, split: str, batch_size: int = 512, sample: Optional[int] = None):
        """Yields images float32 [B,H,W,C] of the split (a seeded choice of `sample` of them
        when given), a batch at a time: memory holds one batch whatever the split's size."""
        import tensorflow as tf

        ds = self.dataset(split, sample)
        try:
            for batch in ds.batch(batch_size).as_numpy_iterator():
                yield batch["image"]
        except tf.errors.InvalidArgumentError as e:  # A file that does not decode.
            raise self._bad_file(split, e) from None

    def _bad_file(self, split: str, error) -> Exception:
        """The DataError naming the first file of a split that does not decode to the
        source's shape (found by decoding each file alone), or `error` itself."""
        from pipeline.sources import DataError

        source = self.reader()
        if not source.reads_files:
            return error
        shape = source.info(split, self).image_shape
        for element in source.stream(split, self, decode=False).as_numpy_iterator():
            try:
                source.decode(element["encoded"], element["id"].decode(), shape, self)
            except DataError as bad:
                return bad
        return error

    def arrays(self, split: str):
        """(images float32 [N,H,W,C], labels, ids) of `dataset(split)`, all in memory
        (experiments on small data; the stages stream)."""
        from pipeline.sources import to_numpy

        return to_numpy(self.dataset(split))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig
    autoencoder: AutoencoderConfig
    prior: PriorConfig
    num_shards: int = 4            # TFRecord shards per split.
    report_samples: int = 16       # Samples per row of the report's grids.
    export_dtype: str = "float32"  # The SavedModel's prior: "float32" or "bfloat16_weights".
    classifier: str = ""           # A domain classifier directory for the profile's domain FD.
    seed: int = 0
    beam_args: tuple = ()          # Beam options for the extract stage (not a cache input).
    checkpoint_every: int = 500    # Training checkpoints every this many batches and at
                                   # every epoch end (0: epoch ends only; not a cache input).
    strategy: str = ""             # "mirrored": train on all local GPUs (not a cache input).
    preset: str = ""               # The architecture preset the configs started from.
    time_budget: float = 0.0       # Seconds a run (or one stage's command) may take, split
                                   # among the stages (pipeline.stages.BUDGET_SHARES); 0: no
                                   # budget. Not a cache input.

    def __post_init__(self):
        check_choice("export_dtype", self.export_dtype, EXPORT_DTYPES)
        if not self.time_budget >= 0:
            raise ValueError(f"time_budget={self.time_budget}, expected seconds >= 0 (0: none)")

    def distribution(self):
        """The tf.distribute strategy the training stages run under (None: the default)."""
        if not self.strategy:
            return None
        if self.strategy != "mirrored":
            raise ValueError(f"strategy={self.strategy!r}, expected '' or 'mirrored' (for "
                             "multi-worker or TPU training, pass a strategy to "
                             "ordered_vqvae.training.train_autoencoder / train_prior)")
        import tensorflow as tf

        return tf.distribute.MirroredStrategy()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PipelineConfig":
        d = dict(d)
        return cls(data=DataConfig(**d.pop("data")),
                   autoencoder=AutoencoderConfig.from_dict(d.pop("autoencoder")),
                   prior=PriorConfig(**d.pop("prior")), beam_args=tuple(d.pop("beam_args", ())),
                   **d)


def _shape_text(shape) -> str:
    return "x".join(map(str, shape))


def pipeline_preset(dataset: str, preset_name: Optional[str] = None,
                    data: Optional[DataConfig] = None, autoencoder_overrides: Optional[dict] = None,
                    prior_overrides: Optional[dict] = None, image_shape=None,
                    **overrides) -> PipelineConfig:
    """The default pipeline for a dataset: the image shape comes from the data (or
    `image_shape`, when already read), the architecture preset from the shape unless
    `preset_name` (a preset or a family, see `preset_name`) is given; `autoencoder_overrides`
    and `prior_overrides` replace fields."""
    data = data or DataConfig(source=dataset)
    shape = tuple(image_shape or data.image_shape())
    name = resolve_preset(preset_name, shape)
    return PipelineConfig(
        data=data, preset=name, prior=prior_preset(name, **(prior_overrides or {})),
        autoencoder=preset(name, **{"image_shape": shape, **(autoencoder_overrides or {})}),
        **overrides)
