"""Figures of a comparison: marginals, pairs, forest, ELBO curves, and ArviZ's NUTS plots.

Each function takes a :class:`~vilab.inference.comparison.api.ComparisonReport` and returns a
matplotlib ``Figure``; nothing is shown or saved here.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg", force=False)
import arviz as az  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = [
    "plot_marginals",
    "plot_pairs",
    "plot_forest",
    "plot_elbo",
    "plot_nuts_trace",
    "plot_nuts_rank",
    "plot_energy",
    "comparison_figures",
]

_REFERENCE_STYLE = dict(color="black", lw=2.0, label="reference")


def _parameters(report, max_parameters: int) -> list[str]:
    return list(report.reference)[:max_parameters]


def _density(ax, values, **style):
    values = np.asarray(values, dtype=float)
    lo, hi = np.quantile(values, [0.005, 0.995])
    if hi <= lo:
        ax.axvline(values.mean(), **style)
        return
    grid = np.linspace(lo, hi, 200)
    bandwidth = 1.06 * values.std() * values.size ** (-1 / 5) or 1e-12
    sub = values[:: max(1, values.size // 2000)]
    density = np.exp(-0.5 * ((grid[:, None] - sub[None]) / bandwidth) ** 2).mean(1) / (bandwidth * np.sqrt(2 * np.pi))
    ax.plot(grid, density, **style)


def plot_marginals(report, max_parameters: int = 12):
    """Each parameter's marginal density: the reference in black, every method overlaid."""
    names = _parameters(report, max_parameters)
    cols = min(4, len(names))
    rows = int(np.ceil(len(names) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        _density(ax, report.reference[name], **_REFERENCE_STYLE)
        for method in report.methods.values():
            if name in method.draws and not (method.kind == "nuts" and report.reference_name == "nuts"):
                _density(ax, method.draws[name], lw=1.2, label=method.name)
        ax.set_title(name, fontsize=9)
        ax.set_yticks([])
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(6, len(labels)), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return fig


def plot_pairs(report, parameters: Optional[Sequence[str]] = None, max_points: int = 500):
    """Pairwise scatter of the first parameters: reference in grey, each method overlaid."""
    names = list(parameters or _parameters(report, 4))
    n = len(names)
    if n < 2:
        return None
    fig, axes = plt.subplots(n, n, figsize=(2.3 * n, 2.3 * n), squeeze=False)
    rng = np.random.default_rng(0)
    for i, yname in enumerate(names):
        for j, xname in enumerate(names):
            ax = axes[i, j]
            if j >= i:
                ax.axis("off")
                continue
            sets = [("reference", report.reference, dict(color="0.6", s=3, alpha=0.4))]
            sets += [
                (m.name, m.draws, dict(s=3, alpha=0.4))
                for m in report.methods.values()
                if not (m.kind == "nuts" and report.reference_name == "nuts")
            ]
            for label, draws, style in sets:
                if xname in draws and yname in draws:
                    idx = rng.choice(len(draws[xname]), min(max_points, len(draws[xname])), replace=False)
                    ax.scatter(draws[xname][idx], draws[yname][idx], label=label, **style)
            if i == n - 1:
                ax.set_xlabel(xname, fontsize=8)
            if j == 0:
                ax.set_ylabel(yname, fontsize=8)
            ax.tick_params(labelsize=6)
    if n > 1:
        handles, labels = axes[1, 0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="upper right", fontsize=8, markerscale=4)
    fig.tight_layout()
    return fig


def plot_forest(report, max_parameters: int = 20):
    """Mean and 90% interval of each parameter for the reference and every method."""
    names = _parameters(report, max_parameters)
    sources = [("reference", report.reference)] + [
        (m.name, m.draws) for m in report.methods.values() if not (m.kind == "nuts" and report.reference_name == "nuts")
    ]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) * len(sources) ** 0.5 + 1.5))
    offsets = np.linspace(-0.3, 0.3, len(sources))
    for (label, draws), offset in zip(sources, offsets):
        ys, means, los, his = [], [], [], []
        for k, name in enumerate(names):
            if name in draws:
                scale = np.std(report.reference[name]) or 1.0
                centre = np.mean(report.reference[name])
                values = (np.asarray(draws[name]) - centre) / scale
                ys.append(k + offset)
                means.append(values.mean())
                lo, hi = np.quantile(values, [0.05, 0.95])
                los.append(max(values.mean() - lo, 0.0))  # a point mass rounds to tiny negatives
                his.append(max(hi - values.mean(), 0.0))
        ax.errorbar(
            means,
            ys,
            xerr=[los, his],
            fmt="o",
            ms=3,
            lw=1,
            label=label,
            color="black" if label == "reference" else None,
        )
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    ax.axvline(0, color="0.7", lw=0.8)
    ax.set_xlabel("(value - reference mean) / reference sd")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return fig


def plot_elbo(report):
    """ELBO (negative loss) per step for every fitted guide, smoothed over 25 steps."""
    fig, ax = plt.subplots(figsize=(6.5, 3.5))
    for method in report.methods.values():
        if method.kind != "vi":
            continue
        losses = -np.asarray(method.result.losses, dtype=float)
        window = min(25, len(losses))
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=method.name, lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("ELBO (smoothed)")
    finals = [-np.mean(m.result.losses[-50:]) for m in report.methods.values() if m.kind == "vi"]
    if finals:
        top, spread = max(finals), max(np.ptp(finals), 1.0)
        ax.set_ylim(top - 10 * spread, top + spread)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _nuts_idata(report):
    method = report.methods.get("nuts")
    return None if method is None else method.inference_data


def _latent_names(idata, limit=6):
    return list(idata.posterior.data_vars)[:limit]


def plot_nuts_trace(report):
    """ArviZ trace plot of NUTS's first latent variables (``None`` without NUTS)."""
    idata = _nuts_idata(report)
    if idata is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_trace(idata, var_names=_latent_names(idata), compact=True, show=False)
    return np.asarray(axes).flat[0].figure


def plot_nuts_rank(report):
    """ArviZ rank plot: uniform ranks across chains mean the chains agree."""
    idata = _nuts_idata(report)
    if idata is None:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        axes = az.plot_rank(idata, var_names=_latent_names(idata, 4), show=False)
    return np.asarray(axes).flat[0].figure


def plot_energy(report):
    """ArviZ energy plot (marginal vs transition energy; the E-BFMI in the legend)."""
    idata = _nuts_idata(report)
    if idata is None or "energy" not in idata.sample_stats:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ax = az.plot_energy(idata, show=False)
    return ax.figure


def comparison_figures(report) -> dict:
    """name -> Figure for every figure that applies to ``report``."""
    makers = {
        "marginals": plot_marginals,
        "pairs": plot_pairs,
        "forest": plot_forest,
        "elbo": plot_elbo,
        "nuts_trace": plot_nuts_trace,
        "nuts_rank": plot_nuts_rank,
        "energy": plot_energy,
    }
    figures = {}
    for name, make in makers.items():
        if name == "elbo" and not any(m.kind == "vi" for m in report.methods.values()):
            continue
        figure = make(report)
        if figure is not None:
            figures[name] = figure
    return figures
