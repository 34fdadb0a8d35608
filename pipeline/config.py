"""The whole pipeline's configuration, as code: data, autoencoder, prior, extraction, report."""

from __future__ import annotations

import dataclasses
from typing import Optional

from ordered_vqvae.configs import AutoencoderConfig, PriorConfig, preset, prior_preset

# Which architecture preset a dataset uses by default.
DATASET_PRESETS = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10",
                   "tfds:mnist": "mnist", "tfds:fashion_mnist": "mnist",
                   "tfds:cifar10": "cifar10", "tfds:celeb_a": "celeb_a"}


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the images come from (arguments of `ordered_vqvae.data.load`)."""

    source: str = "digits"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    download: bool = False
    max_train: Optional[int] = None
    max_test: Optional[int] = None

    def limit(self, split: str) -> Optional[int]:
        return self.max_train if split == "train" else self.max_test

    def arrays(self, split: str, seed: int = 0):
        """(images float32 [N,H,W,C], labels, ids) of a split, shuffled with `seed` for train."""
        from ordered_vqvae import data

        ds, _ = data.load(self.source, split, path=self.path, data_dir=self.data_dir,
                          image_size=self.image_size, shuffle=split == "train", seed=seed,
                          download=self.download)
        return data.to_numpy(ds, limit=self.limit(split))


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    data: DataConfig
    autoencoder: AutoencoderConfig
    prior: PriorConfig
    num_shards: int = 4            # TFRecord shards per split.
    report_samples: int = 16       # Samples per row of the report's grids.
    seed: int = 0
    beam_args: tuple = ()          # Beam options for the extract stage (not a cache input).
    checkpoint_every: int = 500    # Training checkpoints every this many batches and at
                                   # every epoch end (0: epoch ends only; not a cache input).
    strategy: str = ""             # "mirrored": train on all local GPUs (not a cache input).

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


def pipeline_preset(dataset: str, preset_name: Optional[str] = None, data: Optional[DataConfig] = None,
                    autoencoder_overrides: Optional[dict] = None,
                    prior_overrides: Optional[dict] = None, **overrides) -> PipelineConfig:
    """The default pipeline for a dataset (its architecture preset unless `preset_name`)."""
    name = preset_name or DATASET_PRESETS.get(dataset)
    if name is None:
        raise ValueError(f"dataset {dataset!r} has no default preset; pass a preset name "
                         f"(one of digits, mnist, cifar10, celeb_a)")
    return PipelineConfig(data=data or DataConfig(source=dataset),
                          autoencoder=preset(name, **(autoencoder_overrides or {})),
                          prior=prior_preset(name, **(prior_overrides or {})), **overrides)
