"""Tables and figures from a results directory's stored metrics (never from training).

    build_report(out)   <out>/table.md, table.tex, table.csv and the report's figures:
                        the experiment's own report function (normbench/experiments/<name>.py)
                        or the shared curves report (curves.py: Figures 1 and 3)
    build_all(root)     every experiment folder under results/, then the index
    write_index(root)   results/README.md

Modules: `runs` (stored runs as tidy tables), `tables` (formatting, Markdown, LaTeX,
notes), `plots` (backend order, colours, legends, saving), `methods` (which registered
method each variant ran), `curves` (the shared report), `build`, `index`. No method is
named in this package: colours and labels come from the plugin registries, and roles
("the reference without normalization") from the experiments that need them.
"""

from __future__ import annotations

from normbench.reporting.build import Results, build_report
from normbench.reporting.index import (INDEX_NAME, build_all, compute_summary, is_results_root, provenance_summary,
                                       recorded_overrides, regenerate_command, run_records, update_index, write_index)
from normbench.reporting.runs import at_step, final_accuracy, load_percentiles, load_runs, ok_only
from normbench.reporting.tables import agreement_markdown, render_latex, render_markdown
from normbench.reporting.curves import summary_table

__all__ = ["INDEX_NAME", "Results", "agreement_markdown", "at_step", "build_all", "build_report", "compute_summary",
           "final_accuracy", "is_results_root", "load_percentiles", "load_runs", "ok_only", "provenance_summary",
           "recorded_overrides", "regenerate_command", "render_latex", "render_markdown", "run_records",
           "summary_table", "update_index", "write_index"]
