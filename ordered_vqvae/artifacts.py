"""Model artifacts on disk: a directory with a config JSON and a Keras weights file.

Written atomically (a reader never sees a half-written directory); read back with a clear
error naming the directory, what is missing or unreadable, and the command that rebuilds it.
"""

from __future__ import annotations

import json
import os
from typing import Callable

from ordered_vqvae.atomic import atomic_directory


class ArtifactError(ValueError):
    """An artifact is missing, incomplete or from an incompatible version."""


def save_model_dir(model, config: dict, directory: str, config_name: str,
                   weights_name: str) -> str:
    """Writes `config` as JSON and the model's weights into `directory` atomically."""
    with atomic_directory(directory) as tmp:
        with open(os.path.join(tmp, config_name), "w") as f:
            json.dump(config, f, indent=1)
        model.save_weights(os.path.join(tmp, weights_name))
    return directory


def _read_model_dir(directory: str, config_name: str, weights_name: str):
    """(config dict, weights path) of a directory written by `save_model_dir`."""
    for name in (config_name, weights_name):
        if not os.path.isfile(os.path.join(directory, name)):
            raise FileNotFoundError(f"model artifact {directory!r} is missing {name}")
    path = os.path.join(directory, config_name)
    with open(path) as f:
        try:
            return json.load(f), os.path.join(directory, weights_name)
        except json.JSONDecodeError as e:
            raise ArtifactError(f"{path!r} is not valid JSON ({e})") from None


def load_model_dir(directory: str, config_name: str, weights_name: str,
                   build: Callable[[dict], object], what: str, rebuild: str):
    """Reads a directory written by `save_model_dir`: `build(config)` makes the model with
    its weights created, then the weights load. A config or weights layout this version
    cannot read is an ArtifactError naming the directory and `rebuild`, the command that
    writes the artifact anew."""
    config, weights = _read_model_dir(directory, config_name, weights_name)
    try:
        model = build(config)
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{what} artifact {directory!r} has a config this version cannot "
                            f"read ({e}); rebuild it with `{rebuild}`") from None
    try:
        model.load_weights(weights)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{weights!r} does not fit this version's {what} ({e}); rebuild "
                            f"it with `{rebuild}`") from None
    return model
