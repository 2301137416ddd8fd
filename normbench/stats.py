"""Statistics for comparing backends' seed-to-seed distributions of a result."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

# Backends agree on a method when a two-sided Welch t-test cannot reject equal means at
# this level. Welch (unequal variances) because the spreads of two frameworks need not
# match; a 1% level because several method x pair tests are made per table.
AGREEMENT_ALPHA = 0.01


def welch_test(a, b) -> tuple[float, float]:
    """(t statistic, two-sided p-value) of Welch's unequal-variance t-test."""
    from scipy import stats

    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) < 2 or len(b) < 2:
        return float("nan"), float("nan")
    if np.var(a, ddof=1) == 0 and np.var(b, ddof=1) == 0:
        return (0.0, 1.0) if a.mean() == b.mean() else (float("inf"), 0.0)
    result = stats.ttest_ind(a, b, equal_var=False)
    return float(result.statistic), float(result.pvalue)


def backend_agreement(finals: pd.DataFrame, variant_order: list[str], value: str = "accuracy_pct") -> pd.DataFrame:
    """For each variant and backend pair: means, Welch p-value and whether they agree
    (`agree` is None where the test cannot be made: fewer than 2 runs on a side)."""
    rows = []
    for variant in variant_order:
        d = finals[finals.variant == variant]
        for left, right in itertools.combinations(sorted(d.backend.unique()), 2):
            a, b = d[d.backend == left][value], d[d.backend == right][value]
            t, p = welch_test(a, b)
            rows.append({"variant": variant, "pair": f"{left} vs {right}", "mean_left": a.mean(), "mean_right": b.mean(),
                         "n_left": len(a), "n_right": len(b), "welch_t": t, "p_value": p,
                         "agree": bool(p >= AGREEMENT_ALPHA) if not np.isnan(p) else None})
    return pd.DataFrame(rows)
