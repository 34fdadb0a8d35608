"""Load on `ovqvae serve`: anytime sampling against fixed-k serving, measured in one run.

Closed-loop clients on loopback (each sends a request, waits for the answer, sends the
next) at 1, 2, 4, 8, 16 and 32 concurrent clients, for three servings of one SavedModel:

  fixed:    POST :predict with signature "sample" and k = K, what a plain TF Serving
            deployment does (each request on its own);
  anytime:  POST :anytime with a deadline (default: half the fixed-k median latency at 16
            clients), continuous batching across requests;
  one-at-a-time (16 clients only): the anytime server with --max_batch equal to one
            request's samples, so requests never share a chunk.

Per row: p50 and p99 latency at the client, deadline misses (answers later than the
deadline), mean k, samples per second and codes per second (samples x k: the work
done). Last, the model's own gain from batching: row-codes per second of `extend` at 16
requests' rows against one request's, an upper bound on what continuous batching can add.
Writes a plot of latency and mean k against concurrency. The model is the MNIST preset
(K = 64) with untrained weights (latency does not depend on what the weights learnt), with
the small prior preset or `--prior=reference`, or `--saved_model`.

  .venv/bin/python bench/serve_load.py [--prior=mnist|reference] [--seconds=8]
      [--export_dtype=float32|bfloat16_weights]
      [--num_samples=4] [--deadline_ms=D] [--plot=docs/serve_load.png]
"""

import argparse
import http.client
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
CONCURRENCY = (1, 2, 4, 8, 16, 32)


def build_saved_model(prior_preset: str, path: str, dtype: str = "float32") -> str:
    import tensorflow as tf

    from ordered_vqvae import configs, export, models
    from ordered_vqvae.prior import CodePrior, load_prior, save_prior

    ae = models.OrderedVQVAE(configs.preset("mnist"))
    ae(tf.zeros((1, 28, 28, 1)))
    prior = CodePrior.from_config_for(configs.prior_preset(prior_preset), ae.code_length,
                                      ae.codebook_size)
    prior(tf.zeros((1, 1), tf.int32))
    if dtype != "float32":  # The copy `ovqvae export --export_dtype` writes.
        prior = load_prior(save_prior(prior, path + "-prior"), dtype)
    return export.export(ae, prior, path)


class Server:
    def __init__(self, saved_model, *flags):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipeline.cli", "serve", f"--saved_model={saved_model}",
             "--port=0", *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True, env={**os.environ, "PYTHONPATH": REPO})
        for line in self.proc.stdout:
            found = re.search(r"on http://([\d.]+):(\d+)/ \(K=(\d+)\)", line)
            if found:
                self.host, self.port, self.code_length = (
                    found.group(1), int(found.group(2)), int(found.group(3)))
                threading.Thread(target=lambda: [None for _ in self.proc.stdout],
                                 daemon=True).start()
                return
        raise RuntimeError("the server did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(120)


def closed_loop(server, clients, seconds, path, make_body):
    """Runs `clients` closed-loop clients for `seconds`; returns [(latency s, status, answer)].
    A refused client (503) waits as its Retry-After header asks before sending again."""
    results, lock, stop = [], threading.Lock(), time.monotonic() + seconds

    def client(i):
        connection = http.client.HTTPConnection(server.host, server.port, timeout=120)
        n = 0
        while time.monotonic() < stop:
            body = json.dumps(make_body(i * 100003 + n)).encode()
            start = time.monotonic()
            connection.request("POST", path, body, {"Content-Type": "application/json"})
            response = connection.getresponse()
            answer = json.loads(response.read())
            with lock:
                results.append((time.monotonic() - start, response.status, answer))
            n += 1
            if response.status == 503:  # Refused: back off as the server asks.
                time.sleep(max(min(float(response.getheader("Retry-After", "1")),
                                   stop - time.monotonic()), 0))
        connection.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def batching_gain(saved_model, rows, factor=16, repeats=3):
    """Row-codes per second of the SavedModel's `extend` at rows * factor over rows: what
    sharing chunk calls can gain at most on this machine."""
    import numpy as np

    from pipeline.serving.model import Model

    model = Model(saved_model)
    K = model.code_length

    def rate(batch):
        ones, limit = np.ones(batch, np.float32), np.full(batch, K, np.int32)
        model.extend(model.begin(batch, 0), ones, limit, 8)  # Compile.
        best = float("inf")
        for _ in range(repeats):
            state, start = model.begin(batch, 0), time.perf_counter()
            for _ in range(-(-K // 8)):
                state = model.extend(state, ones, limit, 8)
            best = min(best, time.perf_counter() - start)
        return batch * K / best

    return rate(rows * factor) / rate(rows)


def summarise(results, seconds, num_samples, deadline, code_length):
    ok = [(t, a) for t, status, a in results if status == 200]
    latencies = sorted(t for t, _ in ok)
    if not latencies:
        return {"requests": 0, "refused": len(results)}
    ks = [a.get("num_codes", code_length) for _, a in ok]
    p = lambda q: latencies[min(len(latencies) - 1, int(q * len(latencies)))]  # noqa: E731
    return {"requests": len(ok), "refused": len(results) - len(ok), "p50_ms": 1e3 * p(0.5),
            "p99_ms": 1e3 * p(0.99),
            "miss": (sum(t > deadline for t in latencies) / len(latencies)) if deadline else None,
            "mean_k": statistics.mean(ks), "samples_per_s": len(ok) * num_samples / seconds,
            "codes_per_s": sum(ks) * num_samples / seconds}


def row(name, clients, s, deadline_ms):
    if not s["requests"]:
        return f"| {name} | {clients} | - | - | - | - | - | - | {s['refused']} |"
    miss = "" if s["miss"] is None else f"{100 * s['miss']:.1f}%"
    return (f"| {name} | {clients} | {s['p50_ms']:.0f} | {s['p99_ms']:.0f} | {miss} | "
            f"{s['mean_k']:.1f} | {s['samples_per_s']:.1f} | {s['codes_per_s']:.0f} | "
            f"{s['refused']} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prior", default="mnist", choices=["mnist", "reference"])
    parser.add_argument("--saved_model", default=None, help="Serve this instead of building one.")
    parser.add_argument("--export_dtype", default="float32", choices=["float32", "bfloat16_weights"],
                        help="The built SavedModel's prior precision (as `ovqvae export`).")
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--num_samples", type=int, default=4)
    parser.add_argument("--deadline_ms", type=float, default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    tmp = tempfile.mkdtemp(prefix="ovqvae-load-")
    saved = args.saved_model or build_saved_model(args.prior, os.path.join(tmp, "saved_model"),
                                                  args.export_dtype)
    n = args.num_samples
    print(f"MNIST preset, prior preset '{args.prior}' ({args.export_dtype}), {n} samples per request, "
          f"{args.seconds:g} s per row, {os.cpu_count()} CPUs", flush=True)

    server = Server(saved)
    K = server.code_length
    fixed = {}
    try:
        def fixed_body(seed):
            return {"signature_name": "sample", "inputs": {"num_samples": n, "num_codes": K,
                                                           "seed": seed, "temperature": 1.0}}

        closed_loop(server, 2, 2.0, "/v1/models/ovqvae:predict", fixed_body)  # Compile.
        for clients in CONCURRENCY:
            fixed[clients] = closed_loop(server, clients, args.seconds,
                                         "/v1/models/ovqvae:predict", fixed_body)
        base16 = summarise(fixed[16], args.seconds, n, None, K)
        deadline_ms = args.deadline_ms or base16["p50_ms"] / 2
        deadline = deadline_ms / 1e3

        def anytime_body(seed):
            return {"num_samples": n, "deadline_ms": deadline_ms, "seed": seed}

        anytime = {c: closed_loop(server, c, args.seconds, "/v1/models/ovqvae:anytime",
                                  anytime_body) for c in CONCURRENCY}
    finally:
        server.stop()
    single = Server(saved, f"--max_batch={n}")
    try:
        one_at_a_time = closed_loop(single, 16, args.seconds, "/v1/models/ovqvae:anytime",
                                    anytime_body)
    finally:
        single.stop()

    print(f"\ndeadline {deadline_ms:.0f} ms (half the fixed-k median latency at 16 clients)")
    print("| serving | clients | p50 ms | p99 ms | missed deadline | mean k | samples/s | "
          "codes/s | refused |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    summary = {}
    for c in CONCURRENCY:
        summary[("fixed", c)] = summarise(fixed[c], args.seconds, n, deadline, K)
        summary[("anytime", c)] = summarise(anytime[c], args.seconds, n, deadline, K)
    for c in CONCURRENCY:
        print(row("fixed k=K (:predict)", c, summary[("fixed", c)], deadline_ms))
    for c in CONCURRENCY:
        print(row("anytime (:anytime)", c, summary[("anytime", c)], deadline_ms))
    alone = summarise(one_at_a_time, args.seconds, n, deadline, K)
    print(row("anytime, one request at a time", 16, alone, deadline_ms))
    at16 = summary[("anytime", 16)]
    within = sum(t <= 1.25 * deadline + 0.010 for t, s, _ in anytime[16] if s == 200)
    print(f"\nat 16 clients: {100 * within / max(at16['requests'], 1):.1f}% of anytime answers "
          f"within 1.25 x deadline + 10 ms; mean k {at16['mean_k']:.1f} of {K}; continuous "
          f"batching {at16['samples_per_s'] / max(alone['samples_per_s'], 1e-9):.1f}x the "
          f"samples/s and {at16['codes_per_s'] / max(alone['codes_per_s'], 1e-9):.1f}x the "
          "codes/s of one request at a time")
    print(f"the model's own batching gain, {16 * n} rows against {n}: "
          f"{batching_gain(saved, n):.1f}x row-codes/s")
    if args.plot:
        plot(summary, deadline_ms, args.plot, args.prior)


def plot(summary, deadline_ms, path, prior):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ordered_vqvae.atomic import atomic_file

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode, style in (("fixed", "--"), ("anytime", "-")):
        for q in ("p50_ms", "p99_ms"):
            left.plot(CONCURRENCY, [summary[(mode, c)].get(q, float("nan")) for c in CONCURRENCY],
                      style, marker="o", label=f"{mode} {q[:3]}")
        right.plot(CONCURRENCY, [summary[(mode, c)].get("mean_k", float("nan"))
                                 for c in CONCURRENCY], style, marker="o", label=mode)
    left.axhline(deadline_ms, color="gray", lw=0.8, label="deadline")
    left.set(xscale="log", yscale="log", xlabel="concurrent clients", ylabel="latency (ms)",
             title=f"Latency at the client (prior '{prior}')")
    right.set(xscale="log", xlabel="concurrent clients", ylabel="mean k (of 64)",
              title="Codes per answer")
    for ax in (left, right):
        ax.set_xticks(CONCURRENCY, [str(c) for c in CONCURRENCY])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
