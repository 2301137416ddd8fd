"""A results directory's stored runs as tidy tables (never from training)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from normbench import runner


def load_runs(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(metrics of all finished runs, one row of status per run)."""
    frames, status = [], []
    for run_dir in runner.finished_run_dirs(out):
        record = json.loads((run_dir / "provenance.json").read_text())
        frames.append(pd.read_csv(run_dir / "metrics.csv"))
        status.append({"backend": record["backend"], "variant": record["variant"]["name"], "seed": record["seed"],
                       "status": record["status"], "diverged_at_step": record.get("diverged_at_step"),
                       "train_time_s": record.get("train_time_s"), "device": record.get("device"),
                       "git_commit": record.get("git_commit")})
    if not frames:
        raise FileNotFoundError(f"{out}: no finished runs under {out}/runs; run `normbench run` or `normbench reproduce` first")
    return pd.concat(frames, ignore_index=True), pd.DataFrame(status)


def final_accuracy(metrics: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """Final test accuracy (percent) of every run that finished without diverging."""
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    test = metrics[metrics.split == "test"]
    last = test.loc[test.groupby(["backend", "variant", "seed"]).step.idxmax()]
    last = last.merge(ok, on=["backend", "variant", "seed"])
    return last.assign(accuracy_pct=100 * last.accuracy)[["backend", "variant", "seed", "step", "accuracy_pct"]]


def load_percentiles(out: Path) -> pd.DataFrame:
    """Percentile rows of every finished run that tracked layers (diverged runs included)."""
    frames = [pd.read_csv(d / "percentiles.csv") for d in runner.finished_run_dirs(out) if (d / "percentiles.csv").exists()]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=runner.PERCENTILE_COLUMNS)


def ok_only(frame: pd.DataFrame, status: pd.DataFrame) -> pd.DataFrame:
    """The rows of `frame` that belong to runs which finished without diverging."""
    ok = status[status.status == "ok"][["backend", "variant", "seed"]]
    return frame.merge(ok, on=["backend", "variant", "seed"])


def at_step(metrics: pd.DataFrame, split: str, step: int | None = None) -> pd.DataFrame:
    """One row per run: its evaluation at `step` (default: its last evaluation)."""
    d = metrics[metrics.split == split]
    if step is None:
        return d.loc[d.groupby(["backend", "variant", "seed"]).step.idxmax()]
    return d[d.step == step]
