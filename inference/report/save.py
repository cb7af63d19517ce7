"""Write a comparison to disk: metrics JSON, CSV tables, NetCDF per method, PNGs, and the
report as Markdown (``report.md``) and as one self-contained HTML page (``report.html``).

A report folder is written whole: built in a temporary sibling and swapped into place, so a
crash leaves the previous report or the new one. ``run.json`` records the report's title and
the settings that produced it, so a later run can tell whether a folder holds its own report.
"""

from __future__ import annotations

import fnmatch
import io
import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional

import matplotlib.pyplot as plt
import numpy as np

from vilab.fileio import write_json, write_text
from vilab.inference.report.plots import comparison_figures
from vilab.inference.report.html import render_comparison_html
from vilab.run_folders import RunFolderError, atomic_directory, settings_differences
from vilab.inference.report.verdicts import warnings_for

__all__ = ["REPORT_FILES", "check_report_folder", "previous_report", "save_report", "warnings_for", "markdown_report"]

# The names save_report writes: a folder holding only these holds a report (and may be replaced).
REPORT_FILES = ("run.json", "metrics.json", "summary.csv", "table.csv", "report.md", "report.html", "*.nc", "*.png")


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
    summary_columns = [
        c
        for c in (
            "kind",
            "mean_abs_error_sd",
            "max_abs_error_sd",
            "mean_abs_log_sd_ratio",
            "mean_abs_log_lrvb_sd_ratio",
            "mean_wasserstein_sd",
            "k_hat",
            "k_hat_verdict",
            "elbo",
            "converged",
            "gradient_evaluations",
            "wall_time",
            "ess_bulk_min",
            "ess_per_second",
            "r_hat_max",
            "num_divergences",
        )
        if c in report.summary.columns
    ]
    parts = [
        f"# {report.title}",
        "",
        f"Reference: {report.reference_name}.",
        "",
        "## Methods",
        "",
        _markdown_table(report.summary[summary_columns]),
        "",
    ]
    notes = warnings_for(report)
    parts += ["## Warnings", ""] + ([f"- {n}" for n in notes] or ["- none"]) + [""]
    if len(report.table):
        parts += ["## Parameters", "", _markdown_table(report.table.set_index("method")), ""]
    parts += ["## Figures", ""] + [f"![{name}]({path})" for name, path in figures.items()]
    return "\n".join(parts) + "\n"


def check_report_folder(directory: str | os.PathLike) -> None:
    """Raise unless ``directory`` is absent, an empty folder, or a folder of report files only.

    Raises:
        RunFolderError: ``directory`` is a file, or holds files a report does not write (named).
    """
    path = Path(directory)
    if not path.exists():
        return
    if not path.is_dir():
        raise RunFolderError(f"out: {str(path)!r} is a file; expected a folder for the report")
    foreign = sorted(
        name for name in os.listdir(path) if not any(fnmatch.fnmatch(name, pattern) for pattern in REPORT_FILES)
    )
    if foreign:
        raise RunFolderError(
            f"out: {str(path)!r} holds files that are not a comparison report ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}); expected a new or empty folder or an earlier "
            "report, which is replaced whole; choose another folder"
        )


def previous_report(directory: str | os.PathLike, settings: Mapping[str, Any]) -> Optional[dict]:
    """Compare the report in ``directory`` with one about to be written with ``settings``.

    Returns:
        ``None`` when there is no report there; else the settings that differ, as
        ``{name: (old, new)}`` (empty for a rerun of the same comparison; a report without
        ``run.json``, from an older vilab, differs in ``"settings"``).

    Raises:
        RunFolderError: as :func:`check_report_folder`.
    """
    check_report_folder(directory)
    path = Path(directory)
    if not path.is_dir() or not os.listdir(path):
        return None
    record = path / "run.json"
    if not record.is_file():
        return {"settings": ("(not recorded)", "(these)")}
    return settings_differences(json.loads(record.read_text()).get("settings", {}), settings)


def save_report(report, directory) -> Path:
    """Write everything about ``report`` into ``directory``; ``report.html`` embeds every figure,
    so it can be opened or sent on its own.

    The folder is built beside ``directory`` and swapped into place at the end: an earlier
    report there is replaced whole, and a crash leaves it untouched.

    Raises:
        RunFolderError: ``directory`` is a file or holds files that are not a report.
    """
    check_report_folder(directory)
    with atomic_directory(directory) as out:
        _write_report(report, out)
    return Path(directory)


def _write_report(report, out: Path) -> None:
    write_json(out / "run.json", {"title": report.title, "settings": getattr(report, "settings", {})})
    write_json(
        out / "metrics.json",
        {
            "reference": report.reference_name,
            "summary": report.summary.reset_index().to_dict(orient="records"),
            "table": report.table.to_dict(orient="records"),
            "warnings": warnings_for(report),
        },
    )
    write_text(out / "summary.csv", report.summary.to_csv())
    write_text(out / "table.csv", report.table.to_csv(index=False))
    for name, method in report.methods.items():
        method.inference_data.to_netcdf(str(out / f"{name}.nc"))
    files, images = {}, {}
    for name, figure in comparison_figures(report).items():
        buffer = io.BytesIO()
        figure.savefig(buffer, dpi=90, format="png")
        plt.close(figure)
        images[name] = buffer.getvalue()
        (out / f"{name}.png").write_bytes(images[name])
        files[name] = f"{name}.png"
    write_text(out / "report.md", markdown_report(report, files))
    write_text(out / "report.html", render_comparison_html(report, images))
