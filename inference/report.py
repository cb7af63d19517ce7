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

__all__ = ["save_report", "warnings_for", "markdown_report"]


def warnings_for(report) -> list[str]:
    """What a careful statistician would say about ``report``, in words."""
    notes = [f"{name}: could not be fitted and is not in the tables ({reason})"
             for name, reason in getattr(report, "failures", {}).items()]
    for name, m in report.methods.items():
        x = m.metrics
        if m.kind == "nuts":
            if x.get("num_divergences", 0):
                notes.append(f"{name}: {x['num_divergences']} divergent transitions; the sampler missed part of the posterior (reparameterise or raise target_accept).")
            if x.get("r_hat_max", 1.0) > 1.01:
                notes.append(f"{name}: R-hat up to {x['r_hat_max']:.3f} (> 1.01); chains disagree, run longer.")
            low_ess = x.get("ess_bulk_min", np.inf) < 100 * m.result.config.get("num_chains", 1)
            if low_ess:
                notes.append(f"{name}: bulk ESS as low as {x['ess_bulk_min']:.0f}; Monte Carlo error is large.")
            notes.extend(_dense_mass_advice(name, m.result, low_ess or x.get("r_hat_max", 1.0) > 1.01))
            if x.get("bfmi_min", 1.0) < 0.3:
                notes.append(f"{name}: E-BFMI {x['bfmi_min']:.2f} (< 0.3); momentum resampling explores energy poorly.")
        else:
            k = x.get("k_hat", np.nan)
            if np.isfinite(k) and k > 0.7:
                notes.append(f"{name}: Pareto k-hat {k:.2f} > 0.7: this guide's estimates are unreliable.")
            if not x.get("converged", True):
                notes.append(f"{name}: the ELBO had not converged after {x.get('num_steps')} steps.")
    return notes


# Mean leapfrog steps per draw from which a diagonal metric is suspected of fighting correlations.
_LONG_TRAJECTORY = 31


def _dense_mass_advice(name: str, result, poor_mixing: bool) -> list[str]:
    """Long trajectories under a diagonal metric, with poor mixing, usually mean strongly
    correlated parameters, which a dense metric removes (kidiq: 5x the ESS per second)."""
    stats = getattr(result, "sample_stats", None) or {}
    if not poor_mixing or result.config.get("dense_mass", False) or "n_steps" not in stats:
        return []
    steps = float(np.mean(np.asarray(stats["n_steps"])))
    if steps < _LONG_TRAJECTORY:
        return []
    return [f"{name}: {steps:.0f} leapfrog steps per draw on average under a diagonal metric, "
            "the sign of strongly correlated parameters; a dense metric usually mixes far better: "
            "nuts_options={'dense_mass': True} (CLI: --dense-mass)."]


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
                                   "mean_wasserstein_sd", "k_hat", "k_hat_verdict", "elbo", "wall_time", "gradient_evaluations",
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
