"""Stage 1: train the ordered VQ-VAE and evaluate reconstruction against code length."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ordered_vqvae import data, figures, models, training
from ordered_vqvae.configs import AutoencoderConfig

CURVE_FRACTIONS = (0.1, 0.25, 0.5, 0.75, 1.0)


@dataclass
class DataSpec:
    """Where the images come from (see `ordered_vqvae.data.load`)."""

    source: str = "digits"
    path: Optional[str] = None
    data_dir: Optional[str] = None
    image_size: Optional[int] = None
    download: bool = False
    max_train: Optional[int] = None
    max_test: Optional[int] = None

    def arrays(self, split: str, seed: int = 0):
        ds, _ = data.load(self.source, split, path=self.path, data_dir=self.data_dir,
                          image_size=self.image_size, shuffle=split == "train", seed=seed,
                          download=self.download)
        limit = self.max_train if split == "train" else self.max_test
        return data.to_numpy(ds, limit=limit)


@dataclass
class AutoencoderStage:
    config: AutoencoderConfig
    data: DataSpec = field(default_factory=DataSpec)
    resume: bool = False
    verbose: int = 1


def run(stage: AutoencoderStage, workdir: str) -> dict:
    """Trains, saves `workdir/autoencoder/`, writes `workdir/autoencoder_eval.json` and PNGs."""
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    print(f"[autoencoder] loading {stage.data.source} ...", flush=True)
    train_x, _, _ = stage.data.arrays("train", seed=stage.config.seed)
    test_x, _, _ = stage.data.arrays("test")
    print(f"[autoencoder] {len(train_x)} train / {len(test_x)} test images of shape "
          f"{train_x.shape[1:]}; K={stage.config.code_length} codes, "
          f"{stage.config.num_embeddings} codewords", flush=True)
    val = test_x[:2000]
    model = training.train_autoencoder(stage.config, train_x, val, os.path.join(workdir, "train"),
                                       resume=stage.resume, verbose=stage.verbose)
    models.save_autoencoder(model, os.path.join(workdir, "autoencoder"))
    result = evaluate(model, test_x, workdir)
    result["train_seconds"] = round(time.time() - t0, 1)
    _write_json(os.path.join(workdir, "autoencoder_eval.json"), result)
    return result


def evaluate(model: models.OrderedVQVAE, test_x: np.ndarray, workdir: str) -> dict:
    """Test MSE against code length, plus a reconstruction grid at 25/50/75/100% of K."""
    K = model.code_length
    lengths = sorted(set(models.fraction_lengths(K, CURVE_FRACTIONS)) | {1, K})
    mse = model.mse_by_length(test_x, lengths)
    curve_png = figures.save_curves({"ordered VQ-VAE" if model.config.truncation != "none"
                                     else "unordered VQ-VAE": mse},
                                    os.path.join(workdir, "mse_vs_codes.png"),
                                    "codes kept (k)", "test MSE ([0,1] scale)",
                                    f"Reconstruction vs code length (K={K})", logy=True)
    shown = test_x[:12]
    codes = model.encode(shown)
    grid_lengths = models.fraction_lengths(K)
    rows = [shown] + [model.decode(codes, k).numpy() for k in grid_lengths]
    labels = ["input"] + [f"k={k} ({k * 100 // K}%)" for k in grid_lengths]
    grid_png = figures.save_image_rows(rows, labels, os.path.join(workdir, "reconstructions.png"),
                                       "Reconstructions from the first k codes")
    for k in lengths:
        print(f"[autoencoder] test MSE with k={k:>3}/{K}: {mse[k]:.5f}", flush=True)
    return {"code_length": K, "codebook_size": model.codebook_size,
            "test_images": int(len(test_x)), "mse_by_codes": {str(k): v for k, v in mse.items()},
            "figures": [os.path.basename(curve_png), os.path.basename(grid_png)]}


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
