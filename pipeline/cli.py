"""`ovqvae`: the command line of the ordered VQ-VAE pipeline.

`ovqvae --help` lists the commands, `ovqvae COMMAND --help` one command's flags with their
defaults. Datasets: digits (embedded), mnist (--data_path: IDX directory), cifar10
(--data_path: the JPEG tarball or folder), image_folder (--data_path and --preset),
tfds:<name> (--data_dir). Every field of the dataset's autoencoder preset is a flag
(--latent_channels, --codebook_size, --truncation, ...); prior fields take a prior_ prefix
(--prior_num_layers, ...). Flags this program does not know are Beam pipeline options for
the extract stage (--runner=DataflowRunner --project=...). TensorFlow's C++ log lines are
hidden unless --verbosity is given. Exit codes: 0 success, 1 runtime error, 2 usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import sys
import typing

from absl import app, flags

from ordered_vqvae.configs import AutoencoderConfig, PriorConfig
from ordered_vqvae.validation import op_error_text
from pipeline.config import EXPORT_DTYPES
from pipeline.stages import BY_COMMAND, STAGES, artifact_path

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the run's artifacts (demo: workdir/digits).")
flags.DEFINE_string("dataset", "digits", "digits | mnist | cifar10 | image_folder | celeba | "
                    "tfds:<name>.")
flags.DEFINE_string("data_path", None, "MNIST IDX directory, image folder / .tar.gz, or CelebA "
                    "directory / .tar.gz (img_align_celeba/, list_eval_partition.txt).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds:<name> datasets).")
flags.DEFINE_bool("download", False, "Allow TFDS to download a missing dataset.")
flags.DEFINE_integer("image_size", None, "Resize and center-crop folder/TFDS images to this size.")
flags.DEFINE_integer("max_train_images", None, "Use this many training images, chosen at random (the same in every stage).")
flags.DEFINE_integer("max_test_images", None, "Use this many test images, chosen at random (the same in every stage).")
flags.DEFINE_string("preset", None, "Architecture preset: digits, mnist, cifar10, celeb_a "
                    "(default: from --dataset).")
flags.DEFINE_integer("num_shards", 4, "Output TFRecord shards per split (extract).")
flags.DEFINE_integer("report_samples", 16, "Samples per row of the report's grids.")
flags.DEFINE_enum("export_dtype", "float32", list(EXPORT_DTYPES), "The SavedModel's "
                  "prior: float32 (the reference), or bfloat16_weights (its projection kernels "
                  "in bfloat16, activations and cache float32; faster at large batches under "
                  "XLA, a smaller file).")
flags.DEFINE_bool("force", False, "Redo stages even when their manifest matches.")
flags.DEFINE_enum("strategy", "", ["", "mirrored"], "Training under tf.distribute: "
                  "'mirrored' uses every local GPU (one replica each; --batch_size is the "
                  "global batch).")
flags.DEFINE_integer("checkpoint_every", 500, "Training checkpoints every this many batches "
                     "(and at every epoch end; 0: epoch ends only). An interrupted stage "
                     "resumes from the latest one when rerun.")
flags.DEFINE_integer("verbose", 1, "Keras verbosity: 0 silent, 1 progress bar, 2 one line per epoch.")
flags.DEFINE_string("saved_model", None, "SavedModel directory (default WORKDIR/saved_model).")
flags.DEFINE_integer("num_codes", None, "k, the codes to generate, 1 <= k <= K (unset: K).")
flags.DEFINE_integer("num_samples", 16, "Samples to draw.")
flags.DEFINE_integer("seed", None, "Seed of training and report sampling (run, stages) or of "
                     "the samples (sample; default 0).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature > 0 (sample).")
flags.DEFINE_list("experiments", "ordered_vs_unordered,time,channel_vs_spatial,priority_code,"
                  "ablations", "Experiments to run (experiments), some of: ordered_vs_unordered, "
                  "time, channel_vs_spatial, priority_code, ablations, ordering_price, "
                  "prior_size.")
flags.DEFINE_integer("eval_samples", 1000, "Samples per code length for Frechet distances.")
flags.DEFINE_string("inception_weights", None, "Local InceptionV3 notop weights (.h5) for FID; "
                    "without it FID is skipped (nothing is downloaded).")
flags.DEFINE_integer("classifier_epochs", None, "Epochs of the domain classifier for the FD "
                     "(unset: 3 for its CNN on grayscale, 15 for its ResNet on colour images).")
flags.DEFINE_integer("ablation_max_train_images", None, "Training images of each ablation variant.")
flags.DEFINE_integer("ablation_epochs", None, "Autoencoder epochs of each ablation variant.")
flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (serve).")
flags.DEFINE_integer("port", 8501, "Port to listen on (serve; TF Serving's REST port).")
flags.DEFINE_string("model_name", "ovqvae", "The {name} in /v1/models/{name} (serve).")
flags.DEFINE_integer("max_batch", 128, "Rows (samples) sampled together at most (serve).")
flags.DEFINE_integer("max_samples", None, "num_samples of one request at most (serve; "
                     "unset: 64, or --max_batch if smaller).")
flags.DEFINE_integer("max_queue", 256, "Anytime requests waiting at most; more get 503 (serve).")
flags.DEFINE_integer("max_chunk", 8, "Codes per compiled call at most (serve).")
flags.DEFINE_float("deadline_margin_ms", 5.0, "Milliseconds every :anytime deadline keeps free "
                   "for sending the answer, at least; the server adds what it learns (serve).")
flags.DEFINE_float("drain_seconds", 30.0, "After SIGTERM, seconds requests in flight may take "
                   "before their connections are closed (serve).")
flags.DEFINE_float("header_timeout_s", 10.0, "Seconds a connection may take to send a "
                   "request's headers, or stay idle between requests (serve).")
flags.DEFINE_float("body_timeout_s", 10.0, "Seconds a request may take to send its body; "
                   "then 408 (serve).")
flags.DEFINE_enum("log_format", "text", ["text", "json"], "Server logs: '[serve] ...' lines "
                  "or one JSON object per line (serve).")
flags.DEFINE_string("output", None, "PNG grid to write (sample); codes and images go beside "
                    "it as .npz.")



# Flag groups: what each command takes. Stage commands take COMMON plus the groups their
# Stage declares; the config groups are filled in by _define_config_flags.
GROUPS = {
    "common": ["workdir", "dataset", "preset", "seed", "force", "verbose"],
    "data": ["data_path", "data_dir", "download", "image_size", "max_train_images",
             "max_test_images"],
    "training": ["strategy", "checkpoint_every"],
    "extract": ["num_shards"],
    "report": ["report_samples"],
    "export": ["export_dtype"],
    "autoencoder": [],
    "prior": [],
    "sample": ["saved_model", "workdir", "num_codes", "num_samples", "seed", "temperature",
               "output"],
    "serve": ["saved_model", "workdir", "host", "port", "model_name", "max_batch",
              "max_samples", "max_queue", "max_chunk", "deadline_margin_ms", "drain_seconds",
              "header_timeout_s", "body_timeout_s", "log_format"],
    "experiments": ["experiments", "eval_samples", "inception_weights", "classifier_epochs",
                    "ablation_max_train_images", "ablation_epochs"],
}
ALL_STAGE_GROUPS = ("common", "data", "training", "extract", "report", "export", "autoencoder",
                    "prior")


@dataclasses.dataclass(frozen=True)
class Command:
    name: str
    summary: str
    groups: tuple
    beam_options: bool = False  # Unknown flags pass to Beam.


COMMANDS = {c.name: c for c in (
    Command("demo", "the whole pipeline on the embedded digits data (workdir/digits)",
            ALL_STAGE_GROUPS, beam_options=True),
    Command("run", "every stage in order: " + ", ".join(s.command for s in STAGES),
            ALL_STAGE_GROUPS, beam_options=True),
    Command("sample", "draw samples from a SavedModel at k codes: a PNG grid and an .npz",
            ("sample",)),
    Command("serve", "serve a SavedModel: TF Serving's REST API, :anytime with deadlines, "
            "a page at /", ("serve",)),
    Command("experiments", "the paper's comparisons (ordered vs unordered, time, ...)",
            ALL_STAGE_GROUPS + ("experiments",), beam_options=True),
    *(Command(s.command, s.summary, ("common",) + s.flag_groups,
              beam_options="extract" in s.flag_groups) for s in STAGES),
)}

def _define_config_flags():
    """One flag per AutoencoderConfig field and per PriorConfig field (prior_ prefix),
    default None meaning 'the preset's value'."""
    for cls, prefix, group in ((AutoencoderConfig, "", "autoencoder"),
                               (PriorConfig, "prior_", "prior")):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "seed":  # One --seed for everything.
                continue
            name, hint = prefix + f.name, hints[f.name]
            GROUPS[group].append(name)
            text = f"{cls.__name__}.{f.name}; unset: the preset's value (base {f.default})."
            if hint is bool:
                flags.DEFINE_bool(name, None, text)
            elif hint is int:
                flags.DEFINE_integer(name, None, text)
            elif hint is float:
                flags.DEFINE_float(name, None, text)
            elif hint is str:
                flags.DEFINE_string(name, None, text)
            else:  # Tuples of ints.
                flags.DEFINE_list(name, None, text + " Comma-separated.")


_define_config_flags()


# ----------------------------------------------------------------------------- help


def _flag_lines(names) -> list:
    lines = []
    for name in dict.fromkeys(names):
        flag = FLAGS[name]
        default = "unset" if flag.default is None else repr(flag.default)
        lines.append(f"  --{name}  (default: {default})")
        lines.append(f"      {flag.help}")
    return lines


def help_text(command: typing.Optional[str] = None) -> str:
    """`ovqvae --help` (the commands) or `ovqvae COMMAND --help` (its flags)."""
    if command is None:
        width = max(len(c) for c in COMMANDS)
        lines = ["usage: ovqvae COMMAND [--flag=value ...]", "",
                 "Anytime sampling with an ordered VQ-VAE and a Transformer prior.", "",
                 "commands:"]
        lines += [f"  {c.name:<{width}}  {c.summary}" for c in COMMANDS.values()]
        lines += ["", "'ovqvae COMMAND --help' lists a command's flags and their defaults.",
                  "--verbosity=N shows TensorFlow's and absl's log lines.",
                  "Exit codes: 0 success, 1 runtime error, 2 usage error."]
        return "\n".join(lines) + "\n"
    spec = COMMANDS[command]
    lines = [f"usage: ovqvae {command} [--flag=value ...]", "", spec.summary[0].upper()
             + spec.summary[1:] + ".", "", "flags:"]
    lines += _flag_lines(name for group in spec.groups for name in GROUPS[group])
    if spec.beam_options:
        lines += ["", "Other flags are Apache Beam pipeline options for the extract stage "
                  "(--runner=DataflowRunner --project=... --setup_file=./setup.py)."]
    return "\n".join(lines) + "\n"


class UsageError(Exception):
    """A bad command line: exit code 2."""


def _overrides(cls, prefix):
    out = {} if FLAGS.seed is None else {"seed": FLAGS.seed}
    for f in dataclasses.fields(cls):
        if f.name == "seed":
            continue
        value = FLAGS[prefix + f.name].value
        if value is not None:
            out[f.name] = tuple(int(v) for v in value) if isinstance(value, list) else value
    return out


def pipeline_config():
    """The PipelineConfig the flags describe."""
    from pipeline.config import DataConfig, pipeline_preset

    dataset = FLAGS.dataset
    source = "image_folder" if dataset == "cifar10" else dataset
    if source in ("mnist", "image_folder", "celeba") and not FLAGS.data_path:
        raise UsageError(f"--dataset={dataset} needs --data_path")
    if not (source in ("digits", "mnist", "image_folder", "celeba")
            or source.startswith("tfds:")):
        raise UsageError(f"--dataset={dataset} is not supported, expected digits, mnist, "
                         "cifar10, image_folder, celeba or tfds:<name>")
    data = DataConfig(source=source, path=FLAGS.data_path, data_dir=FLAGS.data_dir,
                      image_size=FLAGS.image_size, download=FLAGS.download,
                      max_train=FLAGS.max_train_images, max_test=FLAGS.max_test_images)
    try:
        return pipeline_preset(dataset, FLAGS.preset, data,
                               autoencoder_overrides=_overrides(AutoencoderConfig, ""),
                               prior_overrides=_overrides(PriorConfig, "prior_"),
                               num_shards=FLAGS.num_shards, report_samples=FLAGS.report_samples,
                               export_dtype=FLAGS.export_dtype,
                               seed=FLAGS.seed or 0, checkpoint_every=FLAGS.checkpoint_every,
                               strategy=FLAGS.strategy)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from None


def _saved_model_path(command: str) -> str:
    """--saved_model, or the export stage's artifact under --workdir."""
    if FLAGS.saved_model:
        return FLAGS.saved_model
    if not FLAGS.workdir:
        raise UsageError(f"{command} needs --saved_model (or --workdir)")
    return artifact_path(FLAGS.workdir, "export")


def _sample():
    import numpy as np
    import tensorflow as tf

    from ordered_vqvae import export, figures
    from ordered_vqvae.atomic import atomic_file, check_writable_directory

    path = _saved_model_path("sample")
    if not FLAGS.output:
        raise UsageError("sample needs --output=PATH.png")
    export.check_saved_model_dir(path)
    out_dir = os.path.dirname(os.path.abspath(FLAGS.output))
    if not os.path.isdir(out_dir):
        raise OSError(f"cannot write --output={FLAGS.output}: {out_dir!r} is not a directory")
    check_writable_directory(out_dir, "--output directory")
    model = tf.saved_model.load(path)
    K = int(model.code_length)
    k = K if FLAGS.num_codes is None else FLAGS.num_codes
    if not 1 <= k <= K:
        raise UsageError(f"--num_codes={k}, expected 1 <= num_codes <= {K}")
    if FLAGS.temperature <= 0 or FLAGS.num_samples < 1:
        raise UsageError(f"--temperature={FLAGS.temperature} must be > 0 and --num_samples="
                         f"{FLAGS.num_samples} >= 1")
    out = model.signatures["sample"](num_samples=tf.constant(FLAGS.num_samples),
                                     num_codes=tf.constant(k), seed=tf.constant(FLAGS.seed or 0),
                                     temperature=tf.constant(FLAGS.temperature, tf.float32))
    images, codes = out["images"].numpy(), out["codes"].numpy()
    base = os.path.splitext(FLAGS.output)[0]
    with atomic_file(base + ".npz", "wb") as f:
        np.savez(f, images=images, codes=codes)
    figures.save_image_rows([images], [f"k={k}/{K}"], FLAGS.output,
                            f"{FLAGS.num_samples} samples from the first {k} of {K} codes")
    print(f"[sample] wrote {FLAGS.output} and {base}.npz ({FLAGS.num_samples} samples, "
          f"k={k} of K={K})", flush=True)


def _serve():
    from pipeline import serving

    path = _saved_model_path("serve")
    max_samples = min(64, FLAGS.max_batch) if FLAGS.max_samples is None else FLAGS.max_samples
    try:
        config = serving.ServeConfig(
            saved_model=path, model_name=FLAGS.model_name, host=FLAGS.host, port=FLAGS.port,
            max_batch=FLAGS.max_batch, max_samples=max_samples, max_queue=FLAGS.max_queue,
            max_chunk=FLAGS.max_chunk, deadline_margin_ms=FLAGS.deadline_margin_ms,
            drain_seconds=FLAGS.drain_seconds, header_timeout_s=FLAGS.header_timeout_s,
            body_timeout_s=FLAGS.body_timeout_s, log_format=FLAGS.log_format)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    serving.serve(config)


def main(argv):
    from absl import logging

    if not _verbosity_given(argv):
        logging.set_verbosity(logging.WARNING)
    positional = [a for a in argv[1:] if not a.startswith("-")]
    unknown = [a for a in argv[1:] if a.startswith("-")]
    if not positional or positional[0] not in COMMANDS:
        got = positional[0] if positional else "nothing"
        raise UsageError(f"expected a command, one of {', '.join(COMMANDS)}; got {got}")
    if len(positional) > 1:
        raise UsageError(f"unexpected arguments {positional[1:]}")
    command = positional[0]
    if unknown and not COMMANDS[command].beam_options:
        raise UsageError(f"unknown flag(s) {unknown} for command {command}")
    if command == "sample":
        return _sample()
    if command == "serve":
        return _serve()
    from pipeline import stages

    workdir = FLAGS.workdir or ("workdir/digits" if command == "demo" else None)
    if not workdir:
        raise UsageError("--workdir is required")
    config = pipeline_config()
    if unknown:
        config = dataclasses.replace(config, beam_args=tuple(unknown))
    if command == "experiments":
        from pipeline import experiments

        experiments.run(experiments.ExperimentConfig(
            base=config, names=tuple(FLAGS.experiments), eval_samples=FLAGS.eval_samples,
            classifier_epochs=FLAGS.classifier_epochs, inception_weights=FLAGS.inception_weights,
            ablation_max_train=FLAGS.ablation_max_train_images,
            ablation_epochs=FLAGS.ablation_epochs), workdir, verbose=FLAGS.verbose)
    elif command in ("demo", "run"):
        stages.run_pipeline(config, workdir, force=FLAGS.force, verbose=FLAGS.verbose)
        report = os.path.join(artifact_path(workdir, "report"), "report.md")
        print(f"[{command}] done: the report is {report}", flush=True)
    else:
        stages.run_stage(config, workdir, BY_COMMAND[command].name, force=FLAGS.force,
                         verbose=FLAGS.verbose)


def _parse(argv):
    try:
        return FLAGS(argv, known_only=True)  # Unknown flags may be Beam options.
    except flags.Error as e:
        print(f"ovqvae: usage error: {e}\nTry 'ovqvae --help'.", file=sys.stderr)
        sys.exit(2)


def _main_with_exit_codes(argv):
    import tensorflow as tf

    try:
        main(argv)
    except UsageError as e:
        print(f"ovqvae: usage error: {e}\nTry 'ovqvae --help'.", file=sys.stderr)
        sys.exit(2)
    except tf.errors.OpError as e:
        print(f"ovqvae: error: {op_error_text(e)}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, OSError, RuntimeError) as e:  # DataError, TrainingDiverged, ...
        print(f"ovqvae: error: {e}", file=sys.stderr)
        sys.exit(1)


def _verbosity_given(argv) -> bool:
    return any(re.match(r"--?(v|verbosity)(=|$)", a) for a in argv[1:])


@contextlib.contextmanager
def _quiet_stderr(quiet: bool):
    """Sends file descriptor 2 to /dev/null: TensorFlow's C++ runtime prints its start-up
    lines (oneDNN, CUDA probing) before its own log level applies."""
    if not quiet:
        yield
        return
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    sys.stderr.flush()
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(null)
        os.close(saved)


def run(argv=None):
    """Console-script entry point."""
    argv = list(sys.argv if argv is None else argv)
    words = [a for a in argv[1:] if not a.startswith("-")]
    if any(a in ("--help", "-h", "--helpshort", "-?") for a in argv[1:]):
        command = words[0] if words and words[0] in COMMANDS else None
        sys.stdout.write(help_text(command))
        sys.exit(0)
    quiet = not _verbosity_given(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if quiet else "0")
    with _quiet_stderr(quiet):
        import tensorflow as tf

        tf.config.list_physical_devices()  # Device probing logs here, once.
    app.run(_main_with_exit_codes, argv=argv, flags_parser=_parse)


if __name__ == "__main__":
    run()
