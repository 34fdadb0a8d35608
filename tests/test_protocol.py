"""The request parser in-process, under many more random bodies than the server test can
afford: every body is either accepted with checked values or refused with RequestError."""

import json

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
FIELDS = st.sampled_from(list(protocol.ANYTIME_FIELDS) + ["signature_name", "inputs"])
INPUTS = st.sampled_from(["num_samples", "num_codes", "seed", "temperature", "codes", "images"])
BODIES = st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=6),
                   st.fixed_dictionaries({"signature_name": st.sampled_from(sorted(SPECS)) | JSON,
                                          "inputs": st.dictionaries(INPUTS, JSON, max_size=4)}))


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
    _, signature, inputs = answer
    assert set(inputs) == set(SPECS[signature])
    for name, (dtype, shape) in SPECS[signature].items():
        assert inputs[name].dtype == np.dtype(dtype) and inputs[name].ndim == len(shape)
