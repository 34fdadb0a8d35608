"""The report stage: report.md, metrics.json and PNG figures from a finished workdir."""

from __future__ import annotations

import os

import numpy as np

from ordered_vqvae import figures
from ordered_vqvae.atomic import atomic_directory, write_json
from ordered_vqvae.configs import fraction_lengths
from ordered_vqvae.generator import ImageGenerator
from pipeline import evaluate, profile
from pipeline.config import PipelineConfig


def _pct(k: int, K: int) -> str:
    return f"{round(100 * k / K)}%"


# Images behind the comparison with the baselines: the mean of this many training images,
# and the samples and test images compared in pooled pixel space.
BASELINE_TRAIN_IMAGES = 2000
BASELINE_TEST_IMAGES = 512
BASELINE_SAMPLES = 256


def build(config: PipelineConfig, autoencoder, prior, results: dict, shown_images,
          out_dir: str, mean_image, test_images) -> str:
    """Writes the report into `out_dir` (atomically) and returns it.

    Args:
      autoencoder, prior: the trained OrderedVQVAE and CodePrior.
      results: the "result" of the autoencoder, extract and prior stages, by stage name.
      shown_images: float32 [n,H,W,C] in [0,1], the test images whose reconstructions
        the report shows (the first report_samples).
      mean_image: float32 [H,W,C], the mean training image (the trivial baseline).
      test_images: float32 [N,H,W,C], the test images the model and baseline are compared on.
    """
    generator = ImageGenerator(prior, autoencoder)
    K, n = autoencoder.code_length, config.report_samples
    ae_eval, codes_eval, prior_eval = (results[s] for s in ("autoencoder", "extract", "prior"))

    with atomic_directory(out_dir) as tmp:
        quarter = sorted(set(fraction_lengths(K).values()))
        # Reconstructions of test images from the first k codes.
        shown = shown_images[:n]
        codes = autoencoder.encode(shown)
        rows = [shown] + [autoencoder.decode(codes, k).numpy() for k in quarter]
        labels = ["input"] + [f"k={k} ({_pct(k, K)})" for k in quarter]
        figures.save_image_rows(rows, labels, os.path.join(tmp, "reconstructions.png"),
                                "Test images reconstructed from the first k codes")
        # Samples: one autoregressive pass, decoded at 25/50/75/100% of K.
        samples, _ = generator.sample_progressive(n, quarter, seed=config.seed)
        figures.save_image_rows([samples[k].numpy() for k in quarter],
                                [f"k={k} ({_pct(k, K)})" for k in quarter],
                                os.path.join(tmp, "samples.png"),
                                "Samples: the same sampling pass stopped after k codes")
        mse = {int(k): v for k, v in ae_eval["mse_by_codes"].items()}
        figures.save_curves({"ordered VQ-VAE": mse}, os.path.join(tmp, "mse_vs_codes.png"),
                            "codes kept (k)", "test MSE ([0,1] scale)",
                            f"Reconstruction error against code length (K={K})", logy=True)
        profile.plot(results["export"]["profile"], os.path.join(tmp, "quality_profile.png"))
        seconds = evaluate.sampling_seconds(generator, n, sorted(mse))
        figures.save_curves({f"batch of {n}": seconds}, os.path.join(tmp, "time_vs_codes.png"),
                            "codes generated (k)", "seconds (sample + decode)",
                            "Anytime sampling time against code length")
        recon = np.concatenate([autoencoder.decode(autoencoder.encode(batch), K).numpy()
                                for batch in np.array_split(test_images, -(-len(test_images) // 256))])
        baselines = evaluate.against_baselines(
            float(np.mean((recon - test_images) ** 2)),
            generator.sample(BASELINE_SAMPLES, K, seed=config.seed)[0].numpy(), test_images,
            mean_image)
        metrics = {"code_length": K, "baselines": baselines, "codebook_size": autoencoder.codebook_size,
                   "test_images": ae_eval["test_images"], "mse_by_codes": ae_eval["mse_by_codes"],
                   "sampling_seconds_by_codes": {str(k): v for k, v in seconds.items()},
                   "prior_val_bits_per_code": prior_eval["val_bits_per_code"],
                   "uniform_bits_per_code": prior_eval["uniform_bits_per_code"],
                   "records": codes_eval["counts"], "dead_letters": codes_eval["dead_letters"],
                   "training": {stage: results[stage]["training"] for stage in
                                ("autoencoder", "prior") if "training" in results[stage]},
                   "time_budget": config.time_budget}
        write_json(os.path.join(tmp, "metrics.json"), metrics)
        with open(os.path.join(tmp, "report.md"), "w") as f:
            f.write(_markdown(config, metrics))
    return out_dir


def _markdown(config: PipelineConfig, m: dict) -> str:
    K = m["code_length"]
    lines = [
        "# Ordered VQ-VAE: anytime sampling report",
        "",
        f"Dataset `{config.data.source}`: {m['records'].get('train', 0)} train / "
        f"{m['records'].get('test', 0)} test code records "
        f"({sum(m['dead_letters'].values())} dead letters). Code length "
        f"K = {K}, codebook of {m['codebook_size']} codewords "
        f"({config.autoencoder.quantization}-wise quantization, truncation "
        f"`{config.autoencoder.truncation}`). Prior: {config.prior.num_layers} layers, width "
        f"{config.prior.width}; validation {m['prior_val_bits_per_code']:.3f} bits per code "
        f"(uniform: {m['uniform_bits_per_code']:.3f}).",
        "",
        *_verdict(m["baselines"]),
        *_training_lines(config, m),
        "## Samples at 25/50/75/100% of the code",
        "",
        "Each column is one sampling pass; row k decodes only its first k codes, the rest "
        "filled as in training.",
        "",
        "![samples](samples.png)",
        "",
        "## Reconstruction against code length",
        "",
        "| codes kept k | fraction of K | test MSE ([0,1] scale) | sampling seconds |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for k in sorted(int(k) for k in m["mse_by_codes"]):
        sec = m["sampling_seconds_by_codes"].get(str(k))
        lines.append(f"| {k} | {k / K:.0%} | {m['mse_by_codes'][str(k)]:.5f} | "
                     f"{sec:.4f} |" if sec is not None else f"| {k} | {k / K:.0%} | "
                     f"{m['mse_by_codes'][str(k)]:.5f} | |")
    lines += ["", "![MSE against code length](mse_vs_codes.png)", "",
              "![reconstructions](reconstructions.png)", "",
              "## Sampling time against code length", "",
              f"Wall time for a batch of {config.report_samples} samples (codes and decoding), "
              "best of 3, one compiled program for every k.", "",
              "![time against code length](time_vs_codes.png)", "",
              "## The SavedModel's quality profile", "",
              "What the exported model stores and serves (`quality_profile`, `GET "
              "/v1/models/{name}/profile`): reconstruction PSNR of test images and the "
              "samples' FD per k (domain FD where the export was given a classifier, else "
              "pixel FD), and sampling time per k on the exporting machine.", "",
              "![quality and time against code length](quality_profile.png)", ""]
    return "\n".join(lines)


def _training_lines(config: PipelineConfig, m: dict) -> list:
    """What training got: epochs and minutes per training stage, and under a time budget
    whether the budget stopped it."""
    if not m["training"]:
        return []
    planned = {"autoencoder": config.autoencoder.pretrain_epochs + config.autoencoder.epochs,
               "prior": config.prior.epochs}
    budget = m["time_budget"]
    lines = ["## Training", ""]
    if budget:
        lines += [f"Time budget {budget / 60:.1f} min for the whole run (`--time_budget`); "
                  "each training stage trains until its share is spent.", ""]
    lines += ["| stage | epochs trained | of planned | minutes | share of the budget | "
              "stopped by |", "| --- | ---: | ---: | ---: | ---: | --- |"]
    for stage, t in m["training"].items():
        share = f"{t['budget_seconds'] / 60:.1f} min" if "budget_seconds" in t else ""
        why = "the time budget" if t["budget_stop"] else "its epochs"
        lines.append(f"| {stage} | {t['epochs_trained']:.2f} | {planned[stage]} | "
                     f"{t['seconds'] / 60:.1f} | {share} | {why} |")
    return lines + [""]


def _verdict(b: dict) -> list:
    """The report's opening word on whether the model has learnt anything: its
    reconstructions and samples against the mean training image and the data."""
    fd = b["pixel_fd"]
    recon = (f"reconstructions from all K codes have test MSE {b['reconstruction_mse']:.5f}; "
             f"the mean training image has {b['mean_image_mse']:.5f}")
    samples = (f"{BASELINE_SAMPLES} samples are at pixel Frechet distance {fd['samples']:.3f} "
               f"from the test images; the mean training image at {fd['mean_image']:.3f}, one "
               f"half of the test images from the other at {fd['test_halves']:.3f} (the floor)")
    lines = ["## Is the model trained?", ""]
    if b["autoencoder_undertrained"]:
        lines.append(f"**The autoencoder is undertrained**: its {recon}. Train it longer "
                     "(--epochs) or on more images.")
    else:
        lines.append(f"The autoencoder has learnt: its {recon}.")
    lines.append("")
    if b["autoencoder_undertrained"]:
        lines.append("**The samples are no better than the mean training image**: they are "
                     "decoded by an autoencoder whose reconstructions of real images are not "
                     f"(above). For the record, {samples}.")
    elif b["samples_undertrained"]:
        lines.append(f"**The samples are no better than the mean training image**: {samples}. "
                     "Train the prior longer (--prior_epochs) or on more images.")
    else:
        share = (fd["mean_image"] - fd["samples"]) / max(fd["mean_image"] - fd["test_halves"],
                                                          1e-12)
        lines.append(f"The samples beat the mean training image: {samples}; they cover "
                     f"{share:.0%} of the way from the mean image to the floor.")
    lines += ["", "(Pixel space, images average-pooled to at most 8x8: a coarse check, not "
              "a perceptual metric.)", ""]
    return lines
