"""The HTTP app: routes, body limits, timeouts, errors, access logs and the lifecycle (load,
warm up, serve, drain, stop). Request checks live in `protocol`, the model's work in
`engine`; this module only wires them to aiohttp.

aiohttp is the HTTP stack: a maintained asyncio server that streams responses and exposes
its connections' lifecycle. The model runs in the engine's worker thread; large :predict
bodies are parsed in a worker process (a JSON parse holds the GIL, so a thread would still
stall the event loop); nothing else of size runs on the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import multiprocessing
import signal
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Optional

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ordered_vqvae.validation import op_error_text
from pipeline.page import page
from pipeline.serving import protocol
from pipeline.serving import quality as floors
from pipeline.serving.config import ServeConfig
from pipeline.serving.engine import CallJob, ClientGone, Engine, Overloaded, SampleJob
from pipeline.serving.metrics import Metrics
from pipeline.serving.model import PREDICT_SIGNATURES, Model
from pipeline.serving.protocol import RequestError
from pipeline.serving.versions import Versions

INLINE_PARSE_BYTES = 64 << 10  # Bodies up to this size are parsed on the event loop.
CLIENT_GONE = 499  # nginx's status for "the client closed the request", in logs and metrics.

log = logging.getLogger("ovqvae.serve")


# ----------------------------------------------------------------------------- logs


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "message": record.getMessage(), **getattr(record, "fields", {})}
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(log_format: str) -> None:
    """One handler on stdout: "[serve] message" lines, or one JSON object per line."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_JsonFormatter() if log_format == "json"
                         else logging.Formatter("[serve] %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False
    # aiohttp's own loggers would print a traceback for every client that misbehaves.
    for name in ("aiohttp.server", "aiohttp.access", "aiohttp.web"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


# ----------------------------------------------------------------------------- errors


def json_error(message: str, status: int, headers: Optional[dict] = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


class _JsonErrorHandler(RequestHandler):
    """aiohttp answers requests it cannot parse (bad request lines, headers over the size
    limit) before any middleware runs, in plain text; this answers them as {"error": ...}
    and counts them."""

    __slots__ = ()
    metrics: Optional[Metrics] = None

    def handle_error(self, request, status=500, exc=None, message=None):
        if status >= 500:
            log.error("%d while reading a request: %r", status, exc, exc_info=exc)
        reason = str(getattr(exc, "message", None) or message or "unreadable")
        response = json_error(f"the request could not be parsed ({reason[:160]})", status)
        response.force_close()
        if _JsonErrorHandler.metrics is not None:
            _JsonErrorHandler.metrics.requests.labels("unparsed", str(status)).inc()
        return response


class _Runner(web.AppRunner):
    async def _make_server(self):
        server = await super()._make_server()
        server.__class__ = _JsonErrorServer
        return server


class _JsonErrorServer(web.Server):
    def __call__(self):
        handler = super().__call__()
        handler.__class__ = _JsonErrorHandler  # Same slots: only handle_error differs.
        return handler


def _gone(request):
    """Whether the request's client has closed its connection."""
    def gone() -> bool:
        transport = request.transport
        return transport is None or transport.is_closing()
    return gone


# ----------------------------------------------------------------------------- the app


class Server:
    def __init__(self, config: ServeConfig):
        self.config = config
        self.metrics = Metrics()
        self.parsers: Optional[ProcessPoolExecutor] = None
        self.draining = False
        self.in_flight = 0
        self.versions = Versions(config.model_base_path, config.saved_model,
                                 config.model_version_policy, config.labels,
                                 self._load_version, self._unload_version, log.info)
        self.page: Optional[str] = None
        self.poller: Optional[asyncio.Task] = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes,
                              middlewares=[self._middleware])
        base = f"/v1/models/{self.config.model_name}"
        app.router.add_get("/", self.index)
        app.router.add_get("/metrics", self.prometheus)
        for prefix in (base, base + r"/versions/{version:\d+}", base + "/labels/{label:[^/:]+}"):
            app.router.add_get(prefix, self.status)
            app.router.add_get(prefix + "/metadata", self.model_metadata)
            app.router.add_get(prefix + "/profile", self.quality_profile)
            app.router.add_post(prefix + ":predict", self.predict)
            app.router.add_post(prefix + ":anytime", self.anytime)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)
        return app

    def runner(self) -> web.AppRunner:
        _JsonErrorHandler.metrics = self.metrics
        # keepalive_timeout also closes a connection whose request headers are not complete
        # by then (aiohttp arms it when the connection opens); lingering_time bounds how
        # long the unread rest of a refused body is drained before the connection closes.
        return _Runner(self.app(), handle_signals=False, access_log=None,
                       keepalive_timeout=self.config.header_timeout_s, lingering_time=1.0,
                       shutdown_timeout=1.0)

    async def _start(self, app):
        loop = asyncio.get_running_loop()
        # Spawned, not forked: the parent has TensorFlow's threads.
        self.parsers = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        await loop.run_in_executor(self.parsers, protocol.parse_json, b"{}")  # Starts it.
        await self.versions.refresh()
        if self.config.model_base_path:
            self.poller = loop.create_task(
                self.versions.poll(self.config.file_system_poll_wait_seconds))

    async def _stop(self, app):
        if self.poller is not None:
            self.poller.cancel()
        for version in self.versions.versions.values():
            if version.engine is not None:
                await version.engine.stop()
        if self.parsers is not None:
            self.parsers.shutdown(wait=False, cancel_futures=True)

    async def _load_version(self, version) -> None:
        """Loads a version's SavedModel and compiles and times its programs (its engine's
        warm-up) before it takes traffic."""
        model = await asyncio.to_thread(Model, version.path)
        engine = Engine(model, self.config, self.metrics)
        await asyncio.get_running_loop().run_in_executor(
            engine.pool, engine.warm_up, self._render_anytime,
            lambda message: log.info("version %d: %s", version.number, message))
        engine.start()
        version.specs = model.input_specs()
        version.metadata = protocol.signature_metadata(model.signatures, PREDICT_SIGNATURES)
        version.signature_defs = await asyncio.to_thread(model.signature_defs,
                                                         PREDICT_SIGNATURES)
        version.model, version.engine = model, engine
        if self.page is None:
            self.page = page(self.config.model_name, model.code_length)

    @staticmethod
    async def _unload_version(version) -> None:
        await version.engine.stop()

    def busy(self) -> bool:
        return any(v.engine is not None and v.engine.busy()
                   for v in self.versions.versions.values())

    # -- every request

    @web.middleware
    async def _middleware(self, request, handler):
        """Counts, times and logs every request; turns errors into a status and
        {"error": ...}. A 500 is a bug: logged once with its traceback."""
        resource = request.match_info.route.resource
        endpoint = resource.canonical if resource is not None else "unknown"
        start = time.monotonic()
        request["log"] = fields = {}
        self.in_flight += 1
        try:
            if self.draining and request.method == "POST":
                raise RequestError("the server is shutting down; retry on another replica",
                                   503, {"Retry-After": "1"})
            response = await handler(request)
        except RequestError as e:
            response = json_error(str(e), e.status, e.headers)
            if e.status in (408, 413):  # The rest of the body is not worth reading.
                response.force_close()
        except Overloaded as e:
            response = json_error(str(e), 503,
                                  {"Retry-After": str(max(1, math.ceil(e.retry_after)))})
        except (ClientGone, ConnectionError):  # Nobody is left to read the answer.
            response = json_error("the client left", CLIENT_GONE)
            fields["gone"] = True
        except web.HTTPException as e:  # Unknown paths, methods.
            kept = {k: v for k, v in e.headers.items() if k in ("Allow", "Retry-After")}
            response = json_error(e.text or e.reason, e.status, kept)
        except Exception as e:
            log.exception("500 on %s %s", request.method, request.path)
            response = json_error(f"internal error ({type(e).__name__}: {e})", 500)
        finally:
            self.in_flight -= 1
        status = CLIENT_GONE if fields.get("gone") else response.status
        seconds = time.monotonic() - start
        self.metrics.requests.labels(endpoint, str(status)).inc()
        if status == CLIENT_GONE:
            self.metrics.gone.inc()
        self.metrics.latency.labels(endpoint).observe(seconds)
        self._log_access(request, status, seconds, fields)
        return response

    def _log_access(self, request, status, seconds, fields):
        shown = {k: v for k, v in fields.items() if k != "gone"}
        text = " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in shown.items())
        note = " (the client left)" if status == CLIENT_GONE else ""
        log.info("%s %s %d %.1f ms%s%s", request.method, request.path, status, seconds * 1e3,
                 " " + text if text else "", note,
                 extra={"fields": {"event": "request", "method": request.method,
                                   "path": request.path, "status": status,
                                   "ms": round(seconds * 1e3, 2), **shown}})

    async def _body(self, request, limit: int) -> bytes:
        """The body, at most `limit` bytes (413), within body_timeout_s (408), UTF-8."""
        charset = request.charset
        if charset is not None and charset.lower() not in ("utf-8", "utf8"):
            raise RequestError(f"charset={charset!r}, expected utf-8", 415)
        if request.content_length is not None and request.content_length > limit:
            raise RequestError(f"the body has {request.content_length} bytes, expected at "
                               f"most {limit}", 413)
        chunks, size = [], 0
        try:
            async with asyncio.timeout(self.config.body_timeout_s):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise RequestError(f"the body has more than {limit} bytes, expected "
                                           f"at most {limit}", 413)
                    chunks.append(chunk)
        except TimeoutError:
            raise RequestError(f"the body did not arrive within {self.config.body_timeout_s:g}"
                               " s", 408) from None
        except (HttpProcessingError, RequestPayloadError) as e:  # A lying Content-Encoding,
            message = getattr(e, "message", None) or str(e)      # a broken chunk.
            raise RequestError(f"the body could not be read ({' '.join(message.split())})"
                               ) from None
        return b"".join(chunks)

    # -- routes

    async def index(self, request):
        if self.page is None:
            raise RequestError("no version of the model is available yet", 503,
                               {"Retry-After": "1"})
        return web.Response(text=self.page, content_type="text/html")

    async def prometheus(self, request):
        return web.Response(body=generate_latest(self.metrics.registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    def _version(self, request):
        """The version a request's URL names (the highest available when it names none)."""
        version = self.versions.resolve(request.match_info.get("version"),
                                        request.match_info.get("label"))
        request["log"]["version"] = version.number
        return version

    async def status(self, request):
        statuses = self.versions.statuses(request.match_info.get("version"),
                                          request.match_info.get("label"))
        if self.draining:
            statuses = [{**s, "state": "UNLOADING", "status": {
                "error_code": "UNAVAILABLE", "error_message": "the server is draining"}}
                for s in statuses]
        ready = not self.draining and any(s["state"] == "AVAILABLE" for s in statuses)
        return web.json_response({"model_version_status": statuses},
                                 status=200 if ready else 503)

    async def model_metadata(self, request):
        version = self._version(request)
        return web.json_response({
            "model_spec": {"name": self.config.model_name, "signature_name": "",
                           "version": str(version.number)},
            "metadata": {"signature_def": {"signature_def": version.metadata},
                         "quality_profile": version.model.profile}})

    async def quality_profile(self, request):
        version = self._version(request)
        return web.json_response({"model_spec": {"name": self.config.model_name,
                                                 "version": str(version.number)},
                                  "quality_profile": version.model.profile})

    @staticmethod
    def _render_anytime(job, codes, images, final):
        return protocol.render_anytime(job.k, round((time.monotonic() - job.arrived) * 1e3, 2),
                                       codes, images, job.stream, final)

    @staticmethod
    def _render_sample(job, codes, images, final):
        return None, protocol.render_outputs({"codes": codes, "images": images})

    async def predict(self, request):
        raw = await self._body(request, self.config.max_body_bytes)
        version = self._version(request)
        model = version.model
        args = (raw, version.specs, self.config.max_samples, model.code_length,
                model.codebook_size)
        if len(raw) <= INLINE_PARSE_BYTES:
            parsed = protocol.parse_predict(*args)
        else:
            parsed = await asyncio.get_running_loop().run_in_executor(
                self.parsers, protocol.parse_predict, *args)
        if parsed[0] == "error":
            raise RequestError(parsed[1], parsed[2])
        _, signature, inputs, rows = parsed
        request["log"]["signature"] = signature
        if signature == "sample":  # Scalar inputs only: never rows.
            k = int(inputs["num_codes"])
            request["log"]["k"] = k
            job = SampleJob(int(inputs["num_samples"]), int(inputs["seed"]),
                            float(inputs["temperature"]), k, k, render=self._render_sample,
                            gone=_gone(request))
        else:
            render = protocol.render_predictions if rows else protocol.render_outputs
            job = CallJob(signature, len(next(v for v in inputs.values() if v.ndim)),
                          run=lambda: self._call(model, signature, inputs, render),
                          gone=_gone(request))
        return await self._answer(version, job, request)

    @staticmethod
    async def _answer(version, job, request, quality=None):
        return web.Response(body=await version.run(job, quality),
                            content_type="application/json")

    @staticmethod
    def _call(model, signature, inputs, render) -> bytes:
        try:
            return render(model.call(signature, inputs))
        except model.tf.errors.InvalidArgumentError as e:
            raise RequestError(op_error_text(e)) from None

    async def anytime(self, request):
        now = time.monotonic()
        body = protocol.parse_json(await self._body(request,
                                                    self.config.max_anytime_body_bytes))
        version = self._version(request)
        fields = protocol.anytime_fields(body, self.config.max_samples,
                                         version.model.code_length)
        request["log"]["deadline_ms"] = fields["deadline_ms"]
        quality, min_codes = fields["min_quality"], floors.min_codes(version.model.profile,
                                                                     fields)
        if quality is not None:
            request["log"]["min_codes"] = min_codes
        job = SampleJob(fields["num_samples"], fields["seed"], fields["temperature"],
                        min_codes, fields["max_codes"], render=self._render_anytime,
                        deadline=now + fields["deadline_ms"] / 1e3, stream=fields["stream"],
                        gone=_gone(request), arrived=now)
        if not job.stream:
            response = await self._answer(version, job, request, quality)
            version.engine.sent(job)
            request["log"]["k"] = job.k
            return response
        version.in_flight += 1
        try:
            return await self._stream(version, job, request, quality)
        finally:
            version.in_flight -= 1

    async def _stream(self, version, job, request, quality):
        floors.submit(version.engine, job, version.model.profile, quality)
        started = await job.started  # A refusal before the first code is still a 503.
        if isinstance(started, Exception):
            raise started
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            while (event := await job.events.get()) is not None:
                await response.write(event)
        except ConnectionError:  # The client left mid-stream; the engine drops its rows.
            request["log"]["gone"] = True
            return response
        result = job.done.result() if job.done.done() else None
        if isinstance(result, ClientGone):
            request["log"]["gone"] = True
        elif isinstance(result, Exception):  # After a 200: the error goes in the stream.
            await response.write(f"data: {json.dumps({'error': str(result)})}\n\n".encode())
        else:
            version.engine.sent(job)
        request["log"]["k"] = job.k
        return response

    # -- SIGTERM

    async def drain(self, runner: web.AppRunner):
        """Reports UNLOADING (503) at once, refuses new work, lets requests in flight finish
        for up to drain_seconds, then closes every connection left."""
        self.draining = True
        log.info("draining: requests in flight finish (up to %g s), new ones get 503",
                 self.config.drain_seconds)
        give_up = time.monotonic() + self.config.drain_seconds
        while (self.in_flight or self.busy()) and time.monotonic() < give_up:
            await asyncio.sleep(0.02)
        if self.in_flight or self.busy():
            log.info("drain time over: closing %d request(s) still in flight", self.in_flight)
        await runner.cleanup()


async def _serve(config: ServeConfig):
    server = Server(config)
    runner = server.runner()
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port)
    await site.start()
    stopped = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal():
        if not server.draining:
            loop.create_task(server.drain(runner)).add_done_callback(lambda _: stopped.set())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    grpc_server = None
    if config.grpc_port:
        from pipeline.serving import grpc_service

        grpc_server, grpc_port = await grpc_service.start(server, config.host, config.grpc_port)
        log.info("gRPC (TF Serving's PredictionService, ModelService) on %s:%d", config.host,
                 grpc_port)
    port = runner.addresses[0][1]  # The bound port, also when asked for port 0.
    log.info("%s as model %r on http://%s:%d/ (versions %s)",
             config.saved_model or config.model_base_path, config.model_name, config.host,
             port, [v.number for v in server.versions.available()])
    await stopped.wait()
    if grpc_server is not None:
        await grpc_server.stop(1.0)
    log.info("drained and stopped")


def serve(config: ServeConfig) -> None:
    """Runs the server until SIGTERM or SIGINT."""
    configure_logging(config.log_format)
    asyncio.run(_serve(config))
