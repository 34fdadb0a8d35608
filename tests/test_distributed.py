"""tf.distribute: MirroredStrategy over 2 logical CPUs and MultiWorkerMirroredStrategy with
2 worker processes on loopback train like one device with the same global batch.

Each global batch, with its truncation lengths, comes from the seeded training stream and
is split between replicas; losses over kept codes are normalised by the global count and
batch norm is synchronised. With plain SGD the weights then agree to float rounding. Adam
turns rounding in near-zero gradients into full-size steps, so with the real optimizers the
test compares the resulting metrics instead.
"""

import json
import os
import socket
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SUBPROCESS_ENV
from pipeline import workdir as workdir_module

WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
# What Keras's own symbolic build raises on a batch peeked from a multi-worker dataset.
STOCK_BUILD_ERROR = r"(?s)Attempt to convert a value \(.*PerReplica.*with an unsupported type"


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(mode, optimizer, out_dir, *extra):
    out = os.path.join(out_dir, f"{mode}-{optimizer}.npz")
    workdir = os.path.join(out_dir, f"{mode}-{optimizer}")
    args = [sys.executable, WORKER, mode, optimizer, workdir, out, *extra]
    if mode != "multi_worker":
        procs = [subprocess.Popen(args, env=SUBPROCESS_ENV, stderr=subprocess.PIPE, text=True)]
    else:
        workers = [f"127.0.0.1:{p}" for p in _free_ports(2)]
        procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env={
            **SUBPROCESS_ENV, "TF_CONFIG": json.dumps({"cluster": {"worker": workers},
                                            "task": {"type": "worker", "index": i}})})
            for i in range(2)]
    return procs, workdir, out


def _train(mode, optimizer, out_dir):
    procs, workdir, out = _start(mode, optimizer, out_dir)
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
    history = {part: json.load(open(os.path.join(workdir, part, "history.json")))
               for part in ("ae", "prior")}
    return np.load(out), json.load(open(out + ".json")), history


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("single"))
    return {opt: _train("single", opt, out) for opt in ("sgd", "adam")}


@pytest.mark.parametrize("mode", ["mirrored", "multi_worker"])
def test_two_replicas_train_like_one_device(single, tmp_path, mode):
    weights, metrics, history = _train(mode, "sgd", str(tmp_path))
    want_weights, want_metrics, want_history = single["sgd"]
    assert metrics["replicas"] == 2 and want_metrics["replicas"] == 1
    assert sorted(weights.files) == sorted(want_weights.files)
    for name in want_weights.files:  # 2 epochs of autoencoder and prior.
        np.testing.assert_allclose(weights[name], want_weights[name], atol=1e-5, err_msg=name)
    for part in ("ae", "prior"):
        for got, want in zip(history[part], want_history[part], strict=True):
            for key in want:
                if key != "stage":
                    assert got[key] == pytest.approx(want[key], rel=1e-5), (part, key)

    _, metrics, _ = _train(mode, "adam", str(tmp_path))
    want = single["adam"][1]
    for k in ("2", "8"):
        assert metrics["ae_mse"][k] == pytest.approx(want["ae_mse"][k], rel=1e-3)
    assert metrics["prior_bits"] == pytest.approx(want["prior_bits"], rel=1e-2)


def test_pipeline_stage_under_the_mirrored_flag(finished_run, tmp_path):
    """`--strategy=mirrored` (here one CPU replica) runs the same training as the default."""
    import dataclasses

    from conftest import tiny_config
    from pipeline import stages

    config = dataclasses.replace(tiny_config(), strategy="mirrored")
    got = stages.run_stage(config, str(tmp_path / "wd"), "autoencoder", verbose=0)["result"]
    want = workdir_module.read_manifest(finished_run, "autoencoder")["result"]
    for k, mse in want["mse_by_codes"].items():
        assert got["mse_by_codes"][k] == pytest.approx(mse, rel=1e-4), k
    with pytest.raises(ValueError, match="strategy='tpu', expected '' or 'mirrored'"):
        dataclasses.replace(config, strategy="tpu").distribution()


@pytest.mark.parametrize("model", ["autoencoder", "prior"])
def test_multi_worker_training_fails_without_each_symbolic_build_override(tmp_path, model):
    # Keras (3.15) builds a model under a strategy from a batch peeked from the distributed
    # dataset; with MultiWorkerMirroredStrategy that fails, which each override avoids.
    procs, _, _ = _start("multi_worker", "sgd", str(tmp_path), f"stock_{model}")
    errors = [proc.communicate(timeout=600)[1] for proc in procs]
    assert [proc.returncode for proc in procs] != [0, 0]
    assert any(re.search(STOCK_BUILD_ERROR, err) for err in errors), errors[0][-3000:]
