"""The config a workdir command runs with: the workdir's recorded run, or for a new
workdir one read from the data (its image shape, the preset that shape gets), with the
fields of the flags given replaced. Pure Python over flag values: the command line lives
in `pipeline.cli`.

`CONFIG_FLAGS` maps each flag that defines a run to where it lives in PipelineConfig:
(section, field), section "" for the top level.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from ordered_vqvae.configs import AutoencoderConfig, PriorConfig
from pipeline import workdir as wd
from pipeline.config import DataConfig, PipelineConfig, pipeline_preset, resolve_preset

DEFAULT_DATASET = "digits"


class UsageError(Exception):
    """A bad command line: exit code 2."""


DATA_FIELDS = {"data_path": "path", "data_dir": "data_dir", "image_size": "image_size",
               "download": "download", "max_train_images": "max_train",
               "max_test_images": "max_test"}
CONFIG_FLAGS = {
    **{flag: ("data", field) for flag, field in DATA_FIELDS.items()},
    **{name: ("", name) for name in ("num_shards", "report_samples", "export_dtype",
                                      "classifier", "checkpoint_every", "strategy", "seed",
                                      "time_budget")},
    **{f.name: ("autoencoder", f.name) for f in dataclasses.fields(AutoencoderConfig)
       if f.name != "seed"},
    **{"prior_" + f.name: ("prior", f.name) for f in dataclasses.fields(PriorConfig)
       if f.name != "seed"},
}


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text) -> float:
    """'30m', '90s', '1.5h' or plain seconds ('1800') -> seconds >= 0."""
    value = str(text).strip().lower()
    unit = _UNITS.get(value[-1:], None)
    number = value[:-1] if unit else value
    try:
        seconds = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration, expected seconds or a number with "
                         "s, m or h (90s, 30m, 1.5h)") from None
    if not seconds >= 0 or seconds == float("inf"):
        raise ValueError(f"{text!r} is not a duration >= 0")
    return seconds


def config_values(config) -> dict:
    """{flag: the value `config` gives it}, for every flag that defines a run."""
    values = {"dataset": config.data.source, "preset": config.preset}
    for flag, (section, field) in CONFIG_FLAGS.items():
        values[flag] = getattr(getattr(config, section) if section else config, field)
    return values


def _source(dataset: str):
    """The registered source --dataset names (an alias gives the source's own name)."""
    from pipeline import sources

    try:
        return sources.get(dataset)
    except sources.DataError as e:
        raise UsageError(f"--dataset={dataset} is not supported: {e}") from None


def _new_config(given: dict):
    """The config of a new workdir: the data from the flags, its image shape read from the
    data (both splits listed first), the preset chosen from that shape unless --preset."""
    dataset = given.get("dataset", DEFAULT_DATASET)
    source = _source(dataset)
    if source.needs == "data_path" and not given.get("data_path"):
        raise UsageError(f"--dataset={dataset} needs --data_path")
    data = DataConfig(source=source.label, **{DATA_FIELDS[k]: v for k, v in given.items()
                                              if k in DATA_FIELDS})
    shape = data.splits()["train"].image_shape
    # The architecture flags apply with the shape (--hidden decides which sizes fit);
    # --image_shape is checked against the data by _changed.
    architecture = {CONFIG_FLAGS[k][1]: v for k, v in given.items()
                    if CONFIG_FLAGS.get(k, ("",))[0] == "autoencoder" and k != "image_shape"}
    config = pipeline_preset(source.label, given.get("preset"), data, image_shape=shape,
                             autoencoder_overrides=architecture)
    how = "--preset" if given.get("preset") else "chosen from the shape; --preset overrides"
    print(f"[ovqvae] {'x'.join(map(str, shape))} images: preset {config.preset} ({how})",
          flush=True)
    return config


def _changed(config, given: dict):
    """`config` with the given flags' fields replaced. A changed data source re-reads the
    image shape; --image_shape must agree with the data (the shape follows the data)."""
    sections = {"data": {}, "autoencoder": {}, "prior": {}, "": {}}
    for flag, value in given.items():
        if flag not in CONFIG_FLAGS:  # --dataset, --preset: checked by resolve.
            continue
        section, field = CONFIG_FLAGS[flag]
        sections[section][field] = value
    if "seed" in given:  # One --seed for everything.
        sections["autoencoder"]["seed"] = sections["prior"]["seed"] = given["seed"]
    data = dataclasses.replace(config.data, **sections["data"])
    shape = tuple(config.autoencoder.image_shape)
    if data != config.data:
        shape = tuple(data.splits()["train"].image_shape)
    wanted = tuple(sections["autoencoder"].pop("image_shape", shape))
    if wanted != shape:
        raise UsageError(f"--image_shape={','.join(map(str, wanted))}, but the images are "
                         f"{'x'.join(map(str, shape))}: the shape follows the data; pass "
                         "--image_size=N to resize them")
    return dataclasses.replace(
        config, data=data, **sections[""],
        autoencoder=config.autoencoder.replace(image_shape=shape, **sections["autoencoder"]),
        prior=config.prior.replace(**sections["prior"]))


def resolve(workdir: Optional[str], given: dict) -> PipelineConfig:
    """The PipelineConfig of a command: the workdir's recorded run (or, for a new workdir,
    the data's), with the fields of the flags `given` ({flag: value}, those on the command
    line) replaced. A --dataset or --preset other than the recorded one is a UsageError."""
    record = wd.read_run(workdir) if workdir else None
    try:
        if record is None:
            return _changed(_new_config(given), given)
        config = PipelineConfig.from_dict(record["config"])
        shape = tuple(config.autoencoder.image_shape)
        for flag, recorded in (("dataset", config.data.source), ("preset", config.preset)):
            value = given.get(flag)
            if flag in given and (_source(value).label if flag == "dataset"
                                  else resolve_preset(value, shape)) != recorded:
                raise UsageError(f"--{flag}={value}, but workdir {workdir!r} records {flag} "
                                 f"{recorded!r}; use a new --workdir for another {flag}")
        return _changed(config, given)
    except (ValueError, TypeError) as e:  # A config field out of range.
        from pipeline.sources import DataError

        if isinstance(e, DataError):  # Bad data: a runtime error (exit 1).
            raise
        hint = "; pass --image_size=N to resize the images" if "not divisible" in str(e) else ""
        raise UsageError(f"{e}{hint}") from None


def say_changes(workdir: str, config: PipelineConfig) -> None:
    """Prints one line naming what `config` changes in the workdir's recorded run and which
    finished stages that invalidates."""
    from pipeline import stages

    record = wd.read_run(workdir)
    if record is None:
        return
    old = config_values(PipelineConfig.from_dict(record["config"]))
    new = config_values(config)
    changes = [f"--{k} {old[k]!r} -> {new[k]!r}" for k in new if old[k] != new[k]]
    if not changes:
        return
    stale = stages.stale_stages(config, workdir)
    redo = (", ".join(f"{name} ({why})" for name, why in stale.items())
            if stale else "no finished stage depends on it")
    print(f"[ovqvae] changes the recorded run: {'; '.join(changes)}; invalidates: {redo}",
          flush=True)
