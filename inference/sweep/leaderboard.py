r"""The sweep's leaderboard: one self-contained HTML page and a CSV, read from the store.

Per model and method, over the seeds that finished: the mean (and sd) of the mean absolute
error of the posterior means in reference sds
:math:`\frac1J\sum_j |\hat m_j - m_j| / s_j` (``mean_abs_error_sd``), the worst parameter's
error, the mean :math:`|\log(\hat s_j/s_j)|`, PSIS :math:`\hat k`, gradient evaluations and
seconds. Plots put accuracy against cost (error vs gradient evaluations, error vs seconds),
one point per seed and a bar over the seeds' range per method.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Union

import matplotlib
import pandas as pd
from matplotlib.figure import Figure  # not pyplot: drawing a page must not touch the caller's backend

from vilab.inference.report.html import _escape, _number, _page, _table, _warnings_block, encode_figure
from vilab.inference.sweep.store import SweepStore

__all__ = ["LEADERBOARD_COLUMNS", "leaderboard_table", "render_leaderboard_html", "write_leaderboard"]

ERROR = "mean_abs_error_sd"
# summary column -> (heading, how seeds are combined)
LEADERBOARD_COLUMNS = {
    "mean_abs_error_sd": ("mean |error| / ref sd", "mean"),
    "max_abs_error_sd": ("max |error| / ref sd", "mean"),
    "mean_abs_log_sd_ratio": ("mean |log sd ratio|", "mean"),
    "k_hat": ("PSIS k-hat (median)", "median"),
    "num_gradient_evaluations": ("gradient evaluations", "mean"),
    "wall_time": ("seconds", "mean"),
}


# A finished task whose own checks say not to trust it: NUTS chains that disagree, a VI fit
# that did not converge, or PSIS's k-hat past its reliability bound.
MAX_R_HAT, MAX_K_HAT = 1.01, 0.7


def _flagged(ok: pd.DataFrame) -> pd.Series:
    def column(name):
        return pd.to_numeric(ok[name], errors="coerce") if name in ok else pd.Series(math.nan, index=ok.index)

    converged = column("converged")
    return (column("r_hat_max") > MAX_R_HAT) | (converged == 0) | (column("k_hat") > MAX_K_HAT)


def leaderboard_table(results: pd.DataFrame) -> pd.DataFrame:
    """One row per model and method: seeds ok / run, then per metric the combination over the
    finished seeds (and ``*_sd``, the sd over seeds, for the error); ordered by model, then error."""
    rows = []
    for (model, method), group in results.groupby(["model", "method"], sort=True):
        ok = group[group["status"] == "ok"]
        row = {
            "model": model,
            "method": method,
            "num_ok": len(ok),
            "num_tasks": len(group),
            "num_flagged": int(_flagged(ok).sum()),
        }
        for column, (_, how) in LEADERBOARD_COLUMNS.items():
            values = pd.to_numeric(ok[column], errors="coerce").dropna() if column in ok else pd.Series(dtype=float)
            row[column] = float(getattr(values, how)()) if len(values) else math.nan
        errors = pd.to_numeric(ok.get(ERROR, pd.Series(dtype=float)), errors="coerce").dropna()
        row[f"{ERROR}_sd"] = float(errors.std(ddof=1)) if len(errors) > 1 else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    return table.sort_values(["model", ERROR], na_position="last").reset_index(drop=True) if len(table) else table


def _cost_figure(model: str, ok: pd.DataFrame):
    """Error against gradient evaluations and against seconds, one colour per method."""
    figure = Figure(figsize=(10.5, 3.8), layout="constrained")
    axes = figure.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    for index, (method, group) in enumerate(ok.groupby("method", sort=True)):
        for axis, cost in zip(axes, ("num_gradient_evaluations", "wall_time")):
            pairs = group[[cost, ERROR]].apply(pd.to_numeric, errors="coerce").dropna()
            pairs = pairs[(pairs[cost] > 0) & (pairs[ERROR] > 0)]
            if not len(pairs):
                continue
            marker = "s" if method == "nuts" else "o"
            axis.scatter(pairs[cost], pairs[ERROR], s=14, alpha=0.45, color=colours(index % 10), marker=marker)
            x, y = pairs[cost].median(), pairs[ERROR].median()
            axis.errorbar(
                [x],
                [y],
                xerr=[[x - pairs[cost].min()], [pairs[cost].max() - x]],
                yerr=[[y - pairs[ERROR].min()], [pairs[ERROR].max() - y]],
                fmt=marker,
                ms=7,
                capsize=3,
                color=colours(index % 10),
                label=method,
            )
    for axis, label in zip(axes, ("gradient evaluations", "seconds")):
        axis.set(xscale="log", yscale="log", xlabel=label, ylabel="mean |error| / reference sd")
        axis.grid(True, which="both", alpha=0.25)
    for axis in axes:  # the legend goes where the methods have points
        handles, labels = axis.get_legend_handles_labels()
        if handles:
            axis.legend(handles, labels, fontsize=8, loc="best")
            break
    figure.suptitle(model, fontsize=11)
    return figure


def _model_table(table: pd.DataFrame) -> str:
    header = [
        "method",
        "seeds ok",
        "flagged (R-hat > 1.01, not converged or k-hat > 0.7)",
        *(LEADERBOARD_COLUMNS[c][0] for c in LEADERBOARD_COLUMNS),
    ]
    rows = []
    for _, row in table.iterrows():
        error = _number(row[ERROR])
        if not _is_nan(row[f"{ERROR}_sd"]):
            error += f" ± {_number(row[f'{ERROR}_sd'], 2)}"
        cells = [
            (_escape(row["method"]), ""),
            (f"{row['num_ok']} / {row['num_tasks']}", "" if row["num_ok"] == row["num_tasks"] else "bad"),
            (str(row["num_flagged"]), "bad" if row["num_flagged"] else ""),
            (error, ""),
        ]
        cells += [(_number(row[c]), "") for c in list(LEADERBOARD_COLUMNS)[1:]]
        rows.append(cells)
    return _table(header, rows)


def _is_nan(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _overall_table(table: pd.DataFrame) -> str:
    """Per method over models: models where every seed finished, mean error over models."""
    rows = []
    summary = table.groupby("method").agg(
        models=("model", "nunique"),
        complete=("num_ok", "size"),
        error=(ERROR, "mean"),
        gradients=("num_gradient_evaluations", "median"),
        seconds=("wall_time", "median"),
    )
    complete = table[table["num_ok"] == table["num_tasks"]].groupby("method").size()
    for method, row in summary.sort_values("error", na_position="last").iterrows():
        rows.append(
            [
                (_escape(method), ""),
                (f"{int(complete.get(method, 0))} / {int(row['models'])}", ""),
                (_number(row["error"]), ""),
                (_number(row["gradients"]), ""),
                (_number(row["seconds"]), ""),
            ]
        )
    return _table(
        [
            "method",
            "models with every seed ok",
            "mean |error| / ref sd (mean over models)",
            "gradient evaluations (median)",
            "seconds (median)",
        ],
        rows,
    )


def _failures_table(results: pd.DataFrame) -> str:
    failed = results[results["status"] != "ok"]
    if not len(failed):
        return "<p>No task failed.</p>"
    rows = [
        [
            (_escape(r["model"]), ""),
            (_escape(r["method"]), ""),
            (str(r["seed"]), ""),
            (_escape(str(r["error"])[:600]), "wrap"),
        ]
        for _, r in failed.iterrows()
    ]
    return _table(["model", "method", "seed", "error"], rows, text_columns=4)


def _notes(results: pd.DataFrame, references: pd.DataFrame) -> list[str]:
    notes = []
    failed = int((results["status"] != "ok").sum())
    if failed:
        notes.append(f"{failed} of {len(results)} tasks failed; their errors are listed under Failed tasks.")
    ok = results[results["status"] == "ok"]
    if "converged" in ok:
        stuck = ok[ok["converged"].notna() & ~ok["converged"].fillna(1).astype(bool)]
        if len(stuck):
            cells = ", ".join(f"{m} {k} ({n})" for (m, k), n in stuck.groupby(["model", "method"]).size().items())
            notes.append(
                f"{len(stuck)} VI fits stopped before their loss converged (model method (seeds)): {cells}. "
                "Their errors include optimisation error: give them more steps."
            )
    if "k_hat" in ok:
        poor = ok[pd.to_numeric(ok["k_hat"], errors="coerce") > 0.7]
        if len(poor):
            pairs = ", ".join(f"{m} {k}" for m, k in sorted(set(zip(poor["model"], poor["method"]))))
            notes.append(
                f"PSIS k-hat above 0.7 in {len(poor)} tasks ({pairs}): those guides miss mass the "
                "posterior has, and importance weighting cannot repair them."
            )
    for _, ref in references.iterrows():
        if ref.get("num_divergences", 0) or not ref.get("r_hat_max", 1.0) <= 1.01:
            notes.append(
                f"The NUTS reference of {ref['model']} has R-hat {_number(ref.get('r_hat_max'))} and "
                f"{ref.get('num_divergences')} divergences: its errors are measured against a doubtful reference."
            )
    return notes


def render_leaderboard_html(results: pd.DataFrame, references: pd.DataFrame, title: str = "vilab sweep") -> str:
    """The leaderboard page for a store's ``results`` and ``references`` tables."""
    table = leaderboard_table(results)
    ok = results[results["status"] == "ok"]
    sections = [
        ("notes", "Notes", _warnings_block(_notes(results, references))),
        ("overall", "Methods over all models", _overall_table(table) if len(table) else "<p>No results.</p>"),
    ]
    for model, part in table.groupby("model", sort=True):
        body = _model_table(part)
        rows = ok[ok["model"] == model]
        if len(rows):
            figure = _cost_figure(model, rows)
            body += (
                f'<figure><img src="{encode_figure(figure)}" alt="accuracy against cost, {_escape(model)}">'
                "<figcaption>Accuracy against cost: one small point per seed, a large marker at the median "
                "with bars over the seeds' range; lower left is better.</figcaption></figure>"
            )
        sections.append((f"model-{_anchor(model)}", model, body))
    sections.append(("failed", "Failed tasks", _failures_table(results)))
    subtitle = (
        f"{results['model'].nunique()} models, {results['method'].nunique()} methods, "
        f"{results['seed'].nunique()} seeds: {int((results['status'] == 'ok').sum())} of {len(results)} tasks ok. "
        "Errors are in units of the reference posterior sd."
    )
    return _page(title, _escape(subtitle), sections)


def _anchor(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name)


def write_leaderboard(store: Union[SweepStore, str, Path], out: Union[str, Path, None] = None) -> Path:
    """Write ``leaderboard.html`` and ``leaderboard.csv`` into ``out`` (default: the store's
    folder); returns the HTML page's path."""
    if not isinstance(store, SweepStore):
        path = Path(store)
        if not path.is_file():
            raise FileNotFoundError(f"store: expected a sweep results file; got {str(path)!r}, which does not exist")
        with SweepStore(path) as opened:
            return write_leaderboard(opened, out)
    out = Path(out) if out is not None else store.path.parent
    out.mkdir(parents=True, exist_ok=True)
    results, references = store.results(), store.references()
    if not len(results):
        raise ValueError(f"store: expected at least one task in {str(store.path)!r}; got none (run the sweep first)")
    leaderboard_table(results).to_csv(out / "leaderboard.csv", index=False)
    page = out / "leaderboard.html"
    page.write_text(render_leaderboard_html(results, references), encoding="utf-8")
    return page
