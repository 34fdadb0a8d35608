"""What `encode_to_quality` costs, measured side by side in one run on one batch of test
images of a trained autoencoder.

  .venv/bin/python bench/encode_to_quality.py --workdir=runs/cifar10 [--batch=256] [--repeats=3]

The signature encodes, then decodes prefixes k = 1, 2, ... of the images that have not met
the target yet, so an image costs its own k decodes. The targets are the batch's mean PSNR
at k = K/8, K/4, K/2 and K (what a `min_quality` request asks for), and one no image
reaches (every image decodes all K prefixes). For each it prints the mean and largest k and
the time against one plain reconstruction (`encode`, then `decode` at K) and against the
same search decoding the whole batch at every step up to the largest k (the simpler loop,
whose cost is the largest k times the batch).
"""

import argparse
import os
import statistics
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from harness import timings  # noqa: E402


def whole_batch(autoencoder, images, max_mse):
    """The reference loop: every image decoded at every k until the last one meets it."""
    import tensorflow as tf

    K = autoencoder.code_length
    codes = autoencoder.encode(images)
    n = tf.shape(codes)[0]

    def more(k, found):
        return (k <= K) & tf.reduce_any(found == 0)

    def prefix(k, found):
        error = tf.reduce_mean(tf.square(autoencoder.decode(codes, k) - images), axis=[1, 2, 3])
        return k + 1, tf.where((found == 0) & ((error <= max_mse) | (k == K)), k, found)

    return tf.while_loop(more, prefix, (tf.constant(1), tf.zeros([n], tf.int32)))[1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True,
                        help="a workdir with a trained autoencoder (ovqvae train_autoencoder)")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import tensorflow as tf

    from rate_distortion import load, prefix_errors
    from ordered_vqvae.export import AnytimeModel
    from ordered_vqvae.prior import CodePrior

    autoencoder, images = load(args.workdir, args.batch)
    K = autoencoder.code_length
    # The signature never calls the prior; a one-layer stand-in builds the module.
    module = AnytimeModel(autoencoder, CodePrior(K, autoencoder.codebook_size, num_layers=1,
                                                 num_heads=1, width=8, ffn_width=8))
    x = tf.constant(images)
    psnr = 10 * np.log10(1 / np.maximum(prefix_errors(autoencoder, images), 1e-12))
    reconstruct = tf.function(lambda x: autoencoder.decode(autoencoder.encode(x), K))
    whole = tf.function(lambda x, m: whole_batch(autoencoder, x, m))
    base = statistics.median(timings(lambda: reconstruct(x).numpy(), args.repeats))
    print(f"{len(images)} test images of {args.workdir}, K={K}: encode + decode at K "
          f"{1e3 * base:.1f} ms (median of {args.repeats})")
    print(f"{'target':>30s} {'mean k':>7s} {'max k':>6s} {'x reconstruction':>17s} "
          f"{'x whole-batch loop':>19s}")
    targets = [(f"mean PSNR at k={k}", float(psnr[:, k - 1].mean()))
               for k in sorted({max(1, K // 8), max(1, K // 4), max(1, K // 2), K})]
    targets.append(("unreachable", float(psnr.max()) + 10))
    for name, target in targets:
        max_mse = tf.constant(10 ** (-target / 10), tf.float32)
        out = module.encode_to_quality(x, max_mse)
        k = out["num_codes"].numpy()
        np.testing.assert_array_equal(k, whole(x, max_mse).numpy())  # Same answer, both ways.
        ours = statistics.median(timings(
            lambda: module.encode_to_quality(x, max_mse)["num_codes"].numpy(), args.repeats))
        ref = statistics.median(timings(lambda: whole(x, max_mse).numpy(), args.repeats))
        print(f"{name + f' ({target:.1f} dB)':>30s} {k.mean():7.2f} {k.max():6d} "
              f"{ours / base:17.2f} {ours / ref:19.2f}", flush=True)


if __name__ == "__main__":
    main()
