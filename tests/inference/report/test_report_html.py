"""The HTML report pages: content, self-containedness, and a real render in headless Chromium.

The browser tests open the page from disk in Debian's ``chromium`` with the network off, inject
a tiny script into a copy of the page that records, after the ``load`` event, how many images
decoded (``naturalWidth > 0``), how many tables exist and every error event, read that record
back through ``--dump-dom``, and take a screenshot.
"""

import os
import re
import shutil
import subprocess
import warnings

import numpy as np
import pytest
import torch

from vilab.inference.report.html import encode_figure, render_comparison_html, render_vae_html, vae_warnings

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"]
needs_chromium = pytest.mark.skipif(
    not os.path.exists(CHROMIUM), reason="Debian chromium not installed (apt-get install -y chromium)"
)

_CHECK_HEAD = """<script>window.__vilabErrors=[];window.addEventListener('error',function(e){
window.__vilabErrors.push(String(e.message||(e.target&&(e.target.src||e.target.href))||'error'));},true);</script>"""
_CHECK_BODY = """<script>window.addEventListener('load',function(){var imgs=document.images,broken=0;
for(var i=0;i<imgs.length;i++){if(!(imgs[i].complete&&imgs[i].naturalWidth>0))broken++;}
var m=document.createElement('div');m.id='vilab-load-check';m.setAttribute('data-images',imgs.length);
m.setAttribute('data-broken',broken);m.setAttribute('data-tables',document.querySelectorAll('table').length);
m.setAttribute('data-errors',window.__vilabErrors.join(' | '));document.body.appendChild(m);});</script>"""


@pytest.fixture(scope="module")
def saved_report(tmp_path_factory):
    """A real comparison (normal-normal model, exact reference, meanfield and NUTS), saved."""
    from vilab import compare, get_model

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        spec = get_model("normal_normal")
        model, args, kwargs = spec.load()
        torch.manual_seed(0)
        reference = {"loc": spec.exact_posterior()["loc"].sample((1000,))}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short NUTS chains warn about ESS; the page says it instead
            report = compare(
                model,
                *args,
                guides=("meanfield",),
                reference=reference,
                include_nuts=True,
                svi_options={"num_steps": 200, "lr": 0.05},
                num_draws=200,
                progress=False,
                nuts_options={"num_samples": 50, "num_warmup": 50, "num_chains": 2},
                **kwargs,
            )
        out = report.save(tmp_path_factory.mktemp("report"))
    finally:
        torch.set_default_dtype(previous)
    return report, out


@pytest.fixture(scope="module")
def vae_page(tmp_path_factory):
    """A real (untrained, tiny) VAE on sklearn digits, evaluated and plotted."""
    from vilab.datasets import load_dataset, make_loader
    from vilab.inference.vae.evaluation import evaluate_vae
    from vilab.inference.vae.plots import save_all_figures
    from vilab.models.vae.vae import VAEConfig, build_vae

    # Module fixtures are built before the per-test dtype fixture runs: fix the dtype here.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        torch.manual_seed(0)
        data = load_dataset("digits")
        vae = build_vae(
            VAEConfig(
                data.image_shape, latent_dim=3, num_levels=data.num_levels, encoder_hidden=(32,), decoder_hidden=(32,)
            )
        )
        x, labels = data.test[:60].float(), data.test_labels[:60]
        metrics = evaluate_vae(vae, make_loader(x, labels, batch_size=30), iw_samples=20, chunk_size=20)
        metrics.update(data="digits", guide="meanfield", split="test")
        figures = save_all_figures(vae, x, labels, str(tmp_path_factory.mktemp("vae") / "figures"))
    finally:
        torch.set_default_dtype(previous)
    return metrics, figures


def _open_in_chromium(page_path, tmp_path):
    """(marker attributes, stderr, screenshot path) of ``page_path`` rendered headless."""
    checked = tmp_path / "checked.html"
    text = open(page_path, encoding="utf-8").read()
    checked.write_text(
        text.replace("</head>", _CHECK_HEAD + "</head>", 1).replace("</body>", _CHECK_BODY + "</body>", 1),
        encoding="utf-8",
    )
    url = checked.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            *profile,
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    shot = tmp_path / "screenshot.png"
    subprocess.run(
        [
            CHROMIUM,
            *CHROMIUM_FLAGS,
            *profile,
            f"--screenshot={shot}",
            "--window-size=1280,2000",
            "--hide-scrollbars",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    match = re.search(r'<div id="vilab-load-check"([^>]*)>', dom.stdout)
    assert match, f"the load check never ran; chromium stderr:\n{dom.stderr[-2000:]}"
    marker = dict(re.findall(r'data-(\w+)="([^"]*)"', match.group(1)))
    return marker, dom.stderr, shot


def _assert_screenshot(shot):
    from matplotlib.image import imread

    assert shot.exists() and shot.read_bytes().startswith(b"\x89PNG")
    pixels = imread(str(shot))
    assert pixels.shape[:2] == (2000, 1280)
    assert pixels[..., :3].std() > 0.05, "the screenshot is blank"
    keep = os.environ.get("VILAB_SCREENSHOT_DIR")
    if keep:
        os.makedirs(keep, exist_ok=True)
        shutil.copy(shot, os.path.join(keep, shot.parent.name + ".png"))


def _console_errors(stderr):
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_saved_report_writes_a_self_contained_page(saved_report):
    report, out = saved_report
    page = (out / "report.html").read_text(encoding="utf-8")
    figures = sorted(p.stem for p in out.glob("*.png"))
    assert {"marginals", "forest", "elbo", "nuts_trace", "nuts_rank", "energy"} <= set(figures)
    for name in figures:
        assert f'id="figure-{name}"' in page
    assert page.count('src="data:image/png;base64,') == len(figures)
    assert not re.search(r'(src|href)="(https?:)?//', page), "the page must not reach the network"
    assert 'id="summary-table"' in page and 'id="parameter-table"' in page
    for method in report.methods:
        assert f'<td class="text">{method}</td>' in page
    assert (out / "report.md").exists()


def test_warnings_appear_in_words(saved_report, monkeypatch):
    report, _ = saved_report
    monkeypatch.setitem(report.methods["meanfield"].metrics, "k_hat", 0.93)  # as a poor guide would have
    monkeypatch.setitem(report.methods["nuts"].metrics, "num_divergences", 7)
    monkeypatch.setitem(report.methods["nuts"].metrics, "r_hat_max", 1.2)
    page = render_comparison_html(report, {})
    assert "this guide&#x27;s estimates are unreliable" in page
    assert "7 divergent transitions" in page
    assert "R-hat up to 1.200 (&gt; 1.01)" in page


def test_encode_figure_rejects_what_is_not_a_png(tmp_path):
    with pytest.raises(ValueError, match="expected PNG data"):
        encode_figure(b"GIF89a....")
    with pytest.raises(TypeError, match="expected PNG bytes, a PNG path or a matplotlib Figure; got int"):
        encode_figure(3)
    with pytest.raises(TypeError, match="figures: expected a mapping"):
        render_vae_html({}, ["a.png"])


def test_vae_warnings_name_collapsed_units():
    metrics = {
        "latent_dim": 4,
        "active_units": 1,
        "kl_per_dim": [2.0, 0.001, 0.0, 0.002],
        "kl": 2.003,
        "log_likelihood_mc_stderr": 0.5,
        "log_likelihood_stderr": 0.1,
    }
    notes = " ".join(vae_warnings(metrics))
    assert "3 of 4 latent units are inactive" in notes
    assert "3 of 4 latent dimensions carry less than 0.01 nats" in notes
    assert "raise --iw-samples" in notes
    assert vae_warnings({"latent_dim": 2, "active_units": 2, "kl_per_dim": [1.0, 1.0], "kl": 2.0}) == []


@pytest.mark.browser
@needs_chromium
def test_comparison_page_renders_in_chromium(saved_report, tmp_path):
    _, out = saved_report
    marker, stderr, shot = _open_in_chromium(out / "report.html", tmp_path)
    assert int(marker["images"]) == len(list(out.glob("*.png")))
    assert marker["broken"] == "0", "an embedded figure did not decode"
    assert marker["tables"] == "2"
    assert marker["errors"] == "", marker["errors"]
    assert _console_errors(stderr) == []
    _assert_screenshot(shot)


@pytest.mark.browser
@needs_chromium
def test_the_load_check_catches_a_broken_figure(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text(
        "<!DOCTYPE html><html><head></head><body><table></table>"
        '<img src="data:image/png;base64,iVBORw0KGgo="></body></html>',
        encoding="utf-8",
    )
    marker, _, _ = _open_in_chromium(page, tmp_path)
    assert (marker["images"], marker["broken"], marker["tables"]) == ("1", "1", "1")
    assert marker["errors"] != ""


@pytest.mark.browser
@needs_chromium
def test_vae_page_renders_in_chromium(vae_page, tmp_path):
    metrics, figures = vae_page
    page = tmp_path / "vae.html"
    page.write_text(render_vae_html(metrics, figures), encoding="utf-8")
    marker, stderr, shot = _open_in_chromium(page, tmp_path)
    assert int(marker["images"]) == len(figures) >= 4
    assert marker["broken"] == "0"
    assert marker["tables"] == "1"  # per-unit collapse table
    assert marker["errors"] == ""
    assert _console_errors(stderr) == []
    _assert_screenshot(shot)
    assert np.isfinite(metrics["elbo"])
