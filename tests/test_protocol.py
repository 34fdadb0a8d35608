"""The request parser in-process, under many more random bodies than the server test can
afford: every body is either accepted with checked values or refused with RequestError."""

import json
import re

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.serving import protocol

K, V, MAX_SAMPLES = 8, 16, 64
SPECS = {"sample": {"num_samples": ("int32", ()), "num_codes": ("int32", ()),
                    "seed": ("int32", ()), "temperature": ("float32", ())},
         "decode": {"codes": ("int32", (None, K))},
         "encode": {"images": ("float32", (None, 8, 8, 1))}}

JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70)
                    | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=16)
FIELDS = st.sampled_from(list(protocol.ANYTIME_FIELDS) + ["signature_name", "inputs",
                                                          "instances"])
INPUTS = st.sampled_from(["num_samples", "num_codes", "seed", "temperature", "codes", "images"])
BODIES = st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=6),
                   st.fixed_dictionaries({"signature_name": st.sampled_from(sorted(SPECS)) | JSON,
                                          "inputs": st.dictionaries(INPUTS, JSON, max_size=4)}),
                   st.fixed_dictionaries({"signature_name": st.sampled_from(sorted(SPECS)),
                                          "instances": st.lists(
                                              st.dictionaries(INPUTS, JSON, max_size=2)
                                              | JSON, max_size=3)}))


@settings(max_examples=1500, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=BODIES)
def test_every_body_is_checked_or_refused_with_a_request_error(body):
    try:
        fields = protocol.anytime_fields(body, MAX_SAMPLES, K)
    except protocol.RequestError as e:
        assert str(e) and e.status in (400, 413)
    else:
        assert 1 <= fields["min_codes"] <= fields["max_codes"] <= K
        assert 1 <= fields["num_samples"] <= MAX_SAMPLES
    raw = json.dumps(body, allow_nan=True).encode()
    answer = protocol.parse_predict(raw, SPECS, MAX_SAMPLES, K, V)
    if answer[0] == "error":
        assert answer[1] and answer[2] in (400, 413)
        return
    _, signature, inputs, rows = answer
    assert set(inputs) == set(SPECS[signature]) and rows == ("instances" in body)
    for name, (dtype, shape) in SPECS[signature].items():
        assert inputs[name].dtype == np.dtype(dtype) and inputs[name].ndim == len(shape)


def test_the_row_format_gives_the_columns_and_refuses_what_tf_serving_refuses():
    images = np.random.default_rng(0).random((3, 8, 8, 1)).round(3).tolist()
    as_values = protocol.predict_inputs({"signature_name": "encode", "instances": images},
                                        SPECS, MAX_SAMPLES, K, V)
    as_objects = protocol.predict_inputs(
        {"signature_name": "encode", "instances": [{"images": x} for x in images]},
        SPECS, MAX_SAMPLES, K, V)
    columnar = protocol.predict_inputs({"signature_name": "encode", "inputs": {"images": images}},
                                       SPECS, MAX_SAMPLES, K, V)
    assert as_values[2] and as_objects[2] and not columnar[2]
    for answer in (as_values, as_objects):
        np.testing.assert_array_equal(answer[1]["images"], columnar[1]["images"])
    cases = [({"signature_name": "encode", "instances": images, "inputs": {"images": images}},
              "expecting only one of 'inputs' or 'instances' keys to exist"),
             ({"signature_name": "sample", "instances": [{"num_samples": 1}]},
              r"scalar input\(s\) \['num_codes', 'num_samples', 'seed', 'temperature'\]"),
             ({"signature_name": "encode", "instances": []}, "non-empty list"),
             ({"signature_name": "encode", "instances": [{"image": images[0]}]},
              r"element: 0 .* expected only \['images'\]"),
             ({"signature_name": "decode"}, "Missing 'inputs' or 'instances' key")]
    for body, message in cases:
        try:
            protocol.predict_inputs(body, SPECS, MAX_SAMPLES, K, V)
        except protocol.RequestError as e:
            assert re.search(message, str(e)) and e.status == 400, (str(e), message)
        else:
            raise AssertionError(f"accepted {body}")
    rows = json.loads(protocol.render_predictions({"codes": np.arange(6).reshape(2, 3),
                                                   "num": np.array([4, 5])}))
    assert rows == {"predictions": [{"codes": [0, 1, 2], "num": 4},
                                    {"codes": [3, 4, 5], "num": 5}]}
    assert json.loads(protocol.render_predictions({"codes": np.arange(4).reshape(2, 2)})) == \
        {"predictions": [[0, 1], [2, 3]]}
