"""The speed-up metric (normbench.reporting.speedup) on curves whose answer is known."""

import math

import pandas as pd
import pytest

from normbench.reporting import speedup


def _runs(curves: dict, backend="torch", time_per_step=None):
    """metrics and status frames from {(variant, seed): [(step, accuracy), ...]}."""
    rows, status = [], []
    for (variant, seed), points in curves.items():
        per_step = (time_per_step or {}).get(variant, 0.01)
        for step, accuracy in points:
            for split in ("test", "train"):
                rows.append({"backend": backend, "variant": variant, "seed": seed, "step": step, "split": split,
                             "accuracy": accuracy if split == "test" else 0.0, "wall_time_s": step * per_step})
        status.append({"backend": backend, "variant": variant, "seed": seed, "status": "ok"})
    return pd.DataFrame(rows), pd.DataFrame(status)


def _linear(rate, steps=range(0, 1001, 10), cap=1.0):
    return [(s, min(cap, rate * s)) for s in steps]


def test_speedup_is_baseline_steps_over_method_steps_at_the_baselines_best():
    # Baseline climbs to 0.5 at step 1000; the method climbs four times as fast.
    metrics, status = _runs({("none", 0): _linear(0.0005), ("bn", 0): _linear(0.002)})
    table = speedup.speedup_table(metrics, status, "none", ["none", "bn"]).set_index("variant")
    assert table.loc["none", "target"] == pytest.approx(0.5)
    assert table.loc["none", "steps"] == 1000 and table.loc["none", "speedup"] == pytest.approx(1.0)
    assert table.loc["bn", "steps"] == 250 and table.loc["bn", "resolution"] == 10
    assert table.loc["bn", "speedup"] == pytest.approx(4.0)


def test_time_speedup_charges_a_methods_slower_steps():
    metrics, status = _runs({("none", 0): _linear(0.0005), ("std", 0): _linear(0.002)},
                            time_per_step={"none": 0.01, "std": 0.02})
    row = speedup.speedup_table(metrics, status, "none", ["std"]).iloc[0]
    assert row.speedup == pytest.approx(4.0)
    assert row.time_speedup == pytest.approx(2.0)


def test_a_method_that_never_reaches_the_target_says_so_and_never_reports_the_budget():
    metrics, status = _runs({("none", 0): _linear(0.0005), ("slow", 0): _linear(0.0001)})
    table = speedup.speedup_table(metrics, status, "none", ["none", "slow"])
    slow = table[table.variant == "slow"].iloc[0]
    assert math.isnan(slow.steps) and math.isnan(slow.speedup) and slow.seeds_reached == 0
    markdown, latex = speedup.render(table, "t", "none", None)
    assert "not reached within 1000" in markdown
    assert "| slow | torch | 50.00 | not reached within 1000 |" in markdown


def test_mean_curve_and_per_seed_spread():
    # Two seeds of the method: one 2x, one 8x as fast as the baseline to its best (0.4 at step 800).
    metrics, status = _runs({("none", 0): _linear(0.0005, range(0, 801, 10)),
                             ("m", 0): _linear(0.001, range(0, 801, 10)), ("m", 1): _linear(0.004, range(0, 801, 10))})
    row = speedup.speedup_table(metrics, status, "none", ["m"]).iloc[0]
    assert (row.seed_speedup_min, row.seed_speedup_max) == (pytest.approx(2.0), pytest.approx(8.0))
    # The mean curve is 0.0025 * step (until seed 1 caps at 1.0): reaches 0.4 at step 160.
    assert row.steps == 160 and row.speedup == pytest.approx(5.0) and row.seeds_reached == 2


def test_diverged_runs_are_left_out_and_a_fixed_target_is_honoured():
    metrics, status = _runs({("none", 0): _linear(0.0005), ("m", 0): _linear(0.001), ("m", 1): _linear(0.01)})
    status.loc[(status.variant == "m") & (status.seed == 1), "status"] = "diverged"
    row = speedup.speedup_table(metrics, status, "none", ["m"], target=0.3).iloc[0]
    assert row.target == 0.3 and row.seeds == 1 and row.steps == 300 and row.speedup == pytest.approx(2.0)


def test_each_backend_has_its_own_baseline_target():
    m1, s1 = _runs({("none", 0): _linear(0.0005), ("m", 0): _linear(0.001)}, backend="torch")
    m2, s2 = _runs({("none", 0): _linear(0.0004), ("m", 0): _linear(0.001)}, backend="jax")
    table = speedup.speedup_table(pd.concat([m1, m2]), pd.concat([s1, s2]), "none", ["m"]).set_index("backend")
    assert table.loc["torch", "target"] == pytest.approx(0.5) and table.loc["jax", "target"] == pytest.approx(0.4)
    assert table.loc["torch", "steps"] == 500 and table.loc["jax", "steps"] == 400


def test_coarse_resolution_is_noted():
    steps = [0, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000]
    metrics, status = _runs({("none", 0): _linear(0.0005, steps), ("fast", 0): _linear(0.01, steps)})
    table = speedup.speedup_table(metrics, status, "none", ["fast"])
    assert table.iloc[0].steps == 100 and table.iloc[0].resolution == 100
    assert any("Coarse step resolution" in n and "fast (torch)" in n for n in speedup.resolution_notes(table))


def test_speedup_curve_rises_to_the_target():
    metrics, status = _runs({("none", 0): _linear(0.0005), ("bn", 0): _linear(0.002)})
    curve = speedup.speedup_curve(metrics, status, "none", ["bn"], levels=5)
    assert len(curve) == 5 and curve.level.max() == pytest.approx(0.5)
    # Linear curves through the origin: 4x wherever the evaluation grid (every 10 steps)
    # resolves the method's crossing; at the lowest level both cross before step 10.
    resolved = curve[curve.level >= 0.2]
    assert len(resolved) == 3 and resolved.speedup.to_numpy() == pytest.approx([4.0] * 3, rel=0.05)
    assert curve.speedup.iloc[0] == pytest.approx(1.0)
