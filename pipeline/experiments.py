"""The paper's experiments on one dataset, as variants of the pipeline compared side by side.

  ordered_vs_unordered  the same architecture with and without nested truncation, each with
                        its own prior: domain FD (and FID where InceptionV3 weights are
                        local) of samples, and test reconstruction MSE, against code length
  time                  anytime sampling seconds against code length
  channel_vs_spatial    sample grids at 1/4 of the code, channel-wise vs spatial-wise
  priority_code         fix the first k codes of one sample, resample the rest
  ablations             truncation distribution (uniform per batch, per example, geometric,
                        all prefixes) and architecture size, as curves

Every variant is an ordinary pipeline run in `workdir/variants/<name>/`, so finished
variants are reused by later runs (their manifests match). Results go to
`workdir/experiments/`: experiments.md, experiments.json and the PNG figures.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from ordered_vqvae import figures, metrics, models
from ordered_vqvae.atomic import atomic_directory, write_json
from ordered_vqvae.configs import EXPERIMENT_FRACTIONS, fraction_lengths
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import load_prior
from pipeline import evaluate, stages, workdir as wd
from pipeline.config import PipelineConfig

EXPERIMENTS = ("ordered_vs_unordered", "time", "channel_vs_spatial", "priority_code", "ablations")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    base: PipelineConfig
    names: tuple = EXPERIMENTS
    eval_samples: int = 1000           # Samples per (variant, k) for Frechet distances.
    classifier_epochs: int = 3
    inception_weights: Optional[str] = None
    ablation_max_train: Optional[int] = None  # A smaller budget for the ablation variants.
    ablation_epochs: Optional[int] = None


def _variant_configs(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    """name -> pipeline config of every variant the chosen experiments need."""
    base = cfg.base
    ae = base.autoencoder

    def variant(**ae_overrides):
        return dataclasses.replace(base, autoencoder=ae.replace(**ae_overrides))

    out = {}
    if {"ordered_vs_unordered", "time", "priority_code", "channel_vs_spatial"} & set(cfg.names):
        out["ordered"] = variant()
    if "ordered_vs_unordered" in cfg.names:
        out["unordered"] = variant(truncation="none")
    if "channel_vs_spatial" in cfg.names:
        out["spatial"] = variant(quantization="spatial")
    if "ablations" in cfg.names:
        data = base.data
        if cfg.ablation_max_train:
            data = dataclasses.replace(data, max_train=cfg.ablation_max_train)
        small = dataclasses.replace(base, data=data)
        epochs = cfg.ablation_epochs or ae.epochs
        for name, overrides in (
                ("ablate-uniform", dict(truncation="uniform")),
                ("ablate-uniform_per_example", dict(truncation="uniform_per_example")),
                ("ablate-geometric", dict(truncation="geometric", geometric_p=0.05)),
                ("ablate-all", dict(truncation="all")),
                ("ablate-narrow", dict(truncation="uniform_per_example",
                                       hidden=tuple(max(4, h // 2) for h in ae.hidden))),
                ("ablate-wide", dict(truncation="uniform_per_example",
                                     hidden=tuple(h * 2 for h in ae.hidden)))):
            out[name] = dataclasses.replace(small, autoencoder=ae.replace(epochs=epochs, **overrides))
    return out


def _classifier(cfg: ExperimentConfig, workdir: str, train, test) -> metrics.DomainClassifier:
    (train_x, train_y, _), (test_x, test_y, _) = train, test
    num_classes = int(max(train_y.max(), test_y.max())) + 1
    path = os.path.join(workdir, "classifier")
    shape = test_x.shape[1:]
    if os.path.exists(os.path.join(path, "accuracy.txt")):
        return metrics.DomainClassifier.load(path, shape, num_classes)
    clf = metrics.DomainClassifier(shape, num_classes)
    accuracy = clf.fit(train_x, train_y, test_x, test_y, epochs=cfg.classifier_epochs)
    print(f"[experiments] domain classifier test accuracy {accuracy:.4f}", flush=True)
    clf.save(path)
    return clf


def _generator(workdir: str) -> ImageGenerator:
    return ImageGenerator(load_prior(stages.artifact_path(workdir, "prior")),
                          models.load_autoencoder(stages.artifact_path(workdir, "autoencoder")))


def _samples_by_length(generator, lengths, n, seed, batch=250):
    """{k: images [n, H, W, C]} from progressive passes (one pass serves every k)."""
    out = {k: [] for k in lengths}
    for i, start in enumerate(range(0, n, batch)):
        images, _ = generator.sample_progressive(min(batch, n - start), lengths, seed=seed + i)
        for k in lengths:
            out[k].append(images[k].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _quality(name, generator, lengths, cfg, clf, real_features, inception, real_inception, test_x):
    samples = _samples_by_length(generator, lengths, cfg.eval_samples, cfg.base.seed)
    row = {"fd": {}, "fid": {}, "mse": {}}
    mse = generator.autoencoder.mse_by_length(test_x, lengths)
    for k in lengths:
        row["fd"][k] = metrics.frechet_distance_of(clf.features(samples[k]), real_features)
        row["mse"][k] = mse[k]
        if inception is not None:
            row["fid"][k] = metrics.frechet_distance_of(inception.features(samples[k]),
                                                        real_inception)
        print(f"[experiments] {name:28s} k={k:3d}: domain FD {row['fd'][k]:8.3f}, test MSE "
              f"{row['mse'][k]:.5f}" + (f", FID {row['fid'][k]:.2f}" if row["fid"] else ""),
              flush=True)
    return row, samples


def run(cfg: ExperimentConfig, workdir: str, verbose: int = 0) -> dict:
    """Runs the variants (cached) and the chosen experiments; writes workdir/experiments/."""
    unknown = set(cfg.names) - set(EXPERIMENTS)
    if unknown:
        raise ValueError(f"unknown experiment(s) {sorted(unknown)}, expected {EXPERIMENTS}")
    wd.prepare(workdir)
    variants = _variant_configs(cfg)
    for name, config in variants.items():
        print(f"[experiments] variant {name}", flush=True)
        stages.run_pipeline(config, os.path.join(workdir, "variants", name),
                            stages=["autoencoder", "extract", "prior"], verbose=verbose)

    train = cfg.base.data.arrays("train")
    test = cfg.base.data.arrays("test")
    test_x = test[0]
    clf = _classifier(cfg, workdir, train, test)
    real_features = clf.features(test_x)
    inception = real_inception = None
    fid_note = "FID not computed: pass --inception_weights=PATH (no weights are downloaded)."
    if cfg.inception_weights:
        inception = metrics.InceptionFeatures(cfg.inception_weights)
        real_inception = inception.features(test_x[:cfg.eval_samples * 2])
        fid_note = f"FID with InceptionV3 from {cfg.inception_weights}."

    K = cfg.base.autoencoder.code_length
    lengths = sorted(set(fraction_lengths(K, EXPERIMENT_FRACTIONS).values()))
    results = {"dataset": cfg.base.data.source, "code_length": K, "lengths": lengths,
               "classifier_accuracy": clf.accuracy, "fid_note": fid_note,
               "eval_samples": cfg.eval_samples, "test_images": int(len(test_x)), "variants": {}}
    generators = {name: _generator(os.path.join(workdir, "variants", name)) for name in variants}
    samples = {}
    for name in variants:
        if name == "spatial":
            continue  # Its code has another length; it is only shown in grids.
        row, samples[name] = _quality(name, generators[name], lengths, cfg, clf, real_features,
                                      inception, real_inception, test_x)
        results["variants"][name] = row
    figs = []
    out = os.path.join(workdir, "experiments")
    with atomic_directory(out) as tmp:
        if "ordered_vs_unordered" in cfg.names:
            pair = {n: results["variants"][n] for n in ("ordered", "unordered")}
            figs.append(figures.save_curves({n: r["fd"] for n, r in pair.items()},
                                            os.path.join(tmp, "fd_vs_codes.png"), "codes kept (k)",
                                            "domain Frechet distance (lower is better)",
                                            f"Sample quality against code length (K={K})", logy=True))
            figs.append(figures.save_curves({n: r["mse"] for n, r in pair.items()},
                                            os.path.join(tmp, "mse_vs_codes.png"), "codes kept (k)",
                                            "test MSE ([0,1] scale)",
                                            f"Reconstruction against code length (K={K})", logy=True))
            if inception is not None:
                figs.append(figures.save_curves({n: r["fid"] for n, r in pair.items()},
                                                os.path.join(tmp, "fid_vs_codes.png"),
                                                "codes kept (k)", "FID", "FID against code length"))
            quarter = fraction_lengths(K, (0.25,))[0.25]
            figures.save_image_rows([samples[n][quarter][:16] for n in pair] +
                                    [samples[n][K][:16] for n in pair],
                                    [f"{n}, k={quarter}" for n in pair] + [f"{n}, k={K}" for n in pair],
                                    os.path.join(tmp, "ordered_vs_unordered_samples.png"),
                                    "Samples at 1/4 and all of the code")
        if "time" in cfg.names:
            seconds = evaluate.sampling_seconds(generators["ordered"], 64, lengths)
            results["sampling_seconds"] = seconds
            figs.append(figures.save_curves({f"{cfg.base.data.source}, batch 64": seconds},
                                            os.path.join(tmp, "time_vs_codes.png"),
                                            "codes generated (k)", "seconds (sample + decode)",
                                            "Anytime sampling time against code length"))
        if "channel_vs_spatial" in cfg.names:
            rows, labels = [], []
            for name in ("ordered", "spatial"):
                s = generators[name]
                k = fraction_lengths(s.code_length, (0.25,))[0.25]
                rows.append(s.sample(16, k, seed=cfg.base.seed)[0].numpy())
                labels.append(f"{'channel' if name == 'ordered' else 'spatial'}-wise, "
                              f"k={k}/{s.code_length}")
            figures.save_image_rows(rows, labels, os.path.join(tmp, "channel_vs_spatial.png"),
                                    "Samples from 1/4 of the code")
        if "priority_code" in cfg.names:
            s = generators["ordered"]
            _, base_codes = s.sample(1, K, seed=cfg.base.seed + 7)
            fixed_rows, labels = [], []
            for frac in (0.125, 0.25, 0.5):
                k = fraction_lengths(K, (frac,))[frac]
                prefix = np.repeat(base_codes.numpy(), 12, axis=0)
                images, _ = s.complete(prefix, num_fixed=k, seed=cfg.base.seed + 11)
                fixed_rows.append(images.numpy())
                labels.append(f"first {k} codes fixed")
            figures.save_image_rows(fixed_rows, labels, os.path.join(tmp, "priority_code.png"),
                                    "Samples sharing the same priority code")
        if "ablations" in cfg.names:
            ablation = {n[len("ablate-"):]: r for n, r in results["variants"].items()
                        if n.startswith("ablate-")}
            truncations = {n: r for n, r in ablation.items() if n not in ("narrow", "wide")}
            sizes = {n: ablation[n] for n in ("narrow", "uniform_per_example", "wide")}
            sizes = {("default" if n == "uniform_per_example" else n): r for n, r in sizes.items()}
            for title, group, stem in (("truncation distribution", truncations, "ablation_truncation"),
                                       ("architecture width", sizes, "ablation_size")):
                figs.append(figures.save_curves({n: r["fd"] for n, r in group.items()},
                                                os.path.join(tmp, f"{stem}_fd.png"), "codes kept (k)",
                                                "domain FD", f"Ablation: {title}", logy=True))
                figs.append(figures.save_curves({n: r["mse"] for n, r in group.items()},
                                                os.path.join(tmp, f"{stem}_mse.png"), "codes kept (k)",
                                                "test MSE", f"Ablation: {title}", logy=True))
        write_json(os.path.join(tmp, "experiments.json"), results)
        with open(os.path.join(tmp, "experiments.md"), "w") as f:
            f.write(_markdown(cfg, results, variants))
    print(f"[experiments] {os.path.join(out, 'experiments.md')}", flush=True)
    return results


def _table(results: dict, names: Sequence[str], key: str, fmt: str) -> List[str]:
    K, lengths = results["code_length"], results["lengths"]
    lines = ["| variant | " + " | ".join(f"k={k} ({k / K:.0%})" for k in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for name in names:
        row = results["variants"][name][key]
        lines.append(f"| {name} | " + " | ".join(format(row[k], fmt) for k in lengths) + " |")
    return lines


def _markdown(cfg: ExperimentConfig, results: dict, variants: Dict[str, PipelineConfig]) -> str:
    K = results["code_length"]
    base = cfg.base
    lines = [f"# Experiments on `{results['dataset']}`", "",
             f"K = {K} codes, {base.autoencoder.codebook_size} codewords; "
             f"{base.data.max_train or 'all'} training images, {results['test_images']} test "
             f"images; autoencoder {base.autoencoder.epochs} epochs, prior "
             f"{base.prior.num_layers} layers x width {base.prior.width}, {base.prior.epochs} "
             f"epochs. Frechet distances use {results['eval_samples']} samples per k against the "
             "test set, on the penultimate features of a classifier trained on the dataset's "
             f"labels (test accuracy {results['classifier_accuracy']:.4f}). {results['fid_note']}",
             "", "Short CPU budgets: absolute numbers are not comparable with the paper's; the "
             "comparisons between variants are.", ""]
    names = [n for n in ("ordered", "unordered") if n in results["variants"]]
    if "ordered_vs_unordered" in cfg.names:
        lines += ["## 1. Ordered vs unordered", "", "Domain Frechet distance of samples:", ""]
        lines += _table(results, names, "fd", ".3f")
        lines += ["", "Test reconstruction MSE ([0,1] scale):", ""]
        lines += _table(results, names, "mse", ".5f")
        lines += ["", "![FD against code length](fd_vs_codes.png)",
                  "![MSE against code length](mse_vs_codes.png)", "",
                  "![samples](ordered_vs_unordered_samples.png)", ""]
        if results["variants"]["ordered"]["fid"]:
            lines += ["FID:", ""] + _table(results, names, "fid", ".2f") + [
                "", "![FID](fid_vs_codes.png)", ""]
    if "time" in cfg.names:
        lines += ["## 2. Sampling time against code length", "",
                  "| k | " + " | ".join(str(k) for k in results["sampling_seconds"]) + " |",
                  "| --- |" + " ---: |" * len(results["sampling_seconds"]),
                  "| seconds (batch 64) | " + " | ".join(
                      f"{v:.3f}" for v in results["sampling_seconds"].values()) + " |", "",
                  "![time](time_vs_codes.png)", ""]
    if "channel_vs_spatial" in cfg.names:
        lines += ["## 3. Channel-wise vs spatial-wise quantization at 1/4 of the code", "",
                  "![channel vs spatial](channel_vs_spatial.png)", ""]
    if "priority_code" in cfg.names:
        lines += ["## 4. Samples on the same priority code", "",
                  "Each row keeps the first k codes of one sample and resamples the rest.", "",
                  "![priority code](priority_code.png)", ""]
    if "ablations" in cfg.names:
        abl = [n for n in results["variants"] if n.startswith("ablate-")]
        budget = variants[abl[0]] if abl else base
        lines += ["## 5. Ablations", "",
                  f"Each ablation variant: {budget.data.max_train or 'all'} training images, "
                  f"{budget.autoencoder.epochs} autoencoder epochs.", "",
                  "Domain FD:", ""] + _table(results, abl, "fd", ".3f") + [
                  "", "Test MSE:", ""] + _table(results, abl, "mse", ".5f") + [
                  "", "![truncation FD](ablation_truncation_fd.png)",
                  "![truncation MSE](ablation_truncation_mse.png)",
                  "![size FD](ablation_size_fd.png)", "![size MSE](ablation_size_mse.png)", ""]
    return "\n".join(lines)
