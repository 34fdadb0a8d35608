"""The paper's experiments on one dataset, as variants of the pipeline compared side by side.

  ordered_vs_unordered  the same architecture with and without nested truncation, each with
                        its own prior: domain FD (and FID where InceptionV3 weights are
                        local) of samples, and test reconstruction MSE, against code length
  time                  anytime sampling seconds against code length
  channel_vs_spatial    sample grids at 1/4 of the code, channel-wise vs spatial-wise
  priority_code         fix the first k codes of one sample, resample the rest
  ablations             truncation distribution (uniform per batch, per example, geometric,
                        all prefixes) and architecture size, as curves
  ordering_price        recipes meant to remove the ordered model's price at full length,
                        each against the goals, with codebook use
  prior_size            the prior's size and schedule (width, depth, epochs, learning rate,
                        dropout, training sequences) on the ordered model's codes:
                        validation bits per code, FD, training time

Every variant is an ordinary pipeline run in `workdir/variants/<name>/`, so finished
variants are reused by later runs (their manifests match). Results go to
`workdir/experiments/`: experiments.md, experiments.json and the PNG figures.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from typing import Dict, List, Optional, Sequence

import numpy as np

from ordered_vqvae import figures, metrics, models
from ordered_vqvae.atomic import atomic_directory, write_json
from ordered_vqvae.configs import EXPERIMENT_FRACTIONS, fraction_lengths
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import load_prior
from pipeline import evaluate, stages, workdir as wd
from pipeline.config import PipelineConfig

EXPERIMENTS = ("ordered_vs_unordered", "time", "channel_vs_spatial", "priority_code", "ablations",
               "ordering_price", "prior_size")
# The prior_size experiment: each variant changes one setting of the base prior.
PRIOR_STUDY = (
    ("prior-wide", lambda p: dict(width=2 * p.width, ffn_width=2 * p.ffn_width)),
    ("prior-deep", lambda p: dict(num_layers=2 * p.num_layers)),
    ("prior-longer", lambda p: dict(epochs=2 * p.epochs)),
    ("prior-lr_x2", lambda p: dict(learning_rate=2 * p.learning_rate)),
    ("prior-no_dropout", lambda p: dict(dropout=0.0)),
    ("prior-all_sequences", lambda p: dict(max_train_sequences=0)),
)
# The paper's recipe on top of any truncation: zeros fill, no full-code share, P(k) untilted.
# The unordered model, the price study's "paper" recipes and the ablations all start from it.
PAPER_RECIPE = dict(full_code_share=0.0, fill="zeros", length_power=0.0)
# The ordering-price experiment's goals: (label, ratio of two FDs or MSEs, at most). Keys are
# "fd"/"mse" at a fraction of K, of the variant or of the unordered model ("u_").
PRICE_GOALS = (
    ("FD 25% / unordered FD 25%", ("fd", 0.25), ("u_fd", 0.25), 0.5),
    ("FD 60% / FD 100%", ("fd", 0.6), ("fd", 1.0), 1.1),
    ("FD 100% / unordered FD 100%", ("fd", 1.0), ("u_fd", 1.0), 1.1),
    ("MSE 100% / unordered MSE 100%", ("mse", 1.0), ("u_mse", 1.0), 1.1),
    ("FD 100% / real-vs-real FD", ("fd", 1.0), ("real", None), 5.0),
)


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    base: PipelineConfig
    names: tuple = EXPERIMENTS
    eval_samples: int = 1000           # Samples per (variant, k) for Frechet distances.
    classifier_epochs: Optional[int] = None  # None: CLASSIFIER_EPOCHS of its architecture.
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
    if {"ordered_vs_unordered", "time", "priority_code", "channel_vs_spatial",
            "ordering_price", "prior_size"} & set(cfg.names):
        out["ordered"] = variant()
    if {"ordered_vs_unordered", "ordering_price"} & set(cfg.names):
        out["unordered"] = variant(truncation="none", **PAPER_RECIPE)
    if "ordering_price" in cfg.names:
        # Each ingredient alone on the paper's recipe (uniform k, zeros fill, no full-code
        # share), then the learned fill with full-code shares or with P(k) tilted by k^power
        # toward long prefixes; all at the same epochs as "ordered" except "longer".
        e = ae.epochs

        def paper(**overrides):
            return variant(**{**PAPER_RECIPE, **overrides})

        out["price-paper"] = paper()
        out["price-pretrain"] = paper(pretrain_epochs=e // 2, epochs=e - e // 2)
        out["price-full_share"] = paper(full_code_share=0.25)
        out["price-full_share_90"] = paper(full_code_share=0.9)
        out["price-ema_restarts"] = paper(use_ema=True, dead_code_steps=100)
        out["price-longer"] = paper(epochs=2 * e)
        for share in (0.5, 0.75, 0.9):
            out[f"price-learned_share_{round(100 * share)}"] = paper(fill="learned",
                                                                     full_code_share=share)
        for power in (1, 2, 5):
            out[f"price-learned_power_{power}"] = paper(fill="learned", length_power=power)
    if "prior_size" in cfg.names:
        for name, overrides in PRIOR_STUDY:
            prior = base.prior.replace(**overrides(base.prior))
            if prior != base.prior:  # "all_sequences" is the base when it has no cap.
                out[name] = dataclasses.replace(base, prior=prior)
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
            out[name] = dataclasses.replace(small, autoencoder=ae.replace(
                epochs=epochs, **PAPER_RECIPE, **overrides))
    return out


def _with_ordered(variants, prefix: str) -> List[str]:
    """"ordered" and the variants of one experiment (named with `prefix`), in order."""
    return [n for n in variants if n == "ordered" or n.startswith(prefix)]


def _share_upstream(source: str, target: str) -> None:
    """Copies the autoencoder and codes of `source` into a new variant workdir `target`,
    with their manifests, unless it holds them already: a prior variant trains on the same
    codes without retraining them, and its workdir still stands alone."""
    upstream = ("autoencoder", "extract")
    if all(wd.read_manifest(target, s) == wd.read_manifest(source, s) for s in upstream):
        return
    wd.prepare(target)
    for stage in upstream:
        artifact = stages.artifact_path(target, stage)
        shutil.rmtree(artifact, ignore_errors=True)
        shutil.copytree(stages.artifact_path(source, stage), artifact)
        shutil.copyfile(wd.manifest_path(source, stage), wd.manifest_path(target, stage))


CLASSIFIER_EPOCHS = {"cnn": 3, "resnet": 15}


def _classifier(cfg: ExperimentConfig, workdir: str, test, verbose: int = 0):
    """(the domain classifier, its features of the test images). The classifier is cached in
    the workdir; it trains on the whole training split (whatever max_train the variants use)."""
    test_x, test_y, _ = test
    path = os.path.join(workdir, "classifier")
    shape = test_x.shape[1:]
    if os.path.exists(os.path.join(path, metrics.CLASSIFIER_JSON)):
        clf = metrics.DomainClassifier.load(path, shape)
        accuracy, features = clf.evaluate(test_x, test_y)
        print(f"[experiments] domain classifier from {path}: test accuracy {accuracy:.4f} on "
              f"this run's {len(test_x)} test images", flush=True)
        return clf, features
    train_x, train_y, _ = dataclasses.replace(cfg.base.data, max_train=None).arrays("train")
    clf = metrics.DomainClassifier(shape, int(max(train_y.max(), test_y.max())) + 1)
    epochs = cfg.classifier_epochs or CLASSIFIER_EPOCHS[clf.architecture]
    print(f"[experiments] training the domain classifier ({clf.architecture}, {epochs} epochs "
          f"on {len(train_x)} images)", flush=True)
    accuracy = clf.fit(train_x, train_y, test_x, test_y, epochs=epochs, verbose=verbose)
    print(f"[experiments] domain classifier test accuracy {accuracy:.4f}", flush=True)
    clf.save(path)
    return clf, clf.features(test_x)


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


def _codes_of(autoencoder, images, batch: int) -> np.ndarray:
    """Codes int32 [N, K] of images [N, H, W, C], encoded `batch` at a time."""
    return np.concatenate([autoencoder.encode(images[i:i + batch]).numpy()
                           for i in range(0, len(images), batch)])


def codebook_use(autoencoder, images, batch: int = 1000) -> dict:
    """How much of the codebook the codes of `images` use: the share of codewords that
    occur, and the perplexity exp(entropy) of their frequencies (1..codebook_size)."""
    codes = _codes_of(autoencoder, images, batch).ravel()
    counts = np.bincount(codes, minlength=autoencoder.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def reconstruction_fd(autoencoder, clf, images, real_features, lengths, batch: int = 500) -> dict:
    """{k: domain FD of `images` reconstructed from their first k codes}: the distance the
    autoencoder alone leaves, with no prior (the floor's own images, so the two compare)."""
    codes = _codes_of(autoencoder, images, batch)
    out = {}
    for k in lengths:
        recon = np.concatenate([autoencoder.decode(codes[i:i + batch], k).numpy()
                                for i in range(0, len(codes), batch)])
        out[k] = metrics.frechet_distance_of(clf.features(recon), real_features)
    return out


def _quality(name, generator, lengths, cfg, clf, real, real_features, inception, real_inception,
             test_x):
    samples = _samples_by_length(generator, lengths, cfg.eval_samples, cfg.base.seed)
    row = {"fd": {}, "fid": {}, "mse": {}, **codebook_use(generator.autoencoder, test_x)}
    mse = generator.autoencoder.mse_by_length(test_x, lengths)
    row["recon_fd"] = reconstruction_fd(generator.autoencoder, clf, real, real_features, lengths)
    for k in lengths:
        row["fd"][k] = metrics.frechet_distance_of(clf.features(samples[k]), real_features)
        row["mse"][k] = mse[k]
        if inception is not None:
            row["fid"][k] = metrics.frechet_distance_of(inception.features(samples[k]),
                                                        real_inception)
        print(f"[experiments] {name:28s} k={k:3d}: domain FD {row['fd'][k]:8.3f} (reconstructions "
              f"{row['recon_fd'][k]:8.3f}), test MSE {row['mse'][k]:.5f}"
              + (f", FID {row['fid'][k]:.2f}" if row["fid"] else ""), flush=True)
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
        where = os.path.join(workdir, "variants", name)
        if name.startswith("prior-"):
            _share_upstream(os.path.join(workdir, "variants", "ordered"), where)
        stages.run_pipeline(config, where, stages=["autoencoder", "extract", "prior"],
                            verbose=verbose)

    test = cfg.base.data.arrays("test")
    test_x = test[0]
    clf, real_features = _classifier(cfg, workdir, test, verbose)
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
    generators = {name: _generator(os.path.join(workdir, "variants", name)) for name in variants}
    samples = {}
    for name in variants:
        if name == "spatial":
            continue  # Its code has another length; it is only shown in grids.
        row, samples[name] = _quality(name, generators[name], lengths, cfg, clf, real,
                                      real_features, inception, real_inception, test_x)
        prior = wd.read_manifest(os.path.join(workdir, "variants", name), "prior")
        row["val_bits_per_code"] = prior["result"]["val_bits_per_code"]
        row["prior_seconds"] = prior["seconds"]
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
        if "ordering_price" in cfg.names:
            results["price"] = _price(results, _with_ordered(variants, "price-"))
            price = {n: results["variants"][n] for n in ["unordered", *results["price"]]}
            figs.append(figures.save_curves({n: r["fd"] for n, r in price.items()},
                                            os.path.join(tmp, "price_fd.png"), "codes kept (k)",
                                            "domain FD", "The price of ordering: FD", logy=True))
            figs.append(figures.save_curves({n: r["mse"] for n, r in price.items()},
                                            os.path.join(tmp, "price_mse.png"), "codes kept (k)",
                                            "test MSE", "The price of ordering: MSE", logy=True))
            K = results["code_length"]
            figs.append(figures.save_figure(figures.scatter_figure(
                {n.removeprefix("price-"): (r["val_bits_per_code"], r["mse"][K], r["fd"][K])
                 for n, r in price.items()},
                "prior's validation bits per code", (f"test MSE at k={K}", f"domain FD at k={K}"),
                "The price of ordering against the codes' rate"),
                os.path.join(tmp, "price_rate.png")))
        if "prior_size" in cfg.names:
            study = {n: results["variants"][n] for n in _with_ordered(variants, "prior-")}
            figs.append(figures.save_curves({n: r["fd"] for n, r in study.items()},
                                            os.path.join(tmp, "prior_size_fd.png"),
                                            "codes kept (k)", "domain FD",
                                            "Prior size and schedule: FD", logy=True))
        write_json(os.path.join(tmp, "experiments.json"), results)
        with open(os.path.join(tmp, "experiments.md"), "w") as f:
            f.write(_markdown(cfg, results, variants))
    print(f"[experiments] {os.path.join(out, 'experiments.md')}", flush=True)
    return results


def _price(results: dict, names: Sequence[str]) -> dict:
    """{variant: {goal label: {"ratio", "limit", "met"}}} for the ordering-price goals."""
    K = results["code_length"]
    at = fraction_lengths(K, (0.25, 0.6, 1.0))
    unordered = results["variants"]["unordered"]

    def value(name, key):
        kind, fraction = key
        if kind == "real":
            return results["real_fd"]
        row = unordered if kind.startswith("u_") else results["variants"][name]
        return row[kind.removeprefix("u_")][at[fraction]]

    return {name: {label: {"ratio": value(name, a) / value(name, b), "limit": limit,
                           "met": value(name, a) / value(name, b) <= limit}
                   for label, a, b, limit in PRICE_GOALS} for name in names}


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
             f"labels (test accuracy {results['classifier_accuracy']:.4f}); the floor, "
             f"{results['eval_samples']} real training images against the same test set, "
             f"scores {results['real_fd']:.3f}. {results['fid_note']}",
             "", "Short CPU budgets: absolute numbers are not comparable with the paper's; the "
             "comparisons between variants are.", ""]
    names = [n for n in ("ordered", "unordered") if n in results["variants"]]
    if "ordered_vs_unordered" in cfg.names:
        lines += ["## 1. Ordered vs unordered", "", "Domain Frechet distance of samples:", ""]
        lines += _table(results, names, "fd", ".3f")
        lines += ["", f"Domain Frechet distance of reconstructions (no prior): the floor's "
                  f"{results['eval_samples']} training images encoded and decoded from k codes; "
                  "what the autoencoder alone leaves of the samples' distance:", ""]
        lines += _table(results, names, "recon_fd", ".3f")
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
    if "price" in results:
        lines += _price_markdown(results, variants)
    if "prior_size" in cfg.names:
        lines += _prior_markdown(results, variants)
    return "\n".join(lines)


def _prior_markdown(results: dict, variants: Dict[str, PipelineConfig]) -> List[str]:
    K = results["code_length"]
    at = fraction_lengths(K, (0.25, 1.0))
    lines = ["## 7. Prior size and schedule", "",
             "Every prior trains on the codes of `ordered` (its autoencoder is shared) and keeps "
             "the weights of its best validation epoch; bits per code are on the test codes.", "",
             "| variant | layers | width | FFN | epochs | sequences | learning rate | dropout | "
             "val bits per code | " + " | ".join(f"FD k={k} ({f:.0%})" for f, k in at.items()) +
             " | training seconds |", "| --- |" + " ---: |" * (9 + len(at))]
    for name in _with_ordered(variants, "prior-"):
        row, p = results["variants"][name], variants[name].prior
        lines.append(
            f"| {name} | {p.num_layers} | {p.width} | {p.ffn_width} | {p.epochs} | "
            f"{p.max_train_sequences or 'all'} | {p.learning_rate:g} | {p.dropout:g} | "
            f"{row['val_bits_per_code']:.3f} | " +
            " | ".join(f"{row['fd'][k]:.3f}" for k in at.values()) +
            f" | {row['prior_seconds']:.0f} |")
    return lines + ["", "![FD](prior_size_fd.png)", ""]


def _price_markdown(results: dict, variants: Dict[str, PipelineConfig]) -> List[str]:
    K, price = results["code_length"], results["price"]
    at = fraction_lengths(K, (0.25, 0.6, 1.0))
    lines = ["## 6. The price of ordering", "",
             "`ordered` is the default recipe; `price-paper` is the paper's (uniform k, zeros "
             "fill, no full-code share), and each other `price-` variant changes it. "
             "Every variant trains the autoencoder for the same epochs as `ordered` except "
             "`price-longer` (twice as many); the prior is the same. Codebook use is measured "
             "on the test codes.", "",
             "| variant | autoencoder epochs | " + " | ".join(
                 f"FD k={k} ({f:.0%})" for f, k in at.items()) +
             f" | MSE k={K} | codewords used | perplexity | prior bits per code | goals met |",
             "| --- |" + " ---: |" * (len(at) + 6)]
    for name in ["unordered", *price]:
        row, ae = results["variants"][name], variants[name].autoencoder
        met = (f"{sum(g['met'] for g in price[name].values())} of {len(PRICE_GOALS)}"
               if name in price else "")
        lines.append(f"| {name} | {ae.pretrain_epochs + ae.epochs} | " + " | ".join(
            f"{row['fd'][k]:.3f}" for k in at.values()) +
            f" | {row['mse'][K]:.5f} | {row['usage']:.0%} | {row['perplexity']:.1f} | "
            f"{row['val_bits_per_code']:.3f} | {met} |")
    lines += ["", "Goals (ratio, at most):", "",
              "| variant | " + " | ".join(f"{label} <= {limit}"
                                         for label, _, _, limit in PRICE_GOALS) + " |",
              "| --- |" + " ---: |" * len(PRICE_GOALS)]
    for name, goals in price.items():
        lines.append(f"| {name} | " + " | ".join(
            f"{g['ratio']:.2f}" + ("" if g["met"] else " (no)") for g in goals.values()) + " |")
    return lines + ["", "![FD](price_fd.png) ![MSE](price_mse.png) "
                     "![MSE and FD against bits per code](price_rate.png)", ""]
