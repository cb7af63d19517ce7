"""Scores and tables of ``benchmarks/nuts_peers.py``: ESS, accuracy against a reference, the
ESS/s ratios and their summary (pure functions of the runs' records; no sampler runs here)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "models"))

__all__ = ["min_bulk_ess", "accuracy", "ratio_summary", "tables", "NUMPYRO"]

NUMPYRO = ("numpyro_vectorized", "numpyro_parallel")


def min_bulk_ess(draws: dict) -> float:
    """Minimum bulk ESS over every non-constant scalar component of ``(chain, draw, ...)`` arrays
    (constant ones, e.g. the zeros above a Cholesky factor's diagonal, have none)."""
    import arviz as az

    dataset = az.convert_to_dataset({name: np.asarray(value, dtype=float) for name, value in draws.items()})
    ess = az.ess(dataset, method="bulk")
    values = np.concatenate([np.ravel(ess[name].values) for name in draws])
    return float(np.nanmin(values)) if np.isfinite(values).any() else float("nan")


def accuracy(statistics: dict, reference: dict, num_chains: int) -> dict:
    """Each reference statistic's mean error, in reference sds and in combined Monte Carlo errors.

    Args:
        statistics: statistic -> ``(num_chains * num_draws,)`` values, chain-major.
        reference: statistic -> (mean, sd, ess of the reference).
        num_chains: chains the values came from (for ESS and R-hat).

    Returns:
        ``max_abs_mean_error_sd`` (max over statistics of :math:`|\\bar x - m| / s`), the statistic
        it occurs at, ``max_abs_z`` (max of :math:`|\\bar x - m| / \\sqrt{\\hat\\sigma^2/\\text{ESS}
        + s^2/\\text{ESS}_{ref}}`), ``z_threshold`` (two-sided, a 1e-3 chance of a false alarm
        shared over the statistics), ``accurate`` (``max_abs_z <= z_threshold``), ``max_rhat``
        and the statistics the reference has and the draws lack.
    """
    import arviz as az
    from zoo.check import z_threshold

    errors, z_scores, rhats = {}, {}, {}
    for name, (mean, sd, reference_ess) in reference.items():
        if name not in statistics:
            continue
        values = np.asarray(statistics[name], dtype=float).reshape(num_chains, -1)
        if np.ptp(values) == 0 or sd == 0:
            continue  # a constant, in the draws or in the reference
        ess = max(float(az.ess(values, method="bulk")), 1.0)
        error = values.mean() - mean
        errors[name] = abs(error) / sd
        z_scores[name] = abs(error) / math.sqrt(values.var(ddof=1) / ess + sd**2 / reference_ess)
        rhats[name] = float(az.rhat(values))
    if not errors:
        return {"max_abs_mean_error_sd": float("nan"), "accurate": False, "statistics_missing": sorted(reference)}
    worst = max(errors, key=errors.get)
    threshold = z_threshold(len(z_scores))
    return {
        "max_abs_mean_error_sd": errors[worst],
        "worst_statistic": worst,
        "max_abs_z": max(z_scores.values()),
        "z_threshold": threshold,
        "accurate": bool(max(z_scores.values()) <= threshold),
        "max_rhat": max(rhats.values()),
        "rhat_below_1.01": bool(max(rhats.values()) < 1.01),
        "num_statistics": len(errors),
        "statistics_missing": sorted(set(reference) - set(statistics)),
    }


def _ok(record) -> bool:
    return record is not None and "error" not in record


def _ratios(runs: dict) -> dict:
    """vilab's ESS/s over the better NumPyro configuration's and over nutpie's, for one problem."""
    vilab = runs.get("vilab")
    numpyro = {name: runs[name] for name in NUMPYRO if _ok(runs.get(name))}
    out = {}
    if numpyro:
        best = max(numpyro, key=lambda name: numpyro[name]["ess_per_second"])
        out["numpyro_best"] = best
        if _ok(vilab):
            out["vs_numpyro"] = vilab["ess_per_second"] / numpyro[best]["ess_per_second"]
            # A chain stuck in a wrong mode has a tiny ESS (and error bars wide enough to pass the
            # z test): such a ratio measures no speed.
            out["vs_numpyro_both_sound"] = _sound(vilab) and _sound(numpyro[best])
    if _ok(vilab) and _ok(runs.get("nutpie")):
        out["vs_nutpie"] = vilab["ess_per_second"] / runs["nutpie"]["ess_per_second"]
        out["vs_nutpie_both_sound"] = _sound(vilab) and _sound(runs["nutpie"])
    return out


def _sound(record: dict) -> bool:
    """Draws that pass their checks: means within the z limit of the reference, R-hat < 1.01."""
    return bool(record.get("accurate") and record.get("rhat_below_1.01"))


def _warm(runs: dict) -> dict:
    """vilab's second (warm) run's seconds over nutpie's post-compile sampling seconds."""
    vilab, nutpie = runs.get("vilab"), runs.get("nutpie")
    if not (_ok(vilab) and _ok(nutpie)):
        return {}
    ratio = vilab["seconds"][-1] / nutpie["sampling_seconds"]
    return {"warm_time_ratio": ratio, "within_3x": bool(ratio <= 3.0)}


def _geometric_mean(values) -> float:
    return float(np.exp(np.mean(np.log(values)))) if len(values) else float("nan")


def ratio_summary(results: dict, warm: bool = False) -> dict:
    """Per problem ratios, their geometric mean and worst case, vilab's fallbacks and every run
    whose draws miss the reference (``accurate`` false) or that failed."""
    per_problem = {name: (_warm(runs) if warm else _ratios(runs)) for name, runs in results.items()}
    summary = {"per_problem": per_problem}
    key = "warm_time_ratio" if warm else "vs_numpyro"
    for ratio_key in (key,) if warm else ("vs_numpyro", "vs_nutpie"):
        values = {name: r[ratio_key] for name, r in per_problem.items() if ratio_key in r}
        if values:
            worst = (max if warm else min)(values, key=values.get)
            summary[ratio_key] = {
                "geometric_mean": _geometric_mean(list(values.values())),
                "worst": values[worst],
                "worst_problem": worst,
                "count": len(values),
            }
            accurate = {n: v for n, v in values.items() if per_problem[n].get(f"{ratio_key}_both_sound", True)}
            if not warm and accurate:
                worst = min(accurate, key=accurate.get)
                summary[f"{ratio_key}_both_sound"] = {
                    "geometric_mean": _geometric_mean(list(accurate.values())),
                    "worst": accurate[worst],
                    "worst_problem": worst,
                    "count": len(accurate),
                    "left_out": sorted(set(values) - set(accurate)),
                }
    summary["vilab_paths"] = {
        name: runs["vilab"].get("path") for name, runs in results.items() if _ok(runs.get("vilab"))
    }
    summary["inaccurate"] = sorted(
        f"{name} {sampler}"
        for name, runs in results.items()
        for sampler, r in runs.items()
        if _ok(r) and not r.get("accurate")
    )
    summary["rhat_not_below_1.01"] = sorted(
        f"{name} {sampler}"
        for name, runs in results.items()
        for sampler, r in runs.items()
        if _ok(r) and not r.get("rhat_below_1.01")
    )
    summary["failed"] = sorted(
        f"{name} {sampler}: {r['error']}" for name, runs in results.items() for sampler, r in runs.items() if not _ok(r)
    )
    return summary


def _speed_cell(record) -> str:
    if record is None:
        return "-"
    if not _ok(record):
        return "failed"
    sampling = f"; sampling {record['sampling_seconds']:.2f} s" if "sampling_seconds" in record else ""
    return f"{record['ess_per_second']:.1f} ({record['seconds'][-1]:.1f} s{sampling})"


def _accuracy_cell(record) -> str:
    if not _ok(record):
        return "-"
    flag = ("" if record.get("accurate") else " !") + ("" if record.get("rhat_below_1.01") else " ?")
    return f"{record['max_abs_mean_error_sd']:.3f} / {record.get('max_rhat', float('nan')):.3f}{flag}"


def tables(results: dict, summary: dict, warm: bool = False) -> str:
    """Markdown tables: speed (ESS/s and seconds, nutpie's post-compile sampling seconds apart;
    ratios) and accuracy (max |mean error| in
    reference sds / max R-hat; ``!`` where a z-score passes its threshold, ``?`` where R-hat is not
    below 1.01), then the summary."""
    samplers = [s for s in ("vilab", *NUMPYRO, "nutpie") if any(s in runs for runs in results.values())]
    head = " | ".join(samplers)
    extra = "vilab warm s / nutpie sampling s" if warm else "vilab / best NumPyro | vilab / nutpie"
    lines = [f"| model | vilab path | {head} | {extra} |", "|" + "---|" * (len(samplers) + (3 if warm else 4))]
    for name, runs in results.items():
        ratios = summary["per_problem"].get(name, {})
        cells = [_speed_cell(runs.get(s)) for s in samplers]
        path = runs["vilab"].get("path", "failed") if "vilab" in runs else "-"
        if warm:
            tail = [f"{ratios['warm_time_ratio']:.2f}" if "warm_time_ratio" in ratios else "-"]
        else:
            tail = [f"{ratios[k]:.2f}" if k in ratios else "-" for k in ("vs_numpyro", "vs_nutpie")]
        lines.append(f"| {name} | {path} | " + " | ".join(cells + tail) + " |")
    lines += ["", f"| model | {head} |", "|" + "---|" * (len(samplers) + 1)]
    lines += [
        f"| {name} | " + " | ".join(_accuracy_cell(runs.get(s)) for s in samplers) + " |"
        for name, runs in results.items()
    ]
    keys = ("vs_numpyro", "vs_numpyro_both_sound", "vs_nutpie", "vs_nutpie_both_sound")
    for key in ("warm_time_ratio",) if warm else keys:
        if key in summary:
            s = summary[key]
            lines.append(
                f"\n{key}: geometric mean {s['geometric_mean']:.2f}, worst {s['worst']:.2f} ({s['worst_problem']}), {s['count']} problems"
                + (f"; left out: {', '.join(s['left_out'])}" if s.get("left_out") else "")
            )
    for key in ("inaccurate", "rhat_not_below_1.01", "failed"):
        if summary[key]:
            lines.append(f"{key}: " + "; ".join(summary[key]))
    return "\n".join(lines)
