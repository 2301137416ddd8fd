"""`build_report`: a results directory's tables and figures, rebuilt from its stored metrics."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pandas as pd

from normbench import experiments, runner
from normbench import spec as spec_module
from normbench.reporting import curves, plots
from normbench.reporting.methods import Method, variant_methods
from normbench.reporting.runs import load_runs


@dataclasses.dataclass
class Results:
    """What a report function reads: one results directory's runs, in declared variant order."""

    out: Path
    experiment: experiments.Experiment | None  # None: results of no named experiment
    metrics: pd.DataFrame  # every evaluation of every finished run (metrics.csv rows)
    status: pd.DataFrame  # one row per run: backend, variant, seed, status, ...
    variant_order: list[str]
    title: str
    spec: spec_module.ExperimentSpec | None  # the resolved spec the runs were made with, if recorded
    methods: dict[str, Method | None]  # variant -> its method (registry plugin), None when unknown

    def colors(self, variants: list[str]) -> dict[str, str]:
        """variant -> colour, from its method's plugin (see `plots.variant_colors`)."""
        return plots.variant_colors(variants, self.methods)


def build_report(out: str | Path, experiment_name: str | None = None) -> dict:
    """Rebuild tables and figures of a results directory from its stored metrics.

    Writes table.md / table.tex / table.csv and the report's figures (PNG and PDF); the
    experiment's own report function draws them, or the shared curves report. Diverged
    runs are counted and listed, never averaged into a mean."""
    out = Path(out)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such results directory")
    meta_path = out / "experiment.json"
    if experiment_name is None and meta_path.exists():
        experiment_name = json.loads(meta_path.read_text()).get("experiment")
    experiment = experiments.get(experiment_name) if experiment_name in experiments.names() else None
    metrics, status = load_runs(out)
    variant_order = list(dict.fromkeys([*metrics.variant, *status.variant]))  # status: also runs with no finite row
    ran = None
    spec_path = out / "spec.toml"
    if spec_path.exists():
        ran = spec_module.load(spec_path)  # the resolved spec the runs were made with
        declared = [v.name for v in ran.variants]
        variant_order = [v for v in declared if v in set(variant_order)] + [v for v in variant_order if v not in declared]
        if experiment is not None:
            experiment = _with_budget_override(experiment, ran)
    title = experiment.title if experiment else f"results in {out.name}"
    runner.collect(out)
    results = Results(out=out, experiment=experiment, metrics=metrics, status=status, variant_order=variant_order,
                      title=title, spec=ran, methods=variant_methods(dict(zip(metrics.variant, metrics.normalization)), ran))
    report = experiment.report if experiment is not None and experiment.report is not None else curves.report
    built = report(results)
    (out / "table.md").write_text(built["markdown"])
    (out / "table.tex").write_text(built["latex"])
    built["table"].to_csv(out / "table.csv", index=False, float_format="%.4f")
    return {**built, "status": status}


def _with_budget_override(experiment, ran):
    """`experiment` as the runs in `ran` (their resolved spec) can honestly be reported:
    when `--steps` changed the training budget, the title says so and the paper's
    numbers, all stated for the experiment's own budget, are not compared."""
    planned = spec_module.load(experiment.spec)
    budgets = lambda s: [s.steps_for(v) for v in s.variants]
    if budgets(ran) == budgets(planned):
        return experiment
    note = (f"**Training budget overridden** (`--steps {ran.steps}`): these runs are not the experiment's "
            f"{planned.steps}-step budget, so its title's step count does not apply and the paper's numbers are not "
            "compared; run without `--steps` to reproduce the paper's setting.")
    return dataclasses.replace(experiment, title=f"{experiment.title} [budget overridden: {ran.steps} steps]",
                               paper_test_accuracy={}, notes=(note, *experiment.notes))
