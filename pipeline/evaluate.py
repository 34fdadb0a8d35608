"""Measurements behind the report: reconstruction and sampling time against code length."""

from __future__ import annotations

from typing import Dict, Iterable, Sequence

import numpy as np

from ordered_vqvae.budget import sampling_seconds as _seconds
from ordered_vqvae.configs import curve_lengths


def reconstruction(model, test_batches: Iterable[np.ndarray]) -> dict:
    """Test MSE ([0,1] scale) of an OrderedVQVAE against the number of codes kept, over a
    stream of image batches."""
    K = model.code_length
    count = [0]

    def counted():
        for batch in test_batches:
            count[0] += len(batch)
            yield batch

    mse = model.mse_by_length(counted(), curve_lengths(K))
    for k, v in mse.items():
        print(f"[evaluate] test MSE with k={k:>3}/{K}: {v:.5f}", flush=True)
    return {"code_length": K, "codebook_size": model.codebook_size,
            "test_images": count[0], "mse_by_codes": {str(k): v for k, v in mse.items()}}


def sampling_seconds(generator, num_samples: int, lengths: Sequence[int],
                     repeats: int = 3) -> Dict[int, float]:
    """Best-of-`repeats` wall time of `generator.sample` (codes and decoding) for each k."""
    _seconds(generator, num_samples, 1, repeats=1)  # Compile once: one program serves every k.
    return {int(k): _seconds(generator, num_samples, k, repeats) for k in lengths}


def pooled(images: np.ndarray, size: int = 8) -> np.ndarray:
    """[N,H,W,C] -> [N, h*w*C]: the images average-pooled to at most size x size, flattened
    (features few enough for a covariance from a few hundred images)."""
    n, h, w, c = images.shape
    fh, fw = max(1, h // size), max(1, w // size)
    cropped = images[:, :h // fh * fh, :w // fw * fw]
    return cropped.reshape(n, h // fh, fh, w // fw, fw, c).mean(axis=(2, 4)).reshape(n, -1)


def against_baselines(recon_mse: float, samples: np.ndarray, test_images: np.ndarray,
                      mean_image: np.ndarray) -> dict:
    """How the model compares with the trivial baseline, the mean training image, and with
    the data: test MSE of the mean image beside the reconstructions' (`recon_mse`, all K
    codes), and the Frechet distance in pooled pixel space to the test images of the
    samples, of the mean image (a constant: zero covariance) and of one half of the test
    images against the other (the floor). The autoencoder counts as undertrained when its
    reconstructions' MSE is at least 0.8 of the mean image's."""
    from ordered_vqvae.metrics import frechet_distance, statistics

    test = pooled(test_images)
    mu, sigma = statistics(test)
    mean = pooled(mean_image[None])[0]
    half = len(test) // 2
    baseline_mse = float(np.mean((test_images - mean_image[None]) ** 2))
    fd = {"samples": frechet_distance(*statistics(pooled(samples)), mu, sigma),
          "mean_image": frechet_distance(mean, np.zeros_like(sigma), mu, sigma),
          "test_halves": frechet_distance(*statistics(test[:half]), *statistics(test[half:]))}
    # Samples decode through the autoencoder: when its reconstructions of real images are
    # no better than the mean image, neither are the samples, whatever their statistics.
    autoencoder = recon_mse >= 0.8 * baseline_mse
    return {"reconstruction_mse": recon_mse, "mean_image_mse": baseline_mse,
            "pixel_fd": fd, "autoencoder_undertrained": autoencoder,
            "samples_undertrained": autoencoder or fd["samples"] >= fd["mean_image"]}
