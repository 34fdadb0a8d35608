"""Shared test helpers: paths to the optional real data, markers, quiet TF."""

import os
import shutil
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# The real files sit beside the repository; resolve through symlinks so the path also
# works from Bazel's runfiles tree.
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SHARED_DATA = os.environ.get("OVQVAE_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
# For tests that start the project in a fresh Python process.
SUBPROCESS_ENV = {**{k: v for k, v in os.environ.items() if k != "TF_CONFIG"},
                  "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": REPO}
CIFAR_TARBALL = os.path.join(SHARED_DATA, "cifar10", "cifar10-jpeg.tar.gz")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: real training for a minute or more (runs by default, "
                            "not in Bazel)")


@pytest.fixture
def mnist_dir():
    if not os.path.isdir(MNIST_DIR):
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (optional; set OVQVAE_SHARED_DATA)")
    return MNIST_DIR


@pytest.fixture
def cifar_tarball():
    if not os.path.isfile(CIFAR_TARBALL):
        pytest.skip(f"CIFAR-10 tarball not found at {CIFAR_TARBALL} (optional; set OVQVAE_SHARED_DATA)")
    return CIFAR_TARBALL


# A shrunk pipeline on the embedded digits: the whole run takes well under a minute.
TINY_AE = dict(hidden=(16,), latent_channels=8, codebook_size=32, epochs=2)
TINY_PRIOR = dict(num_layers=1, num_heads=2, width=32, ffn_width=64, epochs=2, warmup_steps=20)
TINY_FLAGS = ([f"--{k}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
               for k, v in TINY_AE.items()]
              + [f"--prior_{k}={v}" for k, v in TINY_PRIOR.items()] + ["--report_samples=4"])


def tiny_config(**prior):
    from pipeline.config import pipeline_preset

    return pipeline_preset("digits", autoencoder_overrides=TINY_AE,
                           prior_overrides={**TINY_PRIOR, **prior}, report_samples=4)


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """The whole tiny pipeline, run once per session; copy it (`copy_run`) to change it."""
    from pipeline import stages

    path = str(tmp_path_factory.mktemp("run") / "wd")
    stages.run_pipeline(tiny_config(), path, verbose=0)
    return path


def copy_run(finished_run: str, destination) -> str:
    shutil.copytree(finished_run, str(destination))
    return str(destination)


def ovqvae(*args, check_rc=None, **popen):
    """Runs the CLI in a fresh process; returns the CompletedProcess."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=600, **popen)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc
