"""What the bench scripts share: wall-clock timing, and the autoencoder set up for training
as `ovqvae` trains it. Plain Python at import, so that the optional PyTorch environment of
compare_torch.py imports it too."""

import time


def timings(fn, repeats: int, warmup: int = 1) -> list:
    """Seconds of each of `repeats` calls of `fn`, after `warmup` untimed calls (compiling,
    caches)."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def autoencoder_for_fit(config, images, fit_steps, jit_compile: bool = False):
    """(an OrderedVQVAE compiled with its optimizer built, the seeded training stream over
    `images`), seeded with 0: what `ovqvae train_autoencoder` runs `fit` on, with the steps
    per compiled call it would pick for fit calls of `fit_steps` (a tuple of step counts)."""
    import keras
    import tensorflow as tf

    from ordered_vqvae import fit, models, training

    keras.utils.set_random_seed(0)
    model = models.OrderedVQVAE(config)
    model(tf.zeros((1,) + config.image_shape))
    optimizer = keras.optimizers.Adam(config.learning_rate)
    optimizer.build(model.trainable_variables)
    model.compile(optimizer=optimizer, jit_compile=jit_compile,
                  steps_per_execution=fit.steps_per_execution(*fit_steps))
    return model, training.autoencoder_stream(model, images).dataset(0, 1000)
