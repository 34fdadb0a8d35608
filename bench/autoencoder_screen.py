"""Screens autoencoder changes on a fixed wall-clock budget: each variant trains for the same
minutes on the same images, then its test reconstructions are scored at 10/25/50/100% of K.

Every variant is the base config with some fields replaced; training runs through
`training.train_autoencoder` with a deadline, as `ovqvae run --time_budget` does, so a row
is what that many minutes buy. Prints a table (PSNR in dB, steps run, images/s) and writes
it as JSON.

  .venv/bin/python bench/autoencoder_screen.py --data_path=../shared/data/cifar10/cifar10-jpeg.tar.gz \\
      --minutes=3 --variants=reference_narrow,residual,residual_cosine --out=screen.json

`--plot=a.json,b.json --png=F` draws PSNR at all codes against minutes for the variants of
several screens (one curve per variant, a point per screen).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

from ordered_vqvae import configs, training
from ordered_vqvae.xla import prefer_wide_vectors
from pipeline.config import DataConfig

prefer_wide_vectors()

# The docs' CIFAR-10 run before this study: the reference stack at narrow widths.
BASE = dict(hidden=(32, 64, 128), latent_channels=100, codebook_size=500, epochs=1000)
VARIANTS = {
    "reference_narrow": {},
    "reference_narrow_cosine": dict(lr_schedule="cosine", warmup_steps=200),
    "residual": dict(architecture="residual", hidden=(64, 128, 256)),
    "residual_cosine": dict(architecture="residual", hidden=(64, 128, 256),
                            lr_schedule="cosine", warmup_steps=200),
    "residual_cosine_b64": dict(architecture="residual", hidden=(64, 128, 256),
                                lr_schedule="cosine", warmup_steps=200, batch_size=64),
    "residual_cosine_ema": dict(architecture="residual", hidden=(64, 128, 256),
                                lr_schedule="cosine", warmup_steps=200, use_ema=True,
                                dead_code_steps=100),
    "residual_cosine_lr1e-3": dict(architecture="residual", hidden=(64, 128, 256),
                                   lr_schedule="cosine", warmup_steps=200, learning_rate=1e-3),
    "residual_narrow_cosine": dict(architecture="residual", hidden=(32, 64, 128),
                                   lr_schedule="cosine", warmup_steps=200),
    "residual_8x8_cosine": dict(architecture="residual", hidden=(64, 128),
                                lr_schedule="cosine", warmup_steps=200),
    "reference_narrow_cosine_ema": dict(lr_schedule="cosine", warmup_steps=200, use_ema=True,
                                        dead_code_steps=100),
    "residual_narrow_cosine_ema": dict(architecture="residual", hidden=(32, 64, 128),
                                       lr_schedule="cosine", warmup_steps=200, use_ema=True,
                                       dead_code_steps=100),
    "residual_narrow_cosine_bf16": dict(architecture="residual", hidden=(32, 64, 128),
                                        lr_schedule="cosine", warmup_steps=200,
                                        compute_dtype="bfloat16"),
    "residual_narrow_cosine_bf16_b64": dict(architecture="residual", hidden=(32, 64, 128),
                                            lr_schedule="cosine", warmup_steps=200,
                                            compute_dtype="bfloat16", batch_size=64),
    "residual_narrow_cosine_bf16_b256": dict(architecture="residual", hidden=(32, 64, 128),
                                             lr_schedule="cosine", warmup_steps=200,
                                             compute_dtype="bfloat16", batch_size=256),
    "reference_narrow_bf16": dict(compute_dtype="bfloat16"),
    "residual_narrow_bf16": dict(architecture="residual", hidden=(32, 64, 128),
                                 compute_dtype="bfloat16"),
    "residual_cosine_bf16": dict(architecture="residual", hidden=(64, 128, 256),
                                 lr_schedule="cosine", warmup_steps=200,
                                 compute_dtype="bfloat16"),
    "residual_cosine_full10": dict(architecture="residual", hidden=(64, 128, 256),
                                   lr_schedule="cosine", warmup_steps=200, full_code_share=0.1),
}


def psnr(mse):
    return float(np.mean(-10 * np.log10(np.maximum(mse, 1e-10))))


def score(model, images, fractions=(0.1, 0.25, 0.5, 1.0)):
    """{fraction: mean per-image PSNR in dB} of reconstructions from round(f*K) codes."""
    import tensorflow as tf

    K = model.code_length
    out = {}
    codes = tf.concat([model.encode(images[i:i + 500]) for i in range(0, len(images), 500)], 0)
    for f in fractions:
        k = max(1, round(f * K))
        errors = [np.mean((model.decode(codes[i:i + 500], k).numpy() - images[i:i + 500]) ** 2,
                          axis=(1, 2, 3)) for i in range(0, len(images), 500)]
        out[f] = psnr(np.concatenate(errors))
    return out


def plot(paths, png):
    """PSNR from all codes against the screen's minutes, a curve per variant."""
    from ordered_vqvae import figures

    curves = {}
    for path in paths:
        with open(path) as f:
            screen = json.load(f)
        for row in screen["rows"]:
            curves.setdefault(row["variant"], {})[screen["minutes"]] = row["psnr"]["1.0"]
    figures.save_curves(curves, png, "minutes of training (2 CPU cores)",
                        "test PSNR from all K codes (dB)",
                        "Autoencoder changes at equal wall-clock time")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default="")
    parser.add_argument("--png", default="")
    parser.add_argument("--data_path")
    parser.add_argument("--dataset", default="image_folder")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--test_images", type=int, default=2000)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    if args.plot:
        return plot(args.plot.split(","), args.png)
    if not args.data_path:
        parser.error("--data_path is required (or --plot)")
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}, expected some of {sorted(VARIANTS)}")

    data = DataConfig(source=args.dataset, path=args.data_path)
    start = time.time()
    train = np.concatenate(list(data.image_batches("train")))
    test = np.concatenate(list(data.image_batches("test", sample=args.test_images)))
    print(f"{len(train)} training and {len(test)} test images of {train.shape[1:]} "
          f"read in {time.time() - start:.0f} s", flush=True)

    rows = []
    for name in names:
        config = configs.AutoencoderConfig(image_shape=train.shape[1:],
                                           **{**BASE, **VARIANTS[name]})
        with tempfile.TemporaryDirectory() as workdir:
            start = time.time()
            model = training.train_autoencoder(config, train, None, workdir, verbose=0,
                                               checkpoint_every=0,
                                               deadline=start + 60 * args.minutes)
            seconds = time.time() - start
            steps = int(model.optimizer.iterations.numpy())
        row = {"variant": name, "overrides": {k: list(v) if isinstance(v, tuple) else v
                                               for k, v in VARIANTS[name].items()},
               "seconds": round(seconds, 1), "steps": steps,
               "images_per_second": round(steps * config.batch_size / seconds, 1),
               "params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
               "psnr": score(model, test)}
        rows.append(row)
        print(f"{name:<28} {' '.join(f'{v:6.2f}' for v in row['psnr'].values())} dB at "
              f"10/25/50/100%  {steps} steps, {row['images_per_second']:.0f} images/s, "
              f"{row['params']} params", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"minutes": args.minutes, "base": {k: list(v) if isinstance(v, tuple)
                                                             else v for k, v in BASE.items()},
                           "test_images": len(test), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
