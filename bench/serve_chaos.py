"""`ovqvae serve` under traffic as it really comes: the scenarios of a hostile client and of
an operator, each measured against its goal, printed as one table.

  queued      a deadline_ms=200 request behind 20 open 64-sample requests (long deadlines):
              answered (200 or 503) within 1.25 x 200 + 10 ms; a refused stream is a 503
  departed    200 64-sample requests whose clients reset their connections at once, then
              200 ms requests: the first on-time answer within 3 s
  mixed       sequential 100 ms :anytime requests while 3 clients loop :predict sample
              (64 samples, k = K): >= 90% on time
  big bodies  sequential 100 ms requests while 4 clients send 4 MB :predict bodies: >= 80%
  overload    30 clients at 20 ms deadlines for 5 s, then (2 s later) sequential 20 ms
              requests: >= 90%; the same after the 4 MB flood, at 100 ms
  inputs      bodies nested 100k deep, an unknown charset, a lying Content-Encoding, a
              2 kB header line: no 500
  drain       an upload stalled half-way, then SIGTERM: exit 0 within 35 s, UNLOADING meanwhile
  16 clients  16 closed-loop clients at half the fixed-k median latency, 5 runs: >= 95% on
              time in each

On time: HTTP 200 within 1.25 x deadline + 10 ms at the client; 503s count as misses.

  .venv/bin/python bench/serve_chaos.py [--saved_model=workdir/digits/saved_model]
      [--seconds=8] [--runs=5]
"""

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import struct
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from serve_load import Server, closed_loop  # noqa: E402

ANYTIME, PREDICT, STATUS = ("/v1/models/ovqvae:anytime", "/v1/models/ovqvae:predict",
                            "/v1/models/ovqvae")


def post(server, path, body, timeout=60):
    """(status, seconds) of one POST on a fresh connection."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    start = time.monotonic()
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, data, {"Content-Type": "application/json"})
    response = connection.getresponse()
    response.read()
    connection.close()
    return response.status, time.monotonic() - start


def on_time(status, seconds, deadline_ms):
    return status == 200 and seconds <= 1.25 * deadline_ms / 1e3 + 0.010


def sequential(server, deadline_ms, seconds, num_samples=4):
    """On-time share of back-to-back requests for `seconds` (one client, keep-alive)."""
    results = closed_loop(server, 1, seconds, ANYTIME, lambda s: {
        "num_samples": num_samples, "deadline_ms": deadline_ms, "seed": s})
    return sum(on_time(st, t, deadline_ms) for t, st, _ in results) / max(len(results), 1), \
        len(results)


def background(target, clients):
    """Starts `clients` threads running target(i, stop); returns stop()."""
    stop = threading.Event()
    threads = [threading.Thread(target=target, args=(i, stop), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()

    def finish():
        stop.set()
        for t in threads:
            t.join(120)
    return finish


def queued(server, K):
    def long_one(i, stop):
        post(server, ANYTIME, {"num_samples": 64, "deadline_ms": 60000, "seed": i})

    finish = background(long_one, 20)
    time.sleep(0.3)
    streamed = []
    thread = threading.Thread(target=lambda: streamed.append(post(server, ANYTIME, {
        "num_samples": 64, "deadline_ms": 200, "min_codes": K, "stream": True})))
    thread.start()
    status, seconds = post(server, ANYTIME, {"num_samples": 4, "deadline_ms": 200})
    thread.join(60)
    finish()
    stream, stream_seconds = streamed[0]
    ok = (seconds <= 1.25 * 0.2 + 0.010 and stream_seconds <= 1.25 * 0.2 + 0.010
          and stream in (200, 503))
    return ok, (f"answered {status} after {seconds * 1e3:.0f} ms; a stream asking for all "
                f"{K} codes: {stream} after {stream_seconds * 1e3:.0f} ms")


def departed(server):
    sockets = []
    body = json.dumps({"num_samples": 64, "deadline_ms": 60000}).encode()
    for _ in range(200):
        s = socket.create_connection((server.host, server.port))
        s.sendall(f"POST {ANYTIME} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
                  "\r\n".encode() + body)
        sockets.append(s)
    time.sleep(0.05)
    for s in sockets:  # Reset, not a polite close.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    start = time.monotonic()
    while time.monotonic() - start < 10:
        status, seconds = post(server, ANYTIME, {"num_samples": 4, "deadline_ms": 200})
        if on_time(status, seconds, 200):
            break
    waited = time.monotonic() - start
    return waited <= 3, f"first on-time 200 ms answer after {waited:.2f} s"


def during(server, body, clients, seconds, goal):
    """On-time share of sequential 100 ms requests while `clients` loop POSTing `body` to
    :predict; (share >= goal, text)."""
    def load(i, stop):
        while not stop.is_set():
            post(server, PREDICT, body)

    finish = background(load, clients)
    time.sleep(0.5)
    share, n = sequential(server, 100, seconds)
    finish()
    return share >= goal, f"{100 * share:.0f}% of {n} on time"


def mixed(server, K, seconds):
    return during(server, {"signature_name": "sample", "inputs": {
        "num_samples": 64, "num_codes": K, "seed": 1, "temperature": 1.0}}, 3, seconds, 0.9)


def big_bodies(server, seconds, image_shape):
    images = [[[[0.5] * image_shape[2]] * image_shape[1]] * image_shape[0]] * 2
    small = json.dumps({"signature_name": "encode", "inputs": {"images": images}})
    large = (small[:-1] + " " * (4_000_000 - len(small)) + "}").encode()
    return during(server, large, 4, seconds, 0.8)


def overload(server, seconds, deadline_ms):
    closed_loop(server, 30, 5.0, ANYTIME, lambda s: {"num_samples": 4,
                                                      "deadline_ms": deadline_ms, "seed": s})
    time.sleep(2.0)
    share, n = sequential(server, deadline_ms, seconds)
    return share >= 0.9, f"{100 * share:.0f}% of {n} on time at {deadline_ms:g} ms"


def inputs(server):
    statuses = []
    deep = b"[" * 100_000 + b"]" * 100_000
    statuses.append(post(server, PREDICT, deep)[0])
    for headers in ("Content-Type: application/json; charset=foo\r\n",
                    "Content-Encoding: gzip\r\n", "X-Big: " + "a" * 2000 * 5 + "\r\n"):
        body = b'{"num_samples": 1, "deadline_ms": 100}'
        with socket.create_connection((server.host, server.port), timeout=10) as s:
            s.sendall(f"POST {ANYTIME} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{headers}"
                      f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            statuses.append(int(s.recv(65536).split()[1]))
    return all(400 <= s < 500 for s in statuses), f"statuses {statuses}"


def drain(saved_model):
    server = Server(saved_model)
    stalled = socket.create_connection((server.host, server.port))
    stalled.sendall(f"POST {PREDICT} HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
                    '{"signature_name"'.encode())
    time.sleep(0.2)
    start = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    connection.request("GET", STATUS)
    response = connection.getresponse()
    state = json.loads(response.read())["model_version_status"][0]["state"]
    code = server.proc.wait(60)
    took = time.monotonic() - start
    stalled.close()
    ok = code == 0 and took <= 35 and response.status == 503 and state == "UNLOADING"
    return ok, f"status {response.status} {state}; exit {code} after {took:.1f} s"


def sixteen(server, K, seconds, runs, deadline_ms=None):
    fixed = closed_loop(server, 16, seconds, PREDICT, lambda s: {
        "signature_name": "sample", "inputs": {"num_samples": 4, "num_codes": K, "seed": s,
                                               "temperature": 1.0}})
    median = statistics.median(t for t, st, _ in fixed if st == 200) * 1e3
    deadline_ms = deadline_ms or median / 2
    shares = []
    for _ in range(runs):
        results = closed_loop(server, 16, seconds, ANYTIME, lambda s: {
            "num_samples": 4, "deadline_ms": deadline_ms, "seed": s})
        shares.append(sum(on_time(st, t, deadline_ms) for t, st, _ in results)
                      / max(len(results), 1))
        late = sum(st == 200 and not on_time(st, t, deadline_ms) for t, st, _ in results)
        print(f"  16 clients: {len(results)} requests, {late} late, "
              f"{sum(st != 200 for _, st, _ in results)} refused, mean k "
              f"{statistics.mean([a['num_codes'] for _, st, a in results if st == 200] or [0]):.1f}",
              flush=True)
    return min(shares) >= 0.95, (f"deadline {deadline_ms:.1f} ms (fixed-k median "
                                 f"{median:.1f} ms): " + ", ".join(f"{100 * s:.1f}%"
                                                                    for s in shares))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--saved_model", default=os.path.join(REPO, "workdir/digits/saved_model"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--deadline_ms", type=float, default=None,
                        help="The 16 clients' deadline (default: half the fixed-k median).")
    args = parser.parse_args()
    import tensorflow as tf

    shape = [int(d) for d in tf.saved_model.load(args.saved_model).image_shape.numpy()]
    server = Server(args.saved_model)
    K = server.code_length
    print(f"{args.saved_model}: K={K}, images {shape}, {os.cpu_count()} CPUs", flush=True)
    rows = []
    try:
        closed_loop(server, 4, 2.0, ANYTIME, lambda s: {"num_samples": 4, "deadline_ms": 100})
        for name, run in (
                ("queued", lambda: queued(server, K)),
                ("departed", lambda: departed(server)),
                ("mixed :predict + :anytime", lambda: mixed(server, K, args.seconds)),
                ("big bodies", lambda: big_bodies(server, args.seconds, shape)),
                ("after the big bodies", lambda: (time.sleep(2.0), sequential(
                    server, 100, args.seconds))[1]),
                ("overload, then recovery", lambda: overload(server, args.seconds, 20)),
                ("hostile inputs", lambda: inputs(server)),
                ("16 clients", lambda: sixteen(server, K, args.seconds, args.runs,
                                               args.deadline_ms))):
            result = run()
            if name == "after the big bodies":
                result = (result[0] >= 0.9, f"{100 * result[0]:.0f}% of {result[1]} on time")
            rows.append((name, *result))
            print(f"{name}: {'met' if result[0] else 'MISSED'}: {result[1]}", flush=True)
    finally:
        server.stop()
    rows.append(("stalled upload + SIGTERM", *drain(args.saved_model)))
    print(f"{rows[-1][0]}: {rows[-1][2]}")
    print("\n| scenario | goal met | measured |\n| --- | --- | --- |")
    for name, ok, text in rows:
        print(f"| {name} | {'yes' if ok else 'no'} | {text} |")


if __name__ == "__main__":
    main()
