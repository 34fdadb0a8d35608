"""Wall-clock budgets for anytime sampling: how long a chunk of codes and a decode take.

`CostModel` predicts, per batch size and filter setting, the seconds of extending a sampling
state by c codes and of decoding it. It learns online from the times actually observed
(each `extend` and `decode` reports its own), fits seconds = a + b * c by least squares over
a window of recent calls and adds an upper quantile of the residuals, so that a prediction
errs long rather than short. The slope never drops below `min_slope`, so a budget never
buys unbounded codes from timing noise. It is a prediction: a machine that slows down
mid-chunk (another process, a page fault, a first call that compiles) can still overrun.
Such stalls, calls more than `STALL` times slower than the median of their key's window, are
left out of the fit: one of them would otherwise make every prediction of that key too long
to admit any request, and a server that admits nothing observes nothing new.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Deque, Dict, Hashable, Optional, Tuple

import numpy as np

STALL = 10.0


def sampling_seconds(generator, num_samples: int, num_codes: int, repeats: int = 3) -> float:
    """Best-of-`repeats` wall time of `generator.sample` (codes and decoding) for one k."""
    best = float("inf")
    for r in range(repeats):
        start = time.perf_counter()
        generator.sample(num_samples, num_codes, seed=r)[0].numpy()
        best = min(best, time.perf_counter() - start)
    return best


class CostModel:
    """Online predictions of chunk and decode times.

    Args:
      window: how many recent observations per key to fit.
      quantile: the residual quantile added to the fit (0.9: nine in ten calls fit).
      min_slope: seconds per code never predicted below this.
    """

    def __init__(self, window: int = 64, quantile: float = 0.9, min_slope: float = 1e-5):
        self.window, self.quantile, self.min_slope = window, quantile, min_slope
        self._extend: Dict[Hashable, Deque[Tuple[int, float]]] = {}
        self._decode: Dict[Hashable, Deque[float]] = {}
        self._compiled = set()  # (table, key) whose first, compiling call was seen.
        # Fits are refitted only when a key gets a new observation: a scheduler asks for
        # predictions many times per chunk.
        self._fits: Dict[Hashable, Tuple[float, float]] = {}     # key -> (a + margin, b)
        self._decodes: Dict[Hashable, float] = {}

    def _series(self, table, key):
        return table.setdefault(key, collections.deque(maxlen=self.window))

    def observe_extend(self, key: Hashable, codes: int, seconds: float) -> None:
        """Records that advancing a batch (`key`: batch size, filters) by `codes` took
        `seconds`. The first call of a key is not kept: it compiles."""
        self._keep(self._extend, key, (int(codes), float(seconds)))
        self._fits.pop(key, None)

    def observe_decode(self, key: Hashable, seconds: float) -> None:
        self._keep(self._decode, key, float(seconds))
        self._decodes.pop(key, None)

    def _keep(self, table, key, value):
        if (id(table), key) not in self._compiled:
            self._compiled.add((id(table), key))
            return
        self._series(table, key).append(value)

    def _fit(self, key: Hashable) -> Optional[Tuple[float, float]]:
        """(fixed seconds + margin, seconds per code), or None before any observation."""
        if key in self._fits:
            return self._fits[key]
        points = self._extend.get(key)
        if not points:
            return None
        c = np.array([p[0] for p in points], np.float64)
        t = np.array([p[1] for p in points], np.float64)
        usual = t <= STALL * np.median(t)  # A stall is not a cost of the model.
        c, t = c[usual], t[usual]
        if len(set(c)) >= 2:
            slope, intercept = np.polyfit(c, t, 1)
        else:  # One chunk length seen so far: all of the time counts as per-code cost.
            slope, intercept = t.mean() / max(c.mean(), 1.0), 0.0
        slope = max(slope, self.min_slope)
        intercept = max(intercept, 0.0)
        margin = max(np.quantile(t - (intercept + slope * c), self.quantile), 0.0)
        self._fits[key] = fit = (float(intercept + margin), float(slope))
        return fit

    def extend_seconds(self, key: Hashable, codes: int) -> Optional[float]:
        """Predicted seconds for `codes` more codes, or None before any observation."""
        fit = self._fit(key)
        return None if fit is None else fit[0] + fit[1] * codes

    def decode_seconds(self, key: Hashable) -> Optional[float]:
        if key not in self._decodes and self._decode.get(key):
            t = np.array(self._decode[key])
            self._decodes[key] = float(np.quantile(t[t <= STALL * np.median(t)], self.quantile))
        return self._decodes.get(key)

    def affordable_codes(self, key: Hashable, seconds: float, limit: int,
                         decode_key: Optional[Hashable] = None) -> Optional[int]:
        """The most codes (up to `limit`) whose predicted time plus a decode (of
        `decode_key`, by default `key`) fits in `seconds`; None while nothing has been
        observed."""
        fit = self._fit(key)
        decode = self.decode_seconds(key if decode_key is None else decode_key)
        if fit is None or decode is None:
            return None
        codes = math.floor((seconds - decode - fit[0]) / fit[1] + 1e-9)
        return int(min(max(codes, 0), limit))
