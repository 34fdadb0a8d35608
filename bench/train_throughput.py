"""Training throughput of the ordered VQ-VAE, MNIST preset (C=64, 256 codewords, batch 128).

Prints images/second for the Keras `fit` path (what `ovqvae` uses) and, side by side in the
same run, the ratio between variants that matter on CPU: the default truncation vs none,
XLA on vs off, mixed_bfloat16 vs float32, the seeded training stream (exact resume) vs a
plain shuffle buffer, several steps per compiled call vs one, and batch normalization on
TensorFlow's fused kernel vs Keras's own layer. Each row is the best of `--rounds` rounds.

  .venv/bin/python bench/train_throughput.py [--steps=150] [--rounds=2]
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras
import numpy as np
import tensorflow as tf

from harness import autoencoder_for_fit
from ordered_vqvae import configs, models
from ordered_vqvae.xla import prefer_wide_vectors

prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.


def images_per_second(config, images, steps, jit_compile=False, stream=True, policy="float32",
                      several_per_call=True, keras_batch_norm=False):
    # The training path: seeded epochs, lengths drawn in the input pipeline.
    keras.mixed_precision.set_global_policy(policy)  # Read when the model is built.
    fused = models.BatchNormalization
    if keras_batch_norm:  # Keras's own layer, as the models used before.
        models.BatchNormalization = lambda: keras.layers.BatchNormalization(synchronized=True)
    try:
        model, ds = autoencoder_for_fit(config, images, (20, steps) if several_per_call else (1,),
                                        jit_compile)
    finally:
        keras.mixed_precision.set_global_policy("float32")
        models.BatchNormalization = fused
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
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    # Random images: throughput does not depend on pixel values.
    images = rng.uniform(size=(8192, 28, 28, 1)).astype(np.float32)
    base = configs.preset("mnist")
    rows = {
        "ordered (uniform_per_example)": (base, {}),
        "unordered (no truncation)": (base.replace(truncation="none"), {}),
        "ordered, XLA": (base, {"jit_compile": True}),
        "ordered, mixed_bfloat16": (base, {"policy": "mixed_bfloat16"}),
        "ordered, shuffle-buffer input": (base, {"stream": False}),
        "ordered, one step per call": (base, {"several_per_call": False}),
        "ordered, Keras BatchNorm layer": (base, {"keras_batch_norm": True}),
    }
    results = {name: 0.0 for name in rows}
    for round_ in range(args.rounds):
        for name, (config, options) in rows.items():
            value = images_per_second(config, images, args.steps, **options)
            results[name] = max(results[name], value)
            print(f"round {round_ + 1}: {name:32s} {value:8.0f} images/s", flush=True)
    for name, value in results.items():
        print(f"best: {name:32s} {value:8.0f} images/s")
    ref = results["ordered (uniform_per_example)"]
    print(f"ratio unordered/ordered: {results['unordered (no truncation)'] / ref:.2f}; "
          f"XLA/no XLA: {results['ordered, XLA'] / ref:.2f}; "
          f"mixed_bfloat16/float32: {results['ordered, mixed_bfloat16'] / ref:.2f}; "
          f"seeded stream/shuffle buffer: {ref / results['ordered, shuffle-buffer input']:.2f}; "
          f"several steps per call/one: {ref / results['ordered, one step per call']:.2f}; "
          f"fused/Keras BatchNorm: {ref / results['ordered, Keras BatchNorm layer']:.2f}")


if __name__ == "__main__":
    main()
