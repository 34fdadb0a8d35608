"""The paper's experiments on one dataset, as variants of the pipeline compared side by side.

`catalog.REGISTRY` holds each experiment as one unit (its variants, figures and table);
`EXPERIMENTS` is its list of names, which the command line shows. Every variant is an
ordinary pipeline run in `workdir/variants/<name>/`, so finished variants are reused by
later runs (their manifests match). Results go to `workdir/experiments/`: experiments.md,
experiments.json and the PNG figures.

Adding an experiment: write its variants, figures and markdown functions in `catalog.py`
and register them under a name; `run` and the CLI pick it up.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from ordered_vqvae.atomic import atomic_directory, write_json
from ordered_vqvae.configs import EXPERIMENT_FRACTIONS, fraction_lengths
from pipeline import stages, workdir as wd
from pipeline.config import PipelineConfig
from pipeline.experiments.base import Experiment, ExperimentConfig, Outcome
from pipeline.experiments.catalog import REGISTRY

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "Outcome", "REGISTRY", "run"]

EXPERIMENTS = tuple(REGISTRY)


def chosen(cfg: ExperimentConfig) -> List[str]:
    """The experiments `cfg` names, in the registry's order; ValueError for unknown ones."""
    names = EXPERIMENTS if cfg.names is None else tuple(cfg.names)
    unknown = set(names) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiment(s) {sorted(unknown)}, expected {EXPERIMENTS}")
    return [n for n in EXPERIMENTS if n in names]


def variant_configs(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    """name -> pipeline config of every variant the chosen experiments need."""
    out = {}
    for name in chosen(cfg):
        out.update(REGISTRY[name].variants(cfg))
    return out


def run(cfg: ExperimentConfig, workdir: str, verbose: int = 0) -> dict:
    """Runs the variants (cached) and the chosen experiments; writes workdir/experiments/."""
    names = chosen(cfg)
    wd.prepare(workdir)
    variants = variant_configs(cfg)
    _train(variants, workdir, verbose)
    outcome = _measure(cfg, variants, workdir, verbose)
    out = os.path.join(workdir, "experiments")
    with atomic_directory(out) as tmp:
        for name in names:
            REGISTRY[name].figures(outcome, tmp)
        write_json(os.path.join(tmp, "experiments.json"), outcome.results)
        sections = [line for name in names for line in REGISTRY[name].markdown(outcome)]
        with open(os.path.join(tmp, "experiments.md"), "w") as f:
            f.write("\n".join(_header(cfg, outcome.results) + sections))
    print(f"[experiments] {os.path.join(out, 'experiments.md')}", flush=True)
    return outcome.results


def _train(variants: Dict[str, PipelineConfig], workdir: str, verbose: int) -> None:
    """Runs each variant's autoencoder, extract and prior stages (cached); a prior-study
    variant starts from a copy of "ordered"'s autoencoder and codes."""
    from pipeline.experiments import measure

    for name, config in variants.items():
        print(f"[experiments] variant {name}", flush=True)
        where = os.path.join(workdir, "variants", name)
        if name.startswith("prior-"):
            measure.share_upstream(os.path.join(workdir, "variants", "ordered"), where)
        stages.run_pipeline(config, where, stages=["autoencoder", "extract", "prior"],
                            verbose=verbose)


def _measure(cfg: ExperimentConfig, variants: Dict[str, PipelineConfig], workdir: str,
             verbose: int) -> Outcome:
    """Every variant's samples, Frechet distances and reconstruction errors by k, against
    the domain classifier's floor (and FID where InceptionV3 weights are given)."""
    from ordered_vqvae import metrics
    from pipeline.experiments import measure

    test = cfg.base.data.arrays("test")
    test_x = test[0]
    clf, real_features = measure.classifier(cfg, workdir, test, verbose)
    # The floor: as many real training images as samples, against the same test features.
    real = np.concatenate(list(cfg.base.data.image_batches("train", sample=cfg.eval_samples)))
    real_fd = metrics.frechet_distance_of(clf.features(real), real_features)
    print(f"[experiments] real-vs-real domain FD {real_fd:.3f} ({len(real)} training images "
          "against the test set)", flush=True)
    inception = real_inception = None
    fid_note = "FID not computed: pass --inception_weights=PATH (no weights are downloaded)."
    if cfg.inception_weights:
        inception = metrics.InceptionFeatures(cfg.inception_weights)
        real_inception = inception.features(test_x[:cfg.eval_samples * 2])
        fid_note = f"FID with InceptionV3 from {cfg.inception_weights}."
    K = cfg.base.autoencoder.code_length
    lengths = sorted(set(fraction_lengths(K, EXPERIMENT_FRACTIONS).values()))
    results = {"dataset": cfg.base.data.source, "code_length": K, "lengths": lengths,
               "classifier_accuracy": clf.accuracy, "fid_note": fid_note, "real_fd": real_fd,
               "eval_samples": cfg.eval_samples, "test_images": int(len(test_x)), "variants": {}}
    generators = {name: measure.generator(os.path.join(workdir, "variants", name))
                  for name in variants}
    samples = {}
    for name in variants:
        if name == "spatial":
            continue  # Its code has another length; it is only shown in grids.
        row, samples[name] = measure.quality(name, generators[name], lengths, cfg, clf, real,
                                             real_features, inception, real_inception, test_x)
        prior = wd.read_manifest(os.path.join(workdir, "variants", name), "prior")
        row["val_bits_per_code"] = prior["result"]["val_bits_per_code"]
        row["prior_seconds"] = prior["seconds"]
        results["variants"][name] = row
    return Outcome(cfg, variants, results, generators, samples, fid=inception is not None)


def _header(cfg: ExperimentConfig, results: dict) -> List[str]:
    base = cfg.base
    return [f"# Experiments on `{results['dataset']}`", "",
            f"K = {results['code_length']} codes, {base.autoencoder.codebook_size} codewords; "
            f"{base.data.max_train or 'all'} training images, {results['test_images']} test "
            f"images; autoencoder {base.autoencoder.epochs} epochs, prior "
            f"{base.prior.num_layers} layers x width {base.prior.width}, {base.prior.epochs} "
            f"epochs. Frechet distances use {results['eval_samples']} samples per k against the "
            "test set, on the penultimate features of a classifier trained on the dataset's "
            f"labels (test accuracy {results['classifier_accuracy']:.4f}); the floor, "
            f"{results['eval_samples']} real training images against the same test set, "
            f"scores {results['real_fd']:.3f}. {results['fid_note']}",
            "", "Short CPU budgets: absolute numbers are not comparable with the paper's; the "
            "comparisons between variants are.", ""]
