"""The end-to-end pipeline, its caching, the SavedModel contract and the CLI."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

from conftest import copy_run, ovqvae, tiny_config
from ordered_vqvae import models
from pipeline import stages
from pipeline import workdir as workdir_module

REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


@pytest.fixture(scope="module")
def workdir(finished_run, tmp_path_factory):
    """A copy of the tiny pipeline's run (the rerun test changes it)."""
    return copy_run(finished_run, tmp_path_factory.mktemp("run") / "wd")


def test_pipeline_writes_every_artifact(workdir):
    for stage in stages.BY_NAME:
        manifest = workdir_module.read_manifest(workdir, stage)
        assert manifest["stage"] == stage and len(manifest["input_hash"]) == 64
        assert manifest["versions"]["tensorflow"] == tf.__version__
    report = os.path.join(workdir, "report")
    for name in ("report.md", "metrics.json", "samples.png", "reconstructions.png",
                 "mse_vs_codes.png", "time_vs_codes.png"):
        assert os.path.getsize(os.path.join(report, name)) > 100, name
    metrics = json.load(open(os.path.join(report, "metrics.json")))
    assert metrics["records"] == {"train": 1445, "test": 352}
    assert metrics["code_length"] == 8 and set(metrics["mse_by_codes"]) == {"1", "2", "4", "6", "8"}
    assert metrics["prior_val_bits_per_code"] < metrics["uniform_bits_per_code"]
    text = open(os.path.join(report, "report.md")).read()
    assert "![samples](samples.png)" in text and "| 8 | 100% |" in text
    baselines = metrics["baselines"]
    assert baselines["reconstruction_mse"] == pytest.approx(
        float(metrics["mse_by_codes"]["8"]), rel=0.3)  # A seeded 512 of the same test split.
    assert 0 < baselines["pixel_fd"]["test_halves"] < baselines["pixel_fd"]["mean_image"]
    assert "## Is the model trained?" in text and (
        "**The samples are no better" in text) == baselines["samples_undertrained"]
    assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
    assert not os.listdir(os.path.join(workdir, "scratch"))  # Checkpoints dropped when done.


def test_rerun_skips_finished_stages_and_redoes_changed_ones(workdir, capsys):
    before = {s: workdir_module.read_manifest(workdir, s)["finished"] for s in stages.BY_NAME}
    stages.run_pipeline(tiny_config(), workdir, verbose=0)
    out = capsys.readouterr().out
    assert out.count("up to date (manifest matches), skipped") == 5
    assert {s: workdir_module.read_manifest(workdir, s)["finished"] for s in stages.BY_NAME} == before
    # A changed prior redoes the prior and what depends on it, not the autoencoder.
    stages.run_pipeline(tiny_config(epochs=1), workdir, stages=["autoencoder", "extract", "prior"],
                        verbose=0)
    out = capsys.readouterr().out
    assert out.count("skipped") == 2 and "[prior] validation" in out
    # A damaged artifact is not taken as finished.
    os.remove(os.path.join(workdir, "prior", "prior.weights.h5"))
    assert not stages._is_current(workdir, stages.BY_NAME["prior"], workdir_module.read_manifest(workdir, "prior")["input_hash"])


def test_a_field_added_later_keeps_old_workdirs_cached_at_its_neutral_value(workdir):
    config = tiny_config()
    spec = stages.BY_NAME["autoencoder"]
    inputs = stages.stage_inputs(config, workdir, spec)
    assert config.autoencoder.length_power == 0.0 and "length_power" not in inputs["autoencoder"]
    # So the hash is the one a workdir written before the field holds, and the run is current.
    assert workdir_module.input_hash(inputs) == workdir_module.read_manifest(
        workdir, "autoencoder")["input_hash"]
    tilted = dataclasses.replace(config, autoencoder=config.autoencoder.replace(length_power=1.0))
    inputs = stages.stage_inputs(tilted, workdir, spec)
    assert inputs["autoencoder"]["length_power"] == 1.0
    assert not stages._is_current(workdir, spec, workdir_module.input_hash(inputs))


def test_export_with_bfloat16_projection_kernels(finished_run, tmp_path):
    workdir = copy_run(finished_run, tmp_path / "wd")
    saved = os.path.join(workdir, "saved_model")
    reference = tf.saved_model.load(saved)
    reference_bytes = sum(os.path.getsize(os.path.join(saved, "variables", n))
                          for n in os.listdir(os.path.join(saved, "variables")))
    with pytest.raises(ValueError, match="export_dtype='bfloat16', expected one of"):
        dataclasses.replace(tiny_config(), export_dtype="bfloat16")  # Its cache is not float32.
    config = dataclasses.replace(tiny_config(), export_dtype="bfloat16_weights")
    spec = stages.BY_NAME["export"]
    inputs = stages.stage_inputs(tiny_config(), workdir, spec)  # Old workdirs stay current.
    assert "dtype" not in inputs and workdir_module.input_hash(inputs) == \
        workdir_module.read_manifest(workdir, "export")["input_hash"]
    assert not stages._is_current(workdir, spec, workdir_module.input_hash(
        stages.stage_inputs(config, workdir, spec)))
    stages.run_pipeline(config, workdir, stages=["export"], verbose=0)
    mixed = tf.saved_model.load(saved)
    checkpoint = tf.train.load_checkpoint(os.path.join(saved, "variables", "variables"))
    shapes = checkpoint.get_variable_to_shape_map()
    halves = [n for n, d in checkpoint.get_variable_to_dtype_map().items() if d == tf.bfloat16]
    layers = json.load(open(os.path.join(workdir, "prior", "prior.json")))["num_layers"]
    assert len(halves) == 4 * layers and all(len(shapes[n]) == 2 for n in halves)
    assert sum(os.path.getsize(os.path.join(saved, "variables", n))
               for n in os.listdir(os.path.join(saved, "variables"))) < reference_bytes
    args = dict(num_samples=tf.constant(32), num_codes=tf.constant(8), seed=tf.constant(3),
                temperature=tf.constant(1.0))
    a, b = (m.signatures["sample"](**args) for m in (reference, mixed))
    assert b["codes"].shape == (32, 8) and b["images"].dtype == tf.float32
    assert (a["codes"].numpy()[:, 0] == b["codes"].numpy()[:, 0]).mean() >= 0.9
    state = mixed.signatures["begin"](num_samples=tf.constant(2), seed=tf.constant(3))
    assert state["cache"].dtype == tf.float32
    with pytest.raises(ValueError, match="computes in bfloat16"):
        from ordered_vqvae import export
        from ordered_vqvae.prior import load_prior

        export.export(models.load_autoencoder(os.path.join(workdir, "autoencoder")),
                      load_prior(os.path.join(workdir, "prior"), "bfloat16"), str(tmp_path / "x"))


def test_saved_model_contract_in_a_fresh_process(workdir, tmp_path):
    ae = models.load_autoencoder(os.path.join(workdir, "autoencoder"))
    x = np.random.default_rng(0).uniform(size=(5, 8, 8, 1)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "recon.npy", ae.reconstruct(x).numpy())
    np.save(tmp_path / "codes.npy", ae.encode(x).numpy())
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        m = tf.saved_model.load({os.path.join(workdir, "saved_model")!r})
        assert sorted(m.signatures) == ["begin", "decode", "decode_at", "encode",
                                        "encode_to_quality", "extend", "sample"], list(m.signatures)
        K = int(m.code_length)
        assert (K, int(m.codebook_size), m.image_shape.numpy().tolist()) == (8, 32, [8, 8, 1])
        x = np.load({str(tmp_path / "x.npy")!r})
        codes = m.signatures["encode"](images=tf.constant(x))["codes"]
        assert codes.dtype == tf.int32 and codes.shape == (5, K)
        np.testing.assert_array_equal(codes.numpy(), np.load({str(tmp_path / "codes.npy")!r}))
        images = m.signatures["decode"](codes=codes, num_codes=tf.constant(K))["images"]
        assert images.dtype == tf.float32 and images.shape == (5, 8, 8, 1)
        np.testing.assert_allclose(images.numpy(), np.load({str(tmp_path / "recon.npy")!r}), atol=1e-5)
        changed = tf.concat([codes[:, :3], (codes[:, 3:] + 1) % 32], axis=1)
        short = m.signatures["decode"](codes=changed, num_codes=tf.constant(3))["images"]
        same = m.signatures["decode"](codes=codes, num_codes=tf.constant(3))["images"]
        np.testing.assert_array_equal(short.numpy(), same.numpy())
        padded = tf.concat([codes[:, :3], -tf.ones_like(codes[:, 3:])], axis=1)
        np.testing.assert_array_equal(  # Codes beyond k are ignored, even out-of-range ones.
            m.signatures["decode"](codes=padded, num_codes=tf.constant(3))["images"].numpy(),
            same.numpy())
        def sample(seed, k=K):
            return m.signatures["sample"](num_samples=tf.constant(6), num_codes=tf.constant(k),
                                          seed=tf.constant(seed), temperature=tf.constant(1.0))
        a, b, c = sample(3), sample(3), sample(4)
        np.testing.assert_array_equal(a["codes"].numpy(), b["codes"].numpy())
        np.testing.assert_array_equal(a["images"].numpy(), b["images"].numpy())
        assert (a["codes"].numpy() != c["codes"].numpy()).mean() > 0.2
        np.testing.assert_array_equal(sample(3, 2)["codes"].numpy()[:, :2], a["codes"].numpy()[:, :2])
        # Interrupted sampling: chunks of 3 codes give the one-pass codes; decode per row.
        state = m.signatures["begin"](num_samples=tf.constant(6), seed=tf.constant(3))
        assert state["cache"].shape[2] == 6 and state["position"].numpy().tolist() == [0] * 6
        ks = []
        while int(tf.reduce_min(state["position"])) < K:
            out = m.signatures["extend"](
                codes=state["codes"], cache=state["cache"], position=state["position"],
                seeds=state["seeds"], temperature=tf.ones([6]), limit=tf.fill([6], K),
                steps=tf.constant(3))
            state = dict(state, **{{n: out[n] for n in ("codes", "cache", "position")}})
            assert bool(out["finite"])
            ks.append(int(state["position"][0]))
        assert ks == [3, 6, 8]
        np.testing.assert_array_equal(state["codes"].numpy(), a["codes"].numpy())
        per_row = m.signatures["decode_at"](codes=state["codes"],
                                            num_codes=tf.constant([1, 2, 3, 4, 5, 8]))["images"]
        for row, k in enumerate([1, 2, 3, 4, 5, 8]):
            one = m.signatures["decode"](codes=state["codes"][row:row + 1], num_codes=tf.constant(k))
            np.testing.assert_allclose(per_row.numpy()[row], one["images"].numpy()[0], atol=1e-6)
        out = sample(3, 2)
        assert out["images"].shape == (6, 8, 8, 1) and out["codes"].dtype == tf.int32
        assert (out["codes"].numpy()[:, 2:] == 0).all()
        assert 0.0 <= out["images"].numpy().min() and out["images"].numpy().max() <= 1.0
        for call, text in ((lambda: m.signatures["decode"](codes=codes, num_codes=tf.constant(9)),
                            "num_codes="),
                           (lambda: m.signatures["sample"](num_samples=tf.constant(2),
                                num_codes=tf.constant(0), seed=tf.constant(0),
                                temperature=tf.constant(1.0)), "num_codes="),
                           (lambda: m.signatures["sample"](num_samples=tf.constant(2),
                                num_codes=tf.constant(2), seed=tf.constant(0),
                                temperature=tf.constant(0.0)), "temperature=")):
            try:
                call()
            except tf.errors.InvalidArgumentError as e:
                assert text in e.message, e.message
            else:
                raise AssertionError("no error for " + text)
        assert not any(name.startswith(("ordered_vqvae", "pipeline")) for name in sys.modules)
        print("CONTRACT OK")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=str(tmp_path))
    assert "CONTRACT OK" in proc.stdout, proc.stderr[-3000:]


def test_cli_sample_and_errors(workdir, tmp_path):
    out = str(tmp_path / "grid.png")
    ovqvae("sample", f"--saved_model={os.path.join(workdir, 'saved_model')}", "--num_codes=4",
            "--num_samples=6", "--seed=2", f"--output={out}", check_rc=0)
    assert os.path.getsize(out) > 100
    saved = np.load(str(tmp_path / "grid.npz"))
    assert saved["images"].shape == (1, 6, 8, 8, 1) and (saved["codes"][:, 4:] == 0).all()
    assert saved["num_codes"].tolist() == [4]

    proc = ovqvae("sample", f"--saved_model={os.path.join(workdir, 'saved_model')}",
                   "--num_codes=9", f"--output={out}", check_rc=2)
    assert "--num_codes=9, expected 1 <= num_codes <= 8" in proc.stderr
    for bad in ("0%", "101%", "x", "2.5"):
        proc = ovqvae("sample", f"--saved_model={os.path.join(workdir, 'saved_model')}",
                      f"--num_codes=4,{bad}", f"--output={out}", check_rc=2)
        assert f"--num_codes={bad}, expected" in proc.stderr
    broken = tmp_path / "broken"
    broken.mkdir()
    proc = ovqvae("sample", f"--saved_model={broken}", f"--output={out}", check_rc=1)
    assert "is missing saved_model.pb" in proc.stderr
    proc = ovqvae("sample", f"--saved_model={os.path.join(workdir, 'saved_model')}",
                   f"--output={tmp_path / 'nowhere' / 'x.png'}", check_rc=1)
    assert "nowhere' is not a directory" in proc.stderr


def test_cli_usage_and_workdir_errors(tmp_path):
    proc = ovqvae("frobnicate", check_rc=2)
    assert "expected a command" in proc.stderr
    proc = ovqvae("run", "--workdir=x", "--truncation=sometimes", check_rc=2)
    assert "truncation='sometimes'" in proc.stderr
    proc = ovqvae("train_autoencoder", "--workdir=x", "--runner=DirectRunner", check_rc=2)
    assert "train_autoencoder does not take --runner=DirectRunner" in proc.stderr
    proc = ovqvae("run", "--dataset=mnist", "--workdir=x", check_rc=2)
    assert "--dataset=mnist needs --data_path" in proc.stderr
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("precious")
    proc = ovqvae("run", f"--workdir={foreign}", check_rc=1)
    assert "is not an ordered-vqvae workdir" in proc.stderr
    assert os.listdir(foreign) == ["thesis.tex"]
    proc = ovqvae("train_prior", f"--workdir={tmp_path / 'fresh'}", check_rc=1)
    assert "stage 'extract' has not finished" in proc.stderr
