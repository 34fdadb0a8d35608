"""TF Serving's gRPC API (`tensorflow-serving-api`) on the same engines as the REST API:
`PredictionService.Predict` and `GetModelMetadata`, `ModelService.GetModelStatus`, tensors
as `TensorProto`. It runs on the server's event loop (`grpc.aio`).

`Predict` takes the SavedModel's signatures (`sample`, `decode`, `encode`) and one more,
`anytime`: inputs `num_samples` and optionally `seed`, `temperature`, `min_codes`,
`max_codes`, `min_psnr`, `min_fd_ratio` (scalars; the last two a quality floor planned with
the model's profile), and the call's own deadline as the anytime deadline: a call made
with `stub.Predict(request, timeout=0.05)` gets the best sample that fits 50 ms (the
server keeps its sending margin free). Outputs: `codes` int32 [n, K], `num_codes` int32,
`images` float32 [n, H, W, C].
"""

from __future__ import annotations

import time

import grpc
import numpy as np
from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                     model_service_pb2_grpc, predict_pb2,
                                     prediction_service_pb2_grpc)

from pipeline.serving import protocol
from pipeline.serving import quality as floors
from pipeline.serving.jobs import CallJob, ClientGone, Overloaded, SampleJob
from pipeline.serving.protocol import RequestError

STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND,
                413: grpc.StatusCode.RESOURCE_EXHAUSTED, 503: grpc.StatusCode.UNAVAILABLE}
ANYTIME_INPUTS = ("num_samples", "seed", "temperature", "min_codes", "max_codes",
                  "min_psnr", "min_fd_ratio")


def _tensor(value):
    import tensorflow as tf

    return tf.make_tensor_proto(np.asarray(value))


def _outputs(arrays: dict) -> predict_pb2.PredictResponse:
    response = predict_pb2.PredictResponse()
    for name, value in arrays.items():
        response.outputs[name].CopyFrom(_tensor(value))
    return response


def _render_sample(job, codes, images, final):
    return None, _outputs({"codes": codes, "images": images})


def _render_anytime(job, codes, images, final):
    return None, _outputs({"codes": codes, "num_codes": np.int32(job.k), "images": images})


class _Calls:
    """What both services share: finding the version a ModelSpec names, and turning the
    server's errors into gRPC status codes."""

    def __init__(self, server):
        self.server = server

    def version(self, spec):
        label = spec.version_label or None
        number = str(spec.version.value) if spec.HasField("version") else None
        if spec.name != self.server.config.model_name:
            raise RequestError(f"Servable not found for request: Latest({spec.name})", 404)
        return self.server.versions.resolve(number, label)

    async def run(self, context, work):
        try:
            return await work()
        except RequestError as e:
            await context.abort(STATUS_CODES.get(e.status, grpc.StatusCode.UNKNOWN), str(e))
        except Overloaded as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(e))
        except ClientGone:
            await context.abort(grpc.StatusCode.CANCELLED, "the client left")


class PredictionService(_Calls, prediction_service_pb2_grpc.PredictionServiceServicer):
    async def Predict(self, request, context):
        return await self.run(context, lambda: self._predict(request, context))

    async def _predict(self, request, context):
        import tensorflow as tf

        now = time.monotonic()
        if self.server.draining:
            raise RequestError("the server is shutting down; retry on another replica", 503)
        version = self.version(request.model_spec)
        signature = request.model_spec.signature_name or "sample"
        values = {k: tf.make_ndarray(v) for k, v in request.inputs.items()}
        model, server = version.model, self.server
        quality = None
        if signature == "anytime":
            job, quality = self._anytime_job(values, context, now, model)
        else:
            body = {"signature_name": signature, "inputs": {k: v.tolist()
                                                            for k, v in values.items()}}
            signature, inputs, _ = protocol.predict_inputs(
                body, version.specs, server.config.max_samples, model.code_length,
                model.codebook_size)
            if signature == "sample":
                k = int(inputs["num_codes"])
                job = SampleJob(int(inputs["num_samples"]), int(inputs["seed"]),
                                float(inputs["temperature"]), k, k, render=_render_sample,
                                gone=context.cancelled)
            else:
                job = CallJob(signature, len(next(v for v in inputs.values() if v.ndim)),
                              run=lambda: server._call(model, signature, inputs, _outputs),
                              gone=context.cancelled)
        response = await self._answer(version, job, quality)
        response.model_spec.name = server.config.model_name
        response.model_spec.signature_name = signature
        response.model_spec.version.value = version.number
        return response

    def _anytime_job(self, values, context, now, model):
        remaining = context.time_remaining()
        if remaining is None:
            raise RequestError("the anytime signature takes the call's deadline as its own: "
                               "call with a timeout (stub.Predict(request, timeout=0.05))")
        unknown = sorted(set(values) - set(ANYTIME_INPUTS))
        if unknown:
            raise RequestError(f"unknown input(s) {unknown} of signature 'anytime', expected "
                               f"some of {list(ANYTIME_INPUTS)}")
        body = {k: v.item() for k, v in values.items()}
        floor = {name: body.pop(key) for key, name in (("min_psnr", "psnr"),
                                                        ("min_fd_ratio", "fd_ratio"))
                 if key in body}
        if floor:
            body["min_quality"] = floor
        fields = protocol.anytime_fields({**body, "deadline_ms": remaining * 1e3},
                                         self.server.config.max_samples, model.code_length)
        quality, min_codes = fields["min_quality"], floors.min_codes(model.profile, fields)
        job = SampleJob(fields["num_samples"], fields["seed"], fields["temperature"],
                        min_codes, fields["max_codes"], render=_render_anytime,
                        deadline=now + remaining, gone=context.cancelled, arrived=now)
        return job, quality

    @staticmethod
    async def _answer(version, job, quality=None):
        result = await version.run(job, quality)
        if isinstance(job, SampleJob) and job.has_deadline:
            version.engine.sent(job)
        return result

    async def GetModelMetadata(self, request, context):
        return await self.run(context, lambda: self._metadata(request))

    async def _metadata(self, request):
        version = self.version(request.model_spec)
        if list(request.metadata_field) != ["signature_def"]:
            raise RequestError(f"metadata_field {list(request.metadata_field)}, expected "
                               "['signature_def']")
        signatures = get_model_metadata_pb2.SignatureDefMap()
        for name, definition in version.signature_defs.items():
            signatures.signature_def[name].CopyFrom(definition)
        response = get_model_metadata_pb2.GetModelMetadataResponse()
        response.model_spec.name = self.server.config.model_name
        response.model_spec.version.value = version.number
        response.metadata["signature_def"].Pack(signatures)
        return response


class ModelService(_Calls, model_service_pb2_grpc.ModelServiceServicer):
    async def GetModelStatus(self, request, context):
        return await self.run(context, lambda: self._status(request))

    async def _status(self, request):
        spec = request.model_spec
        if spec.name != self.server.config.model_name:
            raise RequestError(f"Could not find any versions of model {spec.name}", 404)
        statuses = self.server.versions.statuses(
            str(spec.version.value) if spec.HasField("version") else None,
            spec.version_label or None)
        response = get_model_status_pb2.GetModelStatusResponse()
        states = get_model_status_pb2.ModelVersionStatus.State
        for status in statuses:
            entry = response.model_version_status.add()
            entry.version = int(status["version"])
            entry.state = states.Value("UNLOADING" if self.server.draining
                                       else status["state"])
            entry.status.error_code = 0 if status["status"]["error_code"] == "OK" else 2
            entry.status.error_message = status["status"]["error_message"]
        return response


async def start(server, host: str, port: int):
    """A started grpc.aio server for `server`'s versions; returns (it, the bound port)."""
    grpc_server = grpc.aio.server()
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(
        PredictionService(server), grpc_server)
    model_service_pb2_grpc.add_ModelServiceServicer_to_server(ModelService(server),
                                                              grpc_server)
    bound = grpc_server.add_insecure_port(f"{host}:{port}")
    await grpc_server.start()
    return grpc_server, bound
