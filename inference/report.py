"""Write a comparison to disk: metrics JSON, CSV tables, NetCDF per method, PNGs, and the
report as Markdown (``report.md``) and as one self-contained HTML page (``report.html``)."""
from __future__ import annotations

import io
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

from vilab.fileio import atomic_path, write_json, write_text
from vilab.inference.plots import comparison_figures
from vilab.inference.report_html import render_comparison_html
from vilab.inference.report_verdicts import warnings_for

__all__ = ["save_report", "warnings_for", "markdown_report"]


def _fmt(value) -> str:
    if isinstance(value, (float, np.floating)):
        return "n/a" if not np.isfinite(value) else f"{value:.4g}"
    return str(value)


def _markdown_table(frame) -> str:
    columns = [frame.index.name or ""] + list(frame.columns)
    lines = ["| " + " | ".join(map(str, columns)) + " |", "|" + "---|" * len(columns)]
    for index, row in frame.iterrows():
        lines.append("| " + " | ".join([str(index)] + [_fmt(v) for v in row.values]) + " |")
    return "\n".join(lines)


def markdown_report(report, figures: dict[str, str]) -> str:
    """The report as Markdown (summary, warnings, per-parameter table, figures)."""
    summary_columns = [c for c in ("kind", "mean_abs_error_sd", "max_abs_error_sd", "mean_abs_log_sd_ratio",
                                   "mean_wasserstein_sd", "k_hat", "k_hat_verdict", "elbo", "wall_time",
                                   "ess_bulk_min", "ess_per_second", "r_hat_max", "num_divergences")
                       if c in report.summary.columns]
    parts = [f"# {report.title}", "", f"Reference: {report.reference_name}.", "", "## Methods", "",
             _markdown_table(report.summary[summary_columns]), ""]
    notes = warnings_for(report)
    parts += ["## Warnings", ""] + ([f"- {n}" for n in notes] or ["- none"]) + [""]
    if len(report.table):
        parts += ["## Parameters", "", _markdown_table(report.table.set_index("method")), ""]
    parts += ["## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    return "\n".join(parts) + "\n"


def save_report(report, directory) -> Path:
    """Write everything about ``report`` into ``directory`` (each file atomically); ``report.html``
    embeds every figure, so it can be opened or sent on its own."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", {
        "reference": report.reference_name,
        "summary": report.summary.reset_index().to_dict(orient="records"),
        "table": report.table.to_dict(orient="records"),
        "warnings": warnings_for(report),
    })
    write_text(out / "summary.csv", report.summary.to_csv())
    write_text(out / "table.csv", report.table.to_csv(index=False))
    for name, method in report.methods.items():
        with atomic_path(out / f"{name}.nc") as tmp:
            method.inference_data.to_netcdf(str(tmp))
    files, images = {}, {}
    for name, figure in comparison_figures(report).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=90, format="png")
        plt.close(figure)
        images[name] = buffer.getvalue()
        with atomic_path(out / f"{name}.png") as tmp:
            tmp.write_bytes(images[name])
        files[name] = f"{name}.png"
    write_text(out / "report.md", markdown_report(report, files))
    write_text(out / "report.html", render_comparison_html(report, images))
    return out
