"""Tests for normbench.reporting and the experiments' own reports (normbench/experiments/):
tables, figures and the results index, built from small synthetic results directories
(fake runs written with runner.write_run, no training), including diverged runs and
missing backends."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pandas as pd
import pytest

from normbench import auxiliary_losses, cli, experiments, normalizations, reporting, runner, spec as spec_module
from normbench.experiments import mnist_cnn_features, mnist_cnn_weight_sweep
from normbench.identity import legacy_columns
from normbench.reporting import methods, plots

STARTED, FINISHED = "2026-01-02T10:00:00+00:00", "2026-01-02T10:00:30+00:00"


def fake_run(out, backend, variant, normalization, seed, curve, *, weight=0.0, steps=100, eval_every=50,
             diverged_at=None, percentiles=None):
    """Write one finished run. curve(step) -> (cross_entropy, accuracy); a diverged run
    keeps its evaluations before `diverged_at`. percentiles(step) -> {q: value} for conv3."""
    last = steps if diverged_at is None else diverged_at - 1
    evaluated = [s for s in range(0, steps + 1, eval_every) if s <= last]
    rows, prow = [], []
    for step in evaluated:
        for split, offset in (("train", 0.02), ("test", 0.0)):
            ce, acc = curve(step)
            rows.append({"backend": backend, "model": "cnn3", "variant": variant, "normalization": normalization,
                         "std_loss_weight": weight, "seed": seed, "step": step, "split": split,
                         "cross_entropy": ce - offset, "std_loss": 1.0, "accuracy": min(acc + offset, 1.0),
                         "wall_time_s": step / 100})
        if percentiles is not None:
            for q, value in percentiles(step).items():
                prow.append({"backend": backend, "variant": variant, "seed": seed, "step": step, "layer": "conv3",
                             "percentile": q, "value": value})
    status = "ok" if diverged_at is None else "diverged"
    record = {"run_key": f"{backend}-{variant}-{seed}", "spec_hash": "feedfacecafebeef", "backend": backend,
              "variant": {"name": variant, "normalization": normalization, "standardization_loss_weight": weight,
                          "steps": None},
              "seed": seed, "status": status, "diverged_at_step": diverged_at, "train_time_s": 12.5,
              "steps_completed": steps if diverged_at is None else diverged_at,
              "device": "cpu (2 threads)", "framework_versions": {backend: "9.9"}, "git_commit": "0123456789abcdef",
              "git_dirty": False, "normbench_version": "0.1.0", "python": "3.11.7", "numpy": "2.4.6",
              "hostname": "testbox", "cpu": "Test CPU", "cpu_count": 2, "started": STARTED, "finished": FINISHED,
              "data_files": {"train-images-idx3-ubyte": "ab" * 32}}
    runner.write_run(runner.run_dir_for(out, backend, spec_module.VariantSpec(variant, normalization, weight), seed),
                     {"rows": rows, "percentile_rows": prow}, record, tracked=percentiles is not None)


def mark(out, experiment):
    out.mkdir(parents=True, exist_ok=True)
    (out / "experiment.json").write_text(json.dumps({"experiment": experiment}))


def rising(final_accuracy, final_ce=0.5, steps=100):
    return lambda s: (2.3 - (2.3 - final_ce) * s / steps, 0.1 + (final_accuracy - 0.1) * s / steps)


def read_table(out):
    return (out / "table.md").read_text(), pd.read_csv(out / "table.csv")


def assert_figure(out, stem):
    for suffix in (".png", ".pdf"):
        path = out / f"{stem}{suffix}"
        assert path.exists() and path.stat().st_size > 1000, path


# ----------------------------------------------------------------------------- Figures 1 and 3


@pytest.fixture(scope="module")
def results_root(tmp_path_factory):
    """One results/ folder shared by the module's experiment fixtures (as the index sees it)."""
    return tmp_path_factory.mktemp("results")


@pytest.fixture(scope="module")
def curves_dir(results_root):
    """mnist-cnn with torch complete, jax missing a variant, tensorflow absent; one diverged run."""
    out = results_root / "mnist-cnn"
    mark(out, "mnist-cnn")
    methods = [("none", "none", 0.25), ("batch_norm", "batch_norm_shift", 0.86),
               ("standardization_loss", "standardization_loss", 0.60)]
    for backend in ("torch", "jax"):
        for variant, norm, acc in methods:
            if backend == "jax" and variant == "batch_norm":
                continue  # a backend missing a method
            for seed in range(3):
                diverged = 40 if (backend == "torch" and variant == "standardization_loss" and seed == 2) else None
                fake_run(out, backend, variant, norm, seed, rising(acc + 0.01 * seed), diverged_at=diverged)
    return out, reporting.build_report(out)


def test_curves_table_counts_diverged_runs_and_never_averages_them(curves_dir):
    out, built = curves_dir
    md, csv = read_table(out)
    row = csv[(csv.backend == "torch") & (csv.variant == "standardization_loss")].iloc[0]
    assert (row.n, row.diverged) == (2, 1)
    assert row["mean"] == pytest.approx(60.5)  # seeds 0 and 1 only: 60 and 61
    assert "diverged runs (1 here)" in md


def test_curves_report_handles_a_missing_backend_and_method(curves_dir):
    out, built = curves_dir
    _, csv = read_table(out)
    assert set(csv.backend) == {"torch", "jax"}
    assert not ((csv.backend == "jax") & (csv.variant == "batch_norm")).any()
    assert_figure(out, "curves")


def test_curves_table_states_differences_from_the_paper(curves_dir):
    out, _ = curves_dir
    md, csv = read_table(out)
    # standardization loss 60.5% is below the paper's 75.2 ± 2.6 band; none (25-27%) is inside 24.6 ± 6.5
    assert "**Differs from the paper:** standardization_loss on torch" in md
    assert "**Differs from the paper:** none on torch" not in md
    assert "3 seeds per variant and backend" in md
    assert "\\pm" in (out / "table.tex").read_text()


def test_mlp_table_says_the_paper_gives_no_numbers(tmp_path):
    out = tmp_path / "mnist-mlp"
    mark(out, "mnist-mlp")
    for seed in range(2):
        fake_run(out, "torch", "none", "none", seed, rising(0.5))
    built = reporting.build_report(out)
    assert "paper %" not in built["markdown"]
    assert "states no MLP numbers" in built["markdown"]


# ----------------------------------------------------------------------------- Figure 2 bottom


def points(weights, means, baseline_n=5, diverged=None):
    diverged = diverged or [0] * len(weights)
    return pd.DataFrame({"weight": weights, "mean": means, "n": [baseline_n - d for d in diverged], "diverged": diverged})


def test_collapse_starts_at_the_first_weight_above_the_best_below_the_baseline():
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.01, 0.1, 1, 3, 10], [40, 60, 75, 30, 10]), baseline_mean=35)
    assert a["best_weight"] == 1 and a["onset"] == 3
    assert a["drop_onset"] == 3  # 30 is more than 10 points below 75
    assert a["collapsed"] == {0.01: False, 0.1: False, 1.0: False, 3.0: True, 10.0: True}


def test_no_collapse_when_every_weight_beats_the_baseline():
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.1, 1, 10], [50, 75, 70]), baseline_mean=25)
    assert a["onset"] is None and a["drop_onset"] is None


def test_small_weights_below_the_baseline_are_not_a_collapse():
    # Below the baseline at small weights is "too weak to help", not the collapse the paper describes.
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.001, 0.01, 0.1, 1], [20, 30, 60, 55]), baseline_mean=25)
    assert a["best_weight"] == 0.1 and a["onset"] is None and not any(a["collapsed"].values())


def test_mostly_diverged_or_entirely_diverged_weights_collapse():
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.1, 1, 10], [60, 70, math.nan], diverged=[0, 0, 5]), baseline_mean=25)
    assert a["onset"] == 10
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.1, 1, 10], [60, 70, 65], diverged=[0, 0, 3]), baseline_mean=25)
    assert a["onset"] == 10  # 3 of 5 diverged, though the 2 left are fine
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.1, 1, 10], [60, 70, 65], diverged=[0, 0, 2]), baseline_mean=25)
    assert a["onset"] is None


def test_a_drop_from_the_best_is_reported_separately():
    a = mnist_cnn_weight_sweep.collapse_analysis(points([0.1, 1, 3, 10], [60, 80, 65, 40]), baseline_mean=25)
    assert a["onset"] is None and a["drop_onset"] == 3


@pytest.fixture(scope="module")
def sweep_dir(results_root):
    out = results_root / "mnist-cnn-weight-sweep"
    mark(out, "mnist-cnn-weight-sweep")
    accuracy = {0.001: 0.26, 0.01: 0.35, 0.1: 0.60, 1.0: 0.76, 3.0: 0.50, 10.0: 0.12}
    for seed in range(3):
        # 1000 steps, as in the paper: only then are the paper's Section 4.1 numbers compared.
        fake_run(out, "torch", "none", "none", seed, rising(0.25 + 0.01 * seed, steps=1000), steps=1000, eval_every=1000)
        fake_run(out, "torch", "batch_norm", "batch_norm_shift", seed, rising(0.86, steps=1000), steps=1000, eval_every=1000)
        for w, acc in accuracy.items():
            fake_run(out, "torch", f"std_loss_w{w:g}", "standardization_loss", seed, rising(acc + 0.01 * seed, steps=1000),
                     weight=w, steps=1000, eval_every=1000, diverged_at=(300 if (w == 10.0 and seed == 0) else None))
    return out, reporting.build_report(out)


def test_weight_sweep_table_states_where_the_collapse_starts(sweep_dir):
    out, built = sweep_dir
    md, csv = read_table(out)
    assert "**The collapse starts at weight 10**" in md  # 3.0 (51%) is above the none mean (26%)
    assert "drop of more than 10 points below the best starts at weight 3" in md
    assert "Collapse rule:" in md
    row = csv[csv.variant == "std_loss_w10"].iloc[0]
    assert (row.n, row.diverged, bool(row.collapsed)) == (2, 1, True)
    assert csv[csv.variant == "std_loss_w1"].iloc[0]["mean"] == pytest.approx(77.0)


def test_weight_sweep_figure_exists_with_references(sweep_dir):
    out, built = sweep_dir
    assert_figure(out, "accuracy_vs_weight")
    md, _ = read_table(out)
    assert "75.2 ± 2.6" in md  # the paper's weight-1.0 value beside std_loss_w1


# ----------------------------------------------------------------------------- Figure 2 top


def test_regularization_shift_at_equal_cross_entropy(tmp_path):
    out = tmp_path / "mnist-cnn-regularization"
    mark(out, "mnist-cnn-regularization")
    # none: accuracy = 1 - ce/2.5 along its 500-step trajectory; standardization loss lies 5 points above it.
    baseline = lambda s: (2.3 - 1.8 * s / 500, 1 - (2.3 - 1.8 * s / 500) / 2.5)
    shifted = lambda s: (2.3 - 1.0 * s / 100, 1 - (2.3 - 1.0 * s / 100) / 2.5 + 0.05)
    for seed in range(2):
        fake_run(out, "torch", "none", "none", seed, baseline, steps=500)
        fake_run(out, "torch", "standardization_loss", "standardization_loss", seed, shifted, weight=1.0)
    # A third run ends at a cross entropy (0.3) the baseline never reaches (0.5 at best): no shift for it.
    beyond = lambda s: (2.3 - 2.0 * s / 100, 0.9)
    fake_run(out, "torch", "standardization_loss", "standardization_loss", 2, beyond, weight=1.0)
    built = reporting.build_report(out)
    t = built["table"]
    sl = t[t.variant == "standardization_loss"].iloc[0]
    assert sl.delta_vs_none == pytest.approx(5.0) and sl.delta_vs_none_n == 2
    assert "5.0 ± 0.0 (2 of 3 runs in range)" in built["markdown"]
    # The paper saw no upward shift against the baseline; this one has 5 points of it.
    assert "**Differs from the paper** on torch: the standardization loss's shift at equal test cross entropy, " \
           "vs none 5.0 ± 0.0 points (upward; paper: none)" in built["markdown"]
    steps = sorted(t[t.variant == "none"].step)
    assert steps == [100, 500]  # the common budget and the baseline's own
    assert_figure(out, "cross_entropy_vs_accuracy")


# ----------------------------------------------------------------------------- Figure 4


@pytest.fixture(scope="module")
def features_dir(results_root):
    out = results_root / "mnist-cnn-features"
    mark(out, "mnist-cnn-features")
    spreads = {"none": 0.02, "batch_norm": 0.0, "standardization_loss": 0.002}
    norms = {"none": "none", "batch_norm": "batch_norm_shift", "standardization_loss": "standardization_loss"}
    for variant, growth in spreads.items():
        for seed in range(2):
            pct = lambda s, g=growth: {1: -1 - g * s, 20: -0.3, 80: 0.4 + g * s / 2, 99: 1.5 + g * s}
            fake_run(out, "torch", variant, norms[variant], seed, rising(0.8), steps=2000, eval_every=200,
                     percentiles=pct, diverged_at=(900 if (variant == "none" and seed == 1) else None))
    return out, reporting.build_report(out)


def test_percentile_figure_and_table(features_dir):
    out, built = features_dir
    assert_figure(out, "percentiles")
    _, csv = read_table(out)
    assert sorted(csv.step.unique()) == [0, 1000, 2000]
    none_end = csv[(csv.variant == "none") & (csv.step == 2000)].iloc[0]
    assert none_end.n == 1  # the diverged seed is not averaged
    assert none_end.p99 == pytest.approx(1.5 + 0.02 * 2000)
    assert none_end.width == pytest.approx(2.5 + 0.04 * 2000)
    md = built["markdown"]
    assert "width at steps 0, 1000, 2000: none (torch): 2.50 → 42.50 → 82.50 (× 1.94 from step 1000 to step 2000)" in md
    assert "8.6K steps" in md
    tex = (out / "table.tex").read_text()
    assert "99th $-$ 1st" in tex and "standardization\\_loss" in tex and "±" not in tex


def test_percentile_panels_follow_the_paper_and_its_colours():
    found = methods.variant_methods({"none": "none", "batch_norm": "batch_norm_shift", "sl": "standardization_loss"})
    order = mnist_cnn_features.feature_panel_order(["none", "batch_norm", "sl"], found)
    assert order == ["none", "sl", "batch_norm"]
    assert mnist_cnn_features.PERCENTILE_COLORS == {1: "#000000", 20: "#0072B2", 80: "#009E73", 99: "#D55E00"}
    assert [plots.ordinal(q) for q in (1, 2, 3, 11, 20, 99)] == ["1st", "2nd", "3rd", "11th", "20th", "99th"]


# ----------------------------------------------------------------------------- methods, colours and labels


def test_published_methods_keep_the_papers_colours_and_labels():
    found = methods.variant_methods({"none": "none", "batch_norm": "batch_norm_shift", "sl": "standardization_loss",
                                     "bn2": "batch_norm_scale_shift", "mystery": "made_up"})
    assert plots.variant_colors(["none", "sl", "batch_norm"], found) == {
        "none": "#000000", "sl": "#D55E00", "batch_norm": "#0072B2"}  # Okabe-Ito, the paper's roles
    assert [found[v].label for v in ("none", "batch_norm", "sl")] == [
        "no normalization", "batch norm", "standardization loss"]
    # A second variant of a method already shown, and a variant of no known method, take extra colours.
    colors = plots.variant_colors(["batch_norm", "bn2", "mystery"], found)
    assert colors["batch_norm"] == "#0072B2" and len({*colors.values()}) == 3
    assert found["mystery"] is None


def test_a_newer_variant_is_found_through_the_resolved_spec():
    spec = spec_module.loads("""
name = "new"
model = "cnn3"
dataset = "mnist"
batch_size = 8
steps = 10
eval_every = 5
seeds = 1
[optimizer]
name = "sgd"
learning_rate = 0.1
[[variant]]
name = "bn_plus_sl"
normalization = { name = "batch_norm", scale = false }
auxiliary_losses = [{ name = "standardization", weight = 0.5 }]
[[variant]]
name = "sl_affine"
affine = true
auxiliary_losses = [{ name = "standardization", weight = 0.5 }]
""")
    columns = {v.name: v.label for v in spec.variants}  # what metrics.csv records for variants older specs could not write
    assert all(legacy_columns(v) is None for v in spec.variants)
    found = methods.variant_methods(columns, spec)
    assert found["bn_plus_sl"].key == ("normalization", "batch_norm")
    assert found["sl_affine"].key == ("auxiliary_loss", "standardization")
    assert methods.variant_methods(columns)["sl_affine"] is None  # without the spec, a label alone says nothing


def test_the_reporting_package_names_no_method():
    """Colours, labels and roles come from the registries and the experiments, never from the shared code."""
    named = set(normalizations.names()) | set(auxiliary_losses.names())
    named |= set(normalizations.shorthands()) | set(auxiliary_losses.normalization_shorthands())
    for path in sorted(Path(reporting.__file__).parent.glob("*.py")):
        literals = {n.value for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Constant)}
        assert not literals & named, f"{path.name} names {sorted(literals & named)}"


# ----------------------------------------------------------------------------- index and CLI


def test_index_embeds_figures_tables_cost_and_provenance(results_root, curves_dir, sweep_dir, features_dir):
    root = results_root
    path = reporting.write_index(root)
    text = path.read_text()
    assert "![mnist-cnn: curves](mnist-cnn/curves.png)" in text
    assert (curves_dir[0] / "table.md").read_text().strip() in text
    # the fake runs used 3 seeds of 100 steps, not the spec's 10 of 1000: the command says so
    assert "`normbench reproduce mnist-cnn --backend torch --backend jax --seeds 3 --steps 100`" in text
    assert "`normbench reproduce mnist-cnn-weight-sweep --backend torch --seeds 3`" in text
    assert "on testbox: Test CPU, 2 cores" in text and "git commit 0123456789ab" in text
    assert "## mnist-mlp" in text and "Not run yet" in text
    assert "![mnist-cnn-features: percentiles](mnist-cnn-features/percentiles.png)" in text
    assert "jax 9.9" in text and "torch 9.9" in text


def test_report_command_rebuilds_a_results_root(tmp_path, capsys):
    out = tmp_path / "results" / "mnist-mlp"
    mark(out, "mnist-mlp")
    fake_run(out, "torch", "none", "none", 0, rising(0.5))
    assert reporting.is_results_root(tmp_path / "results") and not reporting.is_results_root(out)
    assert cli.main(["report", str(tmp_path / "results")]) == 0
    assert (out / "curves.png").exists() and (tmp_path / "results" / "README.md").exists()
    assert cli.main(["report", str(out)]) == 0  # one experiment: its report and the index beside it
    assert "updated" in capsys.readouterr().out


def test_every_experiment_has_a_bundled_spec_and_a_report():
    bundled = spec_module.bundled_specs()
    assert experiments.names() == ["mnist-cnn", "mnist-cnn-regularization", "mnist-cnn-weight-sweep", "mnist-mlp",
                                   "mnist-cnn-features", "pointnet-mnist", "inception-fashion", "mobilenet-batch-size",
                                   "resnet-fashion", "mnist-norms", "mnist-speedup"]
    # the paper's order: Figures 1, 2 top, 2 bottom, 3, 4, 5, 6, 7, then Table 1; then beyond it
    for name, e in experiments.by_name().items():
        assert e.spec in bundled and (e.report is None or callable(e.report))
        s = spec_module.load(e.spec)
        # each variant as metrics.csv records it (variants older specs could not write: their label)
        columns = {(legacy_columns(v) or (v.label,))[0] for v in s.variants}
        if name == "mnist-cnn-features":
            assert s.track_percentiles and e.report is mnist_cnn_features.report
        if name == "mnist-cnn-weight-sweep":
            ws = sorted(v.auxiliary_loss("standardization").option("weight") for v in s.variants
                        if v.auxiliary_loss("standardization") is not None)
            assert len(ws) >= 9 and ws[0] == 0.001 and 10 in ws  # the paper's range, [0.001, 10], at least
            assert columns >= {"none", "batch_norm_shift"} and e.report is mnist_cnn_weight_sweep.report
        if name == "mnist-cnn-regularization":
            assert any(legacy_columns(v)[0] == "none" and s.steps_for(v) == 5000 for v in s.variants)
            assert e.report is not None
        for variant in e.paper_test_accuracy:
            assert variant in {v.name for v in s.variants}
    with pytest.raises(KeyError, match="unknown experiment 'nope'; choose from mnist-cnn, "):
        experiments.get("nope")


def test_index_flags_incomplete_experiments_and_keeps_recorded_overrides(tmp_path):
    out = tmp_path / "results" / "mnist-mlp"
    mark(out, "mnist-mlp")
    (out / "experiment.json").write_text(json.dumps({"experiment": "mnist-mlp",
                                                     "command": "normbench reproduce mnist-mlp --backend tf --seeds 2 --no-progress"}))
    fake_run(out, "tensorflow", "none", "none", 0, rising(0.5))
    reporting.build_report(out)
    text = reporting.write_index(tmp_path / "results").read_text()
    assert "| 1 of 6 runs: **incomplete** |" in text  # 3 variants x 2 seeds x 1 backend
    assert "`normbench reproduce mnist-mlp --backend tensorflow --seeds 2`" in text


@pytest.mark.parametrize("steps", [100, 1000])
def test_a_run_with_an_overridden_budget_is_titled_so_and_never_compared_with_the_paper(tmp_path, steps):
    out = tmp_path / "mnist-cnn"
    mark(out, "mnist-cnn")
    resolved = spec_module.load("mnist-cnn").replace(steps=steps, eval_every=50, seeds=1)
    (out / "spec.toml").write_text(spec_module.to_toml(resolved))
    for variant, norm, acc in [("none", "none", 0.25), ("batch_norm", "batch_norm_shift", 0.86),
                               ("standardization_loss", "standardization_loss", 0.75)]:
        fake_run(out, "torch", variant, norm, 0, rising(acc, steps=steps), steps=steps)
    md = reporting.build_report(out)["markdown"]
    paper_bn = "85.6 ± 1.1"  # the paper's batch-norm CNN result (Section 4.1), stated for 1000 steps
    if steps == 1000:
        assert "budget overridden" not in md.lower() and paper_bn in md
    else:
        assert "[budget overridden: 100 steps]" in md and "**Training budget overridden** (`--steps 100`)" in md
        assert paper_bn not in md


def test_backend_agreement_with_one_run_a_side_is_not_called_a_disagreement():
    from normbench import stats

    finals = pd.DataFrame({"variant": ["bn"] * 5, "backend": ["torch", "jax", "jax", "tensorflow", "tensorflow"],
                           "accuracy_pct": [85.0, 85.0, 85.2, 85.1, 84.9]})
    table = stats.backend_agreement(finals, ["bn"])
    verdict = dict(zip(table.pair, table.agree))
    assert verdict["jax vs tensorflow"] is True
    assert verdict["jax vs torch"] is None and verdict["tensorflow vs torch"] is None  # torch has one run
    md = reporting.agreement_markdown(table)
    assert "| bn | jax vs torch | 85.10 vs 85.00 | 2 vs 1 | nan | nan | n/a (needs 2 runs a side) |" in md
    assert "**no**" not in md
