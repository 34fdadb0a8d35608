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
