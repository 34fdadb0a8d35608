"""Shared test helpers: paths to the optional real data, markers, quiet TF."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

# The real files sit beside the repository; resolve through symlinks so the path also
# works from Bazel's runfiles tree.
REPO = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
SHARED_DATA = os.environ.get("OVQVAE_SHARED_DATA", os.path.join(os.path.dirname(REPO), "shared", "data"))
MNIST_DIR = os.path.join(SHARED_DATA, "mnist")
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
