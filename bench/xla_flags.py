"""XLA's CPU vector width for the anytime sampler, measured side by side in one run.

The package asks XLA for 512-bit vectors (`ordered_vqvae/__init__.py`). This runs the
reference-size prior's sampler (6 layers, width 512, K = 64, codes only) in fresh processes
that alternate between XLA's default (256) and 512, and prints the medians of ms per code at
batch 1 and 64 with their ratios. XLA reads XLA_FLAGS once per process, hence the processes.

  .venv/bin/python bench/xla_flags.py [--rounds=3]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

WIDTHS = (256, 512)
BATCHES = (1, 64)


def worker(repeats):
    import tensorflow as tf

    from ordered_vqvae.configs import prior_preset
    from ordered_vqvae.prior import CodePrior
    from ordered_vqvae.sampler import AnytimeSampler
    from harness import timings

    prior = CodePrior.from_config_for(prior_preset("reference"), 64, 256)
    prior(tf.zeros((1, 1), tf.int32))
    sampler = AnytimeSampler.for_prior(prior)
    return {batch: 1000 * min(timings(lambda: sampler.sample_codes(batch, 64).numpy(),
                                      repeats)) / 64 for batch in BATCHES}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.repeats)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    results = {width: {batch: [] for batch in BATCHES} for width in WIDTHS}
    for _ in range(args.rounds):
        for width in WIDTHS:
            env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
                   "PYTHONPATH": os.pathsep.join([os.path.dirname(here), here]),
                   "XLA_FLAGS": f"--xla_cpu_prefer_vector_width={width}"}
            out = subprocess.run([sys.executable, __file__, "--worker",
                                  f"--repeats={args.repeats}"], env=env, capture_output=True,
                                 text=True)
            if out.returncode:
                sys.exit(f"the worker failed:\n{out.stderr[-3000:]}")
            for batch, ms in json.loads(out.stdout.strip().splitlines()[-1]).items():
                results[width][int(batch)].append(ms)
    for batch in BATCHES:
        base, wide = (statistics.median(results[w][batch]) for w in WIDTHS)
        print(f"batch {batch:2d}: vector width 256 {base:.2f} ms per code "
              f"{[round(v, 2) for v in results[256][batch]]}, 512 {wide:.2f} "
              f"{[round(v, 2) for v in results[512][batch]]}: ratio {wide / base:.2f}")


if __name__ == "__main__":
    main()
