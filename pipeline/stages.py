"""The pipeline's stages, declared as data, and the TFX-style runner that caches them.

  images -> [autoencoder] -> [extract] (Beam) -> [prior] -> [export] -> [report]

`STAGES` is the one list: each `Stage` knows its name, its CLI command, its artifact, the
upstream stages whose artifacts it reads, the part of the config its output depends on, the
flag groups of its command and its run function. The CLI, the cache check and the "run
this first" hints all derive from it.

Each run function reads what earlier stages wrote and writes its artifact atomically. The
runner records a manifest (`pipeline.workdir`) after the artifact is in place. A later run
skips a stage whose manifest matches its current inputs and whose artifact is intact, and
redoes it (and so everything after it) when anything it depends on changed. Training
stages keep their checkpoints in the scratch area and resume from them after a kill.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from typing import Callable, Dict, List, Optional, Tuple

from ordered_vqvae.atomic import write_json
from pipeline import workdir as wd
from pipeline.config import PipelineConfig
from pipeline.workdir import PipelineError


@dataclasses.dataclass(frozen=True)
class Context:
    """What a stage's run function gets besides the config."""

    workdir: str
    scratch: str   # The stage's checkpoint area, removed once the stage has finished.
    verbose: int   # Keras verbosity: 0 silent, 1 progress bar, 2 a line per epoch.
    deadline: Optional[float] = None  # time.time() when a training stage stops training.

    def artifact(self, stage: str) -> str:
        return artifact_path(self.workdir, stage)


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str                       # Its manifest: manifests/<name>.json.
    command: str                    # `ovqvae <command>` runs it alone.
    artifact: str                   # The directory it writes under the workdir.
    upstream: Tuple[str, ...]       # Stages whose artifacts it reads.
    config_inputs: Callable[[PipelineConfig], dict]  # The config its output depends on.
    run: Callable[[PipelineConfig, Context], dict]   # Returns the manifest's "result".
    summary: str                    # One line for `ovqvae --help`.
    flag_groups: Tuple[str, ...] = ()  # Flags its command takes beyond the common ones.


# ----------------------------------------------------------------------------- run functions


def _training_file(ctx: Context, stage: str, name: str, write: Callable):
    """The training examples streamed to `name` in the stage's scratch area, once: a resumed
    run reuses the file (the scratch area is per input hash, so it holds the same data)."""
    from ordered_vqvae.examples import ExampleFile

    path = os.path.join(ctx.scratch, name)
    if os.path.exists(path):
        return ExampleFile(path)
    start = time.time()
    examples = write(path)
    print(f"[{stage}] {len(examples)} training examples streamed to {path} "
          f"({os.path.getsize(path) / 2**20:.1f} MiB) in {time.time() - start:.1f} s", flush=True)
    return examples


def _training_summary(ctx: Context, steps_per_epoch: int, start: float) -> dict:
    """What a training stage's fit did, from its history: epochs trained (a fraction where
    the time budget stopped one), seconds, and whether the budget stopped it (then the
    stage keeps its checkpoints, and a rerun continues training from them)."""
    import json

    with open(os.path.join(ctx.scratch, "history.json")) as f:
        history = json.load(f)
    last = history[-1] if history else {}
    epochs = last.get("epoch", 0)
    if "batches" in last:
        epochs = epochs - 1 + last["batches"] / steps_per_epoch
    out = {"epochs_trained": round(float(epochs), 3), "seconds": round(time.time() - start, 1),
           "budget_stop": bool(last.get("budget_stop"))}
    if ctx.deadline is not None:
        out["budget_seconds"] = round(ctx.deadline - start, 1)
    return out


def _train_autoencoder(config: PipelineConfig, ctx: Context) -> dict:
    import numpy as np

    from ordered_vqvae import models, training
    from ordered_vqvae.examples import write_examples
    from ordered_vqvae.validation import check_images
    from pipeline import evaluate

    ae_config = config.autoencoder
    shape = tuple(ae_config.image_shape)

    def checked(batches):
        seen = 0
        for batch in batches:
            check_images(batch, shape, f"{config.data.source} training images", seen)
            seen += len(batch)
            yield batch

    start = time.time()
    print(f"[autoencoder] loading {config.data.source} ...", flush=True)
    train = _training_file(ctx, "autoencoder", "train_images.npy", lambda path: write_examples(
        path, checked(config.data.image_batches("train")), np.float32))
    val_x = np.concatenate(list(config.data.image_batches("test", sample=2000)))
    print(f"[autoencoder] {len(train)} train images of shape {train.shape[1:]}, read from "
          f"disk a batch at a time; K={ae_config.code_length} codes, codebook_size="
          f"{ae_config.codebook_size}", flush=True)
    model = training.train_autoencoder(ae_config, train, val_x, ctx.scratch,
                                       resume=True, verbose=ctx.verbose,
                                       checkpoint_every=config.checkpoint_every,
                                       strategy=config.distribution(), deadline=ctx.deadline)
    trained = _training_summary(ctx, len(train) // ae_config.batch_size, start)
    models.save_autoencoder(model, ctx.artifact("autoencoder"))
    return {**evaluate.reconstruction(model, config.data.image_batches("test")),
            "training": trained}


def _extract(config: PipelineConfig, ctx: Context) -> dict:
    from pipeline import extract

    meta = extract.run(ctx.artifact("autoencoder"), ctx.artifact("extract"), config.data,
                       num_shards=config.num_shards, beam_args=list(config.beam_args),
                       overwrite=True)
    print(f"[extract] {meta['counts']} records, {meta['dead_letters']} dead letters", flush=True)
    return {"counts": meta["counts"], "dead_letters": meta["dead_letters"]}


def _train_prior(config: PipelineConfig, ctx: Context) -> dict:
    import numpy as np

    from ordered_vqvae import training
    from ordered_vqvae.examples import write_examples
    from ordered_vqvae.prior import save_prior
    from pipeline import schema

    start = time.time()
    codes_dir = ctx.artifact("extract")
    meta = schema.read_metadata(codes_dir)
    K, size = meta["code_length"], meta["codebook_size"]
    cfg = config.prior
    train = _training_file(ctx, "prior", "train_codes.npy", lambda path: write_examples(
        path, schema.code_batches(codes_dir, "train", limit=cfg.max_train_sequences,
                                  code_length=K, codebook_size=size), np.int32))
    val = schema.code_dataset(codes_dir, "test", batch_size=256, code_length=K, codebook_size=size)
    print(f"[prior] {len(train)} training sequences of K={K} codes, codebook_size={size}",
          flush=True)
    prior = training.train_prior(cfg, K, size, train, val, ctx.scratch, resume=True,
                                 verbose=ctx.verbose, checkpoint_every=config.checkpoint_every,
                                 strategy=config.distribution(), deadline=ctx.deadline)
    trained = _training_summary(ctx, len(train) // cfg.batch_size, start)
    bits = prior.bits_per_code(val)
    save_prior(prior, ctx.artifact("prior"))
    print(f"[prior] validation {bits:.3f} bits per code (uniform: {math.log2(size):.3f})",
          flush=True)
    return {"val_bits_per_code": bits, "uniform_bits_per_code": math.log2(size),
            "training": trained}


def _export(config: PipelineConfig, ctx: Context) -> dict:
    import numpy as np

    from ordered_vqvae import export, models
    from ordered_vqvae.prior import load_prior
    from pipeline import profile

    test = np.concatenate(list(config.data.image_batches("test", sample=profile.TEST_IMAGES)))
    classifier = profile.load_classifier(config.classifier, test.shape[1:])
    measured = {}

    def measure(module):
        measured.update(profile.measure(module, test, seed=config.seed, classifier=classifier))
        return measured

    path = export.export(models.load_autoencoder(ctx.artifact("autoencoder")),
                         load_prior(ctx.artifact("prior"), config.export_dtype),
                         ctx.artifact("export"), profile=measure)
    K = measured["code_length"]
    print(f"[export] SavedModel at {path}; quality profile on {len(test)} test images: PSNR "
          f"{measured['psnr_mean'][0]:.1f} dB at k=1, {measured['psnr_mean'][-1]:.1f} dB at "
          f"k={K}", flush=True)
    return {"saved_model": path, "profile": measured}


def _report(config: PipelineConfig, ctx: Context) -> dict:
    import numpy as np

    from ordered_vqvae import models
    from ordered_vqvae.prior import load_prior
    from pipeline import report

    results = {name: wd.read_manifest(ctx.workdir, name)["result"]
               for name in ("autoencoder", "extract", "prior", "export")}
    total, count = 0.0, 0
    for batch in config.data.image_batches("train", sample=report.BASELINE_TRAIN_IMAGES):
        total, count = total + batch.astype(np.float64).sum(axis=0), count + len(batch)
    path = report.build(config, models.load_autoencoder(ctx.artifact("autoencoder")),
                        load_prior(ctx.artifact("prior")), results,
                        next(config.data.image_batches("test", sample=config.report_samples)),
                        ctx.artifact("report"), mean_image=(total / count).astype(np.float32),
                        test_images=np.concatenate(list(config.data.image_batches(
                            "test", sample=report.BASELINE_TEST_IMAGES))))
    print(f"[report] {os.path.join(path, 'report.md')}", flush=True)
    return {"report": os.path.join(path, "report.md")}


def _asdict(value) -> dict:
    return dataclasses.asdict(value)


STAGES: Tuple[Stage, ...] = (
    Stage("autoencoder", "train_autoencoder", "autoencoder", (),
          lambda c: {"data": c.data.cache_inputs(), "autoencoder": c.autoencoder.cache_inputs()},
          _train_autoencoder, "train the ordered VQ-VAE on the images",
          ("data", "autoencoder", "training")),
    Stage("extract", "extract", "codes", ("autoencoder",),
          lambda c: {"data": c.data.cache_inputs(), "num_shards": c.num_shards},
          _extract, "encode every image to code indices with Apache Beam (TFRecords)",
          ("data", "extract")),
    Stage("prior", "train_prior", "prior", ("extract",),
          lambda c: {"prior": _asdict(c.prior)},
          _train_prior, "train the Transformer prior on the extracted codes",
          ("prior", "training")),
    # The dtype and the classifier are inputs only when set: a float32 SavedModel's hash
    # stays the one it has without the fields.
    Stage("export", "export", "saved_model", ("autoencoder", "prior"),
          lambda c: {**({} if c.export_dtype == "float32" else {"dtype": c.export_dtype}),
                     **({"classifier": c.classifier} if c.classifier else {})},
          _export, "write the SavedModel with encode, decode and sample signatures",
          ("export",)),
    Stage("report", "report", "report", ("autoencoder", "extract", "prior", "export"),
          lambda c: {"data": c.data.cache_inputs(), "report_samples": c.report_samples,
                     "seed": c.seed},
          _report, "write report.md, metrics.json and figures (samples at 25-100% of K)",
          ("data", "report")),
)
BY_NAME: Dict[str, Stage] = {s.name: s for s in STAGES}
BY_COMMAND: Dict[str, Stage] = {s.command: s for s in STAGES}


# ----------------------------------------------------------------------------- runner


# How `ovqvae run --time_budget` splits its budget: each stage, when it starts, gets this
# share of the time left, relative to the shares of the stages still to run (itself
# included). The training stages train until theirs is spent; the others take what they
# take, and what a stage leaves unused, or a cached stage skips, goes to the later ones.
BUDGET_SHARES = {"autoencoder": 0.6, "extract": 0.04, "prior": 0.28, "export": 0.04,
                 "report": 0.04}


def stage_deadline(end: float, stage: str, remaining: List[str],
                   now: Optional[float] = None) -> float:
    """The `time.time()` at which `stage` should be done, for a budget ending at `end` with
    the stages `remaining` (`stage` first) still to run."""
    now = time.time() if now is None else now
    total = sum(BUDGET_SHARES[s] for s in remaining)
    return now + max(end - now, 0.0) * BUDGET_SHARES[stage] / total


def artifact_path(workdir: str, stage: str) -> str:
    return os.path.join(workdir, BY_NAME[stage].artifact)


def _upstream_fingerprint(workdir: str, stage: str) -> str:
    manifest = wd.read_manifest(workdir, stage)
    if manifest is None:
        raise PipelineError(f"stage {stage!r} has not finished in {workdir!r}; run it first "
                            f"(ovqvae {BY_NAME[stage].command} or ovqvae run)")
    return manifest["output_fingerprint"]


def stage_inputs(config: PipelineConfig, workdir: str, stage: Stage) -> dict:
    """What a stage's output depends on: its part of the config and its upstream artifacts."""
    return {**stage.config_inputs(config),
            **{f"{up}_fingerprint": _upstream_fingerprint(workdir, up) for up in stage.upstream}}


def _budget_stopped(workdir: str, stage: str, manifest: Optional[dict]) -> bool:
    """Whether the stage's last run stopped training on its time budget and left the
    checkpoints a rerun continues from."""
    if not manifest or not manifest["result"].get("training", {}).get("budget_stop"):
        return False
    return os.path.isdir(os.path.join(wd.scratch_area(workdir, stage, manifest["input_hash"]),
                                      "checkpoints"))


def _is_current(workdir: str, stage: Stage, inputs_hash: str) -> bool:
    manifest = wd.read_manifest(workdir, stage.name)
    if manifest is None or manifest.get("input_hash") != inputs_hash:
        return False
    if _budget_stopped(workdir, stage.name, manifest):
        return False
    artifact = artifact_path(workdir, stage.name)
    return (os.path.isdir(artifact)
            and wd.fingerprint_files(artifact) == manifest["output_fingerprint"])


def record(config: PipelineConfig, workdir: str) -> None:
    """Prepares the workdir and records `config` as its run (Beam options are per command)."""
    wd.prepare(workdir)
    wd.record_run(workdir, dataclasses.replace(config, beam_args=()).to_dict())


def run_stage(config: PipelineConfig, workdir: str, stage: str, force: bool = False,
              verbose: int = 1) -> dict:
    """Runs one stage (by name) unless its manifest says it is current, within the whole
    time budget when the config has one. Returns its manifest."""
    deadline = time.time() + config.time_budget if config.time_budget else None
    return _run_stage(config, workdir, stage, force, verbose, deadline)[0]


def _run_stage(config: PipelineConfig, workdir: str, stage: str, force: bool,
               verbose: int, deadline: Optional[float] = None) -> Tuple[dict, bool]:
    """(manifest, whether the stage ran)."""
    if stage not in BY_NAME:
        raise PipelineError(f"unknown stage {stage!r}, expected one of {list(BY_NAME)}")
    spec = BY_NAME[stage]
    record(config, workdir)
    inputs = stage_inputs(config, workdir, spec)
    inputs_hash = wd.input_hash(inputs)
    if not force and _is_current(workdir, spec, inputs_hash):
        print(f"[{stage}] up to date (manifest matches), skipped", flush=True)
        return wd.read_manifest(workdir, stage), False
    scratch = wd.scratch_area(workdir, stage, inputs_hash)
    previous = wd.read_manifest(workdir, stage)
    stopped = _budget_stopped(workdir, stage, previous)
    if stopped and previous["input_hash"] == inputs_hash:
        if force:  # Redo means from the start, not from where the budget stopped.
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"[{stage}] its last run stopped on the time budget: training continues "
                  "from its checkpoint", flush=True)
    # The old manifest stays until the new artifact is in place: a failed rerun loses
    # nothing, and an artifact replaced without its manifest no longer matches it.
    os.makedirs(scratch, exist_ok=True)
    start = time.time()
    if deadline is not None and "training" in spec.flag_groups:
        print(f"[{stage}] time budget: {max(deadline - start, 0):.0f} s", flush=True)
    result = spec.run(config, Context(workdir, scratch, verbose, deadline))
    manifest = {"stage": stage, "inputs": inputs, "input_hash": inputs_hash,
                "config": config.to_dict(), "versions": wd.library_versions(), "result": result,
                "output_fingerprint": wd.fingerprint_files(artifact_path(workdir, stage)),
                "seconds": round(time.time() - start, 2), "finished": time.strftime("%FT%T%z")}
    write_json(wd.manifest_path(workdir, stage), manifest)
    if not result.get("training", {}).get("budget_stop"):
        shutil.rmtree(scratch, ignore_errors=True)  # Checkpoints are only needed to resume.
    if stopped and previous["input_hash"] != inputs_hash:  # A budget stop of other inputs.
        shutil.rmtree(wd.scratch_area(workdir, stage, previous["input_hash"]),
                      ignore_errors=True)
    print(f"[{stage}] done in {manifest['seconds']:.1f} s", flush=True)
    return manifest, True


def run_pipeline(config: PipelineConfig, workdir: str, stages: Optional[List[str]] = None,
                 force: bool = False, verbose: int = 1) -> Dict[str, dict]:
    """Runs the stages in order (all by default, by name), then prints a table of their wall
    times; returns their manifests."""
    manifests, rows = {}, []
    names = list(stages or [s.name for s in STAGES])
    end = time.time() + config.time_budget if config.time_budget else None
    for i, name in enumerate(names):
        start = time.time()
        deadline = None if end is None else stage_deadline(end, name, names[i:], start)
        manifests[name], ran = _run_stage(config, workdir, name, force, verbose, deadline)
        rows.append((name, "ran" if ran else "up to date", time.time() - start))
    width = max(len(name) for name, _, _ in rows)
    print("\n".join([f"{'stage':<{width}}  {'status':<10}  seconds"]
                    + [f"{name:<{width}}  {status:<10}  {seconds:7.1f}"
                       for name, status, seconds in rows]
                    + [f"{'total':<{width}}  {'':<10}  {sum(r[2] for r in rows):7.1f}"]
                    + ([f"time budget {config.time_budget:.0f} s"] if end else [])),
          flush=True)
    return manifests


def stale_stages(config: PipelineConfig, workdir: str) -> Dict[str, str]:
    """{stage: why} for each finished stage of `workdir` that `config` would redo: its part
    of the config differs from its manifest's, or a stage it reads is redone."""
    stale = {}
    for spec in STAGES:
        manifest = wd.read_manifest(workdir, spec.name)
        if manifest is None:
            continue
        recorded = {k: v for k, v in manifest["inputs"].items()
                    if not k.endswith("_fingerprint")}
        if wd.input_hash(recorded) != wd.input_hash(spec.config_inputs(config)):
            stale[spec.name] = "its config changed"
        elif any(up in stale for up in spec.upstream):
            stale[spec.name] = "it reads " + ", ".join(u for u in spec.upstream if u in stale)
    return stale


def stage_states(config: PipelineConfig, workdir: str) -> Dict[str, str]:
    """{stage: "up to date", "not run" or "to redo (why)"} of `workdir` under `config`."""
    stale, states = stale_stages(config, workdir), {}
    for spec in STAGES:
        if wd.read_manifest(workdir, spec.name) is None:
            states[spec.name] = "not run"
        elif spec.name in stale:
            states[spec.name] = f"to redo ({stale[spec.name]})"
        elif _budget_stopped(workdir, spec.name, wd.read_manifest(workdir, spec.name)):
            states[spec.name] = ("stopped on its time budget; a rerun continues training "
                                 "from its checkpoint")
        else:
            try:
                current = _is_current(workdir, spec,
                                      wd.input_hash(stage_inputs(config, workdir, spec)))
            except PipelineError:  # A stage it reads has not finished.
                current = False
            states[spec.name] = ("up to date" if current else
                                 "to redo (a stage it reads, or its artifact, changed)")
    return states


def status_lines(workdir: str):
    """What `ovqvae status` prints: the workdir's recorded run and each stage's state, or
    None when the workdir records no run."""
    record = wd.read_run(workdir)
    if record is None:
        return None
    config = PipelineConfig.from_dict(record["config"])
    data, ae, prior = config.data, config.autoencoder, config.prior
    return [f"workdir {workdir}: recorded {record['recorded']}",
            f"  data: {data.source}{' at ' + data.path if data.path else ''}, "
            f"{'x'.join(map(str, ae.image_shape))} images, preset {config.preset}",
            f"  autoencoder: K={ae.code_length} codes of {ae.codebook_size} codewords, "
            f"{ae.epochs} epochs; prior: {prior.num_layers} layers, width {prior.width}, "
            f"{prior.epochs} epochs",
            *(f"  {name:<12} {state}" for name, state in stage_states(config, workdir).items())]
