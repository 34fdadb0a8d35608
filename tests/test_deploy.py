"""Deploying like TF Serving: versions under a base path with hot reload, TF Serving's
documented REST requests (row and columnar, versioned and labelled URLs) and its Python
gRPC client, unchanged, against real server processes on loopback."""

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from conftest import REPO, SUBPROCESS_ENV, copy_run
from test_serve import K, Server, call

MODEL = "/v1/models/ovqvae"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_path(finished_run, directory, versions=(1,)) -> str:
    for version in versions:
        shutil.copytree(os.path.join(finished_run, "saved_model"),
                        os.path.join(directory, str(version)))
    return str(directory)


def states(server) -> dict:
    status, body, _ = call(server.url + MODEL)
    return {int(v["version"]): (v["state"], v["status"]["error_message"])
            for v in body["model_version_status"]}


def wait_for(predicate, seconds=60.0):
    give_up = time.monotonic() + seconds
    while time.monotonic() < give_up:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def versioned(finished_run, tmp_path_factory):
    base = base_path(finished_run, tmp_path_factory.mktemp("base"), (1, 2))
    grpc_port = free_port()
    s = Server(None, f"--model_base_path={base}", "--model_version_policy=all",
               "--version_labels=stable=1,canary=2", f"--grpc_port={grpc_port}")
    s.grpc_port = grpc_port
    yield s
    s.stop()


def test_rest_as_tf_serving_documents_it(versioned):
    assert states(versioned) == {1: ("AVAILABLE", ""), 2: ("AVAILABLE", "")}
    for path, version in (("/versions/2", "2"), ("/labels/stable", "1")):
        status, body, _ = call(versioned.url + MODEL + path)
        assert status == 200 and [v["version"] for v in body["model_version_status"]] == [version]
        status, body, _ = call(versioned.url + MODEL + path + "/metadata")
        assert status == 200 and body["model_spec"]["version"] == version
        assert sorted(body["metadata"]["signature_def"]["signature_def"]) == \
            ["decode", "encode", "sample"]
    images = np.random.default_rng(0).random((3, 8, 8, 1)).round(4)
    status, columnar, _ = call(versioned.url + MODEL + ":predict", {
        "signature_name": "encode", "inputs": {"images": images.tolist()}})
    assert status == 200 and np.array(columnar["outputs"]["codes"]).shape == (3, K)
    for body in ({"signature_name": "encode", "instances": images.tolist()},
                 {"signature_name": "encode", "instances": [{"images": x.tolist()}
                                                            for x in images]}):
        for path in ("", "/versions/1", "/labels/canary"):
            status, rows, _ = call(versioned.url + MODEL + path + ":predict", body)
            assert status == 200 and rows == {"predictions": columnar["outputs"]["codes"]}
    status, body, _ = call(versioned.url + MODEL + "/labels/stable:anytime",
                           {"num_samples": 2, "deadline_ms": 500})
    assert status == 200 and 1 <= body["num_codes"] <= K
    for path, status_wanted, message in (
            ("/versions/7:predict", 404, "Servable not found for request"),
            ("/labels/nope:predict", 404, "Unrecognized servable version label: nope")):
        status, body, _ = call(versioned.url + MODEL + path, {
            "signature_name": "encode", "instances": images.tolist()})
        assert status == status_wanted and message in body["error"], body
    status, body, _ = call(versioned.url + MODEL + ":predict", {
        "signature_name": "encode", "instances": images.tolist(),
        "inputs": {"images": images.tolist()}})
    assert status == 400 and "expecting only one of 'inputs' or 'instances'" in body["error"]
    status, body, _ = call(versioned.url + MODEL + ":predict", {
        "signature_name": "decode", "instances": [{"codes": [1] * K, "num_codes": 2}]})
    assert status == 400 and "scalar input(s) ['num_codes']" in body["error"]


def test_tf_serving_python_grpc_client_works_unchanged(versioned):
    import grpc
    import tensorflow as tf
    from tensorflow_serving.apis import (get_model_metadata_pb2, get_model_status_pb2,
                                         model_service_pb2_grpc, predict_pb2,
                                         prediction_service_pb2_grpc)

    channel = grpc.insecure_channel(f"127.0.0.1:{versioned.grpc_port}")
    stub = prediction_service_pb2_grpc.PredictionServiceStub(channel)
    images = np.random.default_rng(1).random((2, 8, 8, 1)).astype(np.float32)
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ovqvae"
    request.model_spec.signature_name = "encode"
    request.inputs["images"].CopyFrom(tf.make_tensor_proto(images))
    result = stub.Predict(request, 10.0)
    codes = tf.make_ndarray(result.outputs["codes"])
    _, rest, _ = call(versioned.url + MODEL + ":predict", {
        "signature_name": "encode", "inputs": {"images": images.tolist()}})
    np.testing.assert_array_equal(codes, rest["outputs"]["codes"])
    assert result.model_spec.version.value == 2  # The highest version.

    request = predict_pb2.PredictRequest()
    request.model_spec.name = "ovqvae"
    request.model_spec.signature_name = "anytime"
    request.model_spec.version_label = "stable"
    request.inputs["num_samples"].CopyFrom(tf.make_tensor_proto(3, dtype=tf.int32))
    start = time.monotonic()
    result = stub.Predict(request, timeout=0.5)
    took = time.monotonic() - start
    k = int(tf.make_ndarray(result.outputs["num_codes"]))
    assert 1 <= k <= K and took < 0.5 and result.model_spec.version.value == 1
    assert tf.make_ndarray(result.outputs["images"]).shape == (3, 8, 8, 1)
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request)  # No deadline: nothing to fit the sample to.
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "call with a timeout" in error.value.details()
    request.inputs["min_psnr"].CopyFrom(tf.make_tensor_proto(150.0, dtype=tf.float32))
    with pytest.raises(grpc.RpcError) as error:  # Beyond the model's profile.
        stub.Predict(request, timeout=1.0)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "beyond what this model reaches" in error.value.details()
    del request.inputs["min_psnr"]
    request.model_spec.ClearField("version_label")
    request.model_spec.version.value = 9
    with pytest.raises(grpc.RpcError) as error:
        stub.Predict(request, timeout=1.0)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND

    metadata = get_model_metadata_pb2.GetModelMetadataRequest()
    metadata.model_spec.name = "ovqvae"
    metadata.metadata_field.append("signature_def")
    answer = stub.GetModelMetadata(metadata, 10.0)
    signatures = get_model_metadata_pb2.SignatureDefMap()
    answer.metadata["signature_def"].Unpack(signatures)
    assert sorted(signatures.signature_def) == ["decode", "encode", "sample"]
    assert signatures.signature_def["decode"].inputs["num_codes"].dtype == tf.int32.as_datatype_enum

    status = get_model_status_pb2.GetModelStatusRequest()
    status.model_spec.name = "ovqvae"
    answer = model_service_pb2_grpc.ModelServiceStub(channel).GetModelStatus(status, 10.0)
    assert [(v.version, get_model_status_pb2.ModelVersionStatus.State.Name(v.state))
            for v in answer.model_version_status] == [(1, "AVAILABLE"), (2, "AVAILABLE")]
    channel.close()


def _load(url, stop, outcomes, deadline_ms=300):
    """Closed-loop :anytime requests until `stop`: (status, seconds, Retry-After) each."""
    import urllib.error
    import urllib.request

    body = json.dumps({"num_samples": 2, "deadline_ms": deadline_ms}).encode()
    while not stop.is_set():
        start = time.monotonic()
        try:
            with urllib.request.urlopen(urllib.request.Request(url, data=body),
                                        timeout=30) as r:
                r.read()
                outcomes.append((r.status, time.monotonic() - start, None))
        except urllib.error.HTTPError as e:
            outcomes.append((e.code, time.monotonic() - start, e.headers.get("Retry-After")))
        except OSError as e:  # A refused or reset connection: a failed request.
            outcomes.append((type(e).__name__, time.monotonic() - start, None))
            time.sleep(0.05)


def test_a_new_version_is_served_within_a_few_polls_and_a_broken_one_never(
        finished_run, tmp_path):
    base = base_path(finished_run, tmp_path / "base")
    s = Server(None, f"--model_base_path={base}", "--file_system_poll_wait_seconds=0.2")
    stop, outcomes = threading.Event(), []
    clients = [threading.Thread(target=_load, args=(s.url + MODEL + ":anytime", stop,
                                                    outcomes)) for _ in range(2)]
    try:
        for client in clients:
            client.start()
        broken = tmp_path / "base" / "2"
        broken.mkdir()
        (broken / "saved_model.pb").write_bytes(b"not a SavedModel")
        assert wait_for(lambda: states(s).get(2, ("",))[0] == "END")
        assert states(s)[1] == ("AVAILABLE", "") and states(s)[2][1]  # Its error, reported.
        workdir = copy_run(finished_run, tmp_path / "wd")
        exported = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "export", f"--workdir={workdir}",
             f"--model_base_path={base}"], cwd=REPO, env=SUBPROCESS_ENV,
            capture_output=True, text=True, timeout=300)
        assert exported.returncode == 0, exported.stderr[-2000:]
        assert f"version 3 published in {base}" in exported.stdout
        published = time.monotonic()
        assert wait_for(lambda: states(s)[3][0] == "AVAILABLE" and states(s)[1][0] == "END")
        served_after = time.monotonic() - published
        time.sleep(0.5)
    finally:
        stop.set()
        for client in clients:
            client.join(60)
        s.stop()
    assert not [n for n in os.listdir(base) if not n.isdigit()]  # No temporary left over.
    statuses = [o[0] for o in outcomes]
    assert len(statuses) > 20 and set(statuses) == {200}, statuses
    log = "".join(s.lines)
    assert "version 2: failed to load, not served" in log and "version 1: END" in log
    print(f"version 3 AVAILABLE {served_after:.1f} s after its export; {len(statuses)} "
          "requests meanwhile, all 200")


HAPROXY = "/usr/sbin/haproxy"  # Debian's package; .ci/run installs it.
DEADLINE_MS = 200


def _replica(base, port):
    return Server(None, f"--model_base_path={base}", f"--port={port}", "--max_batch=8",
                  "--file_system_poll_wait_seconds=0.5", "--drain_seconds=10")


def _healthy(url) -> bool:
    try:
        return call(url + MODEL, timeout=5)[0] == 200
    except OSError:  # Not listening yet.
        return False


def _versions_of(url) -> dict:
    status, body, _ = call(url + MODEL)
    return {int(v["version"]): v["state"] for v in body["model_version_status"]}


def test_replicas_behind_haproxy_roll_out_without_a_failed_request(finished_run, tmp_path):
    if not os.path.exists(HAPROXY):
        pytest.skip("haproxy is not installed (.ci/run installs Debian's haproxy)")
    from ordered_vqvae.atomic import publish_version

    base = base_path(finished_run, tmp_path / "base")
    ports = [free_port() for _ in range(3)]
    replicas = []  # Started inside the try, so that a failed start stops the others.
    env = {**os.environ, "OVQVAE_LISTEN": f"127.0.0.1:{ports[0]}",
           "OVQVAE_REPLICA_1": f"127.0.0.1:{ports[1]}", "OVQVAE_REPLICA_2": f"127.0.0.1:{ports[2]}"}
    proxy = subprocess.Popen([HAPROXY, "-f", os.path.join(REPO, "deploy", "haproxy.cfg")],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{ports[0]}"
    stop, outcomes, events = threading.Event(), [], []
    clients = [threading.Thread(target=_load, args=(url + MODEL + ":anytime", stop, outcomes,
                                                    DEADLINE_MS)) for _ in range(4)]
    started = []
    try:
        replicas += [_replica(base, port) for port in ports[1:]]
        assert wait_for(lambda: _healthy(url), 30)
        for client in clients:
            client.start()
            started.append(client)
        time.sleep(2)
        for i in range(2):  # Rolling restart: one replica at a time.
            events.append((f"restart replica {i + 1}", len(outcomes)))
            replicas[i].stop()
            replicas[i] = _replica(base, ports[i + 1])
            time.sleep(1)
        events.append(("export version 2", len(outcomes)))
        assert publish_version(os.path.join(finished_run, "saved_model"), base) == 2
        assert wait_for(lambda: all(_versions_of(r.url) == {1: "END", 2: "AVAILABLE"}
                                    for r in replicas), 120)
        time.sleep(2)
        events.append(("end", len(outcomes)))
    finally:
        stop.set()
        for client in started:
            client.join(60)
        for replica in replicas:
            replica.stop()
        proxy.terminate()
        proxy.wait(10)
    statuses = [o[0] for o in outcomes]
    ok = [seconds for status, seconds, _ in outcomes if status == 200]
    refused = [o for o in outcomes if o[0] == 503]
    on_time = sum(s <= 1.25 * DEADLINE_MS / 1e3 + 0.010 for s in ok) / len(ok)
    print(f"{len(statuses)} requests through HAProxy: {len(ok)} x 200 ({on_time:.1%} within "
          f"1.25 x {DEADLINE_MS} ms + 10 ms), {len(refused)} x 503; events at request "
          f"{events}")
    assert set(statuses) <= {200, 503}, sorted(set(map(str, statuses)))
    assert all(retry is not None for _, _, retry in refused)
    assert len(ok) > 200 and on_time >= 0.95


def test_version_settings_name_what_is_wrong(tmp_path):
    from ordered_vqvae.atomic import publish_version
    from pipeline.serving.config import ServeConfig
    from pipeline.serving.versions import parse_labels, parse_policy

    assert parse_policy("specific:3,5") == ("specific", frozenset({3, 5}))
    assert parse_labels("stable=3, canary=4") == {"stable": 3, "canary": 4}
    for settings, message in (
            ({"model_version_policy": "newest"}, "model_version_policy='newest', expected"),
            ({"model_version_policy": "specific:x"}, "versions are integers"),
            ({"version_labels": "stable:3"}, "entry 'stable:3', expected label=VERSION"),
            ({"file_system_poll_wait_seconds": 0}, "file_system_poll_wait_seconds=0")):
        with pytest.raises(ValueError, match=message):
            ServeConfig(model_base_path=str(tmp_path), **settings)
    with pytest.raises(ValueError, match="exactly one of saved_model and model_base_path"):
        ServeConfig(saved_model="a", model_base_path="b")
    source = tmp_path / "model"
    source.mkdir()
    (source / "saved_model.pb").write_bytes(b"x")
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "7").mkdir()
    (tmp_path / "base" / "notes").mkdir()
    assert [publish_version(str(source), str(tmp_path / "base")) for _ in range(2)] == [8, 9]
    assert sorted(os.listdir(tmp_path / "base")) == ["7", "8", "9", "notes"]
    assert (tmp_path / "base" / "9" / "saved_model.pb").read_bytes() == b"x"
    with pytest.raises(ValueError, match="object stores lack"):
        publish_version(str(source), "gs://bucket/models")


def test_serve_refuses_a_base_path_beside_a_saved_model(tmp_path):
    from conftest import ovqvae

    proc = ovqvae("serve", f"--model_base_path={tmp_path}", f"--saved_model={tmp_path}",
                  check_rc=2)
    assert "--model_base_path serves its versions; it takes no --saved_model" in proc.stderr
    proc = ovqvae("serve", f"--model_base_path={tmp_path}", "--version_labels=a",
                  check_rc=2)
    assert "--version_labels entry 'a', expected label=VERSION" in proc.stderr
