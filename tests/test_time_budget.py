"""Training to a time budget (anytime training), the learning-rate schedule that follows it,
the budget's split among the stages, and the presets chosen for the machine."""

import json
import math
import os
import time

import numpy as np
import pytest

from conftest import TINY_AE, TINY_PRIOR


def test_warmup_cosine_follows_steps_or_progress_whichever_is_further():
    import tensorflow as tf

    from ordered_vqvae.schedules import WarmupCosine

    progress = tf.Variable(0.0)
    schedule = WarmupCosine(1e-3, warmup_steps=10, total_steps=100, progress=progress)

    def want(step, p):
        warm = min((step + 1) / 10, 1.0)
        return 1e-3 * warm * 0.5 * (1 + math.cos(math.pi * min(max(step / 100, p), 1.0)))

    for step, p in ((0, 0.0), (4, 0.0), (9, 0.0), (50, 0.0), (50, 0.8), (99, 0.2), (150, 0.0),
                    (20, 1.0)):
        progress.assign(p)
        np.testing.assert_allclose(float(schedule(step)), want(step, p), rtol=1e-5, atol=1e-9)
    progress.assign(1.0)
    assert float(schedule(30)) == pytest.approx(0.0, abs=1e-12)  # Time spent: annealed.


def test_parse_duration():
    from pipeline.run_config import parse_duration

    assert parse_duration("30m") == 1800
    assert parse_duration("90s") == 90
    assert parse_duration("1.5h") == 5400
    assert parse_duration("45") == 45
    assert parse_duration("0") == 0
    for bad in ("", "m", "ten minutes", "-5m", "inf"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration(bad)


def test_budget_shares_pass_unused_time_to_later_stages():
    from pipeline.stages import BUDGET_SHARES, STAGES, stage_deadline

    names = [s.name for s in STAGES]
    assert sorted(BUDGET_SHARES) == sorted(names)
    assert sum(BUDGET_SHARES.values()) == pytest.approx(1.0)
    # A fresh run: the autoencoder gets its share of the whole budget.
    assert stage_deadline(1000.0, "autoencoder", names, now=0.0) == pytest.approx(600.0)
    # The prior, starting at 700 s of 1000 with export and report still to come, gets
    # 0.28 / (0.28 + 0.04 + 0.04) of the 300 s left.
    assert stage_deadline(1000.0, "prior", names[2:], now=700.0) == pytest.approx(
        700.0 + 300.0 * 0.28 / 0.36)
    # Past the end: no time at all.
    assert stage_deadline(1000.0, "prior", names[2:], now=1200.0) == pytest.approx(1200.0)


def _digits():
    from sklearn.datasets import load_digits

    return (load_digits().images[..., None] / 16.0).astype(np.float32)


def test_training_stops_on_its_deadline_and_a_rerun_continues(tmp_path):
    """A deadline stops training between steps, mid-epoch, with a checkpoint at that step;
    the model is complete (it reconstructs), and a resumed run starts from the saved step."""
    import tensorflow as tf

    from ordered_vqvae import training
    from ordered_vqvae.configs import preset

    images = _digits()
    config = preset("digits", **{**TINY_AE, "epochs": 1000, "lr_schedule": "cosine",
                                 "warmup_steps": 5})
    workdir = str(tmp_path / "w")
    start = time.time()
    model = training.train_autoencoder(config, images, None, workdir, verbose=0,
                                       deadline=start + 6.0)
    seconds = time.time() - start
    steps = int(model.optimizer.iterations.numpy())
    # The stop comes between compiled calls of at most 16 steps after the deadline; the
    # first call's tracing comes before any step, so allow for it.
    assert seconds < 6.0 + 20.0, seconds
    with open(os.path.join(workdir, "history.json")) as f:
        history = json.load(f)
    assert history[-1]["budget_stop"] == 1.0
    spe = len(images) // config.batch_size
    assert steps > 0 and history[-1]["epoch"] < 1000
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(workdir,
                                                                              "checkpoints")))
    saved_epoch = int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE"))
    saved_batch = int(reader.get_tensor("batch/.ATTRIBUTES/VARIABLE_VALUE"))
    assert saved_epoch * spe + saved_batch == steps  # The checkpoint is at the last step.
    assert float(reader.get_tensor("progress/.ATTRIBUTES/VARIABLE_VALUE")) == pytest.approx(
        1.0)
    recon = model.reconstruct(images[:8]).numpy()
    assert recon.shape == (8, 8, 8, 1) and np.isfinite(recon).all()

    resumed = training.train_autoencoder(config, images, None, workdir, resume=True,
                                         verbose=0, deadline=time.time() + 4.0)
    assert int(resumed.optimizer.iterations.numpy()) > 0
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(os.path.join(workdir,
                                                                              "checkpoints")))
    later = (int(reader.get_tensor("epoch/.ATTRIBUTES/VARIABLE_VALUE")) * spe
             + int(reader.get_tensor("batch/.ATTRIBUTES/VARIABLE_VALUE")))
    assert later > steps  # It went on from the saved step, not from zero.


def test_a_rerun_without_a_budget_trains_on_from_a_budget_stop(tmp_path):
    """A stage that spent its whole budget (its schedule annealed to 0) and is resumed
    without one follows its steps again: its weights move."""
    from ordered_vqvae import training
    from ordered_vqvae.configs import preset

    images = _digits()
    config = preset("digits", **{**TINY_AE, "epochs": 3, "lr_schedule": "cosine"})
    workdir = str(tmp_path / "w")
    stopped = training.train_autoencoder(config, images, None, workdir, verbose=0,
                                         deadline=time.time())  # Stops after one call.
    before = stopped.get_weights()
    with open(os.path.join(workdir, "history.json")) as f:
        assert json.load(f)[-1]["budget_stop"] == 1.0
    resumed = training.train_autoencoder(config, images, None, workdir, resume=True,
                                         verbose=0)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(before, resumed.get_weights()))
    assert moved > 1e-3, moved


@pytest.mark.slow
def test_run_with_a_tiny_budget_stops_on_time_and_a_rerun_resumes(tmp_path):
    """`ovqvae run --time_budget`: the whole run ends near its budget, the SavedModel loads
    and samples, the report says what the budget bought, status says the autoencoder
    stopped on its budget, and a rerun continues its training."""
    import tensorflow as tf

    from conftest import ovqvae

    budget = 90
    flags = ([f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
              for k, v in {**TINY_AE, "epochs": 10000}.items()]
             + [f"--prior_{k}={v}" for k, v in {**TINY_PRIOR, "epochs": 10000}.items()]
             + ["--report_samples=4", "--verbose=2"])
    workdir = str(tmp_path / "wd")
    start = time.time()
    proc = ovqvae("run", f"--workdir={workdir}", f"--time_budget={budget}s", *flags,
                  check_rc=0)
    seconds = time.time() - start
    # The process's own start and TensorFlow's import come on top of the budget.
    assert seconds < budget * 1.1 + 30, seconds
    assert "time budget spent" in proc.stdout
    manifests = {name: json.load(open(os.path.join(workdir, "manifests", f"{name}.json")))
                 for name in ("autoencoder", "prior")}
    for name, manifest in manifests.items():
        trained = manifest["result"]["training"]
        assert trained["budget_stop"], (name, trained)
        assert 0 < trained["epochs_trained"] < 10000
    first = manifests["autoencoder"]["result"]["training"]["epochs_trained"]
    model = tf.saved_model.load(os.path.join(workdir, "saved_model"))
    out = model.signatures["sample"](num_samples=tf.constant(2), num_codes=tf.constant(4),
                                     seed=tf.constant(0), temperature=tf.constant(1.0))
    assert out["images"].shape == (2, 8, 8, 1)
    report = open(os.path.join(workdir, "report", "report.md")).read()
    assert "## Training" in report and "the time budget |" in report
    status = ovqvae("status", f"--workdir={workdir}", check_rc=0).stdout
    assert "stopped on its time budget" in status

    proc = ovqvae("train_autoencoder", f"--workdir={workdir}", "--time_budget=8s",
                  "--verbose=2", check_rc=0)
    assert "training continues from its checkpoint" in proc.stdout
    again = json.load(open(os.path.join(workdir, "manifests", "autoencoder.json")))
    assert again["result"]["training"]["epochs_trained"] > first


def test_presets_follow_the_machine_and_the_shape():
    from ordered_vqvae.configs import PRESETS, PRIOR_PRESETS
    from pipeline.config import default_preset_family, preset_for_shape, resolve_preset

    assert default_preset_family() == "cpu"  # No GPU on the machines the tests run on.
    assert preset_for_shape((32, 32, 3), "cpu") == "cifar10_cpu"
    assert preset_for_shape((64, 64, 3), "cpu") == "celeb_a_cpu"
    assert preset_for_shape((32, 32, 3), "reference") == "cifar10"
    assert preset_for_shape((28, 28, 1), "cpu") == preset_for_shape((28, 28, 1)) == "mnist"
    assert preset_for_shape((8, 8, 1), "cpu") == "digits"
    assert resolve_preset(None, (32, 32, 3)) == "cifar10_cpu"
    assert resolve_preset("reference", (32, 32, 3)) == "cifar10"
    assert resolve_preset("cifar10", (64, 64, 3)) == "cifar10"
    # The reference keeps the paper's plain stack; the CPU presets keep its code.
    assert PRESETS["cifar10"].architecture == "plain"
    assert PRESETS["cifar10"].lr_schedule == "constant"
    for name in ("cifar10", "celeb_a"):
        cpu, ref = PRESETS[f"{name}_cpu"], PRESETS[name]
        assert (cpu.code_length, cpu.codebook_size) == (ref.code_length, ref.codebook_size)
        assert cpu.quantization == ref.quantization == "channel"
        assert PRIOR_PRESETS[f"{name}_cpu"].width < PRIOR_PRESETS[name].width
    with pytest.raises(ValueError, match="cpu, reference"):
        resolve_preset("gpu", (32, 32, 3))
