"""`ovqvae serve` against hostile clients and as an operator runs it: bodies that break
parsers, lying headers, huge uploads, stalled connections, a bug inside a handler, SIGTERM
with an upload stalled half-way, JSON logs."""

import asyncio
import json
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest

from test_serve import Server, call

URL = "/v1/models/ovqvae"


@pytest.fixture(scope="module")
def served(finished_run):
    s = Server(os.path.join(finished_run, "saved_model"))
    yield s
    s.stop()


def raw_exchange(target, data: bytes, timeout=10.0) -> bytes:
    """Sends `data` on a fresh connection and reads until the server closes it."""
    host, port = target.url[len("http://"):].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def status_and_json(answer: bytes):
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body), head.decode()


def test_broken_bodies_and_headers_get_a_json_4xx_never_a_500(served):
    deep = b"[" * 100_000 + b"]" * 100_000
    status, answer, _ = call(f"{served.url}{URL}:predict", raw=deep)
    assert status == 400 and "nested too deeply" in answer["error"]
    post = f"POST {URL}:anytime HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
    body = b'{"num_samples": 1, "deadline_ms": 100}'
    for headers, want, message in (
            (b"Content-Type: application/json; charset=foo\r\n", 415, "charset='foo'"),
            (b"Content-Encoding: gzip\r\n", 400, "could not be read"),
            (b"Content-Encoding: br\r\n", 400, "could not be"),
            (b"X-Big: " + b"a" * 20000 + b"\r\n", 400, "could not be parsed")):
        answer = raw_exchange(served, post + headers + b"Content-Length: %d\r\n\r\n" % len(body)
                              + body)
        got, parsed, _ = status_and_json(answer)
        assert got == want and message in parsed["error"], (headers[:40], answer[:300])
    for request in (b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GARBAGE\r\n\r\n"):
        got, parsed, _ = status_and_json(raw_exchange(served, request))
        assert got == 400 and "could not be parsed" in parsed["error"]
    got, parsed, head = status_and_json(raw_exchange(
        served, f"PUT {URL}:anytime HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        "Content-Length: 0\r\n\r\n".encode()))
    assert got == 405 and "Allow: POST" in head and parsed["error"]
    _, text, _ = call(f"{served.url}/metrics")
    assert 'status="415"' in text and 'endpoint="unparsed",status="400"' in text
    assert 'status="500"' not in text
    assert "Traceback" not in "".join(served.lines)


def test_a_large_predict_body_is_parsed_off_the_event_loop(served):
    """A 4 MB :predict body (parsed in the worker process) gets the same answer as the same
    inputs in a small body, while :anytime requests keep being answered."""
    images = np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 1)).round(3).tolist()
    small = json.dumps({"signature_name": "encode", "inputs": {"images": images}})
    large = small[:-1] + " " * (4_000_000 - len(small)) + "}"
    answers = []

    def anytime():
        for _ in range(5):
            answers.append(call(f"{served.url}{URL}:anytime",
                                {"num_samples": 1, "deadline_ms": 2000})[0])

    thread = threading.Thread(target=anytime)
    thread.start()
    status, big, _ = call(f"{served.url}{URL}:predict", raw=large.encode())
    thread.join(60)
    assert status == 200 and answers == [200] * 5
    assert big == call(f"{served.url}{URL}:predict", raw=small.encode())[1]
    status, answer, _ = call(f"{served.url}{URL}:predict", raw=b"[" * 2_000_000)
    assert status == 400 and "nested too deeply" in answer["error"]


def test_a_bug_is_a_500_logged_once_with_its_traceback_and_counted(finished_run, caplog,
                                                                    monkeypatch):
    from aiohttp.test_utils import TestClient, TestServer

    from pipeline.serving import ServeConfig
    from pipeline.serving.app import Server as App
    from pipeline.serving.model import Model

    config = ServeConfig(saved_model=os.path.join(finished_run, "saved_model"), max_batch=2,
                         max_samples=2)
    app = App(config)

    def broken(self, signature, inputs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(Model, "call", broken)

    async def main():
        async with TestClient(TestServer(app.app())) as client:
            response = await client.post(f"{URL}:predict", json={
                "signature_name": "decode", "inputs": {"codes": [[1] * 8], "num_codes": 2}})
            answer = await response.json()
            metrics = await (await client.get("/metrics")).text()
            return response.status, answer, metrics

    status, answer, metrics = asyncio.run(main())
    assert status == 500 and answer == {"error": "internal error (RuntimeError: a bug)"}
    assert f'ovqvae_requests_total{{endpoint="{URL}:predict",status="500"}} 1.0' in metrics
    bugs = [r for r in caplog.records if r.name == "ovqvae.serve" and r.exc_info]
    assert len(bugs) == 1 and "500 on POST" in bugs[0].getMessage()


def test_stalled_clients_are_timed_out_and_sigterm_drains_within_its_bound(finished_run):
    s = Server(os.path.join(finished_run, "saved_model"), "--log_format=json",
               "--header_timeout_s=1", "--body_timeout_s=4", "--drain_seconds=1")
    try:
        # Half-sent headers (slowloris): closed after the header timeout.
        start = time.monotonic()
        assert raw_exchange(s, f"POST {URL}:anytime HTTP/1.1\r\nHost: x\r\n".encode()) == b""
        assert 0.9 < time.monotonic() - start < 4
        # Half a body: 408 after the body timeout.
        start = time.monotonic()
        got, parsed, _ = status_and_json(raw_exchange(
            s, f"POST {URL}:anytime HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{{".encode()))
        assert got == 408 and "within 4 s" in parsed["error"]
        assert 3.9 < time.monotonic() - start < 8
        status, _, _ = call(f"{s.url}{URL}:anytime", {"num_samples": 1, "deadline_ms": 1000})
        assert status == 200
        # An upload stalled half-way, then SIGTERM: UNLOADING at once, exit 0 after the drain.
        host, port = s.url[len("http://"):].split(":")
        stalled = socket.create_connection((host, int(port)), timeout=10)
        stalled.sendall(f"POST {URL}:predict HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
                        "\r\n{\"signature_name\"".encode())
        time.sleep(0.2)
        start = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        status, body, _ = call(f"{s.url}{URL}")
        assert status == 503 and body["model_version_status"][0]["state"] == "UNLOADING"
        assert call(f"{s.url}{URL}:anytime", {"num_samples": 1, "deadline_ms": 100})[0] == 503
        assert s.proc.wait(35) == 0
        # The drain (1 s), closing what is left (1 s) and the process's teardown (about 2 s
        # on 2 cores); waiting for the body timeout would end no sooner than 4 s + teardown.
        assert time.monotonic() - start < 1 + 3.5
        stalled.close()
    finally:
        s.stop()
    time.sleep(0.2)
    entries = [json.loads(line) for line in s.lines]  # Every line is one JSON object.
    requests = [e for e in entries if e.get("event") == "request"]
    ok = [e for e in requests if e["path"] == f"{URL}:anytime" and e["status"] == 200]
    assert ok and ok[0]["k"] >= 1 and ok[0]["deadline_ms"] == 1000 and ok[0]["ms"] > 0
    assert sorted(e["status"] for e in requests if e["method"] == "POST") == [200, 408, 503]
    assert any("drained and stopped" in e["message"] for e in entries)
    assert not any("traceback" in e for e in entries)
