"""The leaderboard: aggregates over seeds, a self-contained page, and a real render in Chromium."""

import math
import os
import re
import shutil
import subprocess

import pandas as pd
import pytest

from vilab.inference.sweep.grid import Task
from vilab.inference.sweep.leaderboard import leaderboard_table, write_leaderboard
from vilab.inference.sweep.store import SweepStore
from vilab.inference.sweep.tasks import GRADIENT_SCOPE_NUTS, GRADIENT_SCOPE_SVI

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"

# Rows as tasks write them (the numbers are made up: this checks arithmetic and layout).
ERRORS = {
    ("m1", "meanfield"): [0.4, 0.6, 0.5],
    ("m1", "nuts"): [0.05, 0.07, 0.06],
    ("m2", "meanfield"): [1.0, 2.0, None],
    ("m2", "nuts"): [0.1, 0.2, 0.3],
}


@pytest.fixture
def store(tmp_path):
    with SweepStore(tmp_path / "results.sqlite") as opened:
        opened.write_reference("r", "m2", {"seed": 1}, {"x": [0.0, 1.0]}, {"r_hat_max": 1.2, "num_divergences": 3})
        for (model, method), errors in ERRORS.items():
            for seed, error in enumerate(errors):
                task = Task(model, method, seed, {})
                if error is None:
                    opened.write(task, {"status": "failed", "error": "NonFiniteLossError: the loss became non-finite"})
                    continue
                nuts = method == "nuts"
                opened.write(
                    task,
                    {
                        "status": "ok",
                        "error": None,
                        "mean_abs_error_sd": error,
                        "max_abs_error_sd": 2 * error,
                        "mean_abs_log_sd_ratio": error / 2,
                        "k_hat": None if nuts else 0.5 + seed / 5,
                        "num_gradient_evaluations": 1000 * (seed + 1) * (5 if nuts else 1),
                        "gradient_evaluations_scope": GRADIENT_SCOPE_NUTS if nuts else GRADIENT_SCOPE_SVI,
                        "wall_time": 1.5 + seed,
                        "converged": None if nuts else seed != 1,
                    },
                )
        yield opened


def test_table_combines_the_seeds_that_finished(store):
    table = leaderboard_table(store.results()).set_index(["model", "method"])
    row = table.loc[("m1", "meanfield")]
    assert (row["num_ok"], row["num_tasks"]) == (3, 3)
    assert row["mean_abs_error_sd"] == pytest.approx(0.5) and row["mean_abs_error_sd_sd"] == pytest.approx(0.1)
    assert row["k_hat"] == pytest.approx(0.7) and row["num_gradient_evaluations"] == pytest.approx(2000)
    failed = table.loc[("m2", "meanfield")]
    assert (failed["num_ok"], failed["num_tasks"]) == (2, 3) and failed["mean_abs_error_sd"] == pytest.approx(1.5)
    assert math.isnan(table.loc[("m1", "nuts"), "k_hat"])
    assert list(table.loc["m1"].index) == ["nuts", "meanfield"]  # best first


def test_page_is_self_contained_and_says_what_to_distrust(store, tmp_path):
    page = write_leaderboard(store, tmp_path / "board")
    text = page.read_text()
    assert text.count('src="data:image/png;base64,') == 2  # one accuracy-against-cost figure per model
    assert not re.search(r'(src|href)="(https?:)?//', text), "the page must not reach the network"
    assert "NonFiniteLossError: the loss became non-finite" in text
    assert "The NUTS reference of m2 has R-hat 1.2 and 3 divergences" in text
    assert "1 of 12 tasks failed" in text
    assert (
        "2 VI fits stopped before their loss converged (model method (seeds)): m1 meanfield (1), m2 meanfield (1)"
        in text
    )
    assert "PSIS k-hat above 0.7 in 1 tasks (m1 meanfield)" in text
    csv = pd.read_csv(tmp_path / "board" / "leaderboard.csv")
    assert len(csv) == 4 and {"model", "method", "num_ok", "mean_abs_error_sd"} <= set(csv.columns)


def test_an_empty_store_is_refused_with_a_clear_error(tmp_path):
    with SweepStore(tmp_path / "results.sqlite") as empty:
        with pytest.raises(ValueError, match="store: expected at least one task"):
            write_leaderboard(empty)


@pytest.mark.browser
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="Debian chromium not installed (apt-get install -y chromium)")
def test_page_renders_in_headless_chromium_with_every_image_decoded(store, tmp_path):
    page = write_leaderboard(store, tmp_path / "board")
    checked = tmp_path / "checked.html"
    probe = (
        "<script>window.addEventListener('load',function(){var i=document.images,b=0;for(var k=0;k<i.length;k++)"
        "{if(!(i[k].complete&&i[k].naturalWidth>0))b++;}var m=document.createElement('div');m.id='probe';"
        "m.setAttribute('data-images',i.length);m.setAttribute('data-broken',b);"
        "m.setAttribute('data-tables',document.querySelectorAll('table').length);document.body.appendChild(m);});"
        "</script>"
    )
    checked.write_text(page.read_text().replace("</body>", probe + "</body>", 1))
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
    ]
    dom = subprocess.run(
        [CHROMIUM, *flags, "--virtual-time-budget=10000", "--dump-dom", checked.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    found = dict(re.findall(r'data-(\w+)="([^"]*)"', re.search(r'<div id="probe"([^>]*)>', dom.stdout).group(1)))
    assert found == {"images": "2", "broken": "0", "tables": "4"}  # overall, two models, failed tasks
    shot = tmp_path / "shot.png"
    subprocess.run(
        [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1280,1800", checked.as_uri()],
        capture_output=True,
        timeout=120,
    )
    from matplotlib.image import imread

    assert imread(str(shot))[..., :3].std() > 0.05, "the screenshot is blank"


def test_tasks_their_own_checks_distrust_are_counted_as_flagged():
    rows = [
        {"model": "m", "method": "nuts", "seed": 0, "status": "ok", "mean_abs_error_sd": 0.02, "r_hat_max": 1.0},
        {"model": "m", "method": "nuts", "seed": 1, "status": "ok", "mean_abs_error_sd": 10.0, "r_hat_max": 1.53},
        {"model": "m", "method": "dadvi", "seed": 0, "status": "ok", "mean_abs_error_sd": 84.0, "converged": 0.0},
        {
            "model": "m",
            "method": "dadvi",
            "seed": 1,
            "status": "ok",
            "mean_abs_error_sd": 0.1,
            "converged": 1.0,
            "k_hat": 0.9,
        },
        {
            "model": "m",
            "method": "dadvi",
            "seed": 2,
            "status": "ok",
            "mean_abs_error_sd": 0.1,
            "converged": 1.0,
            "k_hat": 0.4,
        },
    ]
    table = leaderboard_table(pd.DataFrame(rows)).set_index("method")
    assert table.loc["nuts", "num_flagged"] == 1 and table.loc["dadvi", "num_flagged"] == 2
