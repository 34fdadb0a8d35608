"""`ServeConfig`: every setting of `ovqvae serve`, checked when it is made."""

from __future__ import annotations

import dataclasses
from typing import Optional

LOG_FORMATS = ("text", "json")


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    saved_model: Optional[str] = None      # One SavedModel, served as version 1; or
    model_base_path: Optional[str] = None  # DIR/<version>/ SavedModels, polled.
    model_version_policy: str = "latest"   # "latest", "all" or "specific:N,M".
    version_labels: str = ""               # "stable=3,canary=4".
    file_system_poll_wait_seconds: float = 1.0
    model_name: str = "ovqvae"
    host: str = "127.0.0.1"
    port: int = 8501
    grpc_port: int = 0                     # TF Serving's gRPC API there (0: off).
    max_batch: int = 128         # Rows (samples) sampled together at most.
    max_samples: int = 64        # num_samples of one request at most.
    max_queue: int = 256         # Requests waiting for the model at most.
    max_chunk: int = 8           # Codes per compiled call at most, with deadline work.
    fixed_chunk_ms: float = 50.0  # A call's length at most when only :predict work runs.
    max_body_bytes: int = 4 << 20          # :predict bodies.
    max_anytime_body_bytes: int = 64 << 10  # :anytime needs a few hundred bytes.
    deadline_margin_ms: float = 5.0  # Kept free for sending an answer and the client's
                                     # side, at least (the engine learns the server's).
    cost_quantile: float = 0.98      # How pessimistic the pacing predictions are.
    cost_max_age_s: float = 2.0      # Seconds after which a timing no longer counts.
    drain_seconds: float = 30.0      # SIGTERM waits this long for requests in flight.
    header_timeout_s: float = 10.0   # A connection with no complete request by then closes.
    body_timeout_s: float = 10.0     # A body not received by then gets 408.
    log_format: str = "text"

    def __post_init__(self):
        def check(name, ok, expected):
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}, expected {expected}")

        for name in ("max_batch", "max_samples", "max_queue", "max_chunk", "max_body_bytes",
                     "max_anytime_body_bytes"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and not isinstance(value, bool) and value >= 1,
                  "an integer >= 1")
        check("max_samples", self.max_samples <= self.max_batch,
              f"at most max_batch={self.max_batch}")
        check("saved_model", bool(self.saved_model) != bool(self.model_base_path),
              "exactly one of saved_model and model_base_path")
        for name in ("port", "grpc_port"):
            value = getattr(self, name)
            check(name, isinstance(value, int) and 0 <= value <= 65535, "0 <= port <= 65535")
        check("file_system_poll_wait_seconds", 0 < self.file_system_poll_wait_seconds <= 3600,
              "a number in (0, 3600]")
        from pipeline.serving.versions import parse_labels, parse_policy

        parse_policy(self.model_version_policy)
        parse_labels(self.version_labels)
        check("model_name", bool(self.model_name) and "/" not in self.model_name
              and ":" not in self.model_name, "a non-empty name without '/' or ':'")
        check("deadline_margin_ms", 0 <= self.deadline_margin_ms <= 10_000,
              "a number in [0, 10000]")
        check("cost_quantile", 0.5 <= self.cost_quantile < 1, "a number in [0.5, 1)")
        check("cost_max_age_s", self.cost_max_age_s > 0, "a number > 0")
        check("fixed_chunk_ms", 0 < self.fixed_chunk_ms <= 10_000, "a number in (0, 10000]")
        for name in ("drain_seconds", "header_timeout_s", "body_timeout_s"):
            check(name, 0 < getattr(self, name) <= 3600, "a number in (0, 3600]")
        check("log_format", self.log_format in LOG_FORMATS, f"one of {list(LOG_FORMATS)}")

    @property
    def labels(self) -> dict:
        from pipeline.serving.versions import parse_labels

        return parse_labels(self.version_labels)

    @property
    def fixed_rows(self) -> int:
        """Rows that work without a deadline (:predict) may hold while deadline work could
        use them: the rest of the batch stays free for one request of max_samples."""
        return max(self.max_batch - self.max_samples, 1)
