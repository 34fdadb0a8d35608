"""`ovqvae serve`: TF Serving's REST and gRPC APIs plus anytime sampling with deadlines,
over one SavedModel or the versions under a base path (nothing else is read). Every
/v1/models/{name} URL below also takes /versions/{N} or /labels/{label}.

  GET  /v1/models/{name}              status of each version, as TF Serving answers it
                                      (UNLOADING, 503, while draining)
  GET  /v1/models/{name}/metadata     the signatures, as TF Serving answers it
  POST /v1/models/{name}:predict      {"signature_name": "sample"|"decode"|"encode",
                                       "inputs": {...}} -> {"outputs": {...}}, or
                                       "instances": [...] -> {"predictions": [...]}
  POST /v1/models/{name}:anytime      {"num_samples", "deadline_ms", "seed", "temperature",
                                       "min_codes"?, "max_codes"?, "stream"?}
                                      -> {"num_codes", "codes", "images" (base64 PNG),
                                      "elapsed_ms"}, or with "stream": true a
                                      text/event-stream, one event per refinement
  GET  /metrics                       Prometheus text format
  GET  /                              a page: sample, and watch the samples refine

Modules, one concern each: `config` (ServeConfig, checked), `protocol` (bodies checked
once for both endpoints, answers, TF Serving's formats), `model` (the SavedModel's
signatures), `versions` (loading, polling, switching and unloading versions), `jobs` and
`engine` (one queue and scheduler per version for all its work, admission, the cost model;
no HTTP), `metrics`, `app` (routes, limits, timeouts, logs, drain), `grpc_service` (TF
Serving's gRPC services on the same engines).
"""

from pipeline.serving.app import Server, serve
from pipeline.serving.config import ServeConfig

__all__ = ["Server", "ServeConfig", "serve"]
