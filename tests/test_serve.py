"""`ovqvae serve` end to end: a real server process on loopback over the tiny pipeline's
SavedModel. TF Serving's REST API, :anytime (plain and streamed), errors, metrics, bodies
drawn by Hypothesis, a client that leaves mid-stream, SIGTERM under load, and the page in
headless Chromium."""

import base64
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from conftest import REPO, SUBPROCESS_ENV

K = 8  # The tiny pipeline's code length.


class Server:
    def __init__(self, saved_model, *flags):
        """`saved_model` None: the flags name the model (--model_base_path)."""
        model = [f"--saved_model={saved_model}"] if saved_model else []
        port = [] if any(f.startswith("--port=") for f in flags) else ["--port=0"]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", *model, *port, "--max_batch=16",
             "--max_chunk=2", *flags],
            cwd=REPO, env=SUBPROCESS_ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True)
        self.lines = []
        give_up = time.monotonic() + 180
        while time.monotonic() < give_up:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)/", line)
            if found:
                self.url = found.group(1)
                threading.Thread(target=self._drain_output, daemon=True).start()
                return
        self.proc.kill()
        raise AssertionError("the server did not start:\n" + "".join(self.lines))

    def _drain_output(self):
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@pytest.fixture(scope="module")
def server(finished_run):
    s = Server(os.path.join(finished_run, "saved_model"))
    yield s
    s.stop()


def call(url, body=None, raw=None, timeout=30):
    """(status, parsed JSON or text, headers) of a GET (no body) or POST."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method="GET" if data is None else "POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, text, headers = response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as e:
        status, text, headers = e.code, e.read().decode(), e.headers
    try:
        return status, json.loads(text), headers
    except ValueError:
        return status, text, headers


def stream_events(url, body, timeout=30):
    data = json.dumps({**body, "stream": True}).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=data), timeout=timeout) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = r.read().decode()
    return [json.loads(chunk[len("data: "):]) for chunk in text.split("\n\n") if chunk]


def test_status_and_metadata_as_tf_serving_answers(server):
    status, body, _ = call(f"{server.url}/v1/models/ovqvae")
    assert status == 200 and body == {"model_version_status": [{
        "version": "1", "state": "AVAILABLE", "status": {"error_code": "OK", "error_message": ""}}]}
    status, body, _ = call(f"{server.url}/v1/models/ovqvae/metadata")
    signatures = body["metadata"]["signature_def"]["signature_def"]
    assert status == 200 and sorted(signatures) == ["decode", "encode", "sample"]
    assert sorted(signatures["sample"]["inputs"]) == ["num_codes", "num_samples", "seed",
                                                      "temperature"]
    assert signatures["sample"]["inputs"]["temperature"]["dtype"] == "DT_FLOAT"
    assert signatures["decode"]["inputs"]["codes"]["tensor_shape"]["dim"] == [
        {"size": "-1"}, {"size": str(K)}]
    assert call(f"{server.url}/v1/models/other")[0] == 404


def test_predict_answers_what_the_saved_model_computes(server, finished_run):
    import tensorflow as tf

    model = tf.saved_model.load(os.path.join(finished_run, "saved_model"))
    url = f"{server.url}/v1/models/ovqvae:predict"
    inputs = {"num_samples": 3, "num_codes": 5, "seed": 7, "temperature": 0.9}
    status, body, _ = call(url, {"signature_name": "sample", "inputs": inputs})
    want = model.signatures["sample"](**{k: tf.constant(v, tf.float32 if k == "temperature"
                                                        else tf.int32) for k, v in inputs.items()})
    assert status == 200 and sorted(body["outputs"]) == ["codes", "images"]
    np.testing.assert_array_equal(body["outputs"]["codes"], want["codes"].numpy())
    np.testing.assert_allclose(body["outputs"]["images"], want["images"].numpy(), atol=1e-6)
    images = body["outputs"]["images"]
    status, encoded, _ = call(url, {"signature_name": "encode", "inputs": {"images": images}})
    np.testing.assert_array_equal(encoded["outputs"]["codes"],
                                  model.signatures["encode"](images=tf.constant(images))["codes"])
    status, decoded, _ = call(url, {"signature_name": "decode", "inputs": {
        "codes": encoded["outputs"]["codes"], "num_codes": 3}})
    assert status == 200 and np.asarray(decoded["outputs"]["images"]).shape == (3, 8, 8, 1)


@pytest.mark.parametrize("body, status, message", [
    ({"signature_name": "train", "inputs": {}}, 400, 'signature_name="train", expected one of'),
    ({"signature_name": "sample", "inputs": {"num_samples": 1}}, 400,
     "missing ['num_codes', 'seed', 'temperature']"),
    ({"signature_name": "sample", "inputs": {"num_samples": 1, "num_codes": 99, "seed": 0,
                                             "temperature": 1.0}}, 400,
     "num_codes=99, expected an integer in [1, 8]"),
    ({"signature_name": "sample", "inputs": {"num_samples": 1000, "num_codes": 2, "seed": 0,
                                             "temperature": 1.0}}, 413,
     "num_samples=1000, expected an integer in [1, 16]"),
    ({"signature_name": "decode", "inputs": {"codes": [[1, 2]], "num_codes": 1}}, 400,
     "input 'codes' has shape [1, 2], expected int32 of shape [-1, 8]"),
    ({"signature_name": "sample", "inputs": {"num_samples": 1.5, "num_codes": 2, "seed": 0,
                                             "temperature": 1.0}}, 400,
     "num_samples=1.5, expected an integer in [1, 16]"),
    # :predict checks its scalars as :anytime does.
    ({"signature_name": "sample", "inputs": {"num_samples": "2", "num_codes": 2, "seed": 0,
                                             "temperature": 1.0}}, 400, 'num_samples="2"'),
    ({"signature_name": "sample", "inputs": {"num_samples": True, "num_codes": 2, "seed": 0,
                                             "temperature": 1.0}}, 400, "num_samples=true"),
    ({"signature_name": "sample", "inputs": {"num_samples": 1, "num_codes": 2, "seed": -5,
                                             "temperature": 1.0}}, 400,
     "seed=-5, expected an integer in [0, 2147483647]"),
    ({"signature_name": "sample", "inputs": {"num_samples": 1, "num_codes": 2, "seed": 0,
                                             "temperature": 1e39}}, 400,
     "temperature=1e+39, expected a number in (0, 100]"),
    ({"signature_name": "decode", "inputs": {"codes": [[99999] * 8], "num_codes": 1}}, 400,
     "input 'codes' holds 99999, expected values in [0, "),
    ({"signature_name": "decode", "inputs": {"codes": [[True] * 8], "num_codes": 1}}, 400,
     "input 'codes' is not numbers"),
    ({"signature_name": "encode", "inputs": {"images": [[[[1e39]] * 8] * 8]}}, 400,
     "beyond float32's range"),
    ({"signature_name": "encode", "inputs": {"images": [[[[2.0]] * 8] * 8]}}, 400,
     "input 'images' holds 2, expected values in [0.0, 1.0]"),
    ({"instances": [1]}, 400, "signature 'sample' has scalar input(s)"),
    ({"signature_name": "encode", "rows": [1]}, 400, "unknown field(s) ['rows']"),
])
def test_predict_errors_name_the_field(server, body, status, message):
    got, answer, _ = call(f"{server.url}/v1/models/ovqvae:predict", body)
    assert got == status and message in answer["error"], answer


def test_anytime_answers_in_time_with_the_sample_signatures_codes(server):
    url = f"{server.url}/v1/models/ovqvae:anytime"
    start = time.monotonic()
    status, body, _ = call(url, {"num_samples": 3, "deadline_ms": 3000, "seed": 7,
                                 "temperature": 0.9})
    assert status == 200 and time.monotonic() - start < 3.0 * 1.25 + 0.01
    _, want, _ = call(f"{server.url}/v1/models/ovqvae:predict", {
        "signature_name": "sample",
        "inputs": {"num_samples": 3, "num_codes": K, "seed": 7, "temperature": 0.9}})
    assert body["num_codes"] == K
    assert body["codes"] == want["outputs"]["codes"]  # Same seed, same samples.
    pngs = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(p))), np.float32) / 255
                     for p in body["images"]])
    assert pngs.shape == (3, 8, 8)  # 8-bit PNGs of the decoded samples:
    np.testing.assert_allclose(pngs, np.asarray(want["outputs"]["images"])[..., 0], atol=0.5 / 255)
    status, short, _ = call(url, {"num_samples": 2, "deadline_ms": 3000, "seed": 7,
                                  "max_codes": 3})
    assert short["num_codes"] == 3 and all(row[3:] == [0] * (K - 3) for row in short["codes"])
    for stream in (False, True):  # A refused stream is a 503 too, not a 200 stream.
        status, body, headers = call(url, {"num_samples": 16, "deadline_ms": 0.01,
                                           "min_codes": K, "stream": stream})
        assert status == 503 and "cannot be sampled and decoded before" in body["error"]
        assert int(headers["Retry-After"]) >= 1


def test_a_stream_refines_until_the_final_event(server):
    events = stream_events(f"{server.url}/v1/models/ovqvae:anytime",
                           {"num_samples": 2, "deadline_ms": 5000, "seed": 3})
    assert [e["num_codes"] for e in events] == [2, 4, 6, 8]
    assert [e["final"] for e in events] == [False, False, False, True]
    for e in events:
        assert len(e["images"]) == 2
        image = Image.open(io.BytesIO(base64.b64decode(e["images"][0])))
        assert image.size == (8, 8)
    assert events[-1]["codes"][0][:4] == events[1]["codes"][0]  # Refinements extend the code.


@pytest.mark.parametrize("body, message", [
    ({"deadline_ms": 100}, "missing field 'num_samples'"),
    ({"num_samples": 0, "deadline_ms": 100}, "num_samples=0, expected an integer in [1, 16]"),
    ({"num_samples": 1, "deadline_ms": -5}, "deadline_ms=-5, expected a number in (0, 600000]"),
    ({"num_samples": 1, "deadline_ms": 100, "temperature": 0}, "temperature=0"),
    ({"num_samples": 1, "deadline_ms": 100, "min_codes": 5, "max_codes": 3},
     "min_codes=5, expected an integer in [1, 3]"),
    ({"num_samples": 1, "deadline_ms": 100, "stream": "yes"}, 'stream="yes"'),
    ({"num_samples": True, "deadline_ms": 100}, "num_samples=true"),
    ({"num_samples": 1, "deadline_ms": 10**400}, "expected a number in (0, 600000]"),
    ({"num_samples": 2.5, "deadline_ms": 100}, "num_samples=2.5, expected an integer in [1, 16]"),
    ([1, 2], "expected a JSON object"),
])
def test_anytime_errors_name_the_field(server, body, message):
    status, answer, _ = call(f"{server.url}/v1/models/ovqvae:anytime", body)
    assert status == 400 and message in answer["error"], answer


def test_malformed_and_oversized_bodies(server):
    url = f"{server.url}/v1/models/ovqvae:anytime"
    status, answer, _ = call(url, raw=b'{"num_samples": NaN, "deadline_ms": 5}')
    assert status == 400 and "not valid JSON" in answer["error"]
    status, answer, _ = call(url, raw=b"\xff\xfe{")
    assert status == 400 and "the body is not UTF-8" in answer["error"]
    status, answer, _ = call(url, raw=b" " * (5 << 20))
    assert status == 413 and "expected at most 65536" in answer["error"]  # :anytime's limit.


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40)
                    | st.floats(allow_nan=False) | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=5), max_leaves=12)
FIELDS = st.sampled_from(["num_samples", "deadline_ms", "seed", "temperature", "min_codes",
                          "max_codes", "stream", "signature_name", "inputs", "num_codes"])


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=st.one_of(JSON, st.dictionaries(FIELDS, JSON, max_size=6)),
       endpoint=st.sampled_from([":anytime", ":predict"]))
def test_any_body_gets_an_answer_and_the_server_stays_up(server, body, endpoint):
    status, answer, _ = call(f"{server.url}/v1/models/ovqvae{endpoint}",
                             raw=json.dumps(body).encode(), timeout=30)
    assert status in (200, 400, 413, 503), (status, answer)
    if status != 200:
        assert isinstance(answer, dict) and isinstance(answer["error"], str) and answer["error"]
    assert call(f"{server.url}/v1/models/ovqvae")[0] == 200


def _metric(server, name):
    _, text, _ = call(f"{server.url}/metrics")
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    return float(found.group(1)) if found else None


def test_metrics_count_requests_codes_and_batches(server):
    before = _metric(server, 'ovqvae_requests_total{endpoint="/v1/models/ovqvae:anytime",status="200"}') or 0
    for _ in range(2):
        call(f"{server.url}/v1/models/ovqvae:anytime", {"num_samples": 1, "deadline_ms": 3000})
    after = _metric(server, 'ovqvae_requests_total{endpoint="/v1/models/ovqvae:anytime",status="200"}')
    assert after == before + 2
    assert _metric(server, "ovqvae_anytime_codes_count") >= 2
    assert _metric(server, "ovqvae_batch_rows_count") >= 1
    assert _metric(server, "ovqvae_queue_depth") == 0
    assert _metric(server, "ovqvae_deadline_misses_total") is not None


def test_a_client_that_leaves_mid_stream_frees_its_rows(finished_run):
    import socket

    slow = Server(os.path.join(finished_run, "saved_model"), "--max_chunk=1")
    try:
        host, port = slow.url[len("http://"):].split(":")
        body = json.dumps({"num_samples": 16, "deadline_ms": 60000, "stream": True}).encode()
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(b"POST /v1/models/ovqvae:anytime HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body) + body)
            received = b""
            while b"data: " not in received:  # The first refinement.
                received += sock.recv(65536)
        # Gone, mid-stream (the socket is closed: http.client's response would keep it open).
        give_up = time.monotonic() + 20
        while _metric(slow, "ovqvae_active_rows") != 0 and time.monotonic() < give_up:
            time.sleep(0.05)
        assert _metric(slow, "ovqvae_active_rows") == 0
        status, body, _ = call(f"{slow.url}/v1/models/ovqvae:anytime",
                               {"num_samples": 16, "deadline_ms": 5000})
        assert status == 200 and body["num_codes"] == K
        assert _metric(slow, "ovqvae_clients_gone_total") == 1, "".join(slow.lines)
    finally:
        slow.stop()
    log = "".join(slow.lines)  # One line for the departure, no traceback.
    assert "Traceback" not in log and "never retrieved" not in log, log
    gone = re.findall(r"POST /v1/models/ovqvae:anytime 499 .* k=(\d+) \(the client left\)", log)
    assert len(gone) == 1 and int(gone[0]) < K, log  # Dropped before its last code.
    assert re.search(r"POST /v1/models/ovqvae:anytime 200 [\d.]+ ms version=1 deadline_ms=5000 k=8", log)


def test_sigterm_drains_requests_in_flight(finished_run):
    """A streamed request that the server is working on when SIGTERM arrives still gets
    every refinement and its final event; under load, every answer is a complete 200 or a
    503 (or, once the port has closed, no connection); the process exits 0."""
    import http.client

    s = Server(os.path.join(finished_run, "saved_model"), "--max_chunk=1")
    outcomes, stop = [], threading.Event()

    def client(seed):
        while not stop.is_set():
            try:
                status, body, _ = call(f"{s.url}/v1/models/ovqvae:anytime",
                                       {"num_samples": 4, "deadline_ms": 3000, "seed": seed})
                result = (200, body["num_codes"]) if status == 200 else status
            except (ConnectionError, urllib.error.URLError) as e:  # The port has closed.
                result = f"no connection: {e!r}"
            outcomes.append(result)
            if result != (200, K):
                return

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    host, port = s.url[len("http://"):].split(":")
    stream = http.client.HTTPConnection(host, int(port), timeout=30)
    stream.request("POST", "/v1/models/ovqvae:anytime", json.dumps(
        {"num_samples": 16, "deadline_ms": 30000, "stream": True}))
    response = stream.getresponse()
    first = json.loads(response.readline()[len(b"data: "):])
    s.proc.send_signal(signal.SIGTERM)  # While the stream is being sampled.
    rest = [json.loads(line[len(b"data: "):]) for line in response.read().split(b"\n\n")
            if line.startswith(b"data: ")]
    code = s.proc.wait(60)
    stop.set()
    for t in threads:
        t.join(40)
    assert first["num_codes"] < K and rest, (first, rest)
    assert rest[-1]["final"] and rest[-1]["num_codes"] == K
    assert code == 0 and outcomes.count((200, K)) > 6
    assert all(r == (200, K) or r == 503 or str(r).startswith("no connection")
               for r in outcomes), outcomes
    assert "[serve] drained and stopped" in "".join(s.lines)


CHROMIUM = ("/usr/bin/chromium", "/usr/bin/chromedriver")  # Debian's packages.


def _page_answer(driver) -> dict:
    """window.ovqvae once the page's request has ended (within 30 s), without error."""
    give_up = time.monotonic() + 30
    while time.monotonic() < give_up:
        state = driver.execute_script("return window.ovqvae")
        if state["done"] or state["error"]:
            break
        time.sleep(0.1)
    assert state["error"] is None and state["done"], state
    return state


def test_the_page_shows_samples_refining(server, tmp_path):
    found = CHROMIUM
    if not all(os.path.exists(path) for path in found):
        pytest.skip("Chromium and chromedriver are not installed (.ci/run installs them)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By

    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--window-size=1000,640",
                 f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(found[1]), options=options)
    try:
        driver.set_page_load_timeout(30)
        driver.get(server.url + "/")
        assert "Anytime sampling" in driver.title or "ovqvae" in driver.title
        driver.find_element(By.ID, "n").clear()
        driver.find_element(By.ID, "n").send_keys("8")
        driver.find_element(By.ID, "sample").click()
        state = _page_answer(driver)
        assert state["ks"] == [2, 4, 6, 8]  # k grew, one event per chunk of 2 codes.
        shown = driver.execute_script(
            "return [...document.querySelectorAll('#grid img')].map(i => i.naturalWidth)")
        assert shown == [8] * 8  # Eight decoded 8x8 samples on the page.
        assert "k = 8 of 8 codes" in driver.find_element(By.ID, "status").text
        # A quality floor: the answer's k is at least the profile's for it, marked on the
        # profile drawn beside the samples.
        profile = call(server.url + "/v1/models/ovqvae/profile")[1]["quality_profile"]
        floor = sorted(profile["psnr_mean"])[len(profile["psnr_mean"]) // 2]
        wanted = min(k for k, p in zip(profile["k"], profile["psnr_mean"]) if p >= floor)
        driver.find_element(By.CSS_SELECTOR, "input[value=quality]").click()
        for field, value in (("psnr", floor), ("deadline", 5000)):
            driver.find_element(By.ID, field).clear()
            driver.find_element(By.ID, field).send_keys(str(value))
        driver.find_element(By.ID, "sample").click()
        state = _page_answer(driver)
        assert len(state["marked"]) == 2 and state["marked"][0] == 8
        assert state["marked"][1] >= wanted
        driver.save_screenshot(str(tmp_path / "page.png"))
        assert os.path.getsize(tmp_path / "page.png") > 1000
        if os.environ.get("OVQVAE_SCREENSHOT"):
            shutil.copy(tmp_path / "page.png", os.environ["OVQVAE_SCREENSHOT"])
    finally:
        driver.quit()


def test_quality_floors_are_planned_with_the_served_profile(server, finished_run):
    import tensorflow as tf

    profile = json.loads(tf.saved_model.load(os.path.join(finished_run, "saved_model"))
                         .quality_profile.numpy())
    status, body, _ = call(server.url + "/v1/models/ovqvae/profile")
    assert status == 200 and body["quality_profile"] == profile
    status, body, _ = call(server.url + "/v1/models/ovqvae/metadata")
    assert body["metadata"]["quality_profile"] == profile
    psnr = profile["psnr_mean"]
    k_needed = next(k for k in range(2, K + 1) if psnr[k - 1] > psnr[0])
    floor = psnr[k_needed - 1]
    want = min(k for k in range(1, K + 1) if psnr[k - 1] >= floor)
    for seed in range(3):
        status, body, _ = call(server.url + "/v1/models/ovqvae:anytime", {
            "num_samples": 2, "deadline_ms": 2000, "seed": seed, "min_quality": {"psnr": floor}})
        assert status == 200 and body["num_codes"] >= want
    status, body, _ = call(server.url + "/v1/models/ovqvae:anytime", {
        "num_samples": 1, "deadline_ms": 2000, "min_quality": {"psnr": max(psnr) + 1}})
    assert status == 400 and "beyond what this model reaches" in body["error"]
    assert f'min_quality={{"psnr": {max(psnr) + 1}}}' in body["error"]  # As the client wrote it.
    start = time.monotonic()
    status, body, headers = call(server.url + "/v1/models/ovqvae:anytime", {
        "num_samples": 16, "deadline_ms": 0.5, "min_quality": {"psnr": psnr[-1]}})
    assert status == 503 and "reachable in time" in body["error"] and headers["Retry-After"]
    assert time.monotonic() - start < 0.5  # Refused at once.
    status, body, _ = call(server.url + "/v1/models/ovqvae:anytime", {
        "num_samples": 1, "deadline_ms": 100, "min_quality": {"ssim": 0.9}})
    assert status == 400 and 'expected one of {"psnr": dB} or {"fd_ratio": r}' in body["error"]
