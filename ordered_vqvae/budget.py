"""Wall-clock budgets for anytime sampling: how long k codes take, and the largest k that fits.

The choice is a prediction from a calibration taken before sampling (seconds(k) = a + b k
for one batch size); the clock is not looked at again while sampling.
"""

from __future__ import annotations

import time
from typing import Dict

import numpy as np


def sampling_seconds(generator, num_samples: int, num_codes: int, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of `generator.sample` (codes and decoding) for one k."""
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        generator.sample(num_samples, num_codes, seed=r)[0].numpy()
        best = min(best, time.perf_counter() - start)
    return best


class TimeBudget:
    """Picks k for an `ImageGenerator` from a per-batch-size linear cost model."""

    def __init__(self, generator):
        self.generator = generator
        self.code_length = generator.code_length
        self.calibration: Dict[int, tuple] = {}  # batch size -> (seconds fixed, per code)

    def calibrate(self, num_samples: int, repeats: int = 3) -> tuple:
        """Measures seconds(k) = a + b*k for this batch size (k = 1 and K, best of
        `repeats`, after compiling) and keeps it. Returns (a, b)."""
        sampling_seconds(self.generator, num_samples, 1, repeats=1)  # Compile.
        t1 = sampling_seconds(self.generator, num_samples, 1, repeats)
        tk = sampling_seconds(self.generator, num_samples, self.code_length, repeats)
        slope = max(tk - t1, 0.0) / max(self.code_length - 1, 1)
        self.calibration[num_samples] = (t1 - slope, slope)
        return self.calibration[num_samples]

    def codes_within(self, seconds: float, num_samples: int) -> int:
        """The largest k whose calibrated cost fits in `seconds` (at least 1)."""
        if seconds <= 0:
            raise ValueError(f"seconds={seconds}, expected a positive time budget")
        if num_samples not in self.calibration:
            self.calibrate(num_samples)
        fixed, per_code = self.calibration[num_samples]
        if per_code <= 0:
            return self.code_length
        fits = np.floor((seconds - fixed) / per_code + 1e-9)  # Tolerate float round-off.
        return int(np.clip(fits, 1, self.code_length))

    def sample_within(self, seconds: float, num_samples: int, seed: int = 0, **settings):
        """Samples with the largest k that fits the time budget. Returns (images, codes, k)."""
        k = self.codes_within(seconds, num_samples)
        images, codes = self.generator.sample(num_samples, k, seed, **settings)
        return images, codes, k
