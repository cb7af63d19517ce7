"""The sweep on Ray's embedded local cluster (``ray.init()`` with no address): the same numbers
as the same tasks run one after another in this process."""

import pandas as pd
import pytest

from vilab.inference.sweep import read_results, sweep

from sweep_helpers import numbers


@pytest.mark.slow  # about 15 s of Ray start and stop on an idle 2-core machine, 80 s on a loaded one
def test_ray_and_serial_sweeps_store_the_same_numbers(tmp_path, tiny, posteriordb_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    grid = (["posteriordb/kidiq-kidscore_momiq"], ["meanfield", "nuts"], [0])
    options = {**tiny, "posteriordb": str(posteriordb_path), "progress": False, "leaderboard": False}
    on_ray = sweep(*grid, out=tmp_path / "ray", **options)
    serial = sweep(*grid, out=tmp_path / "serial", serial=True, **options)
    assert (on_ray.num_done, on_ray.num_failed) == (2, 0)
    ray_rows, serial_rows = read_results(on_ray.store), read_results(serial.store)
    assert ray_rows["node_id"].notna().all() and serial_rows["node_id"].isna().all()
    pd.testing.assert_frame_equal(numbers(ray_rows), numbers(serial_rows))
