"""Requests with a quality floor: `min_quality` ({"psnr": dB} or {"fd_ratio": r}) becomes
the smallest k that the model's quality profile says meets it; a floor the deadline cannot
afford is refused at once, naming the best quality reachable in time."""

from __future__ import annotations

import dataclasses
import json
import time

from pipeline.profile import codes_for, fd_kind
from pipeline.serving.jobs import Overloaded
from pipeline.serving.protocol import RequestError


def describe(profile: dict, k: int) -> str:
    kind = fd_kind(profile)
    fd = profile[f"{kind}_fd"]
    return (f"k={k}: PSNR {profile['psnr_mean'][k - 1]:.2f} dB, {kind} FD "
            f"{fd[k - 1] / fd[-1]:.2f}x the full-length one")


def min_codes(profile: dict, fields: dict) -> int:
    """The min_codes of checked :anytime fields: theirs, raised to what min_quality needs."""
    quality = fields["min_quality"]
    if quality is None:
        return fields["min_codes"]
    return max(fields["min_codes"], floor_codes(profile, quality, fields["max_codes"]))


def floor_codes(profile: dict, quality: dict, max_codes: int) -> int:
    """The k a quality floor needs, or RequestError when no k up to max_codes meets it."""
    if not profile:
        raise RequestError("this model has no quality profile, so min_quality cannot be "
                           "planned; export it again (ovqvae export)")
    k = codes_for(profile, quality)
    if k is None or k > max_codes:
        best = min(max_codes, profile["code_length"])
        raise RequestError(f"min_quality={json.dumps(quality)} is beyond what this model "
                           f"reaches with up to {max_codes} codes (at best "
                           f"{describe(profile, best)})")
    return k


def submit(engine, job, profile: dict, quality) -> None:
    """engine.submit(job); for a job with a quality floor, a refusal names the best
    quality that the deadline affords."""
    try:
        engine.submit(job)
    except Overloaded as e:
        if quality is None:
            raise
        now = time.monotonic()
        left = job.deadline - engine.floor - now
        best = 0
        for k in range(job.min_codes - 1, 0, -1):
            wait = engine.predicted_wait(dataclasses.replace(job, min_codes=k), now)
            if wait is not None and wait <= left:
                best = k
                break
        reachable = describe(profile, best) if best else "nothing, not even k=1"
        raise Overloaded(f"min_quality={json.dumps(quality)} needs k={job.min_codes} codes, "
                         "which cannot be decoded before the deadline; reachable in time: "
                         f"{reachable}",
                         e.retry_after) from None
