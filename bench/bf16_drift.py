"""How far a prior's bfloat16 copies drift from its float32 reference, on a trained workdir.

Loads the workdir's prior in each of `load_prior`'s dtypes ("float32", "bfloat16":
everything in bfloat16, "bfloat16_weights": bfloat16 projection kernels only) and prints,
each copy against float32:
  1. bits per code of the workdir's test codes;
  2. the share of sampled codes that agree when both sample from the same seeds (the random
     streams are counter-based, so only the logits differ), at each position decile;
  3. with --classifier (an `ovqvae experiments` workdir's classifier/) and --data_path, the
     domain FD of samples at k = K/4 and K against the test images.

  .venv/bin/python bench/bf16_drift.py --workdir=runs/mnist/variants/ordered \\
      --classifier=runs/mnist/classifier --dataset=mnist --data_path=../shared/data/mnist
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from ordered_vqvae import metrics, models
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import PRIOR_DTYPES, load_prior
from ordered_vqvae.xla import prefer_wide_vectors
from pipeline import schema, sources, stages

prefer_wide_vectors()  # As the ovqvae command does, before anything compiles.


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="a pipeline workdir with a prior")
    parser.add_argument("--classifier", help="a classifier/ directory, for the FD")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--data_path", help="the dataset's files, for the FD's test images")
    parser.add_argument("--samples", type=int, default=1000)
    args = parser.parse_args()
    autoencoder = models.load_autoencoder(stages.artifact_path(args.workdir, "autoencoder"))
    generators = {dtype: ImageGenerator(load_prior(stages.artifact_path(args.workdir, "prior"),
                                                   dtype), autoencoder)
                  for dtype in PRIOR_DTYPES}
    K = autoencoder.code_length
    test_codes = np.concatenate(list(schema.code_batches(
        stages.artifact_path(args.workdir, "extract"), "test")))
    print(f"prior: {args.workdir}, K={K}; {len(test_codes)} test code sequences")
    bits = {d: g.prior.bits_per_code(test_codes) for d, g in generators.items()}
    copies = [d for d in PRIOR_DTYPES if d != "float32"]
    print(f"1. bits per code of the test codes: float32 {bits['float32']:.4f}; " + "; ".join(
        f"{d} {bits[d]:.4f} ({bits[d] - bits['float32']:+.4f})" for d in copies))
    codes = {d: np.concatenate([g.sample_codes(min(250, args.samples - s), K, seed=s).numpy()
                                for s in range(0, args.samples, 250)])
             for d, g in generators.items()}
    for d in copies:
        same = codes["float32"] == codes[d]
        deciles = ", ".join(f"{same[:, K * i // 10:K * (i + 1) // 10].mean():.2f}"
                            for i in range(10))
        print(f"2. {d}: sampled codes equal to float32's under the same seeds: "
              f"{same.mean():.3f} of all; rows equal in full: {same.all(axis=1).mean():.3f}; "
              f"by position decile: {deciles}")
    if not (args.classifier and args.data_path):
        return
    test_x, _, _ = sources.to_numpy(sources.load(args.dataset, "test", path=args.data_path)[0])
    clf = metrics.DomainClassifier.load(args.classifier, test_x.shape[1:])
    real = clf.features(test_x)
    for k in (K // 4, K):
        fd = {d: metrics.frechet_distance_of(
            clf.features(generators[d].decode(codes[d], k).numpy()), real) for d in PRIOR_DTYPES}
        print(f"3. domain FD at k={k}: " + ", ".join(f"{d} {fd[d]:.2f}" for d in PRIOR_DTYPES)
              + f" (classifier accuracy {clf.accuracy:.4f})")


if __name__ == "__main__":
    main()
