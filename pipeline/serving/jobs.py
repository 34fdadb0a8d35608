"""The work the engine does, as jobs, and the two ways a job ends without its answer."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from typing import Callable, List, Optional, Union


class Overloaded(Exception):
    """Refused: the work cannot be done in time or the queue is full (HTTP 503)."""

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class ClientGone(Exception):
    """The job's client left before its answer; its work was dropped."""


def _never() -> bool:
    return False


@dataclasses.dataclass(eq=False)
class SampleJob:
    """Rows to sample. `render(job, codes [n, K], images [n, H, W, C], final)` runs in the
    worker thread and returns (stream event bytes or None, final body bytes or None)."""

    num_samples: int
    seed: int
    temperature: float
    min_codes: int
    max_codes: int
    render: Callable
    deadline: float = math.inf   # time.monotonic() by which the answer must be out.
    stream: bool = False
    gone: Callable[[], bool] = _never
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    k: int = 0
    rows: Optional[List[int]] = None   # Its rows in the batch while it is being sampled.
    answered: Optional[float] = None   # When its final answer was ready to send.
    started: Optional[asyncio.Future] = None  # None once it has rows, or the refusal.
    done: Optional[asyncio.Future] = None     # The body, or the exception (returned).
    events: Optional[asyncio.Queue] = None    # Stream events; None ends the stream.

    @property
    def has_deadline(self) -> bool:
        return not math.isinf(self.deadline)


@dataclasses.dataclass(eq=False)
class CallJob:
    """One signature call: `run()` (worker thread) returns the body bytes."""

    name: str
    rows: int
    run: Callable[[], bytes]
    gone: Callable[[], bool] = _never
    arrived: float = dataclasses.field(default_factory=time.monotonic)
    done: Optional[asyncio.Future] = None


Job = Union[SampleJob, CallJob]
