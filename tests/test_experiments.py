"""The experiment runner on the embedded digits, with a shrunk budget."""

import json
import os

import numpy as np
import pytest

from pipeline import experiments
from pipeline.experiments import measure
from pipeline.config import pipeline_preset

TINY_AE = dict(hidden=(16,), latent_channels=8, codebook_size=32, epochs=3)
TINY_PRIOR = dict(num_layers=1, num_heads=2, width=32, ffn_width=64, epochs=3, warmup_steps=20)


def _config(names, prior=None, **kw):
    base = pipeline_preset("digits", autoencoder_overrides=TINY_AE,
                           prior_overrides={**TINY_PRIOR, **(prior or {})})
    return experiments.ExperimentConfig(base=base, names=names, eval_samples=300,
                                        classifier_epochs=10, **kw)


def test_ordered_unordered_time_channel_spatial_and_priority(tmp_path):
    workdir = str(tmp_path / "exp")
    names = ("ordered_vs_unordered", "time", "channel_vs_spatial", "priority_code")
    results = experiments.run(_config(names), workdir)
    out = os.path.join(workdir, "experiments")
    for name in ("experiments.md", "experiments.json", "fd_vs_codes.png", "mse_vs_codes.png",
                 "time_vs_codes.png", "channel_vs_spatial.png", "priority_code.png",
                 "ordered_vs_unordered_samples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 100, name
    assert sorted(os.listdir(os.path.join(workdir, "variants"))) == ["ordered", "spatial", "unordered"]
    lengths = results["lengths"]
    assert lengths == [1, 2, 4, 5, 6, 8]
    ordered, unordered = results["variants"]["ordered"], results["variants"]["unordered"]
    assert sorted(ordered["fd"]) == lengths and ordered["fid"] == {}
    assert all(np.isfinite(v) for r in (ordered, unordered) for v in r["fd"].values())
    # The paper's claim: the ordered model reconstructs better from a short prefix, and
    # its error falls with k.
    assert ordered["mse"][2] < unordered["mse"][2]
    # Cutting to a quarter of the code costs the ordered model far less of its quality
    # (on this 3-epoch budget, 12% against 35% more error).
    cost = {n: r["mse"][2] / r["mse"][8] for n, r in (("o", ordered), ("u", unordered))}
    assert cost["o"] - 1 < 0.6 * (cost["u"] - 1), cost
    assert ordered["fd"][2] < unordered["fd"][2]
    # Reconstructions alone, the floor's own training images: the same from a fresh encode,
    # decode and classifier pass here, and, as the MSE says, closer from a short prefix.
    from ordered_vqvae import metrics, models

    cfg = _config(names)
    real = np.concatenate(list(cfg.base.data.image_batches("train", sample=300)))
    test_x = cfg.base.data.arrays("test")[0]
    clf = metrics.DomainClassifier.load(os.path.join(workdir, "classifier"), test_x.shape[1:])
    ae = models.load_autoencoder(os.path.join(workdir, "variants", "ordered", "autoencoder"))
    recon = ae.decode(ae.encode(real), 4).numpy()
    assert ordered["recon_fd"][4] == pytest.approx(
        metrics.frechet_distance_of(clf.features(recon), clf.features(test_x)), rel=1e-4)
    assert results["real_fd"] == pytest.approx(
        metrics.frechet_distance_of(clf.features(real), clf.features(test_x)), rel=1e-4)
    assert ordered["recon_fd"][2] < unordered["recon_fd"][2]
    mse = [ordered["mse"][k] for k in lengths]
    assert all(b <= a * 1.02 for a, b in zip(mse, mse[1:])), mse
    assert results["classifier_accuracy"] > 0.8
    assert sorted(results["sampling_seconds"]) == lengths
    saved = json.load(open(os.path.join(out, "experiments.json")))
    assert saved["code_length"] == 8 and "FID not computed" in saved["fid_note"]
    # A rerun reuses every variant: no stage of "ordered" runs again.
    manifests = os.path.join(workdir, "variants", "ordered", "manifests")
    finished = {n: json.load(open(os.path.join(manifests, n)))["finished"]
                for n in sorted(os.listdir(manifests))}
    assert sorted(finished) == ["autoencoder.json", "extract.json", "prior.json"]
    experiments.run(_config(("priority_code",)), workdir)
    assert {n: json.load(open(os.path.join(manifests, n)))["finished"] for n in finished} == finished
    with pytest.raises(ValueError, match="unknown experiment"):
        experiments.run(_config(("nonsense",)), workdir)


@pytest.mark.slow
def test_ablations_cover_every_truncation_and_two_sizes(tmp_path):
    results = experiments.run(_config(("ablations",), ablation_max_train=600, ablation_epochs=2),
                              str(tmp_path / "exp"))
    names = sorted(results["variants"])
    assert names == ["ablate-all", "ablate-geometric", "ablate-narrow", "ablate-uniform",
                     "ablate-uniform_per_example", "ablate-wide"]
    for png in ("ablation_truncation_fd.png", "ablation_size_mse.png"):
        assert os.path.exists(os.path.join(str(tmp_path / "exp"), "experiments", png))


@pytest.mark.slow  # Fourteen variants: `make test` runs it, Bazel's fast subset does not.
def test_ordering_price_compares_variants_on_one_budget_against_the_goals(tmp_path):
    workdir = str(tmp_path / "exp")
    results = experiments.run(_config(("ordering_price",)), workdir)
    price = results["price"]
    assert list(price) == ["ordered", "price-paper", "price-pretrain", "price-full_share",
                           "price-full_share_90", "price-ema_restarts", "price-longer",
                           "price-learned_share_50", "price-learned_share_75",
                           "price-learned_share_90", "price-learned_power_1",
                           "price-learned_power_2", "price-learned_power_5"]
    K = results["code_length"]
    unordered = results["variants"]["unordered"]
    for name, goals in price.items():
        row = results["variants"][name]
        assert 0 < row["usage"] <= 1 and 1 <= row["perplexity"] <= 32
        expected = [row["fd"][2] / unordered["fd"][2], row["fd"][5] / row["fd"][K],
                    row["fd"][K] / unordered["fd"][K], row["mse"][K] / unordered["mse"][K],
                    row["fd"][K] / results["real_fd"]]
        np.testing.assert_allclose([g["ratio"] for g in goals.values()], expected, rtol=1e-9)
        assert [g["met"] for g in goals.values()] == [
            r <= g["limit"] for r, g in zip(expected, goals.values())]
    assert 0 < results["real_fd"] < min(r["fd"][K] for r in results["variants"].values())
    md = open(os.path.join(workdir, "experiments", "experiments.md")).read()
    # Same autoencoder epochs (3) for every variant but the longer one; pretrain splits them.
    for name, epochs in (("unordered", 3), ("price-pretrain", 3), ("price-longer", 6)):
        assert f"| {name} | {epochs} | " in md
    config = json.load(open(os.path.join(workdir, "variants", "price-pretrain", "autoencoder",
                                         "autoencoder.json")))
    assert (config["pretrain_epochs"], config["epochs"]) == (1, 2)
    assert (config["full_code_share"], config["fill"]) == (0.0, "zeros")  # The paper's recipe.
    config = json.load(open(os.path.join(workdir, "variants", "price-learned_power_2",
                                         "autoencoder", "autoencoder.json")))
    assert (config["length_power"], config["fill"], config["full_code_share"]) == (2, "learned", 0)
    for figure in ("price_fd.png", "price_rate.png"):
        assert os.path.getsize(os.path.join(workdir, "experiments", figure)) > 100


@pytest.mark.slow  # Seven priors: `make test` runs it, Bazel's fast subset does not.
def test_prior_size_trains_each_prior_on_the_ordered_models_codes(tmp_path):
    workdir = str(tmp_path / "exp")
    results = experiments.run(_config(("prior_size",), prior={"max_train_sequences": 400}),
                              workdir)
    study = ["prior-wide", "prior-deep", "prior-longer", "prior-lr_x2", "prior-no_dropout",
             "prior-all_sequences"]
    assert list(results["variants"]) == ["ordered", *study]
    variants = os.path.join(workdir, "variants")

    def manifest(name, stage):
        return json.load(open(os.path.join(variants, name, "manifests", f"{stage}.json")))

    expected = {"prior-wide": dict(width=64, ffn_width=128), "prior-deep": dict(num_layers=2),
                "prior-longer": dict(epochs=6), "prior-lr_x2": dict(learning_rate=2e-3),
                "prior-no_dropout": dict(dropout=0.0),
                "prior-all_sequences": dict(max_train_sequences=0)}
    base = manifest("ordered", "prior")["config"]["prior"]
    assert base["max_train_sequences"] == 400
    for name in study:
        # One autoencoder and one set of codes, copied, not retrained.
        for stage in ("autoencoder", "extract"):
            assert manifest(name, stage) == manifest("ordered", stage), (name, stage)
        prior = manifest(name, "prior")["config"]["prior"]
        assert {k: v for k, v in prior.items() if base[k] != v} == expected[name], name
    for name, row in results["variants"].items():
        assert 0 < row["val_bits_per_code"] < 5.0 and row["prior_seconds"] > 0, name  # 5 = log2(32)
    md = open(os.path.join(workdir, "experiments", "experiments.md")).read()
    assert "| prior-wide | 1 | 64 | 128 | 3 | 400 | 0.001 | 0.1 | " in md
    assert "| prior-all_sequences | 1 | 32 | 64 | 3 | all | " in md
    table = [line for line in md[md.index("## 7."):].splitlines() if line.startswith("|")]
    assert len({line.count("|") for line in table}) == 1, table  # Header, rule, rows agree.
    assert os.path.getsize(os.path.join(workdir, "experiments", "prior_size_fd.png")) > 100


def test_a_prior_variant_recopies_the_ordered_models_stages_when_they_change(tmp_path):
    from ordered_vqvae.atomic import write_json
    from pipeline import stages, workdir as wd

    source, target = str(tmp_path / "ordered"), str(tmp_path / "prior-wide")

    def finish(workdir, text):
        wd.prepare(workdir)
        for stage in ("autoencoder", "extract"):
            os.makedirs(stages.artifact_path(workdir, stage), exist_ok=True)
            with open(os.path.join(stages.artifact_path(workdir, stage), "f"), "w") as f:
                f.write(text)
            write_json(wd.manifest_path(workdir, stage), {"stage": stage, "text": text})

    def held(workdir):
        return [(wd.read_manifest(workdir, s),
                 open(os.path.join(stages.artifact_path(workdir, s), "f")).read())
                for s in ("autoencoder", "extract")]

    finish(source, "first")
    measure.share_upstream(source, target)
    assert held(target) == held(source)
    finish(source, "second")  # The ordered model was retrained.
    measure.share_upstream(source, target)
    assert held(target) == held(source) and held(target)[0][1] == "second"


def test_many_curves_stay_apart_and_their_legend_beside_the_axes():
    from ordered_vqvae import figures

    curves = {f"v{i}": {1: i + 1.0, 2: i + 2.0} for i in range(13)}
    fig = figures.curves_figure(curves, "k", "FD", logy=True)
    ax = fig.axes[0]
    styles = {(line.get_color(), line.get_linestyle(), line.get_marker()) for line in ax.lines}
    assert len(ax.lines) == 13 and len(styles) == 13
    legend = ax.get_legend()
    assert [t.get_text() for t in legend.get_texts()] == list(curves)
    fig.canvas.draw()
    assert legend.get_window_extent().x0 > ax.get_window_extent().x1  # Right of the axes.
    few = figures.curves_figure({"a": {1: 1.0}, "b": {1: 2.0}}, "k", "FD").axes[0]
    few.figure.canvas.draw()
    assert few.get_legend().get_window_extent().x1 <= few.get_window_extent().x1
    figures._pyplot().close("all")


def test_scatter_figure_puts_every_named_point_in_every_panel():
    from ordered_vqvae import figures

    points = {"unordered": (4.56, 0.0043, 36.8), "ordered": (3.39, 0.0068, 11.7),
              "k^5": (4.57, 0.0046, 31.7)}
    fig = figures.scatter_figure(points, "bits per code", ("MSE", "FD"), "rate")
    assert len(fig.axes) == 2
    for j, ax in enumerate(fig.axes):
        assert ax.get_ylabel() == ("MSE", "FD")[j]
        assert [t.get_text() for t in ax.texts] == list(points)
        plotted = [(line.get_xdata()[0], line.get_ydata()[0]) for line in ax.lines]
        assert plotted == [(v[0], v[j + 1]) for v in points.values()]
    figures._pyplot().close("all")


def test_scatter_figure_labels_of_a_cluster_do_not_cover_each_other():
    from matplotlib.text import Text

    from ordered_vqvae import figures

    # The price study's crowded corner: four recipes within 0.4 bits and 0.5 FD.
    points = {"learned_power_1": (4.01, 20.0), "learned_power_2": (4.21, 19.9),
              "full_share_90": (4.32, 19.9), "learned_share_90": (4.39, 19.5),
              "ordered": (3.39, 11.7), "unordered": (4.56, 36.8)}
    fig = figures.scatter_figure(points, "bits per code", ("FD",))
    ax, renderer = fig.axes[0], fig.canvas.get_renderer()
    boxes = []
    for text in ax.texts:
        text.update_positions(renderer)
        boxes.append(Text.get_window_extent(text, renderer))
    assert [t.get_text() for t in ax.texts] == list(points)
    inside = ax.get_window_extent(renderer)
    for i, box in enumerate(boxes):
        assert inside.x0 <= box.x0 and box.x1 <= inside.x1, ax.texts[i].get_text()
        for other in boxes[:i]:
            assert not box.overlaps(other), ax.texts[i].get_text()
    figures._pyplot().close("all")
