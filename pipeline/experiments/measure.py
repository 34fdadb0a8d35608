"""What the experiments measure, shared by all of them: the variants' workdirs, the domain
classifier, samples, Frechet distances, codebook use."""

from __future__ import annotations

import dataclasses
import os
import shutil

import numpy as np

from ordered_vqvae import metrics, models
from ordered_vqvae.generator import ImageGenerator
from ordered_vqvae.prior import load_prior
from pipeline import stages, workdir as wd


def share_upstream(source: str, target: str) -> None:
    """Copies the autoencoder and codes of `source` into a new variant workdir `target`,
    with their manifests, unless it holds them already: a prior variant trains on the same
    codes without retraining them, and its workdir still stands alone."""
    upstream = ("autoencoder", "extract")
    if all(wd.read_manifest(target, s) == wd.read_manifest(source, s) for s in upstream):
        return
    wd.prepare(target)
    for stage in upstream:
        artifact = stages.artifact_path(target, stage)
        shutil.rmtree(artifact, ignore_errors=True)
        shutil.copytree(stages.artifact_path(source, stage), artifact)
        shutil.copyfile(wd.manifest_path(source, stage), wd.manifest_path(target, stage))


CLASSIFIER_EPOCHS = {"cnn": 3, "resnet": 15}


def classifier(cfg, workdir: str, test, verbose: int = 0):
    """(the domain classifier, its features of the test images). The classifier is cached in
    the workdir; it trains on the whole training split (whatever max_train the variants use)."""
    test_x, test_y, _ = test
    path = os.path.join(workdir, "classifier")
    shape = test_x.shape[1:]
    if os.path.exists(os.path.join(path, metrics.CLASSIFIER_JSON)):
        clf = metrics.DomainClassifier.load(path, shape)
        accuracy, features = clf.evaluate(test_x, test_y)
        print(f"[experiments] domain classifier from {path}: test accuracy {accuracy:.4f} on "
              f"this run's {len(test_x)} test images", flush=True)
        return clf, features
    train_x, train_y, _ = dataclasses.replace(cfg.base.data, max_train=None).arrays("train")
    clf = metrics.DomainClassifier(shape, int(max(train_y.max(), test_y.max())) + 1)
    epochs = cfg.classifier_epochs or CLASSIFIER_EPOCHS[clf.architecture]
    print(f"[experiments] training the domain classifier ({clf.architecture}, {epochs} epochs "
          f"on {len(train_x)} images)", flush=True)
    accuracy = clf.fit(train_x, train_y, test_x, test_y, epochs=epochs, verbose=verbose)
    print(f"[experiments] domain classifier test accuracy {accuracy:.4f}", flush=True)
    clf.save(path)
    return clf, clf.features(test_x)


def generator(workdir: str) -> ImageGenerator:
    return ImageGenerator(load_prior(stages.artifact_path(workdir, "prior")),
                          models.load_autoencoder(stages.artifact_path(workdir, "autoencoder")))


def _samples_by_length(generator, lengths, n, seed, batch=250):
    """{k: images [n, H, W, C]} from progressive passes (one pass serves every k)."""
    out = {k: [] for k in lengths}
    for i, start in enumerate(range(0, n, batch)):
        images, _ = generator.sample_progressive(min(batch, n - start), lengths, seed=seed + i)
        for k in lengths:
            out[k].append(images[k].numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _codes_of(autoencoder, images, batch: int) -> np.ndarray:
    """Codes int32 [N, K] of images [N, H, W, C], encoded `batch` at a time."""
    return np.concatenate([autoencoder.encode(images[i:i + batch]).numpy()
                           for i in range(0, len(images), batch)])


def codebook_use(autoencoder, images, batch: int = 1000) -> dict:
    """How much of the codebook the codes of `images` use: the share of codewords that
    occur, and the perplexity exp(entropy) of their frequencies (1..codebook_size)."""
    codes = _codes_of(autoencoder, images, batch).ravel()
    counts = np.bincount(codes, minlength=autoencoder.codebook_size)
    p = counts[counts > 0] / counts.sum()
    return {"usage": float((counts > 0).mean()), "perplexity": float(np.exp(-(p * np.log(p)).sum()))}


def reconstruction_fd(autoencoder, clf, images, real_features, lengths, batch: int = 500) -> dict:
    """{k: domain FD of `images` reconstructed from their first k codes}: the distance the
    autoencoder alone leaves, with no prior (the floor's own images, so the two compare)."""
    codes = _codes_of(autoencoder, images, batch)
    out = {}
    for k in lengths:
        recon = np.concatenate([autoencoder.decode(codes[i:i + batch], k).numpy()
                                for i in range(0, len(codes), batch)])
        out[k] = metrics.frechet_distance_of(clf.features(recon), real_features)
    return out


def quality(name, generator, lengths, cfg, clf, real, real_features, inception, real_inception,
             test_x):
    samples = _samples_by_length(generator, lengths, cfg.eval_samples, cfg.base.seed)
    row = {"fd": {}, "fid": {}, "mse": {}, **codebook_use(generator.autoencoder, test_x)}
    mse = generator.autoencoder.mse_by_length(test_x, lengths)
    row["recon_fd"] = reconstruction_fd(generator.autoencoder, clf, real, real_features, lengths)
    for k in lengths:
        row["fd"][k] = metrics.frechet_distance_of(clf.features(samples[k]), real_features)
        row["mse"][k] = mse[k]
        if inception is not None:
            row["fid"][k] = metrics.frechet_distance_of(inception.features(samples[k]),
                                                        real_inception)
        print(f"[experiments] {name:28s} k={k:3d}: domain FD {row['fd'][k]:8.3f} (reconstructions "
              f"{row['recon_fd'][k]:8.3f}), test MSE {row['mse'][k]:.5f}"
              + (f", FID {row['fid'][k]:.2f}" if row["fid"] else ""), flush=True)
    return row, samples
