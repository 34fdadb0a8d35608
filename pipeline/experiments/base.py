"""The shapes every experiment shares: its configuration, what an experiment is, and the
outcome its figures and tables read."""

from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Optional

from pipeline.config import PipelineConfig


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    base: PipelineConfig
    names: Optional[tuple] = None      # The experiments to run (None: all of them).
    eval_samples: int = 1000           # Samples per (variant, k) for Frechet distances.
    classifier_epochs: Optional[int] = None  # None: CLASSIFIER_EPOCHS of its architecture.
    inception_weights: Optional[str] = None
    ablation_max_train: Optional[int] = None  # A smaller budget for the ablation variants.
    ablation_epochs: Optional[int] = None


@dataclasses.dataclass
class Outcome:
    """What the experiments' figures and tables read once every variant is measured."""

    cfg: ExperimentConfig
    variants: Dict[str, PipelineConfig]  # Every variant the chosen experiments need.
    results: dict           # experiments.json: per-variant rows ("fd", "mse", ... by k).
    generators: dict        # {variant: ImageGenerator}
    samples: dict           # {variant: {k: images}}, the samples the FDs were measured on.
    fid: bool               # Whether FID was measured (InceptionV3 weights given).

    @property
    def code_length(self) -> int:
        return self.results["code_length"]


@dataclasses.dataclass(frozen=True)
class Experiment:
    """One experiment: the variants it needs (pipeline configs by name; variants of the same
    name are one run), the figures it writes into a directory (adding what it measures to
    `outcome.results`) and its section of experiments.md."""

    summary: str
    variants: Callable[[ExperimentConfig], Dict[str, PipelineConfig]]
    figures: Callable[[Outcome, str], None]
    markdown: Callable[[Outcome], List[str]]
