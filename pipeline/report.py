"""The human-readable report of a run: report.md beside its PNG figures."""

from __future__ import annotations

import os


def write(workdir: str, autoencoder_eval: dict) -> str:
    """Writes `workdir/report.md` (atomically) and returns its path."""
    K = autoencoder_eval["code_length"]
    mse = autoencoder_eval["mse_by_codes"]
    lines = [
        "# Ordered VQ-VAE report",
        "",
        f"Code length K = {K}, codebook size {autoencoder_eval['codebook_size']}, "
        f"{autoencoder_eval['test_images']} test images; training took "
        f"{autoencoder_eval.get('train_seconds', '?')} s.",
        "",
        "## Reconstruction against code length",
        "",
        "| codes kept k | fraction of K | test MSE ([0,1] scale) |",
        "| ---: | ---: | ---: |",
    ]
    for k, v in sorted(mse.items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {k} | {int(k) / K:.0%} | {v:.5f} |")
    lines += ["", "![MSE against code length](mse_vs_codes.png)", "",
              "## Reconstructions from the first k codes", "",
              "![reconstructions](reconstructions.png)", ""]
    path = os.path.join(workdir, "report.md")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)
    return path
