"""What crosses the wire: request bodies checked once for both endpoints, answers rendered,
and TF Serving's formats. Pure Python and NumPy (no TensorFlow, no HTTP), so that a large
body can be parsed in another process.

Every check raises `RequestError` naming the field, its value and what is allowed.
"""

from __future__ import annotations

import base64
import io
import json
import math
from typing import Dict, Optional, Tuple

import numpy as np

INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)
ANYTIME_FIELDS = ("num_samples", "deadline_ms", "seed", "temperature", "min_codes",
                  "max_codes", "stream", "min_quality")
QUALITY_RANGES = {"psnr": (0, 200), "fd_ratio": (1, 1e6)}


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, message: str, status: int = 400, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


# ----------------------------------------------------------------------------- JSON


def parse_json(raw: bytes) -> object:
    """UTF-8 JSON (NaN and Infinity refused) -> Python objects, or RequestError."""
    def refuse(constant):
        raise ValueError(f"{constant} is not valid JSON")

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=refuse)
    except UnicodeDecodeError as e:
        raise RequestError(f"the body is not UTF-8 ({e})") from None
    except RecursionError:
        raise RequestError("the body is nested too deeply to be a request") from None
    except ValueError as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None


def number(name: str, value, low, high, integer: bool = False, low_open: bool = False,
           status: int = 400):
    """`value`, checked to be a JSON number (an integer if asked) in the range; RequestError
    (with `status`) naming the field, its value and the range otherwise."""
    shown = str if integer else (lambda v: f"{v:g}")
    expected = (f"expected {'an integer' if integer else 'a number'} in "
                f"{'(' if low_open else '['}{shown(low)}, {shown(high)}]")
    if value is None:
        raise RequestError(f"missing field {name!r}: {expected}")
    typed = (not isinstance(value, bool) and isinstance(value, (int, float))
             and (isinstance(value, int)  # Any size: no float conversion to overflow.
                  or (math.isfinite(value) and (not integer or value.is_integer()))))
    if not typed or not (value > low if low_open else value >= low):
        raise RequestError(f"{name}={json.dumps(value)}, {expected}")
    if value > high:
        raise RequestError(f"{name}={json.dumps(value)}, {expected}", status)
    return int(value) if integer else float(value)


def _object(body, fields) -> dict:
    if not isinstance(body, dict):
        raise RequestError(f"the body is {type(body).__name__}, expected a JSON object")
    unknown = sorted(set(body) - set(fields))
    if unknown:
        raise RequestError(f"unknown field(s) {unknown}, expected some of {sorted(fields)}")
    return body


# ----------------------------------------------------------------------------- :anytime


def anytime_fields(body, max_samples: int, code_length: int) -> dict:
    """The checked fields of an :anytime body: num_samples, deadline_ms, seed, temperature,
    min_codes, max_codes, stream, min_quality (None or {"psnr": dB} or {"fd_ratio": r})."""
    body = _object(body, ANYTIME_FIELDS)
    max_codes = number("max_codes", body.get("max_codes", code_length), 1, code_length,
                       integer=True)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(f"stream={json.dumps(stream)}, expected true or false")
    quality = body.get("min_quality")
    if quality is not None:
        if not isinstance(quality, dict) or len(quality) != 1 or \
                next(iter(quality)) not in QUALITY_RANGES:
            raise RequestError(f"min_quality={json.dumps(quality)}, expected one of "
                               '{"psnr": dB} or {"fd_ratio": r}')
        (name, value), = quality.items()
        quality = {name: number(f"min_quality.{name}", value, *QUALITY_RANGES[name])}
    return dict(min_quality=quality,
        num_samples=number("num_samples", body.get("num_samples"), 1, max_samples, integer=True),
        deadline_ms=number("deadline_ms", body.get("deadline_ms"), 0, 600_000, low_open=True),
        seed=number("seed", body.get("seed", 0), 0, INT32_MAX, integer=True),
        temperature=number("temperature", body.get("temperature", 1.0), 0, 100, low_open=True),
        min_codes=number("min_codes", body.get("min_codes", 1), 1, max_codes, integer=True),
        max_codes=max_codes, stream=stream)


# ----------------------------------------------------------------------------- :predict


def predict_inputs(body, specs: Dict[str, Dict[str, tuple]], max_samples: int,
                   code_length: int, codebook_size: int
                   ) -> Tuple[str, Dict[str, np.ndarray], bool]:
    """Checks a :predict body against the signatures' input `specs` ({signature: {input:
    (dtype, shape)}}, `Model.input_specs`), in TF Serving's columnar format ("inputs") or
    row format ("instances", for signatures whose inputs all have a batch dimension):
    every input present, numbers of the right rank, dims and dtype, each within its range
    (the same ranges as :anytime for the scalars), at most `max_samples` samples or rows
    (413). Returns (signature name, {input: NumPy array}, whether the body used rows)."""
    body = _object(body, ("signature_name", "inputs", "instances"))
    signature = body.get("signature_name", "sample")
    if not isinstance(signature, str) or signature not in specs:
        raise RequestError(f"signature_name={json.dumps(signature)}, expected one of "
                           f"{sorted(specs)}")
    wanted = specs[signature]
    if "inputs" in body and "instances" in body:  # TF Serving's words.
        raise RequestError("Not formatted correctly expecting only one of 'inputs' or "
                           "'instances' keys to exist")
    rows = "instances" in body
    if rows:
        inputs = _columns(body["instances"], signature, wanted)
    elif "inputs" in body:
        inputs = body["inputs"]
    else:
        raise RequestError("Missing 'inputs' or 'instances' key")
    if not isinstance(inputs, dict):
        raise RequestError(f'"inputs" is {type(inputs).__name__}, expected an object with '
                           f"{sorted(wanted)} (the columnar format)")
    missing, unknown = sorted(set(wanted) - set(inputs)), sorted(set(inputs) - set(wanted))
    if missing or unknown:
        raise RequestError(f"signature {signature!r} takes inputs {sorted(wanted)}; missing "
                           f"{missing}, unknown {unknown}")
    scalars = {"num_samples": (1, max_samples, True, False, 413),
               "num_codes": (1, code_length, True, False, 400),
               "seed": (0, INT32_MAX, True, False, 400),
               "temperature": (0, 100, False, True, 400)}
    ranges = {"codes": (0, codebook_size - 1), "images": (0.0, 1.0)}
    out = {}
    for name, (dtype, shape) in wanted.items():
        if not shape:
            low, high, integer, low_open, status = scalars[name]
            out[name] = np.asarray(number(name, inputs[name], low, high, integer, low_open,
                                          status), dtype)
        else:
            out[name] = _array(name, inputs[name], dtype, shape, ranges[name], max_samples)
    return signature, out, rows


def _columns(instances, signature: str, wanted: dict) -> dict:
    """TF Serving's row format ("instances": one value per row, or one object of named
    inputs per row) as columns {input: list of rows}."""
    scalars = sorted(name for name, (_, shape) in wanted.items() if not shape)
    if scalars:
        raise RequestError(f"signature {signature!r} has scalar input(s) {scalars}, which the "
                           "row format cannot carry; send them in the columnar format "
                           '("inputs")')
    if not isinstance(instances, list) or not instances:
        raise RequestError("Excepting 'instances' to be a non-empty list/array"
                           if isinstance(instances, list) or instances is None else
                           f"'instances' is {type(instances).__name__}, expected a list")
    names = sorted(wanted)
    if not all(isinstance(row, dict) for row in instances):
        if len(names) > 1 or any(isinstance(row, dict) for row in instances):
            raise RequestError(f"'instances' must be a list of objects with keys {names}"
                               if len(names) > 1 else
                               "'instances' mixes objects and plain values")
        return {names[0]: instances}
    for i, row in enumerate(instances):
        if sorted(row) != names:
            raise RequestError(f"Failed to process element: {i} of 'instances' list: it has "
                               f"keys {sorted(row)}, expected only {names}")
    return {name: [row[name] for row in instances] for name in names}


def _array(name, value, dtype, shape, value_range, max_samples) -> np.ndarray:
    expected = f"{dtype} of shape {[-1 if d is None else d for d in shape]}"
    try:
        array = np.asarray(value)
    except (TypeError, ValueError, OverflowError):  # Ragged lists, huge integers.
        array = None
    if array is None or array.dtype.kind not in "iuf":
        raise RequestError(f"input {name!r} is not numbers of one shape; expected {expected}")
    if array.ndim != len(shape) or any(d is not None and d != n
                                       for d, n in zip(shape, array.shape)):
        raise RequestError(f"input {name!r} has shape {list(array.shape)}, expected {expected}")
    if len(array) > max_samples:
        raise RequestError(f"input {name!r} has {len(array)} rows, expected at most "
                           f"{max_samples}", 413)
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        raise RequestError(f"input {name!r} holds NaN or Inf")
    if np.abs(array).max(initial=0) > FLOAT32_MAX:
        raise RequestError(f"input {name!r} holds values beyond float32's range")
    integer = dtype.startswith("int")
    if integer and (array != np.round(array)).any():
        raise RequestError(f"input {name!r} must hold integers; expected {expected}")
    low, high = value_range
    if array.size and (array.min() < low or array.max() > high):
        bad = array.min() if array.min() < low else array.max()
        shown = int(bad) if integer else f"{bad:g}"
        raise RequestError(f"input {name!r} holds {shown}, expected values in [{low}, {high}]")
    return array.astype(dtype)


def parse_predict(raw: bytes, specs, max_samples: int, code_length: int, codebook_size: int):
    """`parse_json` and `predict_inputs` in one call that never raises, for a worker process:
    ("ok", signature, inputs, rows) or ("error", message, status)."""
    try:
        return ("ok",) + predict_inputs(parse_json(raw), specs, max_samples, code_length,
                                        codebook_size)
    except RequestError as e:
        return ("error", str(e), e.status)


# ----------------------------------------------------------------------------- answers


def png_base64(image: np.ndarray) -> str:
    """float [H, W, C] in [0, 1] -> base64 PNG."""
    from PIL import Image

    pixels = np.round(np.clip(image, 0.0, 1.0) * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def render_anytime(k: int, elapsed_ms: float, codes: np.ndarray, images: np.ndarray,
                   stream: bool, final: bool) -> Tuple[Optional[bytes], Optional[bytes]]:
    """(server-sent event or None, final body or None) of an :anytime answer at k codes."""
    pngs = [png_base64(x) for x in images]
    event = body = None
    if stream:
        event = ("data: " + json.dumps({
            "num_codes": k, "elapsed_ms": elapsed_ms, "final": final,
            "codes": codes[:, :k].tolist(), "images": pngs}) + "\n\n").encode()
    if final:
        body = json.dumps({"num_codes": k, "codes": codes.tolist(), "images": pngs,
                           "elapsed_ms": elapsed_ms}).encode()
    return event, body


def render_outputs(outputs: Dict[str, np.ndarray]) -> bytes:
    """TF Serving's columnar answer: {"outputs": {name: nested lists}}."""
    return json.dumps({"outputs": {k: np.asarray(v).tolist() for k, v in outputs.items()}}
                      ).encode()


def render_predictions(outputs: Dict[str, np.ndarray]) -> bytes:
    """TF Serving's row answer: {"predictions": [row, ...]}, each row the one output's
    value or, with several outputs, {name: value}."""
    columns = {k: np.asarray(v).tolist() for k, v in outputs.items()}
    if len(columns) == 1:
        return json.dumps({"predictions": next(iter(columns.values()))}).encode()
    rows = len(next(iter(columns.values())))
    return json.dumps({"predictions": [{k: v[i] for k, v in columns.items()}
                                       for i in range(rows)]}).encode()


# ----------------------------------------------------------------------------- TF Serving

_DTYPES = {"int32": "DT_INT32", "float32": "DT_FLOAT", "bool": "DT_BOOL"}


def signature_metadata(signatures, names) -> dict:
    """TF Serving's signature_def map of the signatures `names` (their specs read as data)."""
    def spec_json(spec) -> dict:
        dims = [{"size": str(-1 if d is None else d)} for d in spec.shape]
        return {"dtype": _DTYPES.get(spec.dtype.name, spec.dtype.name), "name": spec.name,
                "tensor_shape": {"dim": dims, "unknown_rank": False}}

    return {name: {"inputs": {k: spec_json(v) for k, v in
                              signatures[name].structured_input_signature[1].items()},
                   "outputs": {k: spec_json(v) for k, v in
                               signatures[name].structured_outputs.items()},
                   "method_name": "tensorflow/serving/predict"}
            for name in names}
