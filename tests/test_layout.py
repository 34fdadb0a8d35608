"""The layout the architecture promises: no import cycles, a prior that knows nothing of the
autoencoder, one module that renames files, and a command line that explains itself."""

import ast
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO, ovqvae
from pipeline import cli, stages

PACKAGES = ("ordered_vqvae", "pipeline")


def _modules():
    """{dotted name: path} of every module of the two packages, subpackages included."""
    out = {}
    for package in PACKAGES:
        for directory, subdirs, names in os.walk(os.path.join(REPO, package)):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith(("_", ".")))
            dotted = os.path.relpath(directory, REPO).replace(os.sep, ".")
            for name in sorted(n for n in names if n.endswith(".py")):
                module = dotted if name == "__init__.py" else f"{dotted}.{name[:-3]}"
                out[module] = os.path.join(directory, name)
    return out


def _imports(path, modules):
    """The project modules a file imports anywhere in it (function-level imports too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from package import module` imports the module (a package's own submodules
            # re-exported by its __init__ are no cycle); `from module import name`, the module.
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in modules
                     else node.module for alias in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n not in PACKAGES}
    return found


def test_the_library_knows_nothing_of_its_pipeline_and_models_nothing_of_training(graph):
    library = [m for m in graph if m.startswith("ordered_vqvae")]
    assert len(library) >= 20
    assert {m: sorted(i for i in graph[m] if i.startswith("pipeline"))
            for m in library if any(i.startswith("pipeline") for i in graph[m])} == {}
    for module in ("ordered_vqvae.models", "ordered_vqvae.prior"):
        reach = _reachable(graph, module)
        assert not reach & {"ordered_vqvae.fit", "ordered_vqvae.training"}, (module, reach)


def test_no_module_is_longer_than_500_lines():
    lengths = {m: sum(1 for _ in open(path)) for m, path in _modules().items()}
    assert "pipeline.sources.mnist" in lengths and "pipeline.serving.engine" in lengths
    assert {m: n for m, n in lengths.items() if n > 500} == {}


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return {m: _imports(path, modules) for m, path in modules.items()}


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for nxt in graph[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_module_imports_itself_through_others(graph):
    assert len(graph) >= 20  # The walk found the packages.
    assert "ordered_vqvae.models" in graph["ordered_vqvae.training"]  # ... and their imports.
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert cycles == [], f"modules on an import cycle: {cycles}"


def test_the_prior_and_sampler_know_nothing_of_the_autoencoder(graph):
    for module in ("ordered_vqvae.prior", "ordered_vqvae.sampler"):
        reach = _reachable(graph, module)
        assert not reach & {"ordered_vqvae.models", "ordered_vqvae.training",
                            "ordered_vqvae.quantizer"}, (module, sorted(reach))
    assert "pipeline.stages" not in _reachable(graph, "pipeline.report")


def test_one_module_renames_files():
    pattern = re.compile(r"os\.replace\(|os\.rename\(|gfile\.rename\(")
    renaming = sorted(m for m, path in _modules().items() if pattern.search(open(path).read()))
    assert renaming == ["ordered_vqvae.atomic"]


def _clean_env():
    return {k: v for k, v in os.environ.items() if not k.startswith("TF_CPP")}


def test_help_lists_every_command_with_a_summary_and_no_tensorflow_lines():
    proc = ovqvae("--help", check_rc=0, env=_clean_env())
    assert proc.stderr == ""
    listed = re.findall(r"^  (\w+)  +(\S.*)$", proc.stdout, re.M)
    expected = ["demo", "run", "sample", "encode", "decode", "status", "serve", "experiments",
                "train_autoencoder", "extract", "train_prior", "export", "report"]
    assert [name for name, _ in listed] == expected
    assert [s.command for s in stages.STAGES] == expected[8:]  # Derived from the stages.
    assert all(len(summary) > 20 for _, summary in listed)


@pytest.mark.parametrize("command, flag, default", [
    ("sample", "num_codes", "unset"), ("sample", "temperature", "1.0"),
    ("train_autoencoder", "codebook_size", "unset"), ("train_prior", "prior_num_layers", "unset"),
    ("extract", "num_shards", "4"), ("run", "checkpoint_every", "500"),
    ("serve", "port", "8501"), ("serve", "model_name", "'ovqvae'"),
])
def test_command_help_lists_its_flags_with_defaults(command, flag, default):
    proc = ovqvae(command, "--help", check_rc=0, env=_clean_env())
    assert proc.stderr == ""
    assert proc.stdout.startswith(f"usage: ovqvae {command} ")
    assert re.search(rf"^  --{flag}  \(default: {re.escape(default)}[;)]", proc.stdout, re.M)
    flags = re.findall(r"^  --(\w+)  \(default", proc.stdout, re.M)
    assert flags == [f for group in cli.COMMANDS[command].groups for f in cli.GROUPS[group]
                     if f in flags] and len(flags) == len(set(flags))


def test_sample_help_shows_only_its_flags():
    out = ovqvae("sample", "--help", check_rc=0).stdout
    assert "--num_codes" in out and "--prior_num_layers" not in out and "--dataset" not in out


def test_a_command_prints_no_tensorflow_log_lines_unless_asked(finished_run, tmp_path):
    args = ("sample", f"--workdir={finished_run}", "--num_samples=2",
            f"--output={tmp_path / 'x.png'}")
    quiet = ovqvae(*args, check_rc=0, env=_clean_env())
    assert not re.search(r"^[IWE]\d{4} |oneDNN|cuInit|absl::InitializeLog", quiet.stderr, re.M), \
        quiet.stderr
    loud = ovqvae(*args, "--verbosity=0", check_rc=0, env=_clean_env())
    assert re.search(r"^[IWE]\d{4} ", loud.stderr, re.M), loud.stderr


def test_experiments_help_names_every_experiment():
    from pipeline import experiments

    help_text = " ".join(cli.FLAGS["experiments"].help.split())
    assert all(name in help_text for name in experiments.EXPERIMENTS), help_text


@pytest.mark.parametrize("given,expected", [
    (None, "--xla_cpu_prefer_vector_width=512"),
    ("--xla_dump_to=/tmp/x", "--xla_dump_to=/tmp/x --xla_cpu_prefer_vector_width=512"),
    ("--xla_cpu_prefer_vector_width=256", "--xla_cpu_prefer_vector_width=256"),
])
def test_xla_gets_wide_vectors_when_asked_and_importing_changes_nothing(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if given is not None:
        env["XLA_FLAGS"] = given
    out = subprocess.run([sys.executable, "-c", "import os, ordered_vqvae.xla as xla; "
                          "print(os.environ.get('XLA_FLAGS')); xla.prefer_wide_vectors(); "
                          "print(os.environ['XLA_FLAGS'])"], env=env, cwd=REPO,
                         capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:2] == [str(given), expected]
