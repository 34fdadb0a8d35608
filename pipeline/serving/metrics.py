"""Prometheus metrics of the server (prometheus-client, one registry per server)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)  # Batch sizes the engine pads rows to.


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ovqvae_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ovqvae_request_seconds", "Request latency (seconds)",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.codes = Histogram("ovqvae_anytime_codes", "Codes k of anytime answers",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 48, 64, 128, 256))
        self.misses = Counter("ovqvae_deadline_misses", "Anytime answers after their deadline",
                              registry=r)
        self.refused = Counter("ovqvae_refused", "Requests refused with 503 by admission",
                               registry=r)
        self.gone = Counter("ovqvae_clients_gone", "Requests whose client left before the "
                            "answer (their work is dropped)", registry=r)
        self.batch_rows = Histogram("ovqvae_batch_rows", "Rows in a chunk call", registry=r,
                                    buckets=BUCKETS)
        self.queue_depth = Gauge("ovqvae_queue_depth", "Requests waiting for the model",
                                 registry=r)
        self.active_rows = Gauge("ovqvae_active_rows", "Rows being sampled", registry=r)
        self.chunk_seconds = Histogram("ovqvae_chunk_seconds", "Seconds per chunk call",
                                       registry=r, buckets=(.001, .005, .01, .025, .05, .1,
                                                            .25, .5, 1, 2.5))
