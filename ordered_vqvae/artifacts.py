"""Model artifacts on disk: a directory with a config JSON and a Keras weights file.

Written atomically (a reader never sees a half-written directory); read back with a clear
error naming the directory, what is missing or unreadable, and the command that rebuilds it.
"""

from __future__ import annotations

import json
import os

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


def read_model_dir(directory: str, config_name: str, weights_name: str):
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


def load_weights(model, weights_path: str, rebuild: str) -> None:
    """Loads weights, turning a layout mismatch into an ArtifactError that says how to
    rebuild the artifact (`rebuild`: the command)."""
    try:
        model.load_weights(weights_path)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{weights_path!r} does not fit this version's model ({e}); "
                            f"rebuild it with `{rebuild}`") from None
