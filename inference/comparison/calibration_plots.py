"""The plot of a calibration check: one histogram per parameter, verdict in the title."""

from __future__ import annotations

import math

__all__ = ["plot_calibration"]


def plot_calibration(result, path: str) -> str:
    """Histograms of each parameter's VSBC quantiles (or SBC ranks) with the uniform level;
    flagged parameters in red. Writes ``path`` (PNG) and returns it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result.statistics)
    columns = min(4, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.2 * columns, 2.4 * rows), squeeze=False)
    table = result.table.set_index("parameter")
    for axis, name in zip(axes.flat, names):
        values = result.statistics[name]
        if result.test == "SBC":
            values = values / (result.num_ranks - 1)
        axis.hist(
            values, bins=10, range=(0, 1), color="tab:red" if table.loc[name, "flagged"] else "tab:blue", alpha=0.7
        )
        axis.axhline(len(values) / 10, color="black", linewidth=0.8, linestyle="--")
        axis.set_title(f"{name}: p={table.loc[name, 'p_value']:.2g}", fontsize=9)
        axis.set_xlim(0, 1)
    for axis in list(axes.flat)[len(names) :]:
        axis.axis("off")
    label = "posterior quantile of the truth" if result.test == "VSBC" else "normalised rank of the truth"
    figure.suptitle(
        f"{result.test} of {result.method}: {len(result.table)} parameters, "
        f"{result.num_simulations} simulations ({label})",
        fontsize=10,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
