"""`ovqvae`: the command line of the ordered VQ-VAE pipeline.

`ovqvae --help` lists the commands, `ovqvae COMMAND --help` one command's flags with their
defaults. Datasets (pipeline/sources/, one module each): digits (embedded), mnist
(--data_path: IDX directory), cifar10 or image_folder (--data_path: a tarball or folder of
<split>/<class>/<image>), celeba, npz (--data_path: a Keras-style .npz), tfds:<name>
(--data_dir). Every field of the dataset's autoencoder preset is a flag
(--latent_channels, --codebook_size, --truncation, ...); prior fields take a prior_ prefix
(--prior_num_layers, ...). Flags this program does not know are Beam pipeline options for
the extract stage (--runner=DataflowRunner --project=...). TensorFlow's C++ log lines are
hidden unless --verbosity is given. Exit codes: 0 success, 1 runtime error, 2 usage error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import typing

from absl import app, flags

from ordered_vqvae.configs import AutoencoderConfig, PriorConfig
from ordered_vqvae.validation import op_error_text
from pipeline import quiet, run_config, serve_flags
from pipeline.config import EXPORT_DTYPES
from pipeline.experiments import EXPERIMENTS
from pipeline.run_config import CONFIG_FLAGS, UsageError, config_values
from pipeline.stages import BY_COMMAND, STAGES, artifact_path

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for the run's artifacts (demo: workdir/digits).")
flags.DEFINE_string("dataset", run_config.DEFAULT_DATASET, "digits | mnist | cifar10 | "
                    "image_folder | celeba | npz | tfds:<name> (pipeline/sources/).")
flags.DEFINE_string("data_path", None, "MNIST IDX directory, image folder / .tar.gz, CelebA "
                    "directory / .tar.gz (img_align_celeba/, list_eval_partition.txt), or "
                    ".npz file (x_train, y_train, x_test, y_test).")
flags.DEFINE_string("data_dir", None, "TFDS data directory (tfds:<name> datasets).")
flags.DEFINE_bool("download", False, "Allow TFDS to download a missing dataset.")
flags.DEFINE_integer("image_size", None, "Resize and center-crop folder, CelebA and TFDS images "
                     "to this size; the image shape and the preset follow.")
flags.DEFINE_integer("max_train_images", None, "Use this many training images, chosen at random (the same in every stage).")
flags.DEFINE_integer("max_test_images", None, "Use this many test images, chosen at random (the same in every stage).")
flags.DEFINE_string("preset", None, "cpu (sized for a few CPU cores) or reference (the "
                    "paper's sizes), chosen for the images' shape, or a preset's name: digits, "
                    "mnist, cifar10[_cpu], celeb_a[_cpu]. Unset: reference with a GPU, else cpu.")
flags.DEFINE_integer("num_shards", 4, "Output TFRecord shards per split (extract).")
flags.DEFINE_integer("report_samples", 16, "Samples per row of the report's grids.")
flags.DEFINE_enum("export_dtype", "float32", list(EXPORT_DTYPES), "The SavedModel's "
                  "prior: float32 (the reference), or bfloat16_weights (its projection kernels "
                  "in bfloat16, activations and cache float32; faster at large batches under "
                  "XLA, a smaller file).")
flags.DEFINE_string("classifier", "", "A domain classifier directory (the one `ovqvae "
                    "experiments` keeps in its workdir's classifier/): the quality profile "
                    "measured at export then has the samples' domain FD, and fd_ratio floors "
                    "use it.")
flags.DEFINE_bool("force", False, "Redo stages even when their manifest matches.")
flags.DEFINE_enum("strategy", "", ["", "mirrored"], "Training under tf.distribute: "
                  "'mirrored' uses every local GPU (one replica each; --batch_size is the "
                  "global batch).")


class _DurationParser(flags.ArgumentParser):
    parse = staticmethod(run_config.parse_duration)


flags.DEFINE(_DurationParser(), "time_budget", None, "Wall-clock budget: '30m', '90s', "
             "'1h' or seconds (0: none). run splits it among the stages (the training "
             "stages train until their share is spent, then stop between steps with a "
             "complete, resumable model); a stage's command gives it the whole budget.")
flags.DEFINE_integer("checkpoint_every", 500, "Training checkpoints every this many batches "
                     "(and at every epoch end; 0: epoch ends only). An interrupted stage "
                     "resumes from the latest one when rerun.")
flags.DEFINE_integer("verbose", None, "Keras verbosity: 0 silent, 1 progress bar, 2 one line "
                     "per epoch (unset: 1 on a terminal, 2 when the output is a file or pipe).")
flags.DEFINE_string("saved_model", None, "SavedModel directory (default WORKDIR/saved_model).")
flags.DEFINE_list("num_codes", None, "k, the codes per sample, 1 <= k <= K: one or several, as "
                  "counts or shares of K (4,8,16 or 25%,100%); one grid row per k (unset: K).")
flags.DEFINE_integer("num_samples", 16, "Samples to draw.")
flags.DEFINE_integer("seed", None, "Seed of training and report sampling (run, stages) or of "
                     "the samples (sample; default 0).")
flags.DEFINE_float("temperature", 1.0, "Sampling temperature > 0 (sample).")
flags.DEFINE_list("experiments", "ordered_vs_unordered,time,channel_vs_spatial,priority_code,"
                  "ablations", "Experiments to run (experiments), some of: "
                  + ", ".join(EXPERIMENTS) + ".")
flags.DEFINE_integer("eval_samples", 1000, "Samples per code length for Frechet distances.")
flags.DEFINE_string("inception_weights", None, "Local InceptionV3 notop weights (.h5) for FID; "
                    "without it FID is skipped (nothing is downloaded).")
flags.DEFINE_integer("classifier_epochs", None, "Epochs of the domain classifier for the FD "
                     "(unset: 3 for its CNN on grayscale, 15 for its ResNet on colour images).")
flags.DEFINE_integer("ablation_max_train_images", None, "Training images of each ablation variant.")
flags.DEFINE_integer("ablation_epochs", None, "Autoencoder epochs of each ablation variant.")
flags.DEFINE_string("output", None, "PNG grid to write (sample; default WORKDIR/samples/"
                    "samples_k<k,...>_seed<seed>.png); codes and images go beside it as .npz. "
                    "encode: the codes .npz; decode: a new folder of PNGs.")
flags.DEFINE_float("min_psnr", None, "encode: each image keeps the fewest codes whose "
                   "reconstruction reaches this PSNR (dB).")
flags.DEFINE_float("max_mse", None, "encode: each image keeps the fewest codes whose "
                   "reconstruction has at most this MSE.")
flags.DEFINE_string("codes", None, "decode: the .npz that ovqvae encode wrote.")



# Flag groups: what each command takes. Stage commands take COMMON plus the groups their
# Stage declares; the config groups are filled in by _define_config_flags.
GROUPS = {
    "common": ["workdir", "dataset", "preset", "seed", "force", "verbose"],
    "data": ["data_path", "data_dir", "download", "image_size", "max_train_images",
             "max_test_images"],
    "training": ["strategy", "checkpoint_every", "time_budget"],
    "extract": ["num_shards"],
    "report": ["report_samples"],
    "export": ["export_dtype", "classifier", "model_base_path"],
    "autoencoder": [],
    "prior": [],
    "sample": ["saved_model", "workdir", "num_codes", "num_samples", "seed", "temperature",
               "output"],
    "status": ["workdir"],
    "encode": ["saved_model", "data_path", "min_psnr", "max_mse", "num_codes", "output"],
    "decode": ["saved_model", "codes", "output"],
    "serve": ["saved_model", "model_base_path", "model_version_policy", "version_labels",
              "file_system_poll_wait_seconds", "workdir", "host", "port", "grpc_port",
              "model_name", "max_batch",
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
    Command("sample", "draw samples from a SavedModel at one or several k: a PNG grid (a row "
            "per k) and an .npz", ("sample",)),
    Command("encode", "a folder of images to adaptive-length codes (.npz): each image keeps the "
            "fewest codes that meet --min_psnr or --max_mse", ("encode",)),
    Command("decode", "codes from ovqvae encode back to a folder of PNGs, each from its own "
            "number of codes", ("decode",)),
    Command("status", "the workdir's recorded run and which stages are up to date",
            ("status",)),
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


def _flag_lines(names, values: dict) -> list:
    lines = []
    for name in dict.fromkeys(names):
        flag = FLAGS[name]
        default = "unset" if flag.default is None else repr(flag.default)
        run = f"; this run: {values[name]!r}" if name in values else ""
        lines.append(f"  --{name}  (default: {default}{run})")
        lines.append(f"      {flag.help}")
    return lines


def help_text(command: typing.Optional[str] = None, values: typing.Optional[dict] = None) -> str:
    """`ovqvae --help` (the commands) or `ovqvae COMMAND --help` (its flags; with `values`,
    {flag: value}, also the value each has in the run the command would do)."""
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
    if isinstance(values, str):
        lines += [f"(The values of this run are unknown: {values})", ""]
    lines += _flag_lines((name for group in spec.groups for name in GROUPS[group]),
                         values if isinstance(values, dict) else {})
    if spec.beam_options:
        lines += ["", "Other flags are Apache Beam pipeline options for the extract stage "
                  "(--runner=DataflowRunner --project=... --setup_file=./setup.py)."]
    return "\n".join(lines) + "\n"


def _given() -> dict:
    """{flag: value} of the run-defining flags given on the command line (lists of ints as
    tuples)."""
    out = {}
    for name in ("dataset", "preset", *CONFIG_FLAGS):
        if FLAGS[name].present:
            value = FLAGS[name].value
            out[name] = tuple(int(v) for v in value) if isinstance(value, list) else value
    return out


def pipeline_config(workdir: typing.Optional[str]):
    """The PipelineConfig the command line and the workdir's recorded run describe."""
    return run_config.resolve(workdir, _given())


def _saved_model_path(command: str) -> str:
    """--saved_model, or the export stage's artifact under --workdir."""
    if FLAGS.saved_model:
        return FLAGS.saved_model
    if not FLAGS.workdir:
        raise UsageError(f"{command} needs --saved_model (or --workdir)")
    return artifact_path(FLAGS.workdir, "export")


def _sample():
    from pipeline import sample

    sample.sample(_saved_model_path("sample"), FLAGS.num_codes, FLAGS.num_samples,
                  FLAGS.seed or 0, FLAGS.temperature, FLAGS.output, FLAGS.workdir)


def _serve():
    from pipeline import serving

    if FLAGS.model_base_path and (FLAGS.saved_model or FLAGS.workdir):
        raise UsageError("--model_base_path serves its versions; it takes no --saved_model "
                         "or --workdir")
    path = None if FLAGS.model_base_path else _saved_model_path("serve")
    try:
        config = serve_flags.config(path)
    except ValueError as e:
        raise UsageError(f"--{e}") from None
    serving.serve(config)


def _codec(command: str):
    from pipeline import codec

    codec.command(command, FLAGS)


# Commands that run stages in a workdir, from its recorded run.
WORKDIR_COMMANDS = ("demo", "run", "experiments") + tuple(s.command for s in STAGES)
# absl's own flags, which every command takes.
ABSL_FLAGS = ("verbosity", "v", "logtostderr", "alsologtostderr", "log_dir", "stderrthreshold")


def command_flags(command: str) -> list:
    return list(dict.fromkeys(n for g in COMMANDS[command].groups for n in GROUPS[g]))


def _check_flags(command: str, leftover: list) -> list:
    """Refuses, before any work, every flag `command` does not take, with the nearest of
    its own flags; returns the leftover flags that Beam's option parser accepts (only for
    commands that run Beam)."""
    import difflib

    own = command_flags(command)
    bad = [f"--{name}" for name in FLAGS
           if FLAGS[name].present and name not in own and name not in ABSL_FLAGS]
    beam = []
    if leftover and COMMANDS[command].beam_options:
        beam, unknown = _beam_options(leftover)
        bad += unknown
    else:
        bad += leftover
    if not bad:
        return beam
    every = {name for c in COMMANDS for name in command_flags(c)}
    lines = []
    for token in dict.fromkeys(bad):
        name = token.lstrip("-").split("=", 1)[0]
        close = [] if name in every else (
            difflib.get_close_matches(name, own, n=2, cutoff=0.6)
            or difflib.get_close_matches(name, every, n=1, cutoff=0.6))
        hint = [f"did you mean {' or '.join('--' + c for c in close)}"] if close else []
        if name in every or (close and close[0] not in own):
            takers = [c for c in COMMANDS if (close[0] if close else name) in command_flags(c)]
            hint.append(f"a flag of {', '.join(takers)}")
        lines.append(token + (f" ({'; '.join(hint)})" if hint else ""))
    beam_note = ", or Beam pipeline options" if COMMANDS[command].beam_options else ""
    raise UsageError(f"{command} does not take {', '.join(lines)}; its flags: "
                     f"'ovqvae {command} --help'{beam_note}")


def _beam_options(args: list):
    """(args Beam's own option parser accepts, args it does not know). Beam's parser exits
    on a bad value, which becomes a UsageError here."""
    from apache_beam.options.pipeline_options import PipelineOptions

    parsers, said = [], io.StringIO()
    PipelineOptions([]).get_all_options(add_extra_args_fn=parsers.append)
    try:
        with contextlib.redirect_stderr(said):  # Its usage text lists every Beam option.
            _, unknown = parsers[0].parse_known_args(args)
    except SystemExit:
        reason = said.getvalue().strip().splitlines()[-1].split("error: ", 1)[-1]
        raise UsageError(f"Beam pipeline options {args}: {reason}") from None
    return [a for a in args if a not in unknown], unknown


def main(argv):
    from absl import logging

    if not quiet.verbosity_given(argv):
        logging.set_verbosity(logging.WARNING)
        quiet.quiet_beam()
    positional = [a for a in argv[1:] if not a.startswith("-")]
    leftover = [a for a in argv[1:] if a.startswith("-")]
    if not positional or positional[0] not in COMMANDS:
        got = positional[0] if positional else "nothing"
        raise UsageError(f"expected a command, one of {', '.join(COMMANDS)}; got {got}")
    if len(positional) > 1:
        raise UsageError(f"unexpected arguments {positional[1:]}")
    command = positional[0]
    beam_args = _check_flags(command, leftover)
    if command == "sample":
        return _sample()
    if command == "serve":
        return _serve()
    if command in ("encode", "decode"):
        return _codec(command)
    workdir = FLAGS.workdir or ("workdir/digits" if command == "demo" else None)
    if not workdir:
        raise UsageError("--workdir is required")
    if command == "status":
        return _status(workdir)
    _workdir_command(command, workdir, beam_args)


def _workdir_command(command: str, workdir: str, beam_args: list) -> None:
    from pipeline import stages

    # Progress bars redraw with carriage returns: only a terminal shows them as intended.
    verbose = FLAGS.verbose if FLAGS.verbose is not None else 1 if sys.stdout.isatty() else 2
    config = dataclasses.replace(pipeline_config(workdir), beam_args=tuple(beam_args))
    run_config.say_changes(workdir, config)
    stages.record(config, workdir)
    if command == "experiments":
        from pipeline import experiments

        experiments.run(experiments.ExperimentConfig(
            base=config, names=tuple(FLAGS.experiments), eval_samples=FLAGS.eval_samples,
            classifier_epochs=FLAGS.classifier_epochs, inception_weights=FLAGS.inception_weights,
            ablation_max_train=FLAGS.ablation_max_train_images,
            ablation_epochs=FLAGS.ablation_epochs), workdir, verbose=verbose)
    elif command in ("demo", "run"):
        stages.run_pipeline(config, workdir, force=FLAGS.force, verbose=verbose)
        report = os.path.join(artifact_path(workdir, "report"), "report.md")
        print(f"[{command}] done: the report is {report}", flush=True)
    else:
        stages.run_stage(config, workdir, BY_COMMAND[command].name, force=FLAGS.force,
                         verbose=verbose)
        if command == "export" and FLAGS.model_base_path:
            from ordered_vqvae.atomic import publish_version

            version = publish_version(artifact_path(workdir, "export"), FLAGS.model_base_path)
            print(f"[export] version {version} published in {FLAGS.model_base_path}",
                  flush=True)


def _status(workdir: str) -> None:
    from pipeline import stages

    lines = stages.status_lines(workdir)
    if lines is None:
        raise UsageError(f"workdir {workdir!r} has no recorded run; 'ovqvae run "
                         "--workdir=...' starts one")
    print("\n".join(lines))


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


def _run_values(command: str, argv: list):
    """{flag: value} of the run `command` would do with `argv` (the workdir's recorded run,
    or the data's preset), or the reason it cannot be known."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        FLAGS(argv, known_only=True)
        with quiet.quiet_stderr(True), contextlib.redirect_stdout(io.StringIO()):
            return config_values(pipeline_config(
                FLAGS.workdir or ("workdir/digits" if command == "demo" else None)))
    except Exception as e:  # Help still shows the flags and their defaults.
        return str(e).splitlines()[0] if str(e) else type(e).__name__


def run(argv=None):
    """Console-script entry point."""
    from ordered_vqvae import xla

    xla.prefer_wide_vectors()  # Before anything compiles (docs/performance.md).
    argv = list(sys.argv if argv is None else argv)
    words = [a for a in argv[1:] if not a.startswith("-")]
    helps = ("--help", "-h", "--helpshort", "-?")
    if any(a in helps for a in argv[1:]):
        command = words[0] if words and words[0] in COMMANDS else None
        values = None
        if command in WORKDIR_COMMANDS:
            values = _run_values(command, [a for a in argv if a not in helps])
        sys.stdout.write(help_text(command, values))
        sys.exit(0)
    hide = not quiet.verbosity_given(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3" if hide else "0")
    with quiet.quiet_stderr(hide):
        import tensorflow as tf

        tf.config.list_physical_devices()  # Device probing logs here, once.
    app.run(_main_with_exit_codes, argv=argv, flags_parser=_parse)


if __name__ == "__main__":
    run()
