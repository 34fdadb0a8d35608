"""Faults: kill -9 during training or extraction, then rerun; nothing is lost or doubled."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from conftest import REPO, SUBPROCESS_ENV

from ordered_vqvae import configs, models
from pipeline import extract, schema, sources
from pipeline.config import DataConfig

WORKER = os.path.join(REPO, "tests", "resume_worker.py")


def _train(kind, workdir, out):
    return subprocess.Popen([sys.executable, WORKER, kind, str(workdir), str(out)],
                            env=SUBPROCESS_ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _latest_step(workdir) -> int:
    latest = tf.train.latest_checkpoint(os.path.join(str(workdir), "checkpoints"))
    return int(latest.rsplit("-", 1)[1]) if latest else 0


@pytest.mark.parametrize("kind,steps_per_epoch", [("autoencoder", 22), ("prior", 32)])
def test_kill_9_mid_training_then_rerun_ends_bitwise_equal(tmp_path, kind, steps_per_epoch):
    """The worker trains 4 epochs with a checkpoint every 3 batches. One run goes through;
    another is killed with SIGKILL once its checkpoints pass a random batch inside epoch 2
    or 3, then rerun. The reruns resume mid-epoch on the same batches, with the same
    truncation lengths and dropout masks: final weights and metrics are bitwise equal."""
    reference = _train(kind, tmp_path / "reference", tmp_path / "reference.npz")
    target = random.randint(steps_per_epoch + 1, 3 * steps_per_epoch - 1)
    victim = _train(kind, tmp_path / "killed", tmp_path / "killed.npz")
    while victim.poll() is None and _latest_step(tmp_path / "killed") < target:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, f"the run ended before batch {target}"
    killed_at = _latest_step(tmp_path / "killed")
    assert killed_at < 4 * steps_per_epoch
    assert reference.wait() == 0, reference.stderr.read()
    rerun = _train(kind, tmp_path / "killed", tmp_path / "killed.npz")
    assert rerun.wait() == 0, rerun.stderr.read()

    want, got = np.load(tmp_path / "reference.npz"), np.load(tmp_path / "killed.npz")
    assert len(want.files) == len(got.files) > 4
    for name in want.files:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"killed at {killed_at}")
    metric = [json.load(open(f"{tmp_path / name}.npz.json")) for name in ("reference", "killed")]
    assert metric[0] == metric[1]
    history = json.load(open(tmp_path / "killed" / "history.json"))
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_kill_9_mid_extraction_then_rerun_writes_every_id_once(tmp_path):
    model = models.OrderedVQVAE(configs.preset("digits", hidden=(16,), latent_channels=8,
                                               codebook_size=32))
    model(tf.zeros((1, 8, 8, 1)))
    autoencoder = models.save_autoencoder(model, str(tmp_path / "autoencoder"))
    out = tmp_path / "codes"
    job = ("from pipeline import extract; from pipeline.config import DataConfig; "
           f"extract.run({autoencoder!r}, {str(out)!r}, DataConfig('digits'), num_shards=3, "
           "beam_args=['--direct_num_workers=2', '--direct_running_mode=multi_processing'])")
    # Its own process group: the kill takes the Beam worker processes too.
    victim = subprocess.Popen([sys.executable, "-c", job], env=SUBPROCESS_ENV,
                              start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while victim.poll() is None and not [n for n in os.listdir(tmp_path) if ".tmp-" in n]:
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(random.uniform(0.5, 3.0))  # Somewhere in reading, encoding or writing.
    os.killpg(victim.pid, signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, "the extraction ended before the kill"
    assert not out.exists()  # Nothing half-written under the final name.

    meta = extract.run(autoencoder, str(out), DataConfig("digits"), num_shards=3)
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp-" in n) == []
    for split in ("train", "test"):
        ids = [schema.parse_example(r.numpy(), 8)["id"] for r in tf.data.TFRecordDataset(
            sorted(tf.io.gfile.glob(str(out / f"{split}-*.tfrecord"))))]
        expected = sources.to_numpy(sources.load("digits", split)[0])[2]
        assert len(ids) == len(set(ids)) == meta["counts"][split]
        assert set(ids) == {i.decode() if isinstance(i, bytes) else i for i in expected}
