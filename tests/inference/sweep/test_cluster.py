"""Sweeps on a real two-node Ray cluster on loopback: a driver killed mid-sweep resumes to the same
store as an uninterrupted run, and a node killed mid-sweep costs no task and counts none twice.

The cluster (``ray start`` head + one node, one CPU each) is shared by the module's tests; the
node-killing test runs last since it leaves one node.
"""

import os
import signal
import sqlite3
import subprocess
import sys
import time

import pandas as pd
import pytest

from vilab.inference.sweep.store import read_results

from sweep_helpers import numbers

psutil = pytest.importorskip("psutil")
from ray_cluster import ENV, LocalCluster  # noqa: E402

pytestmark = pytest.mark.slow

VILAB = os.path.join(os.path.dirname(sys.executable), "vilab")
MODELS, METHODS, SEEDS = ["normal_normal", "beta_bernoulli"], ["meanfield", "fullrank", "nuts"], [0, 1]
CONFIG = f"""models = {MODELS!r}
methods = {METHODS!r}
seeds = {SEEDS!r}
num_draws = 50
max_retries = 3
[svi]
num_steps = 60
[nuts]
num_samples = 40
num_warmup = 40
num_chains = 2
[reference]
num_samples = 60
num_warmup = 60
num_chains = 2
"""


@pytest.fixture(scope="module")
def cluster():
    started = LocalCluster(num_nodes=2, cpus_per_node=1)
    try:
        yield started
    finally:
        started.stop()


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "sweep.toml"
    path.write_text(CONFIG)
    return path


def _driver(cluster, config, out):
    """``vilab sweep`` joining the cluster, as its own process."""
    return subprocess.Popen(
        [VILAB, "sweep", "--config", str(config), "--out", str(out), "--address", cluster.address, "--quiet"],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _rows(out) -> int:
    try:
        with sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True) as connection:
            return connection.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def _wait_for_rows(out, count, driver, timeout=400):
    deadline = time.monotonic() + timeout
    while _rows(out) < count:
        assert driver.poll() is None, f"the driver ended early:\n{driver.stdout.read()}"
        assert time.monotonic() < deadline, f"fewer than {count} rows after {timeout} s"
        time.sleep(0.5)


def _finish(driver, timeout=600) -> str:
    output, _ = driver.communicate(timeout=timeout)
    assert driver.returncode == 0, output
    return output


def _assert_every_task_once(out):
    rows = read_results(out / "results.sqlite")
    assert len(rows) == len(MODELS) * len(METHODS) * len(SEEDS) and rows["task_id"].is_unique
    assert set(zip(rows["model"], rows["method"], rows["seed"])) == {
        (m, k, s) for m in MODELS for k in METHODS for s in SEEDS
    }
    assert set(rows["status"]) == {"ok"}, rows[rows["status"] != "ok"]["error"].tolist()
    return rows


def test_a_killed_driver_resumes_without_rerunning_and_ends_with_the_uninterrupted_numbers(cluster, config, tmp_path):
    whole = tmp_path / "whole"
    _finish(_driver(cluster, config, whole))
    expected = _assert_every_task_once(whole)
    assert set(expected["node_ip"]) <= {"127.0.0.2", "127.0.0.3"}

    resumed = tmp_path / "resumed"
    driver = _driver(cluster, config, resumed)
    _wait_for_rows(resumed, 3, driver)
    driver.send_signal(signal.SIGKILL)
    driver.wait(timeout=60)
    before = read_results(resumed / "results.sqlite")
    assert 3 <= len(before) < len(expected), "the kill came after the sweep had ended"
    output = _finish(_driver(cluster, config, resumed))
    assert f"{len(before)} found finished, {len(expected) - len(before)} done now, 0 failed" in output
    after = _assert_every_task_once(resumed)
    kept = after.set_index("task_id").loc[before["task_id"], "finished_at"]
    assert list(kept) == list(before["finished_at"]), "a task finished before the kill was run again"
    pd.testing.assert_frame_equal(numbers(after), numbers(expected))


def test_a_node_killed_mid_sweep_costs_no_task_and_counts_none_twice(cluster, config, tmp_path):
    out = tmp_path / "out"
    driver = _driver(cluster, config, out)
    _wait_for_rows(out, 3, driver)
    assert set(cluster.alive_nodes()) == {"127.0.0.2", "127.0.0.3"}
    cluster.kill_node(1)
    killed_at = _rows(out)
    assert killed_at < len(MODELS) * len(METHODS) * len(SEEDS), "the kill came after the sweep had ended"
    _finish(driver)
    _assert_every_task_once(out)
    assert cluster.alive_nodes() == ["127.0.0.2"]
    # the tasks that ended after the node died (rows in the order written) all ran on the head
    with sqlite3.connect(out / "results.sqlite") as connection:
        order = [ip for (ip,) in connection.execute("SELECT node_ip FROM results ORDER BY rowid")]
    assert set(order[killed_at + 2 :]) == {"127.0.0.2"}
