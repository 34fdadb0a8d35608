"""Workdir bookkeeping: the marker file, per-stage manifests, input hashes and fingerprints.

A workdir holds `run.json` (the config its stages run with; later commands start from it),
one directory per stage artifact, `manifests/<stage>.json` (the stage's
inputs, their hash, the config, library versions, the fingerprint of what it wrote) and
`scratch/<stage>-<input hash>/` for a stage's checkpoints while it runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Optional

from ordered_vqvae.atomic import check_writable_directory, write_json

MARKER = "OVQVAE_WORKDIR.json"
WORKDIR_FORMAT = 1


class PipelineError(RuntimeError):
    """A workdir or artifact is not what the pipeline expects."""


def input_hash(inputs) -> str:
    """sha256 of a JSON-able description of a stage's inputs."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


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


def library_versions() -> dict:
    import apache_beam
    import keras
    import numpy
    import tensorflow

    return {"tensorflow": tensorflow.__version__, "keras": keras.__version__,
            "apache_beam": apache_beam.__version__, "numpy": numpy.__version__}


def prepare(workdir: str) -> None:
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


def manifest_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, "manifests", f"{stage}.json")


def read_manifest(workdir: str, stage: str) -> Optional[dict]:
    path = manifest_path(workdir, stage)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def scratch_area(workdir: str, stage: str, inputs_hash: str) -> str:
    return os.path.join(workdir, "scratch", f"{stage}-{inputs_hash[:12]}")


RUN_RECORD = "run.json"


def read_run(workdir: str) -> Optional[dict]:
    """The recorded run of a workdir (the config its stages were last run with), or None."""
    path = os.path.join(workdir, RUN_RECORD)
    if not (os.path.exists(path) and os.path.exists(os.path.join(workdir, MARKER))):
        return None
    with open(path) as f:
        return json.load(f)


def record_run(workdir: str, config: dict) -> None:
    """Records the config the workdir's stages run with: later commands start from it.
    The record is rewritten only when the config changes."""
    recorded = read_run(workdir)
    if recorded is not None and recorded["config"] == json.loads(json.dumps(config)):
        return
    write_json(os.path.join(workdir, RUN_RECORD), {"config": config,
                                                    "recorded": time.strftime("%FT%T%z")})
