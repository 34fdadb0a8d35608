"""Trains a small autoencoder and prior under a tf.distribute strategy and saves the final
weights: the subject of test_distributed.py.

    python tests/distributed_worker.py single|mirrored|multi_worker adam|sgd WORKDIR OUT.npz \
        [stock_autoencoder|stock_prior]

`mirrored` splits the one CPU into 2 logical devices; `multi_worker` reads TF_CONFIG (one
process per worker). Only the chief writes OUT. With `sgd` both trainings use plain SGD
instead of Adam/AdamW: Adam's first steps turn float rounding in near-zero gradients into
full-size updates, so only SGD lets weights be compared element by element. `stock_*`
removes that model's `_maybe_symbolic_build` override, to show what it prevents.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import tensorflow as tf  # noqa: E402

if sys.argv[1] == "mirrored":
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

import keras  # noqa: E402

keras.config.disable_traceback_filtering()
import numpy as np  # noqa: E402

from ordered_vqvae import configs, fit, training  # noqa: E402
from ordered_vqvae.configs import prior_preset  # noqa: E402
from ordered_vqvae.examples import write_examples  # noqa: E402
from pipeline import sources  # noqa: E402

AUTOENCODER = configs.preset("digits", hidden=(16,), latent_channels=8, codebook_size=32,
                             batch_size=64, epochs=2)
PRIOR = prior_preset("digits", num_layers=1, width=32, num_heads=2, ffn_width=64, epochs=2,
                     batch_size=32, warmup_steps=10, dropout=0.0)


def main(mode, optimizer, workdir, out, stock=""):
    if stock:
        from ordered_vqvae import models, prior

        del {"stock_autoencoder": models._Ordered, "stock_prior": prior.CodePrior}[stock] \
            ._maybe_symbolic_build
    if optimizer == "sgd":
        keras.optimizers.Adam = lambda learning_rate: keras.optimizers.SGD(0.1)
        keras.optimizers.AdamW = lambda *args, **kwargs: keras.optimizers.SGD(0.1)
    strategy = {"single": tf.distribute.get_strategy,
                "mirrored": lambda: tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]),
                "multi_worker": tf.distribute.MultiWorkerMirroredStrategy}[mode]()
    images = sources.to_numpy(sources.load("digits", "train")[0])[0]
    rng = np.random.default_rng(0)  # Codes with structure, independent of the autoencoder.
    codes = rng.integers(0, 32, size=(1024, 8)) // rng.integers(1, 4, size=(1024, 1))
    # Both stages read their examples from disk, each worker its own rows of every batch.
    os.makedirs(workdir, exist_ok=True)
    on_disk = {name: write_examples(os.path.join(workdir, f"{name}-{os.getpid()}.npy"),
                                    [array], dtype)
               for name, array, dtype in (("images", images, np.float32),
                                          ("codes", codes, np.int32))}
    ae = training.train_autoencoder(AUTOENCODER, on_disk["images"], None,
                                    os.path.join(workdir, "ae"), verbose=0, strategy=strategy)
    prior = training.train_prior(PRIOR, 8, 32, on_disk["codes"], None,
                                 os.path.join(workdir, "prior"), verbose=0, strategy=strategy)
    if not fit.is_chief(strategy):
        return
    weights = {f"ae/{w.path}": w.numpy() for w in ae.weights}
    weights.update({f"prior/{w.path}": w.numpy() for w in prior.weights})
    np.savez(out, **weights)
    with open(out + ".json", "w") as f:
        json.dump({"replicas": strategy.num_replicas_in_sync,
                   "ae_mse": ae.mse_by_length(images[:500], [2, 8]),
                   "prior_bits": prior.bits_per_code(codes[:500])}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
