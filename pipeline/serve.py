"""`ovqvae serve`: TF Serving's REST API plus anytime sampling with deadlines, over one
SavedModel (nothing else is read).

  GET  /v1/models/{name}              status, as TF Serving answers it
  GET  /v1/models/{name}/metadata     the signatures, as TF Serving answers it
  POST /v1/models/{name}:predict      {"signature_name": "sample"|"decode"|"encode",
                                       "inputs": {...}} -> {"outputs": {...}}
  POST /v1/models/{name}:anytime      {"num_samples", "deadline_ms", "seed", "temperature",
                                       "min_codes"?, "max_codes"?, "stream"?}
                                      -> {"num_codes", "codes", "images" (base64 PNG),
                                      "elapsed_ms"},
                                      or with "stream": true a text/event-stream, one event
                                      per refinement (k and PNG images), the last "final"
  GET  /metrics                       Prometheus text format
  GET  /                              a page: sample, and watch the samples refine

Anytime requests share compiled chunk calls (continuous batching): the `Scheduler` keeps one
batch of rows (padded to a few bucket sizes, so that few programs are compiled), lets
requests join between chunks, picks each chunk's length from what the deadlines can afford
(`ordered_vqvae.budget.CostModel`, learnt online) and retires each request at its deadline
or its max_codes. A request that cannot get min_codes before its deadline is refused at
once with 503 and Retry-After. SIGTERM drains: requests in flight finish, new ones get 503.

aiohttp is the HTTP stack: a maintained asyncio server that streams responses and limits
request bodies; the model runs in worker threads so that the event loop stays responsive.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import dataclasses
import io
import json
import math
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from typing import List, Optional

import numpy as np
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ordered_vqvae.budget import CostModel
from ordered_vqvae.validation import op_error_text
from pipeline.page import page

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PREDICT_SIGNATURES = ("sample", "decode", "encode")
INT32_MAX = 2**31 - 1


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclasses.dataclass(frozen=True)
class ServeConfig:
    saved_model: str
    model_name: str = "ovqvae"
    host: str = "127.0.0.1"
    port: int = 8501
    max_batch: int = 128         # Rows (samples) sampled together at most.
    max_samples: int = 64        # num_samples of one request at most.
    max_queue: int = 256         # Requests waiting to join the batch at most.
    max_chunk: int = 8           # Codes per compiled call at most.
    max_body_bytes: int = 4 << 20
    deadline_margin_ms: float = 5.0  # Kept free for sending an answer and the client's
                                     # side, at least (the scheduler learns the server's).
    cost_quantile: float = 0.98      # How pessimistic the time predictions are.
    drain_seconds: float = 60.0  # SIGTERM waits this long for requests in flight.


# ----------------------------------------------------------------------------- the model


class Model:
    """The SavedModel's signatures, called from worker threads."""

    def __init__(self, path: str):
        import tensorflow as tf

        from ordered_vqvae.export import check_saved_model_dir

        check_saved_model_dir(path)
        self.tf = tf
        self.module = tf.saved_model.load(path)
        self.signatures = self.module.signatures
        self.code_length = int(self.module.code_length)

    # A state is a dict: "codes" int32 [B, K], "position" int32 [B] and "seeds" int32 [B]
    # as NumPy arrays (small, edited in place when a request takes rows), and "cache", the
    # KV cache, as a tensor that only the signatures read and write.

    def begin(self, num_samples: int, seed: int) -> dict:
        tf = self.tf
        out = self.signatures["begin"](num_samples=tf.constant(num_samples, tf.int32),
                                       seed=tf.constant(seed, tf.int32))
        return {k: v if k == "cache" else np.array(v) for k, v in out.items()}

    def extend(self, state: dict, temperature, limit, steps: int) -> dict:
        tf = self.tf
        out = self.signatures["extend"](
            codes=tf.constant(state["codes"]), cache=state["cache"],
            position=tf.constant(state["position"]), seeds=tf.constant(state["seeds"]),
            temperature=tf.constant(temperature, tf.float32),
            limit=tf.constant(limit, tf.int32), steps=tf.constant(steps, tf.int32))
        if not bool(out["finite"]):
            raise FloatingPointError("the prior produced NaN or Inf logits")
        return {**state, "codes": np.array(out["codes"]), "cache": out["cache"],
                "position": np.array(out["position"])}

    def decode_at(self, codes, num_codes) -> np.ndarray:
        tf = self.tf
        return self.signatures["decode_at"](
            codes=tf.constant(codes, tf.int32),
            num_codes=tf.constant(num_codes, tf.int32))["images"].numpy()

    def take(self, state: dict, rows) -> dict:
        """The rows `rows` of a state (the cache's batch axis is 2)."""
        rows = np.asarray(rows, np.int32)
        return {**{k: state[k][rows] for k in ("codes", "position", "seeds")},
                "cache": self.tf.gather(state["cache"], rows, axis=2)}

    def join(self, states: List[dict]) -> dict:
        return {**{k: np.concatenate([s[k] for s in states])
                   for k in ("codes", "position", "seeds")},
                "cache": self.tf.concat([s["cache"] for s in states], 2)}


def _seconds(fn, *args) -> float:
    start = time.monotonic()
    fn(*args)
    return time.monotonic() - start


def png_base64(image: np.ndarray) -> str:
    """float [H, W, C] in [0, 1] -> base64 PNG."""
    from PIL import Image

    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# ----------------------------------------------------------------------------- requests


def _field(body: dict, name: str, low, high, default=None, integer: bool = False,
           low_open: bool = False):
    """body[name] (or `default`), checked to be a JSON number (an integer if asked) in the
    range; RequestError naming the field, its value and the range otherwise."""
    value = body.get(name, default)
    shown = str if integer else (lambda v: f"{v:g}")
    expected = (f"expected {'an integer' if integer else 'a number'} in "
                f"{'(' if low_open else '['}{shown(low)}, {shown(high)}]")
    if value is None:
        raise RequestError(f"missing field {name!r}: {expected}")
    ok = (not isinstance(value, bool) and isinstance(value, (int, float))
          and (isinstance(value, int)  # Any size: no float conversion to overflow.
               or (math.isfinite(value) and (not integer or value.is_integer())))
          and (value > low if low_open else value >= low) and value <= high)
    if not ok:
        raise RequestError(f"{name}={json.dumps(value)}, {expected}")
    return int(value) if integer else float(value)


@dataclasses.dataclass(eq=False)
class AnytimeRequest:
    num_samples: int
    deadline: float        # time.monotonic() by which the answer must be out.
    seed: int
    temperature: float
    min_codes: int
    max_codes: int
    stream: bool
    arrived: float
    k: int = 0
    rows: Optional[List[int]] = None   # Its rows in the batch while it is being sampled.
    answered: Optional[float] = None   # When its final answer was ready to send.
    cancelled: bool = False
    done: Optional[asyncio.Future] = None
    events: Optional[asyncio.Queue] = None

    @classmethod
    def parse(cls, body, config: ServeConfig, code_length: int, now: float):
        if not isinstance(body, dict):
            raise RequestError(f"the body is {type(body).__name__}, expected a JSON object")
        known = {"num_samples", "deadline_ms", "seed", "temperature", "min_codes", "max_codes",
                 "stream"}
        unknown = sorted(set(body) - known)
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}, expected some of {sorted(known)}")
        max_codes = _field(body, "max_codes", 1, code_length, code_length, integer=True)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(f"stream={json.dumps(stream)}, expected true or false")
        return cls(num_samples=_field(body, "num_samples", 1, config.max_samples, integer=True),
                   deadline=now + _field(body, "deadline_ms", 0, 600_000, low_open=True) / 1e3,
                   seed=_field(body, "seed", 0, INT32_MAX, 0, integer=True),
                   temperature=_field(body, "temperature", 0, 100, 1.0, low_open=True),
                   min_codes=_field(body, "min_codes", 1, max_codes, 1, integer=True),
                   max_codes=max_codes, stream=stream, arrived=now)


# ----------------------------------------------------------------------------- metrics


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("ovqvae_requests", "Requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("ovqvae_request_seconds", "Request latency (seconds)",
                                 ["endpoint"], registry=r,
                                 buckets=(.01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30))
        self.codes = Histogram("ovqvae_anytime_codes", "Codes k of anytime answers",
                               registry=r, buckets=(1, 2, 4, 8, 16, 32, 48, 64, 128, 256))
        self.misses = Counter("ovqvae_deadline_misses", "Anytime answers after their deadline",
                              registry=r)
        self.batch_rows = Histogram("ovqvae_batch_rows", "Rows in a chunk call", registry=r,
                                    buckets=BUCKETS)
        self.queue_depth = Gauge("ovqvae_queue_depth", "Anytime requests waiting to join",
                                 registry=r)
        self.active_rows = Gauge("ovqvae_active_rows", "Rows being sampled", registry=r)
        self.chunk_seconds = Histogram("ovqvae_chunk_seconds", "Seconds per chunk call",
                                       registry=r, buckets=(.001, .005, .01, .025, .05, .1,
                                                            .25, .5, 1, 2.5))


# ----------------------------------------------------------------------------- scheduler


def bucket_for(rows: int) -> int:
    return next(b for b in BUCKETS if b >= rows)


class Scheduler:
    """Continuous batching of anytime requests over the SavedModel's begin/extend/decode_at."""

    def __init__(self, model: Model, config: ServeConfig, metrics: Metrics, pool):
        self.model, self.config, self.metrics, self.pool = model, config, metrics, pool
        self.costs = CostModel(quantile=config.cost_quantile)
        self.queue: List[AnytimeRequest] = []
        self.active: List[AnytimeRequest] = []
        self.state: Optional[dict] = None      # Rows of the active requests, then padding.
        self.wakeup = asyncio.Event()
        self.chunk_started: Optional[float] = None
        self.task: Optional[asyncio.Task] = None
        self.overhead = collections.deque([0.0], maxlen=64)  # Seconds of bookkeeping a step.
        # Seconds from an answer being ready to the handler sending it (the event loop's
        # delay): the margin every deadline keeps free.
        self.send_delays = collections.deque([config.deadline_margin_ms / 1e3], maxlen=256)
        self.margin = config.deadline_margin_ms / 1e3

    def sent(self, request: "AnytimeRequest") -> None:
        """Called by the handler as it sends a final answer: learns the sending margin and
        counts a deadline miss."""
        now = time.monotonic()
        if request.answered is not None:
            self.send_delays.append(now - request.answered)
            self.margin = max(self.config.deadline_margin_ms / 1e3,
                              float(np.quantile(self.send_delays, self.config.cost_quantile)))
        if now > request.deadline:
            self.metrics.misses.inc()

    # -- predictions

    def _active_rows(self) -> int:
        return sum(r.num_samples for r in self.active)

    def predicted_wait(self, request: AnytimeRequest, now: float) -> Optional[float]:
        """Seconds until `request` could have min_codes decoded, if it joined now."""
        rows = self._active_rows() + sum(r.num_samples for r in self.queue) + request.num_samples
        key = bucket_for(min(rows, self.config.max_batch))
        codes = self.costs.extend_seconds(key, request.min_codes)
        decode = self.costs.decode_seconds(key)
        if codes is None or decode is None:
            return None  # Nothing learnt yet: admit and learn.
        running = 0.0
        if self.chunk_started is not None:  # It joins after the chunk in flight.
            running = max(self.costs.extend_seconds(key, self.config.max_chunk)
                          - (now - self.chunk_started), 0.0)
        return running + codes + decode

    def admit(self, request: AnytimeRequest) -> None:
        """Queues a request or refuses it at once (RequestError 503)."""
        now = time.monotonic()
        if len(self.queue) >= self.config.max_queue:
            raise RequestError(f"the queue is full ({self.config.max_queue} requests); retry "
                               "later", 503, {"Retry-After": "1"})
        wait = self.predicted_wait(request, now)
        if wait is not None and now + wait > request.deadline - self.margin:
            raise RequestError(
                f"min_codes={request.min_codes} cannot be sampled and decoded before the "
                f"deadline: about {wait * 1e3:.0f} ms needed, "
                f"{(request.deadline - self.margin - now) * 1e3:.0f} ms left", 503,
                {"Retry-After": str(max(1, math.ceil(wait)))})
        request.done = asyncio.get_running_loop().create_future()
        if request.stream:
            request.events = asyncio.Queue()
        self.queue.append(request)
        self.metrics.queue_depth.set(len(self.queue))
        self.wakeup.set()

    # -- the loop

    def start(self):
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _run(self):
        while True:
            if not self.active and not self.queue:
                self.wakeup.clear()
                await self.wakeup.wait()
            try:
                await self._step()
            except Exception as e:  # A model failure fails its requests, not the server.
                for request in self.active + self.queue:
                    self._fail(request, e)
                self.active, self.queue, self.state = [], [], None
                self.metrics.active_rows.set(0)
                self.metrics.queue_depth.set(0)

    def _fail(self, request: AnytimeRequest, error: Exception):
        if request.done is not None and not request.done.done():
            request.done.set_exception(error)
        if request.events is not None:
            request.events.put_nowait(None)

    async def _step(self):
        now = time.monotonic()
        self.active = [r for r in self.active if not r.cancelled]  # Their rows are free.
        await self._join_waiting(now)
        await self._shrink()
        if not self.active:
            return
        self.overhead.append(time.monotonic() - now)  # Joining and shrinking, per step.
        reserve = float(np.quantile(self.overhead, 0.9))
        rows = self._active_rows()
        key = len(self.state["position"])
        # Whom the deadline stops now, and how long a chunk every other request affords.
        # The decode is budgeted at the size of the whole batch: requests that retire
        # together are decoded together.
        retire, steps = [], self.config.max_chunk
        for r in self.active:
            left = r.deadline - self.margin - time.monotonic() - reserve
            affordable = self.costs.affordable_codes(key, left, r.max_codes - r.k)
            if r.k >= r.min_codes and (affordable == 0 or r.k >= r.max_codes):
                retire.append(r)
            elif affordable is None:
                steps = 1  # Learning the costs of this batch size.
            else:
                steps = min(steps, max(affordable, r.min_codes - r.k))
        if retire:
            await self._retire(retire)
            return
        steps = max(1, min(steps, self.config.max_chunk))
        limits = np.zeros(key, np.int32)  # Free rows stay where they are.
        temperature = np.ones(key, np.float32)
        for r in self.active:
            limits[r.rows] = r.max_codes
            temperature[r.rows] = r.temperature
        self.chunk_started = time.monotonic()
        self.state = await self._call(self.model.extend, self.state, temperature, limits, steps)
        seconds = time.monotonic() - self.chunk_started
        self.chunk_started = None
        self.costs.observe_extend(key, steps, seconds)
        self.metrics.chunk_seconds.observe(seconds)
        self.metrics.batch_rows.observe(rows)
        position = self.state["position"]
        refined = []
        for r in self.active:
            k = int(position[r.rows[0]])
            if k != r.k:
                r.k = k
                if r.stream:
                    refined.append(r)
        finished = [r for r in self.active if r.k >= r.max_codes]
        if finished:
            await self._retire(finished)
        refined = [r for r in refined if r not in finished and not r.cancelled]
        if refined:
            await self._decode_and_send(refined, final=False)

    async def _join_waiting(self, now: float):
        joining = []
        capacity = self.config.max_batch - self._active_rows()
        while self.queue and self.queue[0].num_samples <= capacity:
            request = self.queue.pop(0)
            if request.cancelled:
                continue
            wait = self.predicted_wait(request, now)
            if wait is not None and now + wait > request.deadline - self.margin:
                self._fail(request, RequestError(
                    f"min_codes={request.min_codes} can no longer be sampled before the "
                    "deadline", 503, {"Retry-After": str(max(1, math.ceil(wait)))}))
                continue
            capacity -= request.num_samples
            joining.append(request)
        self.metrics.queue_depth.set(len(self.queue))
        if not joining:
            return
        taken = [i for r in self.active for i in r.rows]
        self.state = await self._call(self._place, self.state, taken, joining)
        self.active.extend(joining)
        self.metrics.active_rows.set(self._active_rows())

    def _place(self, state: Optional[dict], taken: List[int], joining) -> dict:
        """(Worker thread.) Gives each joining request free rows of `state`, growing it to a
        larger bucket when too few are free, and starts them: no codes, position 0, the
        request's own random streams. Rows in use stay where they are, so joining copies
        no cache unless the batch grows."""
        size = 0 if state is None else len(state["position"])
        needed = len(taken) + sum(r.num_samples for r in joining)
        if needed > size:
            fresh = self.model.begin(bucket_for(needed) - size, 0)
            state = fresh if state is None else self.model.join([state, fresh])
        free = sorted(set(range(len(state["position"]))) - set(taken))
        for r in joining:
            r.rows, free = free[:r.num_samples], free[r.num_samples:]
            start = self.model.begin(r.num_samples, r.seed)
            for part in ("codes", "position", "seeds"):
                state[part][r.rows] = start[part]
        return state

    async def _shrink(self):
        """Moves the active rows into the smallest bucket that holds them, when that is
        smaller than the batch and no request waits to join (it copies the cache, so not at
        every departure)."""
        if not self.active:
            self.state = None
            self.metrics.active_rows.set(0)
            return
        rows = [i for r in self.active for i in r.rows]
        size = bucket_for(len(rows))
        if self.queue or size >= len(self.state["position"]):
            return
        padding = [rows[0]] * (size - len(rows))  # Free rows: they never advance.
        self.state = await self._call(self.model.take, self.state, rows + padding)
        start = 0
        for r in self.active:
            r.rows = list(range(start, start + r.num_samples))
            start += r.num_samples
        self.metrics.active_rows.set(start)

    def _finish(self, state, requests, final: bool):
        """(Worker thread.) Decodes the requests' rows at their k and serialises what goes
        out: an event per streaming request, the answer body when final. Returns
        [(event bytes or None, body bytes or None)]. Its time is the decode cost the
        scheduler budgets for."""
        codes = state["codes"][[i for r in requests for i in r.rows]]
        images = self.model.decode_at(codes, [r.k for r in requests for _ in r.rows])
        out, at = [], 0
        for r in requests:
            c, im = codes[at:at + r.num_samples], images[at:at + r.num_samples]
            at += r.num_samples
            pngs = [png_base64(x) for x in im]
            elapsed = round((time.monotonic() - r.arrived) * 1e3, 2)
            event = body = None
            if r.stream:
                event = ("data: " + json.dumps({
                    "num_codes": r.k, "elapsed_ms": elapsed, "final": final,
                    "codes": c[:, :r.k].tolist(), "images": pngs}) + "\n\n").encode()
            if final:
                body = json.dumps({"num_codes": r.k, "codes": c.tolist(), "images": pngs,
                                   "elapsed_ms": elapsed}).encode()
            out.append((event, body))
        return out

    async def _decode_and_send(self, requests, final: bool):
        start = time.monotonic()
        finished = await self._call(self._finish, self.state, requests, final)
        self.costs.observe_decode(bucket_for(sum(r.num_samples for r in requests)),
                                  time.monotonic() - start)
        for r, (event, body) in zip(requests, finished):
            if event is not None:
                r.events.put_nowait(event)
            if final:
                self.metrics.codes.observe(r.k)
                r.answered = time.monotonic()
                if not r.done.done():
                    r.done.set_result(body)
                if r.stream:
                    r.events.put_nowait(None)

    async def _retire(self, requests: List[AnytimeRequest]):
        await self._decode_and_send(requests, final=True)
        self.active = [r for r in self.active if r not in requests]
        self.metrics.active_rows.set(self._active_rows())

    def in_flight(self) -> int:
        return len(self.active) + len(self.queue)


# ----------------------------------------------------------------------------- TF Serving REST

_DTYPES = {"int32": "DT_INT32", "float32": "DT_FLOAT", "bool": "DT_BOOL"}


def _spec_json(spec) -> dict:
    dims = [{"size": str(-1 if d is None else d)} for d in spec.shape]
    return {"dtype": _DTYPES.get(spec.dtype.name, spec.dtype.name), "name": spec.name,
            "tensor_shape": {"dim": dims, "unknown_rank": False}}


def signature_metadata(model: Model) -> dict:
    out = {}
    for name in PREDICT_SIGNATURES:
        fn = model.signatures[name]
        out[name] = {"inputs": {k: _spec_json(v) for k, v in
                                fn.structured_input_signature[1].items()},
                     "outputs": {k: _spec_json(v) for k, v in fn.structured_outputs.items()},
                     "method_name": "tensorflow/serving/predict"}
    return out


def predict_inputs(model: Model, signature: str, inputs, max_samples: int) -> dict:
    """Checks a :predict body's "inputs" against the signature: every input present, of the
    right rank, dims and dtype, finite, at most `max_samples` samples or rows. Returns
    tensors."""
    tf = model.tf
    specs = model.signatures[signature].structured_input_signature[1]
    if not isinstance(inputs, dict):
        raise RequestError(f'"inputs" is {type(inputs).__name__}, expected an object with '
                           f"{sorted(specs)} (the columnar format)")
    missing, unknown = sorted(set(specs) - set(inputs)), sorted(set(inputs) - set(specs))
    if missing or unknown:
        raise RequestError(f"signature {signature!r} takes inputs {sorted(specs)}; missing "
                           f"{missing}, unknown {unknown}")
    tensors = {}
    for name, spec in specs.items():
        expected = f"{spec.dtype.name} of shape {[-1 if d is None else d for d in spec.shape]}"
        try:
            value = np.asarray(inputs[name], dtype=np.float64)
        except (TypeError, ValueError, OverflowError):
            raise RequestError(f"input {name!r} is not numbers of one shape; expected "
                               f"{expected}") from None
        if value.ndim != spec.shape.rank or any(
                d is not None and d != n for d, n in zip(spec.shape.as_list(), value.shape)):
            raise RequestError(f"input {name!r} has shape {list(value.shape)}, expected {expected}")
        if not np.isfinite(value).all():
            raise RequestError(f"input {name!r} holds NaN or Inf")
        if spec.dtype.is_integer and ((value != np.round(value)).any()
                                      or np.abs(value).max(initial=0) > INT32_MAX):
            raise RequestError(f"input {name!r} must hold 32-bit integers; expected {expected}")
        rows = int(value) if name == "num_samples" else (len(value) if value.ndim else 1)
        if rows > max_samples:
            raise RequestError(f"input {name!r} asks for {rows} samples or rows, expected at "
                               f"most {max_samples}", 413)
        tensors[name] = tf.constant(value, spec.dtype)
    return tensors


# ----------------------------------------------------------------------------- the app


class Server:
    def __init__(self, config: ServeConfig, model: Optional[Model] = None):
        self.config = config
        self.model = model or Model(config.saved_model)
        self.metrics = Metrics()
        self.pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ovqvae-model")
        self.scheduler: Optional[Scheduler] = None
        self.draining = False
        self.in_flight = 0
        self.metadata = signature_metadata(self.model)
        self.page = page(config.model_name, self.model.code_length)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._errors])
        name = self.config.model_name
        app.router.add_get("/", self.index)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get(f"/v1/models/{name}", self.status)
        app.router.add_get(f"/v1/models/{name}/metadata", self.model_metadata)
        app.router.add_post(f"/v1/models/{name}:predict", self.predict)
        app.router.add_post(f"/v1/models/{name}:anytime", self.anytime)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    async def _start(self, app):
        self.scheduler = Scheduler(self.model, self.config, self.metrics, self.pool)
        await asyncio.get_running_loop().run_in_executor(self.pool, self.warm_up)
        self.scheduler.start()

    def warm_up(self):
        """Compiles every batch bucket before the port opens and times it, so that the first
        requests are admitted and paced on measured costs. Each time kept is the best of 3:
        a stall while warming up is not a cost (the serving loop then learns the tail)."""
        model, costs = self.model, self.scheduler.costs
        for rows in (b for b in BUCKETS if b <= bucket_for(self.config.max_batch)):
            start = time.monotonic()
            state = model.begin(rows, 0)
            ones, limit = np.ones(rows, np.float32), np.full(rows, model.code_length, np.int32)
            model.extend(state, ones, limit, 1)  # Compiles.
            for steps in (1, 1, self.config.max_chunk, self.config.max_chunk):
                costs.observe_extend(rows, steps, min(_seconds(
                    model.extend, model.begin(rows, 0), ones, limit, steps) for _ in range(3)))
            codes, ks = np.asarray(state["codes"]), np.ones(rows, np.int32)

            def answer():  # Decoding and encoding an answer, as _finish does.
                return [png_base64(x) for x in model.decode_at(codes, ks)]

            for _ in range(2):
                costs.observe_decode(rows, min(_seconds(answer) for _ in range(3)))
            print(f"[serve] batch size {rows:3d} compiled and timed in "
                  f"{time.monotonic() - start:.1f} s", flush=True)

    async def _stop(self, app):
        if self.scheduler and self.scheduler.task:
            self.scheduler.task.cancel()
        self.pool.shutdown(wait=False, cancel_futures=True)

    @web.middleware
    async def _errors(self, request, handler):
        """Counts and times every request; turns errors into a status and {"error": ...}."""
        endpoint = request.match_info.route.resource.canonical if request.match_info.route \
            .resource else "unknown"
        start = time.monotonic()
        self.in_flight += 1
        try:
            if self.draining and request.method == "POST":
                raise RequestError("the server is shutting down; retry on another replica",
                                   503, {"Retry-After": "1"})
            response = await handler(request)
        except RequestError as e:
            response = web.json_response({"error": str(e)}, status=e.status, headers=e.headers)
        except web.HTTPException as e:  # Unknown paths, methods, bodies over the limit.
            response = web.json_response({"error": e.text or e.reason}, status=e.status)
        except FloatingPointError as e:
            response = web.json_response({"error": str(e)}, status=500)
        finally:
            self.in_flight -= 1
        self.metrics.requests.labels(endpoint, str(response.status)).inc()
        self.metrics.latency.labels(endpoint).observe(time.monotonic() - start)
        return response

    async def _json(self, request) -> object:
        try:
            return await request.json(loads=_strict_loads)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the body is not valid JSON ({e})") from None

    async def index(self, request):
        return web.Response(text=self.page, content_type="text/html")

    async def prometheus(self, request):
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def status(self, request):
        return web.json_response({"model_version_status": [{
            "version": "1", "state": "AVAILABLE",
            "status": {"error_code": "OK", "error_message": ""}}]})

    async def model_metadata(self, request):
        return web.json_response({
            "model_spec": {"name": self.config.model_name, "signature_name": "", "version": "1"},
            "metadata": {"signature_def": {"signature_def": self.metadata}}})

    async def predict(self, request):
        body = await self._json(request)
        if not isinstance(body, dict):
            raise RequestError(f"the body is {type(body).__name__}, expected a JSON object")
        unknown = sorted(set(body) - {"signature_name", "inputs"})
        if unknown:
            raise RequestError(f"unknown field(s) {unknown}; expected signature_name and "
                               "inputs (the columnar format)")
        signature = body.get("signature_name", "sample")
        if signature not in PREDICT_SIGNATURES:
            raise RequestError(f"signature_name={json.dumps(signature)}, expected one of "
                               f"{list(PREDICT_SIGNATURES)}")
        if "inputs" not in body:
            raise RequestError('missing field "inputs"')
        tensors = predict_inputs(self.model, signature, body["inputs"], self.config.max_samples)
        function = self.model.signatures[signature]

        def run():
            try:
                return {k: v.numpy().tolist() for k, v in function(**tensors).items()}
            except self.model.tf.errors.InvalidArgumentError as e:
                raise RequestError(op_error_text(e)) from None

        outputs = await asyncio.get_running_loop().run_in_executor(self.pool, run)
        return web.json_response({"outputs": outputs})

    async def anytime(self, request):
        now = time.monotonic()
        body = await self._json(request)
        job = AnytimeRequest.parse(body, self.config, self.model.code_length, now)
        self.scheduler.admit(job)
        if not job.stream:
            try:
                answer = await job.done
                self.scheduler.sent(job)
                return web.Response(body=answer, content_type="application/json")
            finally:
                job.cancelled = True  # A client that left frees its rows.
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        try:
            while True:
                event = await job.events.get()
                if event is None:
                    break
                await response.write(event)
            if job.answered is not None:
                self.scheduler.sent(job)
            if job.done.done() and job.done.exception() is not None:
                error = job.done.exception()
                await response.write(f"data: {json.dumps({'error': str(error)})}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            job.cancelled = True
            raise
        finally:
            job.cancelled = True
        return response

    # -- SIGTERM

    async def drain(self, runner: web.AppRunner):
        """New requests get 503; those in flight finish (up to drain_seconds); then stop."""
        self.draining = True
        give_up = time.monotonic() + self.config.drain_seconds
        while (self.in_flight or self.scheduler.in_flight()) and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        await runner.cleanup()


def _strict_loads(text: str):
    """json.loads that refuses NaN and Infinity (not JSON)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    return json.loads(text, parse_constant=refuse)


async def _serve(config: ServeConfig):
    server = Server(config)
    runner = web.AppRunner(server.app(), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal():
        loop.create_task(server.drain(runner)).add_done_callback(lambda _: stopped.set())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    port = runner.addresses[0][1]  # The bound port, also when asked for port 0.
    print(f"[serve] {config.saved_model} as model {config.model_name!r} on "
          f"http://{config.host}:{port}/ (K={server.model.code_length})", flush=True)
    await stopped.wait()
    print("[serve] drained and stopped", flush=True)


def serve(config: ServeConfig) -> None:
    """Runs the server until SIGTERM or SIGINT."""
    asyncio.run(_serve(config))
