"""The paper's experiments, one unit each: the variants it needs, its figures, its table.
`REGISTRY` lists them in the order experiments.md shows them. Plain Python at import (no
TensorFlow), so that the command line can list them."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, List, Sequence

import numpy as np

from ordered_vqvae import figures
from ordered_vqvae.configs import fraction_lengths
from pipeline import evaluate
from pipeline.config import PipelineConfig
from pipeline.experiments.base import Experiment, ExperimentConfig, Outcome

# The paper's recipe on top of any truncation: zeros fill, no full-code share, P(k) untilted.
# The unordered model, the price study's "paper" recipes and the ablations all start from it.
PAPER_RECIPE = dict(full_code_share=0.0, fill="zeros", length_power=0.0)
# The prior_size experiment: each variant changes one setting of the base prior.
PRIOR_STUDY = (
    ("prior-wide", lambda p: dict(width=2 * p.width, ffn_width=2 * p.ffn_width)),
    ("prior-deep", lambda p: dict(num_layers=2 * p.num_layers)),
    ("prior-longer", lambda p: dict(epochs=2 * p.epochs)),
    ("prior-lr_x2", lambda p: dict(learning_rate=2 * p.learning_rate)),
    ("prior-no_dropout", lambda p: dict(dropout=0.0)),
    ("prior-all_sequences", lambda p: dict(max_train_sequences=0)),
)
# The ordering-price experiment's goals: (label, ratio of two FDs or MSEs, at most). Keys are
# "fd"/"mse" at a fraction of K, of the variant or of the unordered model ("u_").
PRICE_GOALS = (
    ("FD 25% / unordered FD 25%", ("fd", 0.25), ("u_fd", 0.25), 0.5),
    ("FD 60% / FD 100%", ("fd", 0.6), ("fd", 1.0), 1.1),
    ("FD 100% / unordered FD 100%", ("fd", 1.0), ("u_fd", 1.0), 1.1),
    ("MSE 100% / unordered MSE 100%", ("mse", 1.0), ("u_mse", 1.0), 1.1),
    ("FD 100% / real-vs-real FD", ("fd", 1.0), ("real", None), 5.0),
)


def _variant(base: PipelineConfig, **autoencoder) -> PipelineConfig:
    return dataclasses.replace(base, autoencoder=base.autoencoder.replace(**autoencoder))


def _ordered(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    return {"ordered": cfg.base}


def _unordered(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    return {"unordered": _variant(cfg.base, truncation="none", **PAPER_RECIPE)}


def _with_ordered(names: Sequence[str], prefix: str) -> List[str]:
    """"ordered" and the variants of one experiment (named with `prefix`), in order."""
    return [n for n in names if n == "ordered" or n.startswith(prefix)]


def _curves(outcome: Outcome, names, key: str, path: str, ylabel: str, title: str,
            logy: bool = True) -> None:
    rows = outcome.results["variants"]
    figures.save_curves({n: rows[n][key] for n in names}, path, "codes kept (k)", ylabel,
                        title, logy=logy)


def _table(results: dict, names: Sequence[str], key: str, fmt: str) -> List[str]:
    K, lengths = results["code_length"], results["lengths"]
    lines = ["| variant | " + " | ".join(f"k={k} ({k / K:.0%})" for k in lengths) + " |",
             "| --- |" + " ---: |" * len(lengths)]
    for name in names:
        row = results["variants"][name][key]
        lines.append(f"| {name} | " + " | ".join(format(row[k], fmt) for k in lengths) + " |")
    return lines


# ----------------------------------------------------------------------------- 1. ordered vs unordered

PAIR = ("ordered", "unordered")


def _pair_figures(outcome: Outcome, out: str) -> None:
    K = outcome.code_length
    _curves(outcome, PAIR, "fd", os.path.join(out, "fd_vs_codes.png"),
            "domain Frechet distance (lower is better)",
            f"Sample quality against code length (K={K})")
    _curves(outcome, PAIR, "mse", os.path.join(out, "mse_vs_codes.png"), "test MSE ([0,1] scale)",
            f"Reconstruction against code length (K={K})")
    if outcome.fid:
        _curves(outcome, PAIR, "fid", os.path.join(out, "fid_vs_codes.png"), "FID",
                "FID against code length", logy=False)
    quarter = fraction_lengths(K, (0.25,))[0.25]
    samples = outcome.samples
    figures.save_image_rows([samples[n][quarter][:16] for n in PAIR]
                            + [samples[n][K][:16] for n in PAIR],
                            [f"{n}, k={quarter}" for n in PAIR] + [f"{n}, k={K}" for n in PAIR],
                            os.path.join(out, "ordered_vs_unordered_samples.png"),
                            "Samples at 1/4 and all of the code")


def _pair_markdown(outcome: Outcome) -> List[str]:
    results = outcome.results
    lines = ["## 1. Ordered vs unordered", "", "Domain Frechet distance of samples:", ""]
    lines += _table(results, PAIR, "fd", ".3f")
    lines += ["", f"Domain Frechet distance of reconstructions (no prior): the floor's "
              f"{results['eval_samples']} training images encoded and decoded from k codes; "
              "what the autoencoder alone leaves of the samples' distance:", ""]
    lines += _table(results, PAIR, "recon_fd", ".3f")
    lines += ["", "Test reconstruction MSE ([0,1] scale):", ""]
    lines += _table(results, PAIR, "mse", ".5f")
    lines += ["", "![FD against code length](fd_vs_codes.png)",
              "![MSE against code length](mse_vs_codes.png)", "",
              "![samples](ordered_vs_unordered_samples.png)", ""]
    if outcome.fid:
        lines += ["FID:", ""] + _table(results, PAIR, "fid", ".2f") + [
            "", "![FID](fid_vs_codes.png)", ""]
    return lines


# ----------------------------------------------------------------------------- 2. time


def _time_figures(outcome: Outcome, out: str) -> None:
    results = outcome.results
    seconds = evaluate.sampling_seconds(outcome.generators["ordered"], 64, results["lengths"])
    results["sampling_seconds"] = seconds
    figures.save_curves({f"{results['dataset']}, batch 64": seconds},
                        os.path.join(out, "time_vs_codes.png"), "codes generated (k)",
                        "seconds (sample + decode)", "Anytime sampling time against code length")


def _time_markdown(outcome: Outcome) -> List[str]:
    seconds = outcome.results["sampling_seconds"]
    return ["## 2. Sampling time against code length", "",
            "| k | " + " | ".join(str(k) for k in seconds) + " |",
            "| --- |" + " ---: |" * len(seconds),
            "| seconds (batch 64) | " + " | ".join(f"{v:.3f}" for v in seconds.values()) + " |",
            "", "![time](time_vs_codes.png)", ""]


# ----------------------------------------------------------------------------- 3. channel vs spatial


def _spatial(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    return {**_ordered(cfg), "spatial": _variant(cfg.base, quantization="spatial")}


def _spatial_figures(outcome: Outcome, out: str) -> None:
    rows, labels = [], []
    for name in ("ordered", "spatial"):
        generator = outcome.generators[name]
        k = fraction_lengths(generator.code_length, (0.25,))[0.25]
        rows.append(generator.sample(16, k, seed=outcome.cfg.base.seed)[0].numpy())
        labels.append(f"{'channel' if name == 'ordered' else 'spatial'}-wise, "
                      f"k={k}/{generator.code_length}")
    figures.save_image_rows(rows, labels, os.path.join(out, "channel_vs_spatial.png"),
                            "Samples from 1/4 of the code")


def _spatial_markdown(outcome: Outcome) -> List[str]:
    return ["## 3. Channel-wise vs spatial-wise quantization at 1/4 of the code", "",
            "![channel vs spatial](channel_vs_spatial.png)", ""]


# ----------------------------------------------------------------------------- 4. priority code


def _priority_figures(outcome: Outcome, out: str) -> None:
    generator, K, seed = outcome.generators["ordered"], outcome.code_length, outcome.cfg.base.seed
    _, base_codes = generator.sample(1, K, seed=seed + 7)
    rows, labels = [], []
    for fraction in (0.125, 0.25, 0.5):
        k = fraction_lengths(K, (fraction,))[fraction]
        prefix = np.repeat(base_codes.numpy(), 12, axis=0)
        images, _ = generator.complete(prefix, num_fixed=k, seed=seed + 11)
        rows.append(images.numpy())
        labels.append(f"first {k} codes fixed")
    figures.save_image_rows(rows, labels, os.path.join(out, "priority_code.png"),
                            "Samples sharing the same priority code")


def _priority_markdown(outcome: Outcome) -> List[str]:
    return ["## 4. Samples on the same priority code", "",
            "Each row keeps the first k codes of one sample and resamples the rest.", "",
            "![priority code](priority_code.png)", ""]


# ----------------------------------------------------------------------------- 5. ablations


def _ablations(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    base, ae = cfg.base, cfg.base.autoencoder
    data = base.data
    if cfg.ablation_max_train:
        data = dataclasses.replace(data, max_train=cfg.ablation_max_train)
    small = dataclasses.replace(base, data=data)
    epochs = cfg.ablation_epochs or ae.epochs
    return {name: _variant(small, epochs=epochs, **PAPER_RECIPE, **overrides) for name, overrides in (
        ("ablate-uniform", dict(truncation="uniform")),
        ("ablate-uniform_per_example", dict(truncation="uniform_per_example")),
        ("ablate-geometric", dict(truncation="geometric", geometric_p=0.05)),
        ("ablate-all", dict(truncation="all")),
        ("ablate-narrow", dict(truncation="uniform_per_example",
                               hidden=tuple(max(4, h // 2) for h in ae.hidden))),
        ("ablate-wide", dict(truncation="uniform_per_example",
                             hidden=tuple(h * 2 for h in ae.hidden))))}


def _ablation_figures(outcome: Outcome, out: str) -> None:
    names = [n for n in outcome.results["variants"] if n.startswith("ablate-")]
    sizes = ["ablate-narrow", "ablate-uniform_per_example", "ablate-wide"]
    truncations = [n for n in names if n not in ("ablate-narrow", "ablate-wide")]
    rows = outcome.results["variants"]
    for title, group, stem in (("truncation distribution", truncations, "ablation_truncation"),
                               ("architecture width", sizes, "ablation_size")):
        label = {n: ("default" if group is sizes and n == "ablate-uniform_per_example"
                     else n[len("ablate-"):]) for n in group}
        for key, ylabel in (("fd", "domain FD"), ("mse", "test MSE")):
            figures.save_curves({label[n]: rows[n][key] for n in group},
                                os.path.join(out, f"{stem}_{key}.png"), "codes kept (k)", ylabel,
                                f"Ablation: {title}", logy=True)


def _ablation_markdown(outcome: Outcome) -> List[str]:
    results = outcome.results
    names = [n for n in results["variants"] if n.startswith("ablate-")]
    budget = outcome.variants[names[0]]
    return (["## 5. Ablations", "",
             f"Each ablation variant: {budget.data.max_train or 'all'} training images, "
             f"{budget.autoencoder.epochs} autoencoder epochs.", "", "Domain FD:", ""]
            + _table(results, names, "fd", ".3f") + ["", "Test MSE:", ""]
            + _table(results, names, "mse", ".5f")
            + ["", "![truncation FD](ablation_truncation_fd.png)",
               "![truncation MSE](ablation_truncation_mse.png)",
               "![size FD](ablation_size_fd.png)", "![size MSE](ablation_size_mse.png)", ""])


# ----------------------------------------------------------------------------- 6. the price of ordering


def _price_variants(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    """Each ingredient alone on the paper's recipe (uniform k, zeros fill, no full-code
    share), then the learned fill with full-code shares or with P(k) tilted by k^power
    toward long prefixes; all at the same epochs as "ordered" except "longer"."""
    e = cfg.base.autoencoder.epochs

    def paper(**overrides):
        return _variant(cfg.base, **{**PAPER_RECIPE, **overrides})

    out = {**_ordered(cfg), **_unordered(cfg),
           "price-paper": paper(), "price-pretrain": paper(pretrain_epochs=e // 2, epochs=e - e // 2),
           "price-full_share": paper(full_code_share=0.25),
           "price-full_share_90": paper(full_code_share=0.9),
           "price-ema_restarts": paper(use_ema=True, dead_code_steps=100),
           "price-longer": paper(epochs=2 * e)}
    for share in (0.5, 0.75, 0.9):
        out[f"price-learned_share_{round(100 * share)}"] = paper(fill="learned",
                                                                 full_code_share=share)
    for power in (1, 2, 5):
        out[f"price-learned_power_{power}"] = paper(fill="learned", length_power=power)
    return out


def _price(results: dict, names: Sequence[str]) -> dict:
    """{variant: {goal label: {"ratio", "limit", "met"}}} for the ordering-price goals."""
    at = fraction_lengths(results["code_length"], (0.25, 0.6, 1.0))
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


def _price_figures(outcome: Outcome, out: str) -> None:
    results, K = outcome.results, outcome.code_length
    results["price"] = _price(results, _with_ordered(results["variants"], "price-"))
    names = ["unordered", *results["price"]]
    _curves(outcome, names, "fd", os.path.join(out, "price_fd.png"), "domain FD",
            "The price of ordering: FD")
    _curves(outcome, names, "mse", os.path.join(out, "price_mse.png"), "test MSE",
            "The price of ordering: MSE")
    rows = results["variants"]
    figures.save_figure(figures.scatter_figure(
        {n.removeprefix("price-"): (rows[n]["val_bits_per_code"], rows[n]["mse"][K],
                                    rows[n]["fd"][K]) for n in names},
        "prior's validation bits per code", (f"test MSE at k={K}", f"domain FD at k={K}"),
        "The price of ordering against the codes' rate"), os.path.join(out, "price_rate.png"))


def _price_markdown(outcome: Outcome) -> List[str]:
    results, K = outcome.results, outcome.code_length
    price = results["price"]
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
        row, ae = results["variants"][name], outcome.variants[name].autoencoder
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


# ----------------------------------------------------------------------------- 7. prior size


def _prior_variants(cfg: ExperimentConfig) -> Dict[str, PipelineConfig]:
    out = _ordered(cfg)
    for name, overrides in PRIOR_STUDY:
        prior = cfg.base.prior.replace(**overrides(cfg.base.prior))
        if prior != cfg.base.prior:  # "all_sequences" is the base when it has no cap.
            out[name] = dataclasses.replace(cfg.base, prior=prior)
    return out


def _prior_figures(outcome: Outcome, out: str) -> None:
    _curves(outcome, _with_ordered(outcome.results["variants"], "prior-"), "fd",
            os.path.join(out, "prior_size_fd.png"), "domain FD", "Prior size and schedule: FD")


def _prior_markdown(outcome: Outcome) -> List[str]:
    at = fraction_lengths(outcome.code_length, (0.25, 1.0))
    lines = ["## 7. Prior size and schedule", "",
             "Every prior trains on the codes of `ordered` (its autoencoder is shared) and keeps "
             "the weights of its best validation epoch; bits per code are on the test codes.", "",
             "| variant | layers | width | FFN | epochs | sequences | learning rate | dropout | "
             "val bits per code | " + " | ".join(f"FD k={k} ({f:.0%})" for f, k in at.items()) +
             " | training seconds |", "| --- |" + " ---: |" * (9 + len(at))]
    for name in _with_ordered(outcome.results["variants"], "prior-"):
        row, p = outcome.results["variants"][name], outcome.variants[name].prior
        lines.append(
            f"| {name} | {p.num_layers} | {p.width} | {p.ffn_width} | {p.epochs} | "
            f"{p.max_train_sequences or 'all'} | {p.learning_rate:g} | {p.dropout:g} | "
            f"{row['val_bits_per_code']:.3f} | " +
            " | ".join(f"{row['fd'][k]:.3f}" for k in at.values()) +
            f" | {row['prior_seconds']:.0f} |")
    return lines + ["", "![FD](prior_size_fd.png)", ""]


REGISTRY: Dict[str, Experiment] = {
    "ordered_vs_unordered": Experiment(
        "the same architecture with and without nested truncation, each with its own prior: "
        "domain FD (and FID where InceptionV3 weights are local) of samples, and test "
        "reconstruction MSE, against code length",
        lambda cfg: {**_ordered(cfg), **_unordered(cfg)}, _pair_figures, _pair_markdown),
    "time": Experiment("anytime sampling seconds against code length",
                       _ordered, _time_figures, _time_markdown),
    "channel_vs_spatial": Experiment("sample grids at 1/4 of the code, channel-wise vs "
                                     "spatial-wise", _spatial, _spatial_figures,
                                     _spatial_markdown),
    "priority_code": Experiment("fix the first k codes of one sample, resample the rest",
                                _ordered, _priority_figures, _priority_markdown),
    "ablations": Experiment("truncation distribution (uniform per batch, per example, "
                            "geometric, all prefixes) and architecture size, as curves",
                            _ablations, _ablation_figures, _ablation_markdown),
    "ordering_price": Experiment("recipes meant to remove the ordered model's price at full "
                                 "length, each against the goals, with codebook use",
                                 _price_variants, _price_figures, _price_markdown),
    "prior_size": Experiment("the prior's size and schedule (width, depth, epochs, learning "
                             "rate, dropout, training sequences) on the ordered model's codes: "
                             "validation bits per code, FD, training time",
                             _prior_variants, _prior_figures, _prior_markdown),
}
