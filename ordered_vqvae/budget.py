"""Wall-clock budgets for anytime sampling: how long a chunk of codes and a decode take, and
the one policy that spends a deadline on them.

`CostModel` predicts, per batch size and filter setting, the seconds of extending a sampling
state by c codes and of decoding it. It learns online from the times actually observed
(each `extend` and `decode` reports its own), fits seconds = a + b * c by least squares over
a window of recent calls, and gives two predictions:

- pessimistic (the default): the fit plus an upper quantile of its residuals, so that a
  chunk sized by it errs long rather than short; it paces work against a deadline.
- typical (`pessimistic=False`): the fit alone; it decides whether a deadline can be met at
  all (admission), so that a noisy tail does not refuse work the machine can do.

The slope never drops below `min_slope`, so a budget never buys unbounded codes from timing
noise. Calls more than `STALL` times slower than the median of their key's window are left
out of the fit.

Predictions cannot lock themselves out. Observations age: only those of the last `max_age`
seconds count, and a key with fewer than `MIN_FRESH` of them falls back to its baseline
(what `keep_baseline` froze, typically warm-up timings taken on an idle machine), so costs
learnt under a burst of load are forgotten once the load is gone, whether or not any
request was admitted since.

`plan_chunk` is the deadline policy: given each request's time left and codes so far, who
retires now and how many codes the next chunk may take. `ImageGenerator.sample_until` runs
it for one request, the server's engine for every request in its batch.
"""

from __future__ import annotations

import collections
import math
import time
from typing import Callable, Deque, Dict, Hashable, List, Optional, Sequence, Tuple

import numpy as np

STALL = 10.0
MIN_FRESH = 4


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
      window: how many recent observations per key to keep.
      quantile: the residual quantile added to pessimistic predictions (0.9: nine in ten
        calls fit).
      min_slope: seconds per code never predicted below this.
      max_age: seconds after which an observation no longer counts.
      clock: the time source (tests pass a fake one).
    """

    def __init__(self, window: int = 64, quantile: float = 0.9, min_slope: float = 1e-5,
                 max_age: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self.window, self.quantile, self.min_slope = window, quantile, min_slope
        self.max_age, self.clock = max_age, clock
        # key -> (time, codes, seconds); decodes use codes = 0.
        self._extend: Dict[Hashable, Deque[Tuple[float, int, float]]] = {}
        self._decode: Dict[Hashable, Deque[Tuple[float, int, float]]] = {}
        self._baseline: Dict[Tuple[int, Hashable], List[Tuple[float, int, float]]] = {}
        self._compiled = set()  # (table, key) whose first, compiling call was seen.
        # Fits are cached until the key gets a new observation or an observation ages out:
        # a scheduler asks for predictions many times per chunk.
        self._fits: Dict[Tuple[int, Hashable], Tuple[float, float, float, float]] = {}

    # -- observing

    def observe_extend(self, key: Hashable, codes: int, seconds: float) -> None:
        """Records that advancing a batch (`key`: batch size, filters) by `codes` took
        `seconds`. The first call of a key is not kept: it compiles."""
        self._keep(self._extend, key, int(codes), float(seconds))

    def observe_decode(self, key: Hashable, seconds: float) -> None:
        self._keep(self._decode, key, 0, float(seconds))

    def _keep(self, table, key, codes, seconds):
        if (id(table), key) not in self._compiled:
            self._compiled.add((id(table), key))
            return
        table.setdefault(key, collections.deque(maxlen=self.window)).append(
            (self.clock(), codes, seconds))
        self._fits.pop((id(table), key), None)

    def keep_baseline(self) -> None:
        """Freezes every key's current observations as its fallback when its fresh ones run
        out (call it after timing the model on an idle machine)."""
        for table in (self._extend, self._decode):
            for key, points in table.items():
                self._baseline[(id(table), key)] = list(points)

    # -- fitting

    def _points(self, table, key, now):
        points = table.get(key, ())
        fresh = [p for p in points if now - p[0] <= self.max_age]
        if len(fresh) < MIN_FRESH:
            fresh += self._baseline.get((id(table), key), [])
        return fresh

    def _fit(self, table, key) -> Optional[Tuple[float, float, float]]:
        """(fixed seconds, seconds per code, residual margin), or None before any
        observation."""
        now = self.clock()
        cached = self._fits.get((id(table), key))
        if cached is not None and now < cached[3]:
            return cached[:3]
        points = self._points(table, key, now)
        if not points:
            return None
        c = np.array([p[1] for p in points], np.float64)
        t = np.array([p[2] for p in points], np.float64)
        usual = t <= STALL * np.median(t)  # A stall is not a cost of the model.
        c, t = c[usual], t[usual]
        if len(set(c)) >= 2:
            slope, intercept = np.polyfit(c, t, 1)
        elif c[0] == 0:  # Decodes: a constant.
            slope, intercept = 0.0, float(np.median(t))
        else:  # One chunk length seen so far: all of the time counts as per-code cost.
            slope, intercept = t.mean() / max(c.mean(), 1.0), 0.0
        slope = max(slope, self.min_slope) if c.max() > 0 else 0.0
        intercept = max(intercept, 0.0)
        margin = max(np.quantile(t - (intercept + slope * c), self.quantile), 0.0)
        # Valid until the oldest counted observation ages out.
        oldest = min(p[0] for p in points)
        expires = oldest + self.max_age if now - oldest <= self.max_age else now + 1.0
        self._fits[(id(table), key)] = (float(intercept), float(slope), float(margin), expires)
        return float(intercept), float(slope), float(margin)

    # -- predicting

    def extend_seconds(self, key: Hashable, codes: int,
                       pessimistic: bool = True) -> Optional[float]:
        """Predicted seconds for `codes` more codes, or None before any observation."""
        fit = self._fit(self._extend, key)
        if fit is None:
            return None
        return fit[0] + fit[1] * codes + (fit[2] if pessimistic else 0.0)

    def decode_seconds(self, key: Hashable, pessimistic: bool = True) -> Optional[float]:
        fit = self._fit(self._decode, key)
        if fit is None:
            return None
        return fit[0] + (fit[2] if pessimistic else 0.0)

    def codes_within(self, key: Hashable, seconds: float, limit: int) -> int:
        """The most codes (1 to `limit`) whose typical time fits in `seconds`; 1 while
        nothing has been observed."""
        fit = self._fit(self._extend, key)
        if fit is None or fit[1] <= 0:
            return 1
        return int(min(max(math.floor((seconds - fit[0]) / fit[1] + 1e-9), 1), limit))

    def affordable_codes(self, key: Hashable, seconds: float, limit: int,
                         decode_key: Optional[Hashable] = None) -> Optional[int]:
        """The most codes (up to `limit`) whose pessimistic time plus a decode (of
        `decode_key`, by default `key`) fits in `seconds`; None while nothing has been
        observed. Infinite `seconds` (work without a deadline) afford `limit`."""
        fit = self._fit(self._extend, key)
        decode = self.decode_seconds(key if decode_key is None else decode_key)
        if fit is None or decode is None:
            return None
        if math.isinf(seconds):
            return int(limit)
        codes = math.floor((seconds - decode - fit[0] - fit[2]) / fit[1] + 1e-9)
        return int(min(max(codes, 0), limit))


def plan_chunk(costs: CostModel, key: Hashable, requests: Sequence[Tuple[float, int, int, int]],
               max_chunk: int) -> Tuple[List[int], int]:
    """The deadline policy, for the requests sharing one batch.

    Args:
      requests: per request (seconds left before its answer must be ready, codes so far,
        min_codes, max_codes); math.inf seconds for work without a deadline.
      max_chunk: codes per chunk at most.
    Returns:
      (indices of the requests to retire now, codes in the next chunk). A request retires
      when it has min_codes and either its next code plus a decode would not fit or it has
      max_codes. The chunk is as long as the tightest remaining deadline affords (but
      always reaches a request's min_codes), 1 while the costs are still unknown.
    """
    retire, steps = [], max_chunk
    for i, (left, k, min_codes, max_codes) in enumerate(requests):
        affordable = costs.affordable_codes(key, left, max_codes - k)
        if k >= min_codes and (affordable == 0 or k >= max_codes):
            retire.append(i)
        elif affordable is None:
            steps = 1  # Learning the costs of this batch size.
        else:
            steps = min(steps, max(affordable, min_codes - k))
    return retire, max(1, min(steps, max_chunk))
