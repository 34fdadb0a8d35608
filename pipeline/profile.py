"""The quality profile every exported SavedModel carries: per code length k, what a sample
or a reconstruction is worth and what it costs, measured at export on held-out images.

  k                     1..K
  mse_mean, psnr_mean,  reconstruction error of the test images from their first k codes
  psnr_p5               (PSNR in dB for images in [0, 1]; p5: the 5th percentile)
  pixel_fd              Frechet distance, in pooled pixel space, of samples decoded at k to
  pixel_fd_floor        the test images; the floor: one half of the test images to the other
  domain_fd,            the same on a domain classifier's features, where the export is
  domain_fd_floor       given one (`--classifier`, as `ovqvae experiments` trains and keeps)
  seconds               {batch size: {"k": [...], "seconds": [...]}}: `sample` (codes and
                        decoding), best of 3, on the exporting machine (`machine`)

A server plans with it (a request's quality floor becomes its min_codes) and a client reads
it with plain `tf.saved_model.load(path).quality_profile` (a JSON string).
"""

from __future__ import annotations

import os
import platform
import time
from typing import Optional, Sequence

import numpy as np

from ordered_vqvae.configs import curve_lengths

BATCH_SIZES = (1, 16, 64)
SAMPLES = 256
TEST_IMAGES = 512
QUALITIES = ("psnr", "fd_ratio")


def _best_seconds(call, repeats: int = 3) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def load_classifier(path: str, image_shape):
    """The domain classifier saved in `path` for images of `image_shape` (None for "")."""
    if not path:
        return None
    from ordered_vqvae.metrics import CLASSIFIER_JSON, DomainClassifier

    if not os.path.isfile(os.path.join(path, CLASSIFIER_JSON)):
        raise ValueError(f"--classifier={path} holds no {CLASSIFIER_JSON}; expected a domain "
                         "classifier directory (ovqvae experiments keeps one in "
                         "WORKDIR/classifier)")
    return DomainClassifier.load(path, tuple(image_shape))


def measure(module, test_images: np.ndarray, seed: int = 0,
            batch_sizes: Sequence[int] = BATCH_SIZES, classifier=None) -> dict:
    """The profile of an `ordered_vqvae.export.AnytimeModel` on test images [N,H,W,C],
    with domain FD when given a `metrics.DomainClassifier`."""
    import tensorflow as tf

    from ordered_vqvae.metrics import frechet_distance, statistics
    from pipeline.evaluate import pooled

    K = int(module.code_length.numpy())
    images = tf.constant(test_images, tf.float32)
    codes = module.encode(images)["codes"]
    n = len(test_images)
    errors = np.stack([((module.decode_at(codes, tf.fill([n], k))["images"].numpy()
                         - test_images) ** 2).mean(axis=(1, 2, 3)) for k in range(1, K + 1)])
    psnr = 10 * np.log10(1.0 / np.maximum(errors, 1e-12))
    test = pooled(test_images)
    mu, sigma = statistics(test)
    half = n // 2
    floor = frechet_distance(*statistics(test[:half]), *statistics(test[half:]))
    samples = module.sample(tf.constant(SAMPLES), tf.constant(K), tf.constant(seed),
                            tf.constant(1.0))["codes"]
    domain = {}
    if classifier is not None:
        real = classifier.features(test_images)
        real_stats = statistics(real)
        domain = {"domain_fd": [], "domain_fd_floor": round(float(frechet_distance(
            *statistics(real[:half]), *statistics(real[half:]))), 5)}
    fd = []
    for k in range(1, K + 1):  # One k's samples at a time: memory stays one batch.
        x = module.decode_at(samples, tf.fill([SAMPLES], k))["images"].numpy()
        fd.append(frechet_distance(*statistics(pooled(x)), mu, sigma))
        if domain:
            domain["domain_fd"].append(round(float(frechet_distance(
                *statistics(classifier.features(x)), *real_stats)), 5))
    seconds = {}
    for batch in batch_sizes:
        ks = curve_lengths(K)
        run = [lambda k=k: module.sample(tf.constant(batch), tf.constant(k), tf.constant(seed),
                                         tf.constant(1.0))["images"].numpy() for k in ks]
        for r in run:  # The first call compiles (one program serves every k); one more each.
            r()
        seconds[str(batch)] = {"k": ks, "seconds": [round(_best_seconds(r), 5) for r in run]}
    return {"code_length": K, "test_images": n, "k": list(range(1, K + 1)),
            "mse_mean": [round(float(e.mean()), 7) for e in errors],
            "psnr_mean": [round(float(p.mean()), 3) for p in psnr],
            "psnr_p5": [round(float(np.percentile(p, 5)), 3) for p in psnr],
            "pixel_fd": [round(float(f), 5) for f in fd], "pixel_fd_floor": round(float(floor), 5),
            **domain,
            "seconds": seconds,
            "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"}


def fd_kind(profile: dict) -> str:
    """The FD a profile's fd_ratio refers to: "domain" where it was measured, else "pixel"."""
    return "domain" if "domain_fd" in profile else "pixel"


def codes_for(profile: dict, quality: dict) -> Optional[int]:
    """The smallest k whose profiled quality meets `quality` ({"psnr": dB} on the mean
    PSNR, or {"fd_ratio": r}: FD at most r x the full-length FD, the domain FD where the
    profile has it, else the pixel FD), or None."""
    (name, value), = quality.items()
    if name == "psnr":
        met = [k for k, p in zip(profile["k"], profile["psnr_mean"]) if p >= value]
    else:
        fd = profile[f"{fd_kind(profile)}_fd"]
        met = [k for k, f in zip(profile["k"], fd) if f <= value * fd[-1]]
    return min(met) if met else None


def plot(profile: dict, path: str) -> None:
    """One figure, two panels: quality (mean and 5th-percentile PSNR, pixel FD with its
    floor) and time (per batch size) against k."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ordered_vqvae.atomic import atomic_file

    fig, (quality, cost) = plt.subplots(1, 2, figsize=(10, 3.6))
    quality.plot(profile["k"], profile["psnr_mean"], label="PSNR, mean")
    quality.plot(profile["k"], profile["psnr_p5"], "--", label="PSNR, 5th percentile")
    quality.set_xlabel("codes (k)")
    quality.set_ylabel("reconstruction PSNR (dB)")
    kind = fd_kind(profile)
    fd = quality.twinx()
    fd.plot(profile["k"], profile[f"{kind}_fd"], color="tab:red", label=f"samples' {kind} FD")
    fd.axhline(profile[f"{kind}_fd_floor"], color="tab:red", linestyle=":", label="FD floor")
    fd.set_ylabel(f"{kind} FD (lower is better)")
    fd.set_yscale("log")
    lines = quality.get_legend_handles_labels()
    more = fd.get_legend_handles_labels()
    quality.legend(lines[0] + more[0], lines[1] + more[1], fontsize=8, loc="center right")
    for batch, curve in profile["seconds"].items():
        cost.plot(curve["k"], [1e3 * s for s in curve["seconds"]], marker="o",
                  label=f"batch of {batch}")
    cost.set_xlabel("codes (k)")
    cost.set_ylabel("ms (sample + decode)")
    cost.set_title(f"on {profile['machine']}", fontsize=9)
    cost.legend(fontsize=8)
    fig.suptitle(f"Quality profile (K={profile['code_length']}, "
                 f"{profile['test_images']} test images)")
    fig.tight_layout()
    fig.subplots_adjust(wspace=0.45)  # Room for the FD axis between the panels.
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    plt.close(fig)
