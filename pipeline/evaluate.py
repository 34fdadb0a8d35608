"""Measurements behind the report: reconstruction and sampling time against code length."""

from __future__ import annotations

from typing import Dict, Sequence

import numpy as np

from ordered_vqvae import models

CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


def curve_lengths(code_length: int, fractions: Sequence[float] = CURVE_FRACTIONS):
    return sorted(set(models.fraction_lengths(code_length, fractions)) | {1, code_length})


def reconstruction(model: models.OrderedVQVAE, test_x: np.ndarray) -> dict:
    """Test MSE ([0,1] scale) against the number of codes kept."""
    K = model.code_length
    mse = model.mse_by_length(test_x, curve_lengths(K))
    for k, v in mse.items():
        print(f"[evaluate] test MSE with k={k:>3}/{K}: {v:.5f}", flush=True)
    return {"code_length": K, "codebook_size": model.codebook_size,
            "test_images": int(len(test_x)), "mse_by_codes": {str(k): v for k, v in mse.items()}}


def sampling_seconds(sampler, num_samples: int, lengths: Sequence[int],
                     repeats: int = 3) -> Dict[int, float]:
    """Best-of-`repeats` wall time of `sampler.sample` (codes and decoding) for each k."""
    sampler.seconds(num_samples, 1, repeats=1)  # Compile once: one program serves every k.
    return {int(k): sampler.seconds(num_samples, k, repeats) for k in lengths}
