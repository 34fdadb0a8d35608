"""A folder of the user's own photos, through the CLI in fresh processes: the workdir
remembers its run, the preset follows the data, no flag is silently ignored, the layout is
checked before any work, and `sample` draws a grid with a row per k."""

import json
import os
import re
import time

import numpy as np
import pytest
from PIL import Image

from conftest import SUBPROCESS_ENV, ovqvae
from pipeline import cli

# Shrinks the cifar10_cpu preset that 32x32 colour images get on a machine without a GPU,
# so that the run takes seconds.
TINY = ["--hidden=16,16,16", "--latent_channels=8", "--codebook_size=32", "--epochs=1",
        "--prior_num_layers=1", "--prior_num_heads=2", "--prior_width=32",
        "--prior_ffn_width=64", "--prior_epochs=1", "--batch_size=8", "--prior_batch_size=8",
        "--report_samples=4"]


def _photos(root, splits=(("train", 24), ("test", 8)), size=32):
    rng = np.random.default_rng(0)
    for split, count in splits:
        for i in range(count):
            folder = root / split / ("cat" if i % 2 else "dog")
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (size, size, 3), np.uint8)).save(
                folder / f"{i}.jpg")
    return root


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("own")
    photos, workdir = _photos(root / "photos"), str(root / "wd")
    proc = ovqvae("run", "--dataset=image_folder", f"--data_path={photos}",
                  f"--workdir={workdir}", *TINY, check_rc=0, env=SUBPROCESS_ENV)
    return photos, workdir, proc


def _record(workdir):
    with open(os.path.join(workdir, "run.json")) as f:
        return json.load(f)["config"]


def _manifest_config(workdir, stage):
    with open(os.path.join(workdir, "manifests", f"{stage}.json")) as f:
        return json.load(f)["config"]


def test_the_preset_follows_the_images_and_the_run_is_recorded(run):
    _, workdir, proc = run
    assert "32x32x3 images: preset cifar10_cpu" in proc.stdout
    config = _record(workdir)
    assert config["preset"] == "cifar10_cpu"
    assert config["autoencoder"]["image_shape"] == [32, 32, 3]
    assert config["autoencoder"]["latent_channels"] == 8  # The flags given over the preset.
    assert config["autoencoder"]["architecture"] == "residual"  # cifar10_cpu's, not digits'.
    assert config["prior"]["warmup_steps"] == 200  # cifar10_cpu's prior, not digits' 100.
    assert "apitools" not in proc.stderr and "Resource module" not in proc.stderr
    # Output to a pipe: one line per epoch, no progress bar redrawn with carriage returns.
    assert "\r" not in proc.stdout
    epochs = re.findall(r"^\[train (\w+)\] epoch 1/1: .*loss [\d.e+-]+.* \([\d.]+ s\)$",
                        proc.stdout, re.M)
    assert epochs == ["autoencoder", "prior"]  # One line per epoch of each stage.
    table = proc.stdout[re.search(r"^stage +status +seconds$", proc.stdout, re.M).start():]
    assert [line.split()[0] for line in table.splitlines()[1:7]] == [
        "autoencoder", "extract", "prior", "export", "report", "total"]


def test_stages_run_alone_use_the_recorded_run(run):
    _, workdir, _ = run
    recorded = _record(workdir)
    for command in ("extract", "train_prior"):
        ovqvae(command, f"--workdir={workdir}", "--force", "--verbose=0", check_rc=0,
               env=SUBPROCESS_ENV)
    ovqvae("report", f"--workdir={workdir}", check_rc=0, env=SUBPROCESS_ENV)
    assert _record(workdir) == recorded
    for stage in ("extract", "prior", "report"):
        assert _manifest_config(workdir, stage) == recorded, stage
    status = ovqvae("status", f"--workdir={workdir}", check_rc=0, env=SUBPROCESS_ENV).stdout
    assert "32x32x3 images, preset cifar10_cpu" in status
    # Training is deterministic: the rerun prior is the same bytes, so export stays current.
    assert all(f"  {stage:<12} up to date" in status for stage in
               ("autoencoder", "extract", "prior", "export", "report")), status


def test_a_contradicting_flag_is_refused_or_invalidates_what_it_feeds(run, tmp_path):
    import shutil

    _, source, _ = run
    workdir = str(tmp_path / "wd")
    shutil.copytree(source, workdir)
    proc = ovqvae("extract", f"--workdir={workdir}", "--dataset=digits", check_rc=2,
                  env=SUBPROCESS_ENV)
    assert "--dataset=digits, but workdir" in proc.stderr and "'image_folder'" in proc.stderr
    proc = ovqvae("report", f"--workdir={workdir}", "--preset=mnist", check_rc=2,
                  env=SUBPROCESS_ENV)
    assert "records preset 'cifar10_cpu'" in proc.stderr
    # The family that gives the recorded preset for these images is the same preset.
    ovqvae("report", f"--workdir={workdir}", "--preset=cpu", check_rc=0, env=SUBPROCESS_ENV)
    proc = ovqvae("train_prior", f"--workdir={workdir}", "--prior_num_layers=2", "--verbose=0",
                  check_rc=0, env=SUBPROCESS_ENV)
    assert ("changes the recorded run: --prior_num_layers 1 -> 2; invalidates: prior (its "
            "config changed), export (it reads prior), report (it reads prior, export)") in proc.stdout
    assert _record(workdir)["prior"]["num_layers"] == 2
    status = ovqvae("status", f"--workdir={workdir}", check_rc=0, env=SUBPROCESS_ENV).stdout
    assert "  prior        up to date" in status and "  export       to redo" in status
    proc = ovqvae("train_autoencoder", f"--workdir={workdir}", "--image_shape=16,16,3",
                  check_rc=2, env=SUBPROCESS_ENV)
    assert "the images are 32x32x3" in proc.stderr and "--image_size" in proc.stderr


def test_help_shows_the_values_of_the_recorded_run(run):
    photos, workdir, _ = run
    out = ovqvae("train_autoencoder", "--help", f"--workdir={workdir}", check_rc=0).stdout
    assert "  --latent_channels  (default: unset; this run: 8)" in out
    assert "  --image_shape  (default: unset; this run: (32, 32, 3))" in out
    out = ovqvae("run", "--help", "--dataset=image_folder", f"--data_path={photos}",
                 "--image_size=64", check_rc=0).stdout
    assert "  --preset  (default: unset; this run: 'celeb_a_cpu')" in out
    assert "  --image_shape  (default: unset; this run: (64, 64, 3))" in out


@pytest.mark.parametrize("command, flag, expected", [
    ("run", "--epoch=1", "(did you mean --epochs)"),
    ("extract", "--prior_epoch=1", "(did you mean --prior_epochs; a flag of"),
    ("export", "--epochs=3", "(a flag of demo, run, experiments, train_autoencoder)"),
    ("sample", "--runner=DirectRunner", "sample does not take --runner=DirectRunner"),
])
def test_a_flag_the_command_does_not_take_exits_2_before_any_work(tmp_path, command, flag,
                                                                   expected):
    workdir = tmp_path / "wd"
    start = time.monotonic()
    proc = ovqvae(command, f"--workdir={workdir}", flag, check_rc=2, env=SUBPROCESS_ENV)
    assert time.monotonic() - start < 30  # Parsing only: no data read, no training.
    assert expected in proc.stderr, proc.stderr
    assert not workdir.exists()


def test_images_the_preset_cannot_downsample_ask_for_image_size(tmp_path):
    photos = _photos(tmp_path / "photos", splits=(("train", 2), ("test", 2)), size=30)
    proc = ovqvae("train_autoencoder", "--dataset=image_folder", f"--data_path={photos}",
                  f"--workdir={tmp_path / 'wd'}", check_rc=2, env=SUBPROCESS_ENV)
    assert "image_shape=(30, 30, 3) is not divisible by 8" in proc.stderr, proc.stderr
    assert "pass --image_size=N to resize the images" in proc.stderr


def test_beam_options_are_checked_by_beams_own_parser():
    accepted, unknown = cli._beam_options(["--runner=DataflowRunner", "--project=p",
                                           "--num_workers=3", "--epoch=1"])
    assert accepted == ["--runner=DataflowRunner", "--project=p", "--num_workers=3"]
    assert unknown == ["--epoch=1"]
    with pytest.raises(cli.UsageError, match="--num_workers: invalid int value: 'x'"):
        cli._beam_options(["--num_workers=x"])


def test_a_missing_test_split_stops_before_any_stage(tmp_path):
    photos = _photos(tmp_path / "photos", splits=(("train", 4),))
    proc = ovqvae("run", "--dataset=image_folder", f"--data_path={photos}",
                  f"--workdir={tmp_path / 'wd'}", *TINY, check_rc=1, env=SUBPROCESS_ENV)
    assert "for split 'test'" in proc.stderr and "[autoencoder]" not in proc.stdout
    assert not (tmp_path / "wd").exists()


def test_sample_draws_a_row_per_k_into_the_workdir(run):
    _, workdir, _ = run
    proc = ovqvae("sample", f"--workdir={workdir}", "--num_codes=25%,100%", "--num_samples=3",
                  check_rc=0, env=SUBPROCESS_ENV)
    grid = os.path.join(workdir, "samples", "samples_k2-8_seed0.png")
    assert grid in proc.stdout and os.path.getsize(grid) > 100
    saved = np.load(grid[:-4] + ".npz")
    assert saved["num_codes"].tolist() == [2, 8]
    assert saved["images"].shape == (2, 3, 32, 32, 3) and saved["codes"].shape == (3, 8)


def test_the_report_says_when_samples_are_no_better_than_the_mean_image():
    from pipeline.sources.digits import arrays as load_digits_arrays
    from pipeline import evaluate

    train = load_digits_arrays("train")[0].astype(np.float32) / 255
    test = load_digits_arrays("test")[0].astype(np.float32) / 255
    mean = train.mean(axis=0)
    baseline = float(np.mean((test - mean) ** 2))
    grey = np.clip(0.5 + 0.01 * np.random.default_rng(0).standard_normal(train[:256].shape),
                   0, 1)
    bad = evaluate.against_baselines(0.9 * baseline, grey, test, mean)
    assert bad["mean_image_mse"] == pytest.approx(baseline, rel=1e-6)
    assert bad["autoencoder_undertrained"] and bad["samples_undertrained"]
    grey_samples = evaluate.against_baselines(0.1 * baseline, grey, test, mean)
    assert not grey_samples["autoencoder_undertrained"] and grey_samples["samples_undertrained"]
    good = evaluate.against_baselines(0.1 * baseline, train[:256], test, mean)
    assert not good["autoencoder_undertrained"] and not good["samples_undertrained"]
    fd = good["pixel_fd"]
    assert fd["samples"] < fd["mean_image"] and fd["test_halves"] < fd["mean_image"]
    assert evaluate.pooled(np.ones((2, 32, 32, 3))).shape == (2, 8 * 8 * 3)
