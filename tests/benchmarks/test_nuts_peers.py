"""The pure parts of ``benchmarks/nuts_peers.py``: scores, ratios, tables, the runs' environment
and the model selection (no sampler runs here)."""

import os
import sys

import numpy as np
import pytest

BENCHMARKS = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks")
sys.path.insert(0, os.path.abspath(BENCHMARKS))

from nuts_peers import _earlier, _environment, _write  # noqa: E402
from peer_problems import ALIASES, select  # noqa: E402
from peer_report import accuracy, min_bulk_ess, ratio_summary, tables  # noqa: E402
from peer_samplers import describe_path  # noqa: E402


def _run(ess_per_second, seconds=2.0, **extra):
    return {
        "ess_per_second": ess_per_second,
        "seconds": [seconds],
        "accurate": True,
        "max_abs_mean_error_sd": 0.01,
        "max_rhat": 1.0,
        "rhat_below_1.01": True,
        **extra,
    }


def test_min_bulk_ess_of_independent_draws_is_near_their_number_and_skips_constants():
    rng = np.random.default_rng(0)
    draws = {"a": rng.normal(size=(4, 1000)), "L": np.stack([rng.normal(size=(4, 1000)), np.zeros((4, 1000))], -1)}
    assert 3200 < min_bulk_ess(draws) < 4800  # iid: ESS = 4000 up to the estimator's noise


def test_accuracy_flags_a_mean_off_by_ten_standard_errors_and_lists_missing_statistics():
    rng = np.random.default_rng(1)
    values = rng.normal(size=4000)  # 4 chains x 1000, chain-major; mean error ~ 1/sqrt(4000)
    reference = {"x": (0.0, 1.0, 1e4), "y": (0.0, 1.0, 1e4), "absent": (0.0, 1.0, 1e4)}
    good = accuracy({"x": values, "y": values + 0.0}, reference, num_chains=4)
    assert good["accurate"] and good["statistics_missing"] == ["absent"] and good["num_statistics"] == 2
    assert good["max_abs_mean_error_sd"] == pytest.approx(abs(values.mean()), rel=1e-12)
    shifted = accuracy({"x": values, "y": values + 10 / np.sqrt(4000)}, reference, num_chains=4)
    assert (
        not shifted["accurate"]
        and shifted["worst_statistic"] == "y"
        and shifted["max_abs_z"] > shifted["z_threshold"] + 2
    )


def test_ratio_uses_the_better_numpyro_configuration_and_summarises_geometric_mean_and_worst():
    results = {
        "a": {
            "vilab": _run(10.0, path="fast vectorized"),
            "numpyro_vectorized": _run(5.0),
            "numpyro_parallel": _run(20.0),
        },
        "b": {
            "vilab": _run(8.0, path="vmap batching"),
            "numpyro_vectorized": _run(2.0),
            "numpyro_parallel": {"error": "boom"},
        },
    }
    summary = ratio_summary(results)
    assert summary["per_problem"]["a"] == {
        "numpyro_best": "numpyro_parallel",
        "vs_numpyro": 0.5,
        "vs_numpyro_both_sound": True,
    }
    assert summary["per_problem"]["b"]["vs_numpyro"] == 4.0
    assert summary["vs_numpyro"]["geometric_mean"] == pytest.approx(np.sqrt(0.5 * 4.0))
    assert summary["vs_numpyro"]["worst"] == 0.5 and summary["vs_numpyro"]["worst_problem"] == "a"
    assert summary["failed"] == ["b numpyro_parallel: boom"]
    assert summary["vilab_paths"] == {"a": "fast vectorized", "b": "vmap batching"}


def test_a_ratio_against_chains_that_did_not_mix_is_left_out_of_the_sound_summary():
    # arma11: NumPyro's chains in the trap mode have a tiny ESS and R-hat 1.53; the ratio of
    # thousands it gives measures no speed, so the summary over sound problems leaves it out.
    results = {
        "good": {"vilab": _run(10.0), "numpyro_parallel": _run(20.0)},
        "stuck": {"vilab": _run(10.0), "numpyro_parallel": _run(0.01, max_rhat=1.53) | {"rhat_below_1.01": False}},
    }
    summary = ratio_summary(results)
    assert summary["vs_numpyro"]["geometric_mean"] == pytest.approx(np.sqrt(0.5 * 1000.0))
    sound = summary["vs_numpyro_both_sound"]
    assert sound["geometric_mean"] == pytest.approx(0.5) and sound["count"] == 1 and sound["left_out"] == ["stuck"]
    assert "vs_numpyro_both_sound: geometric mean 0.50" in tables(results, summary)


def test_warm_ratio_is_vilab_second_run_over_nutpie_sampling_seconds():
    results = {
        "k": {
            "vilab": _run(1.0, seconds=0.0, path="fast vectorized") | {"seconds": [9.0, 0.6]},
            "nutpie": _run(1.0, sampling_seconds=0.25),
        }
    }
    summary = ratio_summary(results, warm=True)
    assert summary["per_problem"]["k"] == {"warm_time_ratio": pytest.approx(2.4), "within_3x": True}


def test_tables_have_one_cell_per_column_and_mark_inaccurate_runs():
    results = {
        "a": {
            "vilab": _run(10.0, path="fast vectorized") | {"rhat_below_1.01": False},
            "numpyro_vectorized": _run(5.0) | {"accurate": False},
        }
    }
    text = tables(results, ratio_summary(results))
    rows = [line for line in text.splitlines() if line.startswith("|")]
    assert len({row.count("|") for row in rows[:3]}) == 1 and len({row.count("|") for row in rows[3:]}) == 1
    assert "| 0.010 / 1.000 ? | 0.010 / 1.000 ! |" in text and "inaccurate: a numpyro_vectorized" in text
    assert "rhat_not_below_1.01: a vilab" in text


def test_only_numpyro_parallel_gets_host_devices(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --other")
    settings = {"num_chains": 4, "vilab_cache": "/cache/vilab"}
    parallel = _environment("numpyro_parallel", "/tmp/c", settings)
    assert parallel["XLA_FLAGS"] == "--other --xla_force_host_platform_device_count=4"
    assert _environment("numpyro_vectorized", "/tmp/c", settings)["XLA_FLAGS"] == "--other"
    assert parallel["TORCHINDUCTOR_CACHE_DIR"].startswith("/tmp/c") and parallel["VILAB_CACHE_DIR"] == "/cache/vilab"


def test_select_takes_full_short_and_alias_names_and_refuses_unknown_ones():
    available = {"posteriordb/kidiq-kidscore_momiq": None, "zoo/gp_numpyro": None}
    assert select(available, ["kidiq", "gp_numpyro"]) == list(available)
    assert ALIASES["kidiq"] == "posteriordb/kidiq-kidscore_momiq"
    with pytest.raises(ValueError, match="--models: expected names among .*; got 'nope'"):
        select(available, ["nope"])


@pytest.mark.parametrize(
    "config, path",
    [
        ({"backend": "pyro"}, "Pyro fallback"),
        ({"backend": "vectorized", "batching": "vmap"}, "vmap batching"),
        ({"backend": "vectorized", "batching": "plate"}, "fast vectorized"),
    ],
)
def test_describe_path_names_the_path_run_nuts_took(config, path):
    assert describe_path(config) == path


def test_results_written_per_problem_are_resumed_only_with_the_same_settings(tmp_path):
    settings = dict(num_chains=4, num_warmup=10, num_samples=10, seed=0, repeats=1, vilab_cache="/x")
    out = tmp_path / "peers.json"
    results = {"a": {"vilab": _run(10.0), "numpyro_parallel": _run(20.0)}}
    _write(out, settings, ["vilab", "numpyro_parallel"], False, results)
    assert _earlier(out, settings) == results
    with pytest.raises(SystemExit, match="other settings"):
        _earlier(out, {**settings, "num_samples": 1000})
    assert _earlier(tmp_path / "absent.json", settings) == {}
