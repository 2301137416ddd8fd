"""Tables: formatting numbers, Markdown and LaTeX rendering, and the notes printed under
every table (seeds, differences from the paper, backend agreement)."""

from __future__ import annotations

import math

import pandas as pd

from normbench import stats


def is_missing(x) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def fmt(mean, sd=None, digits: int = 1) -> str:
    """'75.2 ± 2.6', or '75.2' without an sd, or 'n/a'."""
    if is_missing(mean):
        return "n/a"
    if sd is None or is_missing(sd):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}"


def pm(mean, sd) -> str:
    """The summary table's cell: like `fmt`, always one decimal."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.1f} ± {sd:.1f}" if not math.isnan(sd) else f"{mean:.1f}"


def mean_sd(values) -> tuple[float, float]:
    values = pd.Series(values, dtype=float).dropna()
    return (values.mean() if len(values) else math.nan), (values.std(ddof=1) if len(values) > 1 else math.nan)


def latex_escape(text: str) -> str:
    text = str(text)
    for a, b in (("\\", "\\textbackslash{}"), ("_", "\\_"), ("%", "\\%"), ("&", "\\&"), ("#", "\\#"),
                 ("~", "\\textasciitilde{}"), ("^", "\\textasciicircum{}")):
        text = text.replace(a, b)
    text = text.replace("**", "").replace("*", "").replace("`", "")
    return (text.replace("±", "$\\pm$").replace("≥", "$\\geq$").replace("≤", "$\\leq$").replace("×", "$\\times$")
            .replace("Δ", "$\\Delta$").replace("—", "--").replace("→", "$\\rightarrow$").replace("−", "$-$")
            .replace("…", "\\ldots{}"))


def render_markdown(title: str, head: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n" + notes_markdown(notes)


def render_latex(title: str, head: list[str], rows: list[list[str]], notes: list[str] = ()) -> str:
    lines = ["\\begin{table}[t]", "\\centering", f"\\caption{{{latex_escape(title)}}}",
             f"\\begin{{tabular}}{{l{'r' * (len(head) - 1)}}}", "\\toprule",
             " & ".join(latex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join(latex_escape(c) for c in row) + " \\\\" for row in rows]
    lines += ["\\bottomrule", "\\end{tabular}"]
    lines += [latex_notes(notes), "\\end{table}"] if notes else ["\\end{table}"]
    return "\n".join(lines) + "\n"


def notes_markdown(notes) -> str:
    notes = [n for n in notes if n]
    return ("\n" + "\n".join(f"- {n}" for n in notes) + "\n") if notes else ""


def latex_notes(notes) -> str:
    notes = [n for n in notes if n]
    return "\\par\\smallskip\\footnotesize\n" + "\n".join(f"{latex_escape(n)}\\par" for n in notes) if notes else ""


def with_latex_notes(latex: str, notes) -> str:
    block = latex_notes(notes)
    return latex.replace("\\end{table}", block + "\n\\end{table}") if block else latex


def seeds_note(status: pd.DataFrame, paper_runs: str = "the paper's Section 4.1 numbers are over 10 runs") -> str:
    """How many seeds each variant and backend ran, stated (never implied)."""
    counts = status.groupby(["backend", "variant"]).seed.nunique()
    seeds = sorted(status.seed.unique())
    if len(seeds) == 1:
        span = f"seed {seeds[0]}"
    else:
        span = f"seeds {seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else f"seeds {seeds}"
    if counts.nunique() == 1:
        n = int(counts.iloc[0])
        how_many = f"{n} seed{'s' if n != 1 else ''} per variant and backend ({span})"
    else:
        how_many = "seeds per variant and backend: " + ", ".join(f"{b}/{v} {int(n)}" for (b, v), n in counts.items())
    diverged = int((status.status == "diverged").sum())
    return (f"{how_many}; {paper_runs}. n counts the runs that finished without diverging; "
            f"diverged runs ({diverged} here) are counted, never averaged.")


def paper_difference_notes(rows: list[dict]) -> list[str]:
    """Plain sentences for every number outside the paper's ± 2 sd band.
    rows: {variant, backend, mean, sd, paper (a PaperValue or None)}."""
    out = []
    for r in rows:
        paper = r.get("paper")
        if paper is None:
            continue
        low, high = paper.band()
        if is_missing(r["mean"]):
            out.append(f"**Differs from the paper:** {r['variant']} on {r['backend']} has no finished run; the paper "
                       f"reports {fmt(paper.mean, paper.sd)}% ({paper.where}).")
        elif not low <= r["mean"] <= high:
            side = "above" if r["mean"] > high else "below"
            out.append(f"**Differs from the paper:** {r['variant']} on {r['backend']}: {fmt(r['mean'], r['sd'])}% "
                       f"against the paper's {fmt(paper.mean, paper.sd)}% ({paper.where}), {side} the paper's "
                       f"± 2 sd band [{low:.1f}, {high:.1f}].")
    return out


def paper_cells(paper, mean) -> list[str]:
    """The two table cells beside a mean: the paper's value (and where), within its ± 2 sd band."""
    if paper is None:
        return ["—", "—"]
    low, high = paper.band()
    inside = not is_missing(mean) and low <= mean <= high
    return [f"{fmt(paper.mean, paper.sd)} ({paper.where})", "yes" if inside else "**no**"]


def _agreement_verdict(agree) -> str:
    if agree is None or (isinstance(agree, float) and math.isnan(agree)):
        return "n/a (needs 2 runs a side)"
    return "yes" if agree else "**no**"


def agreement_markdown(agreement: pd.DataFrame) -> str:
    """The backend-agreement table (`normbench.stats.backend_agreement`) under a report's table."""
    lines = ["", f"**Backend agreement**: final test accuracy, two-sided Welch t-test per method and backend pair; "
             f"the backends agree when p >= {stats.AGREEMENT_ALPHA:g}.", "",
             "| method | backends | means (%) | n | Welch t | p | agree |", "|---|---|---|---|---|---|---|"]
    for r in agreement.itertuples():
        lines.append(f"| {r.variant} | {r.pair} | {r.mean_left:.2f} vs {r.mean_right:.2f} | {r.n_left} vs {r.n_right} | "
                     f"{r.welch_t:.3g} | {r.p_value:.3g} | {_agreement_verdict(r.agree)} |")
    return "\n".join(lines) + "\n"
