"""Per-dataset presets for the ordered VQ-VAE, and the fractions of K that reports use.

Vocabulary, the same in code, flags, docs and artifacts: `codebook_size` (V, codewords),
`code_length` (K, tokens per image), `num_codes` (k, the tokens kept or generated).

Every field can be overridden (`preset("mnist", latent_channels=32)`, or CLI flags).
The "plain" architecture follows the reference design: a stack of 4x4 stride-2 convolutions
with batch norm and ReLU (`hidden` gives their widths), a 3x3 convolution to C latent
channels, and a mirrored decoder of transposed convolutions ending in tanh; "residual"
drops the batch norm and adds residual blocks at the latent resolution.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

from ordered_vqvae.validation import check_at_least, check_between, check_choice

QUANTIZATIONS = ("channel", "spatial")
ARCHITECTURES = ("plain", "residual")
COMPUTE_DTYPES = ("float32", "bfloat16")
LR_SCHEDULES = ("constant", "cosine")
DISTRIBUTIONS = ("none", "uniform", "uniform_per_example", "geometric", "all")
FILLS = ("zeros", "learned")
EXPERIMENT_FRACTIONS = (0.1, 0.25, 0.5, 0.6, 0.75, 1.0)  # 0.6: the paper's 60% criterion.
# Keys that artifacts written before the vocabulary was unified may hold.
_OLD_KEYS = {"num_embeddings": "codebook_size"}

# The fractions of K at which reports, logs and figures look at a model.
QUARTERS = (0.25, 0.5, 0.75, 1.0)
CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def fraction_lengths(code_length: int, fractions: Sequence[float] = QUARTERS) -> Dict[float, int]:
    """{f: k} with k = round(f * K), at least 1, for each fraction f (several fractions may
    share a k when K is small)."""
    return {f: max(1, int(round(f * code_length))) for f in fractions}


def curve_lengths(code_length: int, fractions: Sequence[float] = CURVE_FRACTIONS):
    """The distinct k of a curve over `fractions`, with 1 and K always included."""
    return sorted(set(fraction_lengths(code_length, fractions).values()) | {1, code_length})


def fraction_label(fraction: float) -> str:
    """0.25 -> "25pct", the suffix of logged metrics."""
    return f"{round(100 * fraction)}pct"


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """An ordered VQ-VAE and how to train it.

    With channel-wise quantization the code length K is `latent_channels` and each token is
    one channel's flattened HxW map (codeword dimension H*W); with spatial-wise quantization
    K = H*W and each token is one position's C-vector.

    The default truncation draws k per example ("uniform_per_example"), not once per batch
    as the reference did: every batch then trains short and long prefixes together, which
    lowers the test MSE at short k (docs/experiments.md, the truncation ablation).
    """

    image_shape: Tuple[int, int, int] = (28, 28, 1)
    hidden: Tuple[int, ...] = (16, 32)
    # "plain": the reference's stack (strided convolutions, batch norm, ReLU); "residual":
    # strided convolutions without normalisation and `residual_blocks` residual blocks at
    # the latent resolution on both sides, as in the VQ-VAE paper.
    architecture: str = "plain"
    residual_blocks: int = 2
    # The encoder's and decoder's arithmetic: "bfloat16" computes their convolutions in
    # bfloat16 (weights, the quantizer, the losses, inputs and outputs stay float32).
    compute_dtype: str = "float32"
    latent_channels: int = 64
    codebook_size: int = 256
    quantization: str = "channel"
    beta: float = 0.25
    use_ema: bool = False
    ema_decay: float = 0.99
    dead_code_steps: int = 0
    truncation: str = "uniform_per_example"
    full_code_share: float = 0.0   # Share of examples that keep all K codes in training.
    length_power: float = 0.0      # P(k) in training tilted by k^length_power (0: as drawn).
    min_codes: int = 1
    geometric_p: float = 0.1
    fill: str = "learned"
    prefix_chunk: int = 16
    learning_rate: float = 2e-3
    finetune_learning_rate: float = 1e-3
    # "constant", or "cosine": linear warm-up over `warmup_steps`, then a cosine decay to 0
    # over the training's progress (its steps, or its time budget when that ends first).
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    batch_size: int = 128
    pretrain_epochs: int = 0
    epochs: int = 10
    seed: int = 0

    def __post_init__(self):
        h, w, c = self.image_shape
        stride = 2 ** len(self.hidden)
        if h % stride or w % stride:
            raise ValueError(f"image_shape={self.image_shape} is not divisible by {stride} "
                             f"(2 ** len(hidden) for hidden={self.hidden})")
        if c not in (1, 3):
            raise ValueError(f"image_shape={self.image_shape} has {c} channels, expected 1 or 3")
        check_choice("quantization", self.quantization, QUANTIZATIONS)
        check_choice("architecture", self.architecture, ARCHITECTURES)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_choice("compute_dtype", self.compute_dtype, COMPUTE_DTYPES)
        check_choice("truncation", self.truncation, DISTRIBUTIONS)
        check_choice("fill", self.fill, FILLS)
        check_at_least("codebook_size", self.codebook_size, 2, "a codebook of >= 2 codewords")
        for name in ("latent_channels", "batch_size", "prefix_chunk"):
            check_at_least(name, getattr(self, name), 1)
        for name in ("epochs", "pretrain_epochs", "residual_blocks", "warmup_steps"):
            check_at_least(name, getattr(self, name), 0)
        check_between("min_codes", self.min_codes, 1, self.code_length)
        check_between("geometric_p", self.geometric_p, 0.0, 1.0, low_open=True, high_open=True)
        check_between("full_code_share", self.full_code_share, 0.0, 1.0, high_open=True)
        check_between("length_power", self.length_power, 0.0, 16.0)

    @property
    def latent_hw(self) -> Tuple[int, int]:
        stride = 2 ** len(self.hidden)
        return self.image_shape[0] // stride, self.image_shape[1] // stride

    @property
    def code_length(self) -> int:
        """K: tokens per image."""
        h, w = self.latent_hw
        return self.latent_channels if self.quantization == "channel" else h * w

    @property
    def embedding_dim(self) -> int:
        """Codeword dimension D."""
        h, w = self.latent_hw
        return h * w if self.quantization == "channel" else self.latent_channels

    def replace(self, **overrides) -> "AutoencoderConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def cache_inputs(self) -> dict:
        """The fields a pipeline's cache hashes. Fields added after workdirs existed are left
        out at the value that trains as before, so those workdirs keep their cached stages."""
        later = {"length_power": 0.0, "architecture": "plain", "residual_blocks": 2,
                 "lr_schedule": "constant", "warmup_steps": 0, "compute_dtype": "float32"}
        return {k: v for k, v in self.to_dict().items() if not (k in later and v == later[k])}

    @classmethod
    def from_dict(cls, d: dict) -> "AutoencoderConfig":
        """The inverse of `to_dict`; also reads the keys of artifacts written before the
        vocabulary was unified (`num_embeddings`). A config that names no fill was trained
        with zeros, the default before the learned fill."""
        d = {_OLD_KEYS.get(k, k): v for k, v in d.items()}
        d.setdefault("fill", "zeros")
        d["image_shape"] = tuple(d["image_shape"])
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


# Reference sizes: MNIST C x 7 x 7 (codeword dim 49); CIFAR-10 C=100 and 500 codewords
# (C x 4 x 4); CelebA 64x64 (C x 8 x 8). `digits` is the small embedded default. The `_cpu`
# presets keep the reference's code (K, V and the codeword shape) with an autoencoder and a
# prior sized to train on a few CPU cores (docs/experiments.md, the screen of changes at
# equal minutes); the grey presets are small enough already.
PRESETS = {
    "digits": AutoencoderConfig(image_shape=(8, 8, 1), hidden=(64,), latent_channels=16,
                                codebook_size=64, batch_size=64, epochs=30),
    "mnist": AutoencoderConfig(image_shape=(28, 28, 1), hidden=(16, 32), latent_channels=64,
                               codebook_size=256, epochs=10),
    "cifar10": AutoencoderConfig(image_shape=(32, 32, 3), hidden=(128, 256, 512),
                                 latent_channels=100, codebook_size=500, epochs=20),
    "celeb_a": AutoencoderConfig(image_shape=(64, 64, 3), hidden=(128, 256, 512),
                                 latent_channels=100, codebook_size=500, epochs=20),
    "cifar10_cpu": AutoencoderConfig(image_shape=(32, 32, 3), hidden=(32, 64, 128),
                                     architecture="residual", compute_dtype="bfloat16",
                                     latent_channels=100, codebook_size=500,
                                     lr_schedule="cosine", warmup_steps=200, epochs=40),
    "celeb_a_cpu": AutoencoderConfig(image_shape=(64, 64, 3), hidden=(32, 64, 128),
                                     architecture="residual", compute_dtype="bfloat16",
                                     latent_channels=100, codebook_size=500,
                                     lr_schedule="cosine", warmup_steps=200, epochs=40),
}


def preset(name: str, **overrides) -> AutoencoderConfig:
    """The preset for a dataset, with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}, expected one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)


@dataclasses.dataclass(frozen=True)
class PriorConfig:
    """Architecture and training of a CodePrior. The reference used 6 layers, 8 heads,
    width 512, FFN 2048; the presets below are smaller so that they train on a CPU."""

    num_layers: int = 4
    num_heads: int = 8
    width: int = 256
    ffn_width: int = 1024
    dropout: float = 0.1
    learning_rate: float = 1e-3
    warmup_steps: int = 500
    weight_decay: float = 0.01
    batch_size: int = 128
    epochs: int = 10
    max_train_sequences: int = 0   # Train on this many code sequences (0: all).
    seed: int = 0

    def __post_init__(self):
        for name in ("num_layers", "num_heads", "width", "ffn_width", "batch_size"):
            check_at_least(name, getattr(self, name), 1)
        if self.width % self.num_heads:
            raise ValueError(f"width={self.width} is not divisible by num_heads={self.num_heads}")
        check_between("dropout", self.dropout, 0.0, 1.0, high_open=True)
        for name in ("epochs", "warmup_steps", "max_train_sequences"):
            check_at_least(name, getattr(self, name), 0)

    def replace(self, **overrides) -> "PriorConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


PRIOR_PRESETS = {
    "digits": PriorConfig(num_layers=2, num_heads=4, width=128, ffn_width=512, epochs=40,
                          batch_size=64, warmup_steps=100),
    "mnist": PriorConfig(num_layers=4, num_heads=8, width=256, ffn_width=1024, epochs=10),
    "cifar10": PriorConfig(num_layers=6, num_heads=8, width=512, ffn_width=2048, epochs=20),
    "celeb_a": PriorConfig(num_layers=6, num_heads=8, width=512, ffn_width=2048, epochs=20),
    "cifar10_cpu": PriorConfig(num_layers=2, num_heads=4, width=128, ffn_width=512, epochs=8,
                               warmup_steps=200),
    "celeb_a_cpu": PriorConfig(num_layers=2, num_heads=4, width=128, ffn_width=512, epochs=8,
                               warmup_steps=200),
    "reference": PriorConfig(num_layers=6, num_heads=8, width=512, ffn_width=2048),
}


def prior_preset(name: str, **overrides) -> PriorConfig:
    if name not in PRIOR_PRESETS:
        raise ValueError(f"unknown prior preset {name!r}, expected one of {sorted(PRIOR_PRESETS)}")
    return PRIOR_PRESETS[name].replace(**overrides)
