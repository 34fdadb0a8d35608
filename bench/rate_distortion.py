"""Rate against distortion on a test split: one fixed k for every image, per-image adaptive
k at a range of PSNR targets, and JPEG (Pillow) at a range of qualities, for an ordered
autoencoder and, for contrast, an unordered one.

  .venv/bin/python bench/rate_distortion.py --ordered=runs/mnist --unordered=runs/mnist-unordered \
      --out=docs/rate_distortion_mnist [--test_images=10000]

Each --ordered / --unordered is a workdir with a trained autoencoder (`ovqvae
train_autoencoder`); the test images are its recorded data's test split. Rates are bits per
pixel: k x log2(V) over the image's pixels for codes; for JPEG, the whole file's bytes x 8
over the pixels, and beside it the entropy-coded payload alone (the bytes after the start
of scan, without the headers and tables that a codec shared across images would not
resend). PSNR is per image for images in [0, 1] (JPEG from the 8-bit pixels); the tables
give its mean and 5th percentile. Beside each JPEG quality: each model's fixed k whose codes
take as many bits as that JPEG's payload, and its PSNR (the comparison at matched size).

The claim it checks: for each target every test image reaches at K, the mean rate of
per-image adaptive k against that of the one fixed k with which 90% of images reach it
(the targets: 8 up to the worst image's PSNR at K, 3 more up to the PSNR 90% of images
reach at K).
Writes rate_distortion.json and rate_distortion.png into --out, and prints the tables.
"""

import argparse
import io
import json
import math
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

JPEG_QUALITIES = (1, 3, 5, 10, 20, 30, 50, 70, 90, 95)


def _psnr(mse):
    return 10 * np.log10(1.0 / np.maximum(mse, 1e-12))


def load(workdir, limit):
    """(autoencoder, test images float32 [N,H,W,C]) of a workdir's recorded run."""
    from ordered_vqvae import models
    from pipeline import stages, workdir as wd
    from pipeline.config import PipelineConfig

    record = wd.read_run(workdir)
    if record is None:
        raise SystemExit(f"{workdir} records no run; train it with ovqvae train_autoencoder")
    config = PipelineConfig.from_dict(record["config"])
    images = np.concatenate(list(config.data.image_batches("test", sample=limit)))
    return models.load_autoencoder(stages.artifact_path(workdir, "autoencoder")), images


def prefix_errors(model, images, batch=1000):
    """MSE [N, K] of each image reconstructed from its first k codes, k = 1..K."""
    K = model.code_length
    out = np.empty((len(images), K), np.float64)
    for start in range(0, len(images), batch):
        x = images[start:start + batch]
        codes = model.encode(x)
        for k in range(1, K + 1):
            out[start:start + len(x), k - 1] = ((model.decode(codes, k).numpy() - x) ** 2
                                                ).mean(axis=(1, 2, 3))
    return out


def code_curves(model, errors, pixels):
    """Fixed k and adaptive k at PSNR targets, from the prefix errors."""
    K, bits = model.code_length, math.log2(model.codebook_size)
    psnr = _psnr(errors)
    fixed = [{"k": k, "bpp": k * bits / pixels, "psnr_mean": float(psnr[:, k - 1].mean()),
              "psnr_p5": float(np.percentile(psnr[:, k - 1], 5))} for k in range(1, K + 1)]
    reachable = float(psnr[:, -1].min())  # Every image reaches a target up to this at K.
    low = min(float(np.percentile(psnr[:, 0], 50)), reachable - 2)
    # Beyond `reachable`, up to the PSNR that 90% of images reach at K: a fixed k for 90%
    # still exists there, and adaptive k gives the images that never reach it all K codes.
    most = math.floor(10 * float(np.percentile(psnr[:, -1], 10))) / 10
    top = math.floor(10 * reachable) / 10  # Rounded down, so that every image reaches it.
    targets = np.unique(np.round(np.concatenate([np.linspace(low, top, 8),
                                                 np.linspace(reachable, most, 4)[1:]]), 1))
    adaptive = []
    for target in targets:
        meets = psnr >= target
        k = np.where(meets.any(axis=1), meets.argmax(axis=1) + 1, K)
        got = psnr[np.arange(len(k)), k - 1]
        share = meets.mean(axis=0)
        k90 = next((j + 1 for j in range(K) if share[j] >= 0.9), None)
        adaptive.append({"target": float(target), "mean_k": float(k.mean()),
                         "bpp": float(k.mean() * bits / pixels), "psnr_mean": float(got.mean()),
                         "psnr_p5": float(np.percentile(got, 5)),
                         "reached": float((got >= target).mean()), "fixed_k90": k90,
                         "rate_vs_fixed_k90": float(k.mean() / k90) if k90 else None,
                         "every_image_reaches": bool(target <= reachable)})
    return fixed, adaptive


def _payload_bytes(data: bytes) -> int:
    """Bytes of a JPEG after its start-of-scan segment (the entropy-coded data)."""
    at = data.find(b"\xff\xda")
    length = int.from_bytes(data[at + 2:at + 4], "big")
    return len(data) - (at + 2 + length)


def jpeg_curve(images):
    from PIL import Image

    pixels8 = np.round(images * 255).astype(np.uint8)
    h, w, c = images.shape[1:]
    rows = []
    for quality in JPEG_QUALITIES:
        sizes, payloads, psnr = [], [], []
        for image in pixels8:
            buffer = io.BytesIO()
            Image.fromarray(image[..., 0] if c == 1 else image).save(buffer, "JPEG",
                                                                    quality=quality)
            data = buffer.getvalue()
            back = np.asarray(Image.open(io.BytesIO(data)), np.float64).reshape(h, w, c) / 255
            sizes.append(len(data))
            payloads.append(_payload_bytes(data))
            psnr.append(_psnr(((back - image / 255.0) ** 2).mean()))
        rows.append({"quality": quality, "bpp": 8 * float(np.mean(sizes)) / (h * w),
                     "payload_bpp": 8 * float(np.mean(payloads)) / (h * w),
                     "psnr_mean": float(np.mean(psnr)), "psnr_p5": float(np.percentile(psnr, 5))})
    return rows


def at_jpeg_sizes(results, pixels):
    """For each JPEG quality and model, the fixed k whose codes take as many bits as the
    JPEG's payload (k = payload bits / log2 V, rounded), with its PSNR; None beyond K."""
    for row in results["jpeg"]:
        row["codes_at_payload"] = {}
        for name, r in results["models"].items():
            k = round(row["payload_bpp"] * pixels / math.log2(r["V"]))
            fixed = r["fixed"][k - 1] if 1 <= k <= r["K"] else None
            row["codes_at_payload"][name] = fixed and {key: fixed[key] for key in
                                                       ("k", "bpp", "psnr_mean", "psnr_p5")}


def plot(results, path):
    """Two panels: mean PSNR and 5th-percentile PSNR against bits per pixel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    for ax, stat, title in zip(axes, ("psnr_mean", "psnr_p5"),
                               ("mean PSNR", "5th-percentile PSNR (the worst images)")):
        for name, r in results["models"].items():
            ax.plot([p["bpp"] for p in r["fixed"]], [p[stat] for p in r["fixed"]],
                    label=f"{name}: one k for every image")
            ax.plot([p["bpp"] for p in r["adaptive"]], [p[stat] for p in r["adaptive"]],
                    "o--", label=f"{name}: adaptive k per image")
        jpeg = results["jpeg"]
        ax.plot([p["bpp"] for p in jpeg], [p[stat] for p in jpeg], "s-", color="grey",
                label="JPEG, whole file")
        ax.plot([p["payload_bpp"] for p in jpeg], [p[stat] for p in jpeg], "s:",
                color="grey", label="JPEG, entropy-coded payload")
        ax.set_xscale("log")
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(f"{title} (dB)")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Rate against distortion, {results['test_images']} test images")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replot(out):
    """Redraws the figure from a run's rate_distortion.json."""
    with open(os.path.join(out, "rate_distortion.json")) as f:
        plot(json.load(f), os.path.join(out, "rate_distortion.png"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ordered", required=True)
    parser.add_argument("--unordered")
    parser.add_argument("--out", required=True)
    parser.add_argument("--test_images", type=int, default=10000)
    args = parser.parse_args()
    results = {"models": {}}
    for name, workdir in (("ordered", args.ordered), ("unordered", args.unordered)):
        if not workdir:
            continue
        model, images = load(workdir, args.test_images)
        pixels = images.shape[1] * images.shape[2]
        fixed, adaptive = code_curves(model, prefix_errors(model, images), pixels)
        results["models"][name] = {"workdir": workdir, "K": model.code_length,
                                   "V": model.codebook_size, "fixed": fixed,
                                   "adaptive": adaptive}
        results["test_images"] = len(images)
        print(f"\n{name} ({workdir}): K={model.code_length}, V={model.codebook_size}")
        print("| PSNR target | adaptive mean k | bpp | PSNR mean | PSNR p5 | reached | "
              "fixed k for 90% | adaptive / fixed rate |")
        for a in adaptive:
            ratio = f"{a['rate_vs_fixed_k90']:.2f}" if a["rate_vs_fixed_k90"] else "-"
            print(f"| {a['target']:.1f}{'' if a['every_image_reaches'] else ' *'} | "
                  f"{a['mean_k']:.2f} | {a['bpp']:.3f} | {a['psnr_mean']:.2f} | "
                  f"{a['psnr_p5']:.2f} | {a['reached']:.1%} | {a['fixed_k90'] or '-'} | "
                  f"{ratio} |")
    results["jpeg"] = jpeg_curve(images)
    at_jpeg_sizes(results, pixels)
    print("\nJPEG (Pillow), and each model's fixed k with as many bits as the JPEG payload\n"
          "| quality | bpp (file) | bpp (payload) | PSNR mean | PSNR p5 | "
          + " | ".join(f"{name}: k, PSNR mean / p5" for name in results["models"]) + " |")
    for j in results["jpeg"]:
        codes = [f"{c['k']}, {c['psnr_mean']:.2f} / {c['psnr_p5']:.2f}" if c else "beyond K"
                 for c in j["codes_at_payload"].values()]
        print(f"| {j['quality']} | {j['bpp']:.3f} | {j['payload_bpp']:.3f} | "
              f"{j['psnr_mean']:.2f} | {j['psnr_p5']:.2f} | " + " | ".join(codes) + " |")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "rate_distortion.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "rate_distortion.png"))
    print(f"\n* not every test image reaches this target at K. Written to {args.out}/")


if __name__ == "__main__":
    main()
