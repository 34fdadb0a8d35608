"""The flags of `ovqvae serve` (and `export --model_base_path`), defined on import, and
the ServeConfig they give. Kept apart from `pipeline.serving` so that the command line
starts without importing the server."""

from __future__ import annotations

from typing import Optional

from absl import flags

FLAGS = flags.FLAGS

flags.DEFINE_string("model_base_path", None, "A directory of versions DIR/<integer>/ "
                    "(serve: polled, the highest served, as TF Serving does; export: the "
                    "SavedModel is published there as the next version).")
flags.DEFINE_string("model_version_policy", "latest", "Versions served from --model_base_path: "
                    "latest, all, or specific:N,M (serve).")
flags.DEFINE_string("version_labels", "", "Labels for /labels/{label} URLs, e.g. "
                    "stable=3,canary=4 (serve).")
flags.DEFINE_float("file_system_poll_wait_seconds", 1.0, "Seconds between polls of "
                   "--model_base_path for new versions (serve).")
flags.DEFINE_integer("grpc_port", 0, "Port of TF Serving's gRPC API (serve; 8500 in TF "
                     "Serving; 0: off).")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (serve).")
flags.DEFINE_integer("port", 8501, "Port to listen on (serve; TF Serving's REST port).")
flags.DEFINE_string("model_name", "ovqvae", "The {name} in /v1/models/{name} (serve).")
flags.DEFINE_integer("max_batch", 128, "Rows (samples) sampled together at most (serve).")
flags.DEFINE_integer("max_samples", None, "num_samples of one request at most (serve; "
                     "unset: 64, or --max_batch if smaller).")
flags.DEFINE_integer("max_queue", 256, "Anytime requests waiting at most; more get 503 (serve).")
flags.DEFINE_integer("max_chunk", 8, "Codes per compiled call at most (serve).")
flags.DEFINE_float("deadline_margin_ms", 5.0, "Milliseconds every :anytime deadline keeps free "
                   "for sending the answer, at least; the server adds what it learns (serve).")
flags.DEFINE_float("drain_seconds", 30.0, "After SIGTERM, seconds requests in flight may take "
                   "before their connections are closed (serve).")
flags.DEFINE_float("header_timeout_s", 10.0, "Seconds a connection may take to send a "
                   "request's headers, or stay idle between requests (serve).")
flags.DEFINE_float("body_timeout_s", 10.0, "Seconds a request may take to send its body; "
                   "then 408 (serve).")
flags.DEFINE_enum("log_format", "text", ["text", "json"], "Server logs: '[serve] ...' lines "
                  "or one JSON object per line (serve).")


def config(saved_model: Optional[str]):
    """The ServeConfig of the serve flags (ValueError naming a bad one)."""
    from pipeline.serving.config import ServeConfig

    max_samples = min(64, FLAGS.max_batch) if FLAGS.max_samples is None else FLAGS.max_samples
    return ServeConfig(
        saved_model=saved_model, model_base_path=FLAGS.model_base_path,
        model_version_policy=FLAGS.model_version_policy, version_labels=FLAGS.version_labels,
        file_system_poll_wait_seconds=FLAGS.file_system_poll_wait_seconds,
        grpc_port=FLAGS.grpc_port, model_name=FLAGS.model_name, host=FLAGS.host,
        port=FLAGS.port, max_batch=FLAGS.max_batch, max_samples=max_samples,
        max_queue=FLAGS.max_queue, max_chunk=FLAGS.max_chunk,
        deadline_margin_ms=FLAGS.deadline_margin_ms, drain_seconds=FLAGS.drain_seconds,
        header_timeout_s=FLAGS.header_timeout_s, body_timeout_s=FLAGS.body_timeout_s,
        log_format=FLAGS.log_format)
