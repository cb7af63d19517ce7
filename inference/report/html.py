r"""Self-contained HTML report pages: a comparison of guides and NUTS, and a VAE run.

A page is one file: CSS inline, every figure a base64 ``data:`` PNG, no script and no link that
needs a network, so it opens from disk, from a mail attachment or from a CI artefact alike.
Each page holds, in order: the warnings in words (what a careful statistician would say), the
summary table, the per-parameter (or per-latent-dimension) table, and the figures, each with a
line saying how to read it.

Cells a reader should look at are tinted: a Pareto :math:`\hat k` by the Yao et al. (2018)
thresholds (0.5, 0.7), R-hat above 1.01 (Vehtari et al. 2021), divergences above zero, and a
mean error above half a reference sd or an sd ratio outside :math:`[0.8, 1.25]` (a visual cue
only: no test is built on these two).

References:
    Yao et al., "Yes, but Did It Work?: Evaluating Variational Inference", 2018, arXiv:1802.02538.
    Vehtari et al., "Rank-normalization, folding, and localization: an improved R-hat", 2021,
    arXiv:1903.08008.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np

from vilab.inference.report.verdicts import warnings_for

__all__ = [
    "FigureLike",
    "encode_figure",
    "render_comparison_html",
    "render_vae_html",
    "vae_warnings",
    "write_vae_report",
]

FigureLike = Union[bytes, str, "os.PathLike[str]", Any]
"""PNG bytes, a path to a PNG file, or a matplotlib ``Figure``."""

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_ERROR_CUE, _SD_RATIO_CUE = 0.5, (0.8, 1.25)  # visual cues only; see the module docstring
_RHAT_LIMIT = 1.01
# Below this much KL (nats) a latent dimension carries no information about x.
_COLLAPSED_KL = 0.01

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#1d232a;background:#f6f7f9}
main{max-width:1320px;margin:0 auto;padding:18px 28px 60px}
h1{font-size:24px;margin:10px 0 2px}h2{font-size:18px;margin:30px 0 8px;border-bottom:1px solid #d5d9de;padding-bottom:4px}
.sub{color:#5a6570;margin:0 0 12px}nav a{margin-right:14px;color:#2859a8;text-decoration:none}
table{border-collapse:collapse;background:#fff;font-size:13px;margin:6px 0 4px;font-variant-numeric:tabular-nums}
th,td{border:1px solid #dde1e6;padding:4px 7px;text-align:right;white-space:nowrap}
th{background:#eef1f5;font-weight:600;white-space:normal;vertical-align:bottom}td.text,th.text{text-align:left;white-space:normal}
td.wrap{white-space:normal;min-width:110px;text-align:left}
.scroll{overflow-x:auto;max-width:100%}td.good{background:#e3f4e5}td.ok{background:#fff4d6}td.bad{background:#fbe0de}
.warnings{background:#fff8e6;border:1px solid #f0c36d;border-radius:6px;padding:8px 18px}
.warnings.none{background:#eaf6ec;border-color:#9bd3a6}.warnings li{margin:3px 0}
figure{background:#fff;border:1px solid #dde1e6;border-radius:6px;margin:14px 0;padding:10px}
figure img{max-width:min(100%,860px);height:auto;display:block;margin:0 auto}figcaption{color:#4a5560;margin-top:6px}
.legend{color:#5a6570;font-size:12.5px}.bar{background:#5b8def;height:10px;display:inline-block;vertical-align:middle}
dl.metrics{display:grid;grid-template-columns:repeat(auto-fill,minmax(200px,1fr));gap:8px;margin:8px 0}
dl.metrics div{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 12px}
dl.metrics dt{color:#5a6570;font-size:12px}dl.metrics dd{margin:2px 0 0;font-size:18px;font-weight:600}
"""

_COMPARISON_CAPTIONS = {
    "marginals": "Marginal densities: the reference in black, each method overlaid. A good guide sits on the black curve; "
    "a narrower curve is an under-dispersed guide (typical of mean-field VI).",
    "pairs": "Pairwise draws: the reference in grey, methods in colour. Correlations and funnels the guide misses show "
    "here first.",
    "forest": "Mean and 90% interval of each parameter, standardised by the reference (0 = reference mean, 1 = one "
    "reference sd).",
    "elbo": "ELBO per optimisation step (smoothed). A curve still rising at the end has not converged.",
    "nuts_trace": "NUTS traces: chains should look like overlapping, stationary noise.",
    "nuts_rank": "Rank plots: roughly uniform bars in every chain mean the chains agree (Vehtari et al. 2021).",
    "energy": "Energy plot: the marginal energy and the energy transitions should overlap; a narrow transition "
    "distribution (low E-BFMI) means the sampler explores the tails poorly.",
}
_VAE_CAPTIONS = {
    "elbo_curves": "Training and validation ELBO per epoch (nats per image). Training well above validation is "
    "overfitting.",
    "loss_curves": "Training and validation objective per epoch.",
    "reconstructions": "Test images (top) and decoder means at a draw from q(z|x) (bottom).",
    "prior_samples": "Decoder means at draws from the prior p(z): what the model generates.",
    "latent_scatter": "Posterior means E[z|x] of test images coloured by class (first two principal components when "
    "the latent space has more than two dimensions).",
    "latent_traversals": "One latent coordinate varied at a time: a row that does not change is a collapsed unit.",
}


# ----------------------------------------------------------------------------- building blocks
def encode_figure(figure: FigureLike) -> str:
    """A ``data:image/png;base64,...`` URI for PNG bytes, a PNG file path or a matplotlib Figure.

    Raises:
        TypeError: for any other object.
        ValueError: if the bytes (or the file) are not a PNG.
    """
    if hasattr(figure, "savefig"):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=90)
        data = buffer.getvalue()
    elif isinstance(figure, (bytes, bytearray)):
        data = bytes(figure)
    elif isinstance(figure, (str, os.PathLike)):
        data = Path(figure).read_bytes()
    else:
        raise TypeError(f"figure: expected PNG bytes, a PNG path or a matplotlib Figure; got {type(figure).__name__}")
    if not data.startswith(_PNG_MAGIC):
        raise ValueError(f"figure: expected PNG data; got {len(data)} bytes starting {data[:8]!r}")
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _number(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return "n/a" if not math.isfinite(float(value)) else f"{float(value):.{digits}g}"
    return _escape(value)


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, (float, np.floating)) and not math.isfinite(float(value)))


def _table(
    header: Sequence[str], rows: Iterable[Sequence[tuple[str, str]]], *, text_columns: int = 1, table_id: str = ""
) -> str:
    """``rows`` of ``(cell html, css class)``; the first ``text_columns`` are left aligned."""
    head = "".join(
        f'<th class="text">{_escape(h)}</th>' if i < text_columns else f"<th>{_escape(h)}</th>"
        for i, h in enumerate(header)
    )
    body = []
    for row in rows:
        cells = []
        for i, (content, css) in enumerate(row):
            classes = " ".join(c for c in ("text" if i < text_columns else "", css) if c)
            cells.append(f'<td class="{classes}">{content}</td>' if classes else f"<td>{content}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    ident = f' id="{table_id}"' if table_id else ""
    return (
        f'<div class="scroll"><table{ident}><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
    )


def _warnings_block(notes: Sequence[str]) -> str:
    if not notes:
        return (
            '<div class="warnings none" id="warnings"><p>No warnings: every diagnostic is within its limit.</p></div>'
        )
    items = "".join(f"<li>{_escape(n)}</li>" for n in notes)
    return f'<div class="warnings" id="warnings"><ul>{items}</ul></div>'


def _figures_block(figures: Mapping[str, FigureLike], captions: Mapping[str, str]) -> str:
    parts = []
    for name, figure in figures.items():
        caption = captions.get(name, name.replace("_", " "))
        parts.append(
            f'<figure id="figure-{_escape(name)}"><img src="{encode_figure(figure)}" alt="{_escape(name)}">'
            f"<figcaption><b>{_escape(name.replace('_', ' '))}.</b> {_escape(caption)}</figcaption></figure>"
        )
    return "".join(parts) or "<p>No figures.</p>"


def _page(title: str, subtitle: str, sections: Sequence[tuple[str, str, str]]) -> str:
    """``sections`` of ``(anchor, heading, body html)``."""
    nav = "".join(f'<a href="#{a}">{_escape(h)}</a>' for a, h, _ in sections)
    body = "".join(f'<section id="section-{a}"><h2 id="{a}">{_escape(h)}</h2>{b}</section>' for a, h, b in sections)
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_escape(title)}</title><style>{_CSS}</style></head><body><main>"
        f'<h1>{_escape(title)}</h1><p class="sub">{subtitle}</p><nav>{nav}</nav>{body}'
        f"</main></body></html>\n"
    )


# ----------------------------------------------------------------------------- comparison page
def _k_hat_class(k_hat: Any) -> str:
    if _is_missing(k_hat):
        return ""
    return "good" if k_hat < 0.5 else "ok" if k_hat < 0.7 else "bad"


_SUMMARY_COLUMNS = (  # (column, header, digits)
    ("mean_abs_error_sd", "mean |error|", 3),
    ("max_abs_error_sd", "max |error|", 3),
    ("mean_abs_log_sd_ratio", "mean |log sd ratio|", 3),
    ("mean_wasserstein_sd", "mean W1", 3),
    ("mean_abs_log_lrvb_sd_ratio", "mean |log LRVB sd ratio|", 3),
    ("k_hat", "k-hat", 3),
    ("k_hat_verdict", "verdict", 0),
    ("elbo", "ELBO", 5),
    ("converged", "converged", 0),
    ("gradient_evaluations", "gradient evals", 0),
    ("wall_time", "wall time (s)", 3),
    ("ess_bulk_min", "min bulk ESS", 4),
    ("ess_per_second", "ESS/s", 3),
    ("r_hat_max", "max R-hat", 4),
    ("num_divergences", "divergences", 0),
)


def _summary_cell(column: str, value: Any, digits: int) -> tuple[str, str]:
    if _is_missing(value):
        return "&ndash;", ""
    if column == "k_hat_verdict":  # the short verdict; the warnings carry the full sentence
        return _escape(str(value).split(":")[0]), ""
    if column == "k_hat":
        return _number(value, digits), ""
    if column == "r_hat_max":
        return _number(value, digits), "bad" if value > _RHAT_LIMIT else "good"
    if column == "num_divergences":
        return _number(int(value)), "bad" if value > 0 else "good"
    if column == "converged":  # the warnings say what the convergence test found
        return ("yes", "good") if bool(value) else ("NO", "bad")
    if column == "gradient_evaluations":
        return _number(int(value)), ""
    return _number(value, digits), ""


def _summary_table(report) -> str:
    summary = report.summary
    columns = [c for c in _SUMMARY_COLUMNS if c[0] in summary.columns]
    rows = []
    for method, entry in summary.iterrows():
        row = [(_escape(method), ""), (_escape(entry.get("kind", "")), "")]
        k_css = _k_hat_class(entry.get("k_hat"))
        for column, _, digits in columns:
            content, css = _summary_cell(column, entry[column], digits)
            if column in ("k_hat", "k_hat_verdict"):
                css = f"{k_css} wrap" if column == "k_hat_verdict" else k_css
            row.append((content, css.strip()))
        rows.append(row)
    header = ["method", "kind"] + [h for _, h, _ in columns]
    legend = (
        '<p class="legend">Errors and W1 (1-Wasserstein distance) are in units of the reference posterior sd, '
        "averaged over parameters; a log sd ratio of 0 is a perfect spread. k-hat (Pareto smoothed importance sampling): &lt; 0.5 good, 0.5&ndash;0.7 usable after PSIS "
        "reweighting, &gt; 0.7 unreliable. R-hat should be at most 1.01; divergences should be 0.</p>"
    )
    return _table(header, rows, text_columns=2, table_id="summary-table") + legend


_PARAMETER_COLUMNS = (
    ("mean", "mean"),
    ("sd", "sd"),
    ("ref_mean", "ref mean"),
    ("ref_sd", "ref sd"),
    ("mean_error_sd", "error (ref sd)"),
    ("sd_ratio", "sd ratio"),
    ("lrvb_sd", "LRVB sd"),
    ("lrvb_sd_ratio", "LRVB sd ratio"),
    ("wasserstein_sd", "W1 (ref sd)"),
    ("psis_mean_error_sd", "PSIS error (ref sd)"),
    ("psis_sd_ratio", "PSIS sd ratio"),
)


def _parameter_css(column: str, value: float) -> str:
    if _is_missing(value):
        return ""
    if column in ("mean_error_sd", "psis_mean_error_sd", "wasserstein_sd"):
        return "bad" if abs(value) > _ERROR_CUE else ""
    if column in ("sd_ratio", "psis_sd_ratio", "lrvb_sd_ratio"):
        return "" if _SD_RATIO_CUE[0] <= value <= _SD_RATIO_CUE[1] else "bad"
    return ""


def _parameter_table(report) -> str:
    table = report.table
    if not len(table):
        return "<p>No method is scored against a separate reference.</p>"
    columns = [c for c in _PARAMETER_COLUMNS if c[0] in table.columns]
    rows = [
        [(_escape(r["method"]), ""), (_escape(r["parameter"]), "")]
        + [(_number(r[c]) if not _is_missing(r[c]) else "&ndash;", _parameter_css(c, r[c])) for c, _ in columns]
        for _, r in table.iterrows()
    ]
    legend = (
        f'<p class="legend">Tinted: |error| or W1 above {_ERROR_CUE} reference sd, or an sd ratio outside '
        f"[{_SD_RATIO_CUE[0]}, {_SD_RATIO_CUE[1]}]. PSIS columns are the guide's estimates after Pareto-smoothed "
        "importance reweighting. LRVB columns (DADVI) are the linear-response sd, a covariance correction of the mean-field "
        "fit.</p>"
    )
    return (
        _table(["method", "parameter"] + [h for _, h in columns], rows, text_columns=2, table_id="parameter-table")
        + legend
    )


def render_comparison_html(report, figures: Mapping[str, FigureLike], *, notes: Optional[Sequence[str]] = None) -> str:
    """The page of a :class:`~vilab.inference.comparison.api.ComparisonReport`.

    Args:
        report: what :func:`~vilab.inference.comparison.api.compare` returned.
        figures: figure name -> PNG bytes, PNG path or matplotlib Figure (names as in
            :func:`~vilab.inference.report.plots.comparison_figures` get a reading guide as caption).
        notes: the warnings in words; ``None`` takes :func:`~vilab.inference.report.verdicts.warnings_for`.

    Returns:
        One self-contained HTML document.
    """
    if not isinstance(figures, Mapping):
        raise TypeError(f"figures: expected a mapping of name -> figure; got {type(figures).__name__}")
    notes = warnings_for(report) if notes is None else list(notes)
    methods = ", ".join(report.methods)
    subtitle = (
        f"Reference posterior: <b>{_escape(report.reference_name)}</b>. Methods: {_escape(methods)}. "
        f"{len(report.reference)} scalar parameters."
    )
    return _page(
        report.title,
        subtitle,
        [
            ("warnings", f"Warnings ({len(notes)})", _warnings_block(notes)),
            ("summary", "Methods", _summary_table(report)),
            ("parameters", "Parameters", _parameter_table(report)),
            ("figures", "Figures", _figures_block(figures, _COMPARISON_CAPTIONS)),
        ],
    )


# ----------------------------------------------------------------------------- VAE page
def vae_warnings(metrics: Mapping[str, Any]) -> list[str]:
    """Posterior collapse and estimator problems of a VAE evaluation, in words.

    ``metrics`` holds the keys of :func:`~vilab.inference.vae.evaluation.evaluate_vae`.
    """
    notes = []
    dim, active = metrics.get("latent_dim"), metrics.get("active_units")
    if dim is not None and active is not None and active < dim:
        notes.append(
            f"{dim - active} of {dim} latent units are inactive (Cov_x E[z_d|x] <= 0.01): the encoder ignores "
            "the input along them (posterior collapse). Try KL warm-up (--kl-warmup), free bits (--free-bits) "
            "or a smaller latent space."
        )
    kl_per_dim = metrics.get("kl_per_dim")
    if kl_per_dim:
        collapsed = int(np.sum(np.asarray(kl_per_dim, dtype=float) < _COLLAPSED_KL))
        if collapsed:
            notes.append(
                f"{collapsed} of {len(kl_per_dim)} latent dimensions carry less than {_COLLAPSED_KL} nats of "
                "KL: their q(z_d|x) equals the prior, so they encode nothing."
            )
    kl = metrics.get("kl")
    if kl is not None and math.isfinite(kl) and kl < 0.1:
        notes.append(
            f"The total KL is {kl:.3g} nats: the whole posterior has collapsed onto the prior and the decoder "
            "models the data on its own."
        )
    mc, se = metrics.get("log_likelihood_mc_stderr"), metrics.get("log_likelihood_stderr")
    if mc is not None and se is not None and math.isfinite(mc) and math.isfinite(se) and mc > se:
        notes.append(
            f"The importance-sampled log p(x) has Monte Carlo error {mc:.3g} above its test-set error {se:.3g}: "
            "raise --iw-samples."
        )
    if metrics.get("note"):
        notes.append(f"Note: {metrics['note']}.")
    return notes


def _vae_cards(metrics: Mapping[str, Any]) -> str:
    def pm(key, err):
        value = metrics.get(key)
        if _is_missing(value):
            return "n/a"
        return f"{value:.2f}" + (f" &plusmn; {metrics[err]:.2f}" if not _is_missing(metrics.get(err)) else "")

    cards = [
        ("test ELBO (nats)", pm("elbo", "elbo_stderr")),
        ("log p(x), importance sampled", pm("log_likelihood", "log_likelihood_stderr")),
        ("reconstruction E_q[log p(x|z)]", _number(metrics.get("reconstruction"), 5)),
        ("KL(q(z|x) || p(z))", _number(metrics.get("kl"), 4)),
        ("active units", f"{_number(metrics.get('active_units'))} / {_number(metrics.get('latent_dim'))}"),
        ("mutual information I(x; z)", _number(metrics.get("mutual_information"), 3)),
        ("importance samples K", _number(metrics.get("iw_samples"))),
        ("test images", _number(metrics.get("num_examples"))),
    ]
    extra = [(k, _number(metrics[k])) for k in ("data", "guide", "split") if k in metrics]
    return (
        '<dl class="metrics" id="metrics-cards">'
        + "".join(f"<div><dt>{_escape(k)}</dt><dd>{v}</dd></div>" for k, v in cards + extra)
        + "</dl>"
    )


def _collapse_table(metrics: Mapping[str, Any]) -> str:
    variances = metrics.get("unit_variances") or []
    kl_per_dim = metrics.get("kl_per_dim")
    if not variances:
        return "<p>No per-dimension diagnostics.</p>"
    top = max(max(variances), 1e-12)
    rows = []
    for d, variance in enumerate(variances):
        kl = None if kl_per_dim is None else kl_per_dim[d]
        width = int(round(120 * variance / top))
        status = ("active", "good") if variance > 0.01 else ("inactive", "bad")
        rows.append(
            [
                (f"z{d}", ""),
                (_number(variance), ""),
                (f'<span class="bar" style="width:{width}px"></span>', "text"),
                ("&ndash;" if kl is None else _number(kl), "" if kl is None or kl >= _COLLAPSED_KL else "bad"),
                status,
            ]
        )
    legend = (
        '<p class="legend">A unit is active when Cov_x(E_q[z_d|x]) &gt; 0.01 (Burda et al. 2016, '
        "arXiv:1509.00519). KL per dimension is shown when q(z|x) and p(z) are diagonal Gaussians.</p>"
    )
    return _table(["unit", "Cov_x E[z_d|x]", "", "KL (nats)", "status"], rows, table_id="collapse-table") + legend


def render_vae_html(
    metrics: Mapping[str, Any], figures: Mapping[str, FigureLike], *, title: str = "vilab VAE run"
) -> str:
    """The page of a VAE evaluation.

    Args:
        metrics: the dict of :func:`~vilab.inference.vae.evaluation.evaluate_vae` (plus any of
            ``data``, ``guide``, ``split``).
        figures: figure name -> PNG bytes, PNG path or Figure, e.g. what
            :func:`~vilab.inference.vae.plots.save_all_figures` returns.
        title: page title.

    Returns:
        One self-contained HTML document.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(f"metrics: expected a mapping (evaluate_vae's dict); got {type(metrics).__name__}")
    if not isinstance(figures, Mapping):
        raise TypeError(f"figures: expected a mapping of name -> figure; got {type(figures).__name__}")
    notes = vae_warnings(metrics)
    gap = (
        None
        if _is_missing(metrics.get("log_likelihood")) or _is_missing(metrics.get("elbo"))
        else metrics["log_likelihood"] - metrics["elbo"]
    )
    subtitle = "ELBO = reconstruction &minus; KL; log p(x) &minus; ELBO estimates KL(q(z|x) || p(z|x))" + (
        f" = {gap:.2f} nats here." if gap is not None else "."
    )
    return _page(
        title,
        subtitle,
        [
            ("warnings", f"Warnings ({len(notes)})", _warnings_block(notes)),
            ("metrics", "Test metrics", _vae_cards(metrics)),
            ("collapse", "Posterior collapse, per latent unit", _collapse_table(metrics)),
            ("figures", "Figures", _figures_block(figures, _VAE_CAPTIONS)),
        ],
    )


def write_vae_report(
    run_dir: str | os.PathLike, metrics: Mapping[str, Any], figures: Optional[Mapping[str, FigureLike]] = None
) -> Path:
    """Write ``run_dir/report.html`` for a VAE evaluation (the hook for ``vilab vae evaluate``)."""
    from vilab.fileio import write_text

    title = f"vilab VAE: {metrics.get('guide', 'guide')} on {metrics.get('data', 'data')}"
    return write_text(Path(run_dir) / "report.html", render_vae_html(metrics, figures or {}, title=title))
