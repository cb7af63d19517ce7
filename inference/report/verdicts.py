r"""The warnings in words of a comparison: what a careful statistician would say about it.

:func:`warnings_for` reads a :class:`~vilab.inference.comparison.api.ComparisonReport` (NUTS's
divergences, R-hat and ESS; each guide's PSIS :math:`\hat k`, errors in reference sds and
failures) and returns the sentences that the Markdown and HTML reports and the command line
print first.
"""

from __future__ import annotations

import numpy as np

__all__ = ["warnings_for"]


def warnings_for(report) -> list[str]:
    """What a careful statistician would say about ``report``, in words."""
    notes = [
        f"{name}: could not be fitted and is not in the tables ({reason})"
        for name, reason in getattr(report, "failures", {}).items()
    ]
    for name, m in report.methods.items():
        x = m.metrics
        if m.kind == "nuts":
            if x.get("num_divergences", 0):
                notes.append(
                    f"{name}: {x['num_divergences']} divergent transitions; the sampler missed part of the posterior (reparameterise or raise target_accept)."
                )
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
                why = f" ({x['convergence']})" if x.get("convergence") else ""
                notes.append(
                    f"{name}: NOT CONVERGED: the optimisation stopped at its budget of "
                    f"{x.get('num_steps')} steps before its convergence test passed{why}; its "
                    "numbers are those of an unfinished fit (raise num_steps)."
                )
    notes.extend(_skewed_misses(report))
    return notes


# A Gaussian family's mean error (reference sds) worth explaining, and the reference's sample
# skewness from which a marginal is too asymmetric for a symmetric approximation to match.
_OFF_SD = 0.1
_SKEWED = 0.5


def _skewed_misses(report) -> list[str]:
    """A guide whose mean is off where the reference marginal is skewed: the reason a Gaussian
    family misses even at its exact optimum, which a low k-hat does not reveal."""
    table = getattr(report, "table", None)
    if table is None or not len(table) or "mean_error_sd" not in table:
        return []
    notes = []
    for name, rows in table.groupby("method", sort=False):
        off = rows[rows["mean_error_sd"].abs() > _OFF_SD]
        skews = {p: _skewness(report.reference.get(p)) for p in off["parameter"]}
        skewed = {p: g for p, g in skews.items() if abs(g) > _SKEWED}
        if skewed:
            worst = max(skewed, key=lambda p: abs(skewed[p]))
            error = float(off.set_index("parameter").loc[worst, "mean_error_sd"])
            notes.append(
                f"{name}: {len(skewed)} parameter(s) more than {_OFF_SD} sd off where the reference "
                f"marginal is skewed (worst {worst}: {error:+.2f} sd, skewness {skewed[worst]:.2f}); a "
                "Gaussian approximation cannot match a skewed marginal even at its optimum."
            )
    return notes


def _skewness(values) -> float:
    values = np.asarray(values, dtype=float).reshape(-1) if values is not None else np.zeros(0)
    if values.size < 3 or not np.std(values) > 0:
        return 0.0
    centred = values - values.mean()
    return float(np.mean(centred**3) / np.std(values) ** 3)


# Mean leapfrog steps per draw from which a diagonal metric is suspected of fighting correlations.
_LONG_TRAJECTORY = 31


def _dense_mass_advice(name: str, result, poor_mixing: bool) -> list[str]:
    """Long trajectories under a diagonal metric, with poor mixing, usually mean strongly
    correlated parameters, which a dense metric removes (5x the ESS per second on a
    regression with unscaled predictors)."""
    stats = getattr(result, "sample_stats", None) or {}
    if not poor_mixing or result.config.get("dense_mass", False) or "n_steps" not in stats:
        return []
    steps = float(np.mean(np.asarray(stats["n_steps"])))
    if steps < _LONG_TRAJECTORY:
        return []
    return [
        f"{name}: {steps:.0f} leapfrog steps per draw on average under a diagonal metric, "
        "the sign of strongly correlated parameters; a dense metric usually mixes far better: "
        "nuts_options={'dense_mass': True} (CLI: --dense-mass)."
    ]
