"""The pipeline's stages and the TFX-style runner that caches them.

  images -> [autoencoder] -> [extract] (Beam) -> [prior] -> [export] -> [report]

Each stage is `run_<stage>(config, workdir)`: it reads what earlier stages wrote, writes
its artifact atomically (temp name, then rename) and returns a small result dict. The
runner records a manifest per stage (`workdir/manifests/<stage>.json`: the stage's
inputs, their hash, the config, library versions and the fingerprint of what it wrote)
after the artifact is in place. A later run skips a stage whose manifest matches its
current inputs and whose artifact is intact, and redoes it (and so everything after it)
when anything it depends on changed. Training stages keep their checkpoints in
`WORKDIR/scratch/<stage>-<input hash>/` and resume from them after a crash or kill.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional

from ordered_vqvae.atomic import check_writable_directory
from pipeline.config import PipelineConfig

STAGES = ("autoencoder", "extract", "prior", "export", "report")
MARKER = "OVQVAE_WORKDIR.json"
WORKDIR_FORMAT = 1


class PipelineError(RuntimeError):
    """A workdir or artifact is not what the pipeline expects."""


# ----------------------------------------------------------------------------- helpers


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def fingerprint_files(directory: str) -> str:
    """sha256 over the relative names and bytes of every file under `directory`."""
    if not os.path.isdir(directory):
        raise PipelineError(f"artifact {directory!r} does not exist")
    digest = hashlib.sha256()
    for root, _, files in sorted(os.walk(directory)):
        for name in sorted(files):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, directory).encode())
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
    return digest.hexdigest()


def write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True, default=str)
    os.replace(tmp, path)


def _versions() -> dict:
    import apache_beam
    import keras
    import numpy
    import tensorflow

    return {"tensorflow": tensorflow.__version__, "keras": keras.__version__,
            "apache_beam": apache_beam.__version__, "numpy": numpy.__version__}


def prepare_workdir(workdir: str) -> None:
    """Creates a workdir, or checks that an existing one belongs to this pipeline."""
    marker = os.path.join(workdir, MARKER)
    if os.path.isdir(workdir) and os.listdir(workdir) and not os.path.exists(marker):
        raise PipelineError(f"workdir {workdir!r} exists and is not an ordered-vqvae workdir "
                            f"(no {MARKER}); choose an empty or new directory")
    check_writable_directory(workdir, "workdir")
    os.makedirs(os.path.join(workdir, "manifests"), exist_ok=True)
    if not os.path.exists(marker):
        write_json(marker, {"project": "ordered-vqvae", "format": WORKDIR_FORMAT})
    with open(marker) as f:
        if json.load(f).get("format") != WORKDIR_FORMAT:
            raise PipelineError(f"workdir {workdir!r} has an unknown format; use a new workdir")


def _work_area(workdir: str, stage: str, input_hash: str) -> str:
    return os.path.join(workdir, "scratch", f"{stage}-{input_hash[:12]}")


# ----------------------------------------------------------------------------- stages
# Each stage: inputs(config, workdir) -> dict (what its output depends on), and
# run(config, workdir, work) -> result dict. ARTIFACTS names what each one writes.

ARTIFACTS = {"autoencoder": "autoencoder", "extract": "codes", "prior": "prior",
             "export": "saved_model", "report": "report"}


def _artifact(workdir: str, stage: str) -> str:
    return os.path.join(workdir, ARTIFACTS[stage])


def _upstream(workdir: str, stage: str) -> str:
    manifest = read_manifest(workdir, stage)
    if manifest is None:
        raise PipelineError(f"stage {stage!r} has not finished in {workdir!r}; run it first "
                            f"(ovqvae {stage if stage != 'autoencoder' else 'train_autoencoder'} "
                            "or ovqvae run)")
    return manifest["output_fingerprint"]


def _inputs(config: PipelineConfig, workdir: str, stage: str) -> dict:
    c = config.to_dict()
    if stage == "autoencoder":
        return {"data": c["data"], "autoencoder": c["autoencoder"]}
    if stage == "extract":
        return {"data": c["data"], "num_shards": config.num_shards,
                "autoencoder": _upstream(workdir, "autoencoder")}
    if stage == "prior":
        return {"prior": c["prior"], "codes": _upstream(workdir, "extract")}
    if stage == "export":
        return {"autoencoder": _upstream(workdir, "autoencoder"), "prior": _upstream(workdir, "prior")}
    return {"saved_model": _upstream(workdir, "export"), "report_samples": config.report_samples,
            "seed": config.seed, "data": c["data"]}


def _run_autoencoder(config: PipelineConfig, workdir: str, work: str, verbose: int) -> dict:
    from ordered_vqvae import models, training
    from pipeline import evaluate

    ae_config = config.autoencoder
    print(f"[autoencoder] loading {config.data.source} ...", flush=True)
    train_x, _, _ = config.data.arrays("train", seed=ae_config.seed)
    test_x, _, _ = config.data.arrays("test")
    print(f"[autoencoder] {len(train_x)} train / {len(test_x)} test images of shape "
          f"{train_x.shape[1:]}; K={ae_config.code_length} codes, {ae_config.num_embeddings} "
          "codewords", flush=True)
    model = training.train_autoencoder(ae_config, train_x, test_x[:2000], work, resume=True,
                                       verbose=verbose, checkpoint_every=config.checkpoint_every,
                                       strategy=config.distribution())
    models.save_autoencoder(model, _artifact(workdir, "autoencoder"))
    result = evaluate.reconstruction(model, test_x)
    write_json(os.path.join(workdir, "autoencoder_eval.json"), result)
    return result


def _run_extract(config: PipelineConfig, workdir: str, work: str, verbose: int) -> dict:
    from pipeline import extract

    meta = extract.run(_artifact(workdir, "autoencoder"), _artifact(workdir, "extract"), config.data,
                       num_shards=config.num_shards, beam_args=list(config.beam_args),
                       overwrite=True)
    print(f"[extract] {meta['counts']} records, {meta['dead_letters']} dead letters", flush=True)
    return {"counts": meta["counts"], "dead_letters": meta["dead_letters"]}


def _run_prior(config: PipelineConfig, workdir: str, work: str, verbose: int) -> dict:
    from ordered_vqvae import training
    from ordered_vqvae.prior import save_prior
    from pipeline import schema

    codes_dir = _artifact(workdir, "extract")
    meta = schema.read_metadata(codes_dir)
    K, size = meta["code_length"], meta["codebook_size"]
    cfg = config.prior
    train = schema.read_codes(codes_dir, "train", limit=cfg.max_train_sequences, code_length=K,
                              codebook_size=size)
    val = schema.code_dataset(codes_dir, "test", batch_size=256, code_length=K, codebook_size=size)
    print(f"[prior] {len(train)} training sequences of K={K} codes, vocabulary "
          f"{size}", flush=True)
    prior = training.train_prior(cfg, K, size, train, val, work, resume=True, verbose=verbose,
                                 checkpoint_every=config.checkpoint_every,
                                 strategy=config.distribution())
    bits = prior.bits_per_code(val)
    save_prior(prior, _artifact(workdir, "prior"))
    print(f"[prior] validation {bits:.3f} bits per code (uniform: {math.log2(size):.3f})",
          flush=True)
    return {"val_bits_per_code": bits, "uniform_bits_per_code": math.log2(size)}


def _run_export(config: PipelineConfig, workdir: str, work: str, verbose: int) -> dict:
    from ordered_vqvae import export, models
    from ordered_vqvae.prior import load_prior

    path = export.export(models.load_autoencoder(_artifact(workdir, "autoencoder")),
                         load_prior(_artifact(workdir, "prior")), _artifact(workdir, "export"))
    print(f"[export] SavedModel at {path}", flush=True)
    return {"saved_model": path}


def _run_report(config: PipelineConfig, workdir: str, work: str, verbose: int) -> dict:
    from pipeline import report

    path = report.build(config, workdir, _artifact(workdir, "report"))
    print(f"[report] {os.path.join(path, 'report.md')}", flush=True)
    return {"report": os.path.join(path, "report.md")}


RUNNERS: Dict[str, Callable] = {"autoencoder": _run_autoencoder, "extract": _run_extract,
                                "prior": _run_prior, "export": _run_export, "report": _run_report}


# ----------------------------------------------------------------------------- runner


def read_manifest(workdir: str, stage: str) -> Optional[dict]:
    path = os.path.join(workdir, "manifests", f"{stage}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _is_current(workdir: str, stage: str, input_hash: str) -> bool:
    manifest = read_manifest(workdir, stage)
    if manifest is None or manifest.get("input_hash") != input_hash:
        return False
    artifact = _artifact(workdir, stage)
    return os.path.isdir(artifact) and fingerprint_files(artifact) == manifest["output_fingerprint"]


def run_stage(config: PipelineConfig, workdir: str, stage: str, force: bool = False,
              verbose: int = 1) -> dict:
    """Runs one stage unless its manifest says it is current. Returns its manifest."""
    if stage not in STAGES:
        raise PipelineError(f"unknown stage {stage!r}, expected one of {STAGES}")
    prepare_workdir(workdir)
    inputs = _inputs(config, workdir, stage)
    input_hash = _hash(inputs)
    if not force and _is_current(workdir, stage, input_hash):
        print(f"[{stage}] up to date (manifest matches), skipped", flush=True)
        return read_manifest(workdir, stage)
    # The old manifest stays until the new artifact is in place: a failed rerun loses
    # nothing, and an artifact replaced without its manifest no longer matches it.
    manifest_path = os.path.join(workdir, "manifests", f"{stage}.json")
    work = _work_area(workdir, stage, input_hash)
    os.makedirs(work, exist_ok=True)
    start = time.time()
    result = RUNNERS[stage](config, workdir, work, verbose)
    manifest = {"stage": stage, "inputs": inputs, "input_hash": input_hash,
                "config": config.to_dict(), "versions": _versions(), "result": result,
                "output_fingerprint": fingerprint_files(_artifact(workdir, stage)),
                "seconds": round(time.time() - start, 2), "finished": time.strftime("%FT%T%z")}
    write_json(manifest_path, manifest)
    shutil.rmtree(work, ignore_errors=True)  # Checkpoints are only needed to resume.
    return manifest


def run_pipeline(config: PipelineConfig, workdir: str, stages: Optional[List[str]] = None,
                 force: bool = False, verbose: int = 1) -> Dict[str, dict]:
    """Runs the stages in order (all by default); returns their manifests."""
    manifests = {}
    for stage in stages or STAGES:
        manifests[stage] = run_stage(config, workdir, stage, force=force, verbose=verbose)
    return manifests
