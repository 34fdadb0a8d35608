"""The bad-input table of docs/reliability.md, one test per row: each bad input gives a clear error
naming the file or value, a non-zero exit from the CLI, and leaves what was already written
as it was (artifacts, manifests) with no temporary files behind."""

import contextlib
import os
import resource
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from conftest import SUBPROCESS_ENV, TINY_FLAGS, copy_run, ovqvae
from pipeline import stages
from pipeline import workdir as workdir_module
from test_data import _make_mnist


@pytest.fixture
def run(finished_run, tmp_path):
    return copy_run(finished_run, tmp_path / "wd")


def _state(workdir):
    """Fingerprints of every artifact and manifest, and the workdir's temporary names."""
    state = {s.name: workdir_module.fingerprint_files(os.path.join(workdir, s.artifact))
             for s in stages.STAGES}
    for name in sorted(os.listdir(os.path.join(workdir, "manifests"))):
        with open(os.path.join(workdir, "manifests", name)) as f:
            state[name] = f.read()
    leftovers = [n for n in os.listdir(workdir) if ".tmp" in n]
    return state, leftovers


def _assert_untouched(workdir, before):
    after, leftovers = _state(workdir)
    assert leftovers == []
    assert after == before


def test_corrupt_tfrecord_names_the_shard(run):
    shard = os.path.join(run, "codes", "train-00001-of-00004.tfrecord")
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2: len(blob) // 2 + 8] = b"\xff" * 8
    open(shard, "wb").write(bytes(blob))
    before, _ = _state(run)
    proc = ovqvae("train_prior", f"--workdir={run}", "--force", check_rc=1)
    assert "train-00001-of-00004.tfrecord" in proc.stderr and "corrupt" in proc.stderr
    _assert_untouched(run, before)


def test_truncated_gzip_names_the_file(tmp_path):
    os.makedirs(tmp_path / "mnist")
    _make_mnist(str(tmp_path / "mnist"))
    images = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:100])
    proc = ovqvae("train_autoencoder", "--dataset=mnist", f"--data_path={tmp_path / 'mnist'}",
                  f"--workdir={tmp_path / 'wd'}", check_rc=1)
    assert "train-images-idx3-ubyte.gz" in proc.stderr and "not a complete gzip" in proc.stderr
    assert not (tmp_path / "wd" / "autoencoder").exists()


def _folder(root, sizes):
    for i, size in enumerate(sizes):
        os.makedirs(root / "train" / "a", exist_ok=True)
        Image.fromarray(np.full(size, 100, np.uint8), "L").save(root / "train" / "a" / f"{i}.png")
    os.makedirs(root / "test" / "a", exist_ok=True)
    Image.fromarray(np.full(sizes[0], 100, np.uint8), "L").save(root / "test" / "a" / "0.png")
    return root


def test_wrong_image_sizes_name_the_image(tmp_path):
    folder = _folder(tmp_path / "imgs", [(8, 8)] * 3 + [(10, 8)])
    proc = ovqvae("train_autoencoder", "--dataset=image_folder", f"--data_path={folder}",
                  f"--workdir={tmp_path / 'wd'}", "--preset=digits", check_rc=1)
    assert ("image 'train/a/3.png' has shape (10, 8, 1), expected (8, 8, 1) (resize to make "
            "sizes agree)") in proc.stderr


def test_empty_dataset_names_the_folder(tmp_path):
    os.makedirs(tmp_path / "empty" / "train")
    proc = ovqvae("train_autoencoder", "--dataset=image_folder",
                  f"--data_path={tmp_path / 'empty'}", f"--workdir={tmp_path / 'wd'}",
                  "--preset=digits", check_rc=1)
    assert "no images found" in proc.stderr and str(tmp_path / "empty") in proc.stderr


def _saved_model_call(path, body):
    """Runs `body` against the SavedModel in a fresh process that never imports the project."""
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        m = tf.saved_model.load({path!r})
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, env=SUBPROCESS_ENV)


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nan_or_inf_pixels_are_refused(finished_run, value):
    proc = _saved_model_call(os.path.join(finished_run, "saved_model"), f"""
        x = np.full((2, 8, 8, 1), 0.5, np.float32); x[1, 3, 4, 0] = float("{value}")
        m.signatures["encode"](images=tf.constant(x))
    """)
    assert proc.returncode != 0 and "images contain NaN or Inf" in proc.stderr


def test_num_codes_out_of_range_names_the_value(finished_run, tmp_path):
    saved = os.path.join(finished_run, "saved_model")
    for k in (0, 9):
        proc = ovqvae("sample", f"--saved_model={saved}", f"--num_codes={k}",
                      f"--output={tmp_path / 'x.png'}", check_rc=2)
        assert f"--num_codes={k}, expected 1 <= num_codes <= 8" in proc.stderr
    proc = _saved_model_call(saved, """
        m.signatures["sample"](num_samples=tf.constant(2), num_codes=tf.constant(9),
                               seed=tf.constant(0), temperature=tf.constant(1.0))
    """)
    assert proc.returncode != 0 and "out of range, expected 1 <= num_codes <= 8" in proc.stderr
    assert os.listdir(tmp_path) == []


def test_prior_of_another_codebook_is_refused(run, tmp_path):
    import tensorflow as tf

    from ordered_vqvae.prior import CodePrior, save_prior

    other = CodePrior(8, 16, num_layers=1, num_heads=2, width=32, ffn_width=64)
    other(tf.zeros((1, 8), tf.int32))
    shutil.rmtree(os.path.join(run, "prior"))
    save_prior(other, os.path.join(run, "prior"))
    before, _ = _state(run)
    proc = ovqvae("export", f"--workdir={run}", "--force", check_rc=1)
    assert "vocabulary is 16 codes but the autoencoder's codebook has 32" in proc.stderr
    _assert_untouched(run, before)


@pytest.mark.parametrize("missing", ["saved_model.pb", "variables/variables.index",
                                     "variables/variables.data-00000-of-00001"])
def test_saved_model_missing_files_are_named(finished_run, tmp_path, missing):
    broken = shutil.copytree(os.path.join(finished_run, "saved_model"), tmp_path / "sm")
    os.remove(broken / missing)
    proc = ovqvae("sample", f"--saved_model={broken}", f"--output={tmp_path / 'x.png'}",
                  check_rc=1)
    assert f"is missing {missing}" in proc.stderr
    assert not (tmp_path / "x.png").exists()


def _writable(path) -> bool:
    try:
        open(os.path.join(path, "probe"), "w").close()
    except OSError:
        return False
    os.remove(os.path.join(path, "probe"))
    return True


@contextlib.contextmanager
def _read_only(path):
    """Makes `path` read-only for this process's user: the immutable attribute where it can
    be set (root, whom permission bits do not stop), else chmod."""
    os.makedirs(path)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = ["chattr", "-i", str(path)]
    else:
        os.chmod(path, 0o555)
        undo = ["chmod", "755", str(path)]
    try:
        if _writable(path):
            pytest.skip("neither chattr +i nor chmod makes a directory read-only here (root "
                        "without CAP_LINUX_IMMUTABLE, as in some sandboxes)")
        yield path
    finally:
        subprocess.run(undo, check=True)


def test_read_only_output_directory_is_named(finished_run, tmp_path):
    with _read_only(tmp_path / "ro") as ro:
        proc = ovqvae("run", f"--workdir={ro / 'wd'}", *TINY_FLAGS, check_rc=1)
        assert str(ro) in proc.stderr and "not writable" in proc.stderr
        proc = ovqvae("sample", f"--saved_model={os.path.join(finished_run, 'saved_model')}",
                      f"--output={ro / 'x.png'}", check_rc=1)
        assert str(ro) in proc.stderr and "not writable" in proc.stderr
        assert os.listdir(ro) == []


@pytest.mark.parametrize("stage,command", [("prior", "train_prior"), ("export", "export")])
def test_disk_full_mid_write_keeps_the_finished_artifact(run, stage, command):
    """Writes fail (EFBIG) past 64 KiB per file, as when the disk fills: the rerun fails
    cleanly and the previous artifact and its manifest stay as they were."""
    before, _ = _state(run)

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))

    proc = ovqvae(command, f"--workdir={run}", "--force", check_rc=1,
                  preexec_fn=limit_file_size)
    assert "File too large" in proc.stderr, proc.stderr[-2000:]
    _assert_untouched(run, before)
    assert stages._is_current(run, stages.BY_NAME[stage], workdir_module.read_manifest(run, stage)["input_hash"])
