"""``report.warnings_for``: what the comparison report tells the user, in words."""

from types import SimpleNamespace

import numpy as np
import pytest

from vilab.inference.report.save import warnings_for


def _report(n_steps: float, dense: bool, ess: float):
    result = SimpleNamespace(
        config={"num_chains": 4, "dense_mass": dense}, sample_stats={"n_steps": np.full((4, 100), n_steps)}
    )
    nuts = SimpleNamespace(
        kind="nuts", result=result, metrics={"ess_bulk_min": ess, "r_hat_max": 1.0, "num_divergences": 0}
    )
    return SimpleNamespace(methods={"nuts": nuts}, failures={})


@pytest.mark.parametrize(
    "n_steps, dense, ess, advised",
    [
        (127.0, False, 150.0, True),  # long trajectories, poor mixing, diagonal metric
        (127.0, True, 150.0, False),  # already dense
        (7.0, False, 150.0, False),  # short trajectories: something else is wrong
        (127.0, False, 4000.0, False),  # mixes well enough: no advice
    ],
)
def test_dense_mass_is_advised_only_for_long_trajectories_that_mix_poorly(n_steps, dense, ess, advised):
    notes = warnings_for(_report(n_steps, dense, ess))
    assert any("dense_mass" in note for note in notes) is advised
    assert any("bulk ESS as low as" in note for note in notes) is (ess < 400)


def test_a_guide_off_where_the_reference_is_skewed_is_explained():
    from types import SimpleNamespace

    import numpy as np
    import pandas as pd

    from vilab.inference.report.verdicts import warnings_for

    rng = np.random.default_rng(0)
    reference = {"tau": rng.lognormal(0.0, 0.8, 20000), "mu": rng.normal(size=20000)}
    table = pd.DataFrame({"method": ["dadvi", "dadvi"], "parameter": ["tau", "mu"], "mean_error_sd": [0.17, 0.15]})
    report = SimpleNamespace(table=table, reference=reference, methods={}, failures={})
    (note,) = warnings_for(report)
    # tau's lognormal(0, 0.8) has skewness about 3; mu is symmetric, so only tau is named.
    assert note.startswith("dadvi: 1 parameter(s) more than 0.1 sd off") and "worst tau: +0.17 sd" in note
    table["mean_error_sd"] = [0.05, 0.15]
    assert warnings_for(report) == []
