"""`ovqvae`: the command line of the ordered VQ-VAE pipeline.

  ovqvae demo [--workdir=workdir/digits]
      Trains the ordered VQ-VAE on the embedded digits data and writes a report.
  ovqvae train_autoencoder --dataset=mnist --data_path=DIR --workdir=DIR [--epochs=N ...]
      Trains an ordered VQ-VAE; any preset field can be overridden by its flag.
  ovqvae extract --dataset=mnist --data_path=DIR --workdir=DIR [Beam options]
      Encodes the dataset with WORKDIR/autoencoder into WORKDIR/codes (Beam). Flags this
      program does not know are Beam pipeline options, e.g. --runner=DataflowRunner.

Datasets: digits (embedded), mnist (--data_path: IDX directory), cifar10 (--data_path: the
JPEG tarball or folder), image_folder (--data_path, --preset), tfds:<name> (--data_dir).
Exit codes: 0 success, 1 runtime error, 2 usage error.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing

from absl import app, flags

COMMANDS = ("demo", "train_autoencoder", "extract")
BEAM_COMMANDS = ("demo", "extract")
DATASET_PRESETS = {"digits": "digits", "mnist": "mnist", "cifar10": "cifar10",
                   "tfds:mnist": "mnist", "tfds:fashion_mnist": "mnist",
                   "tfds:cifar10": "cifar10", "tfds:celeb_a": "celeb_a"}

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the run's artifacts.")
flags.DEFINE_string("dataset", "digits", "digits | mnist | cifar10 | image_folder | tfds:<name>.")
flags.DEFINE_string("data_path", None, "MNIST IDX directory, or image folder / .tar.gz.")
flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds:<name> datasets).")
flags.DEFINE_bool("download", False, "Allow TFDS to download a missing dataset.")
flags.DEFINE_integer("image_size", None, "Resize and center-crop folder/TFDS images to this size.")
flags.DEFINE_integer("max_train_images", None, "Use at most this many training images.")
flags.DEFINE_integer("max_test_images", None, "Use at most this many test images.")
flags.DEFINE_string("preset", None, "Architecture preset (default: from --dataset).")
flags.DEFINE_bool("resume", False, "Continue training from the latest checkpoint in --workdir.")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")
flags.DEFINE_integer("num_shards", 4, "Output TFRecord shards per split (extract).")
flags.DEFINE_bool("overwrite", False, "Replace an existing code directory (extract).")


def _define_config_flags():
    """One flag per AutoencoderConfig field, default None meaning 'the preset's value'."""
    from ordered_vqvae.configs import AutoencoderConfig

    hints = typing.get_type_hints(AutoencoderConfig)
    for f in dataclasses.fields(AutoencoderConfig):
        hint = hints[f.name]
        help_text = f"Override the preset's {f.name} (base value {f.default}; presets differ)."
        if hint is bool:
            flags.DEFINE_bool(f.name, None, help_text)
        elif hint is int:
            flags.DEFINE_integer(f.name, None, help_text)
        elif hint is float:
            flags.DEFINE_float(f.name, None, help_text)
        elif hint is str:
            flags.DEFINE_string(f.name, None, help_text)
        else:  # Tuples of ints.
            flags.DEFINE_list(f.name, None, help_text + " Comma-separated.")


_define_config_flags()


class UsageError(Exception):
    """A bad command line: exit code 2."""


def _config():
    from ordered_vqvae.configs import AutoencoderConfig, preset

    name = FLAGS.preset or DATASET_PRESETS.get(FLAGS.dataset)
    if name is None:
        raise UsageError(f"--dataset={FLAGS.dataset} has no default preset; pass --preset "
                         "(digits, mnist, cifar10 or celeb_a)")
    overrides = {}
    for f in dataclasses.fields(AutoencoderConfig):
        value = FLAGS[f.name].value
        if value is not None:
            overrides[f.name] = tuple(int(v) for v in value) if isinstance(value, list) else value
    try:
        return preset(name, **overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _data_spec():
    from pipeline.autoencoder import DataSpec

    source, path = FLAGS.dataset, FLAGS.data_path
    if source == "cifar10":
        source = "image_folder"
    if source in ("mnist", "image_folder") and not path:
        raise UsageError(f"--dataset={FLAGS.dataset} needs --data_path")
    if not (source in ("digits", "mnist", "image_folder") or source.startswith("tfds:")):
        raise UsageError(f"--dataset={FLAGS.dataset} is not supported, expected digits, mnist, "
                         "cifar10, image_folder or tfds:<name>")
    return DataSpec(source=source, path=path, data_dir=FLAGS.data_dir,
                    image_size=FLAGS.image_size, download=FLAGS.download,
                    max_train=FLAGS.max_train_images, max_test=FLAGS.max_test_images)


def _train_autoencoder(workdir):
    from pipeline import autoencoder

    stage = autoencoder.AutoencoderStage(_config(), _data_spec(), resume=FLAGS.resume,
                                         verbose=FLAGS.verbose)
    return autoencoder.run(stage, workdir)


def _demo(workdir):
    from pipeline import report

    result = _train_autoencoder(workdir)
    path = report.write(workdir, result)
    print(f"[demo] done: report at {path}", flush=True)


def _extract(workdir, beam_args):
    from pipeline import extract

    spec = _data_spec()
    source = extract.SourceSpec(source=spec.source, path=spec.path, data_dir=spec.data_dir,
                                image_size=spec.image_size, limit=spec.max_test)
    meta = extract.run(os.path.join(workdir, "autoencoder"), os.path.join(workdir, "codes"),
                       source, num_shards=FLAGS.num_shards, beam_args=beam_args,
                       overwrite=FLAGS.overwrite)
    print(f"[extract] wrote {meta['counts']} records ({meta['dead_letters']} dead letters) to "
          f"{os.path.join(workdir, 'codes')}", flush=True)
    return meta


def main(argv):
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    positional = [a for a in argv[1:] if not a.startswith("-")]
    unknown = [a for a in argv[1:] if a.startswith("-")]
    if not positional or positional[0] not in COMMANDS:
        got = positional[0] if positional else "nothing"
        raise UsageError(f"expected a command, one of {', '.join(COMMANDS)}; got {got}")
    if len(positional) > 1:
        raise UsageError(f"unexpected arguments {positional[1:]}")
    command = positional[0]
    if unknown and command not in BEAM_COMMANDS:
        raise UsageError(f"unknown flag(s) {unknown} for command {command}")
    workdir = FLAGS.workdir or ("workdir/digits" if command == "demo" else None)
    if not workdir:
        raise UsageError("--workdir is required")
    if command == "demo":
        _demo(workdir)
    elif command == "extract":
        _extract(workdir, unknown)
    else:
        _train_autoencoder(workdir)


def _parse(argv):
    try:
        return FLAGS(argv, known_only=True)  # Unknown flags may be Beam options.
    except flags.Error as e:
        print(f"ovqvae: usage error: {e}\nTry 'ovqvae --help'.", file=sys.stderr)
        sys.exit(2)


def _main_with_exit_codes(argv):
    from ordered_vqvae.data import DataError
    from ordered_vqvae.training import TrainingDiverged

    try:
        main(argv)
    except UsageError as e:
        print(f"ovqvae: usage error: {e}\nTry 'ovqvae --help'.", file=sys.stderr)
        sys.exit(2)
    except (DataError, TrainingDiverged, ValueError, OSError, RuntimeError) as e:
        print(f"ovqvae: error: {e}", file=sys.stderr)
        sys.exit(1)


def run():
    """Console-script entry point."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    app.run(_main_with_exit_codes, flags_parser=_parse)


if __name__ == "__main__":
    run()
