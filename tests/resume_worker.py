"""Trains a small autoencoder or prior to completion, resuming from WORKDIR's checkpoints,
and saves the final weights and logs: the subject of the kill -9 tests (test_faults.py).

    python tests/resume_worker.py autoencoder|prior WORKDIR OUT.npz
"""

import json
import os
import sys
import time

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ordered_vqvae import configs, training  # noqa: E402
from ordered_vqvae.configs import prior_preset  # noqa: E402
from pipeline import sources  # noqa: E402

CHECKPOINT_EVERY = 3


class Throttle(keras.callbacks.Callback):
    """Slows each batch so that a kill from outside lands mid-run (numerics unchanged)."""

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(0.02)


def main(kind, workdir, out):
    images = sources.to_numpy(sources.load("digits", "train")[0])[0]
    original_fit = keras.Model.fit

    def fit(self, *args, callbacks=(), **kwargs):
        return original_fit(self, *args, callbacks=[*callbacks, Throttle()], **kwargs)

    keras.Model.fit = fit
    if kind == "autoencoder":
        config = configs.preset("digits", hidden=(16,), latent_channels=8, codebook_size=32,
                                batch_size=64, epochs=4)
        model = training.train_autoencoder(config, images, images[:200], workdir, resume=True,
                                           verbose=0, checkpoint_every=CHECKPOINT_EVERY)
        metric = model.mse_by_length(images[:200], [2, 8])
    else:
        rng = np.random.default_rng(0)
        codes = rng.integers(0, 16, size=(1024, 8)) // rng.integers(1, 4, size=(1024, 1))
        config = prior_preset("digits", num_layers=1, width=32, num_heads=2, ffn_width=64,
                              epochs=4, batch_size=32, warmup_steps=10, dropout=0.1)
        model = training.train_prior(config, 8, 16, codes, None, workdir, resume=True, verbose=0,
                                     checkpoint_every=CHECKPOINT_EVERY)
        metric = {"bits": model.bits_per_code(codes[:256])}
    np.savez(out, *[w.numpy() for w in model.weights])
    with open(out + ".json", "w") as f:
        json.dump({str(k): float(v) for k, v in metric.items()}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
