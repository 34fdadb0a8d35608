"""Peak memory of the training and extraction stages at N and 4N images.

Writes synthetic 64x64 images (N and 4N training images, the same 256 test images) in one
of the layouts the pipeline reads: an image folder of RGB PNGs, the same folder as a
.tar.gz, or MNIST-style gzipped IDX files (grayscale). Runs `ovqvae train_autoencoder`,
`ovqvae extract` and `ovqvae train_prior` on each, every stage in a process of its own, and
prints each stage's peak resident memory (the process's ru_maxrss, from wait4) and the
growth from N to 4N. One epoch of a small model per stage: what grows with N is the data,
not the model.

Goal: each stage grows by at most 120 MB from 2,000 to 8,000 images (a float32 copy of
6,000 more RGB images alone is 295 MB; grayscale, 98 MB).

  .venv/bin/python bench/memory_growth.py [--layout=folder|tarball|idx] [--n=2000] [--keep=DIR]
"""

import argparse
import gzip
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, TEST_IMAGES, CLASSES = 64, 256, 4
MODEL_FLAGS = ["--preset=celeb_a", "--hidden=16,32,32", "--latent_channels=16",
               "--codebook_size=64", "--epochs=1", "--batch_size=64", "--prior_num_layers=1",
               "--prior_width=32", "--prior_num_heads=2", "--prior_ffn_width=64",
               "--prior_epochs=1", "--prior_batch_size=64", "--verbose=0"]
STAGES = ("train_autoencoder", "extract", "train_prior")


def synthetic_image(index: int) -> np.ndarray:
    """A 64x64 RGB picture: a colour gradient with a few filled ellipses, from the index."""
    rng = np.random.default_rng(index)
    y, x = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    image = rng.random(3) * (1 - y[..., None]) + rng.random(3) * y[..., None]
    for _ in range(rng.integers(1, 4)):
        cy, cx, ry, rx = rng.random(4) * [1, 1, 0.3, 0.3] + [0, 0, 0.05, 0.05]
        inside = ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        image[inside] = rng.random(3)
    return (image * 255).astype(np.uint8)


def _splits(num_train: int):
    return (("train", num_train, 0), ("test", TEST_IMAGES, 10**7))


def write_folder(root: str, num_train: int) -> str:
    from PIL import Image

    for split, count, offset in _splits(num_train):
        for c in range(CLASSES):
            os.makedirs(os.path.join(root, split, f"c{c}"), exist_ok=True)
        for i in range(count):
            Image.fromarray(synthetic_image(offset + i)).save(
                os.path.join(root, split, f"c{i % CLASSES}", f"{i:06d}.png"))
    return root


def write_tarball(root: str, num_train: int) -> str:
    folder = write_folder(root + "-folder", num_train)
    path = root + ".tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(folder, arcname="images")
    shutil.rmtree(folder)
    return path


def write_idx(root: str, num_train: int) -> str:
    """The four MNIST file names, gzipped, holding 64x64 grayscale images."""
    os.makedirs(root, exist_ok=True)
    stems = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
    for split, count, offset in _splits(num_train):
        images, labels = stems[split]
        with gzip.open(os.path.join(root, images + ".gz"), "wb", compresslevel=1) as f:
            f.write(struct.pack(">IIII", 2051, count, SIZE, SIZE))
            for i in range(count):
                f.write(synthetic_image(offset + i).mean(-1).astype(np.uint8).tobytes())
        with gzip.open(os.path.join(root, labels + ".gz"), "wb") as f:
            f.write(struct.pack(">II", 2049, count) + bytes(i % CLASSES for i in range(count)))
    return root


LAYOUTS = {  # How each layout is written and read.
    "folder": (write_folder, ["--dataset=image_folder"]),
    "tarball": (write_tarball, ["--dataset=image_folder"]),
    "idx": (write_idx, ["--dataset=mnist", "--image_shape=64,64,1"]),
}


def peak_rss(command) -> tuple:
    """Runs `command`; returns (peak resident memory in MB, seconds)."""
    start = time.time()
    proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": REPO})
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"{' '.join(command)} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return usage.ru_maxrss / 1024, time.time() - start


def _taken(command: str, args: list) -> list:
    """The args `command` takes: the first stage records the data and the model, later
    ones read them from the workdir and refuse flags they do not take."""
    from pipeline import cli

    own = cli.command_flags(command)
    return [a for a in args if a.lstrip("-").split("=", 1)[0] in own]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", choices=sorted(LAYOUTS), default="folder")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--keep", default=None, help="Keep the folders and workdirs here.")
    args = parser.parse_args()
    root = args.keep or tempfile.mkdtemp(prefix="ovqvae-memory-")
    peaks = {}
    try:
        for n in (args.n, 4 * args.n):
            write, flags = LAYOUTS[args.layout]
            start = time.time()
            images = write(os.path.join(root, f"{args.layout}-{n}"), n)
            print(f"{n} + {TEST_IMAGES} synthetic {SIZE}x{SIZE} images written as "
                  f"{args.layout} in {time.time() - start:.0f} s", flush=True)
            work = os.path.join(root, f"work-{args.layout}-{n}")
            for stage in STAGES:
                given = [*flags, f"--data_path={images}", "--force", *MODEL_FLAGS]
                mb, seconds = peak_rss([sys.executable, "-m", "pipeline.cli", stage,
                                        f"--workdir={work}", *_taken(stage, given)])
                peaks[(stage, n)] = mb
                print(f"{stage:18s} N={n:6d}: peak RSS {mb:7.1f} MB in {seconds:5.1f} s",
                      flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    small, large = args.n, 4 * args.n
    print(f"\nlayout: {args.layout}\n| stage | peak MB at {small:,} | peak MB at {large:,} | growth MB |")
    print("| --- | ---: | ---: | ---: |")
    for stage in STAGES:
        a, b = peaks[(stage, small)], peaks[(stage, large)]
        print(f"| {stage} | {a:.0f} | {b:.0f} | {b - a:+.0f} |")


if __name__ == "__main__":
    main()
