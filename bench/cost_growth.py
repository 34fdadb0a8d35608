"""How the cost of each part grows: training with dataset size N and code length K,
extraction with N, sampling with k and K. Every point is measured in this one run; the
cost-growth table of docs/reliability.md comes from it.

  .venv/bin/python bench/cost_growth.py [--mnist=../shared/data/mnist]

Training runs the real path (seeded stream, truncation drawn per example) on random
MNIST-shaped images; extraction runs the Beam job on the MNIST training images when
--mnist is given; sampling uses a 2-layer width-128 prior, batch 64.
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import tensorflow as tf

from ordered_vqvae import configs, models
from ordered_vqvae.prior import CodePrior
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.xla import prefer_wide_vectors
from harness import autoencoder_for_fit, timings

prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.


def epoch_seconds(config, images, steps=60):
    """Seconds per epoch over `images`, from the time of `steps` batches after warm-up."""
    model, ds = autoencoder_for_fit(config, images, (10, steps))
    model.fit(ds, steps_per_epoch=10, epochs=1, verbose=0, shuffle=False)
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    per_step = (time.perf_counter() - start) / steps
    return per_step * (len(images) // config.batch_size)


def best_seconds(fn, repeats=3):
    return min(timings(fn, repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", help="MNIST IDX directory (for the extraction rows)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    base = configs.preset("mnist")

    print("1. training, MNIST preset, batch 128: seconds per epoch")
    for n in (15_000, 60_000):
        images = rng.uniform(size=(n, 28, 28, 1)).astype(np.float32)
        print(f"   N={n:6d}, K=64: {epoch_seconds(base, images):6.1f} s", flush=True)
    for k in (16, 128):
        print(f"   N= 60000, K={k}: {epoch_seconds(base.replace(latent_channels=k), images):6.1f} s",
              flush=True)

    if args.mnist:
        from pipeline import extract
        from pipeline.config import DataConfig

        print("2. extraction (Beam FnApiRunner, 1 process, train + test splits), K=64")
        tmp = tempfile.mkdtemp()
        model = models.OrderedVQVAE(base)
        model(tf.zeros((1, 28, 28, 1)))
        ae = models.save_autoencoder(model, os.path.join(tmp, "ae"))
        for n in (10_000, 40_000):
            start = time.perf_counter()
            meta = extract.run(ae, os.path.join(tmp, f"codes-{n}"), DataConfig(
                "mnist", path=args.mnist, max_train=n, max_test=n // 4), num_shards=4)
            seconds = time.perf_counter() - start
            total = sum(meta["counts"].values())
            print(f"   {total:6d} images: {seconds:6.1f} s ({total / seconds:5.0f} images/s)",
                  flush=True)

    print("3. sampling, batch 64, 2-layer width-128 prior: seconds (codes + decode)")
    for K in (32, 64, 128):
        ae = models.OrderedVQVAE(base.replace(latent_channels=K))
        ae(tf.zeros((1, 28, 28, 1)))
        prior = CodePrior(K, 256, num_layers=2, num_heads=4, width=128, ffn_width=512)
        prior(tf.zeros((1, K), tf.int32))
        sampler = ImageGenerator(prior, ae)
        ks = sorted({K // 4, K // 2, K})
        times = {k: best_seconds(lambda k=k: sampler.sample(64, k)[0].numpy()) for k in ks}
        print(f"   K={K:3d}: " + ", ".join(f"k={k}: {t:.3f}" for k, t in times.items()), flush=True)


if __name__ == "__main__":
    main()
