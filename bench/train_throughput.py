"""Training throughput of the ordered VQ-VAE, MNIST preset (C=64, 256 codewords, batch 128).

Prints images/second for the Keras `fit` path (what `ovqvae` uses) and, side by side in the
same run, the ratio between variants that matter on CPU: the default truncation vs none,
XLA on vs off, mixed_bfloat16 vs float32, and the seeded training stream (exact resume) vs a
plain shuffle buffer.

  .venv/bin/python bench/train_throughput.py [--steps=150]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from harness import autoencoder_for_fit
from ordered_vqvae import configs


def images_per_second(config, images, steps, jit_compile=False, stream=True, policy="float32"):
    # The training path: seeded epochs, lengths drawn in the input pipeline.
    keras.mixed_precision.set_global_policy(policy)  # Read when the model is built.
    try:
        model, ds = autoencoder_for_fit(config, images, (20, steps), jit_compile)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    if not stream:  # A plain shuffle buffer, lengths drawn in the model: no exact resume.
        ds = (tf.data.Dataset.from_tensor_slices(images).shuffle(len(images), seed=0).repeat()
              .batch(config.batch_size, drop_remainder=True).prefetch(2))
        options = tf.data.Options()
        options.autotune.enabled = False  # As in the training stream.
        ds = ds.with_options(options)
    model.fit(ds, steps_per_epoch=20, epochs=1, verbose=0, shuffle=False)  # Trace and warm up.
    start = time.perf_counter()
    model.fit(ds, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False)
    return steps * config.batch_size / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Random images: throughput does not depend on pixel values.
    images = rng.uniform(size=(8192, 28, 28, 1)).astype(np.float32)
    base = configs.preset("mnist")
    rows = [
        ("ordered (uniform_per_example)", base, False, True, "float32"),
        ("unordered (no truncation)", base.replace(truncation="none"), False, True, "float32"),
        ("ordered, XLA", base, True, True, "float32"),
        ("ordered, mixed_bfloat16", base, False, True, "mixed_bfloat16"),
        ("ordered, shuffle-buffer input", base, False, False, "float32"),
    ]
    results = {}
    for name, config, xla, stream, policy in rows:
        results[name] = images_per_second(config, images, args.steps, xla, stream, policy)
        print(f"{name:32s} {results[name]:8.0f} images/s", flush=True)
    ref = results[rows[0][0]]
    print(f"ratio unordered/ordered: {results[rows[1][0]] / ref:.2f}; "
          f"XLA/no XLA: {results[rows[2][0]] / ref:.2f}; "
          f"mixed_bfloat16/float32: {results[rows[3][0]] / ref:.2f}; "
          f"seeded stream/shuffle buffer: {ref / results[rows[4][0]]:.2f}")


if __name__ == "__main__":
    main()
