"""NUTS on the nine posteriordb ports against the Stan reference posteriors (slow).

Run with ``python -m pytest -q -m slow tests/inference/nuts/test_nuts_posteriordb.py`` (or one problem:
``... -k kidiq``); the references are read from ``$VILAB_POSTERIORDB`` or ``../shared/posteriordb``
and the tests skip when neither exists. Each problem runs 4 chains of 1000 warm-up and 1000 draws
with ``run_nuts``'s default backend (the vectorized sampler; Pyro's NUTS only where a model cannot
be batched, which the failure message reports), once with its leaves fused by Inductor from the
start (``compiler="inductor"``, what the default ``"auto"`` switches to in runs this long) and
once on the virtual machine (``compiler="vm"``, what ``"auto"`` starts on); under a minute per
problem and kernel on a 2-core machine.

For every reference parameter:

* mean: ``|mean - ref_mean| < z * ref_sd * sqrt(1/ESS + 1/ESS_ref)``, the Monte Carlo standard
  error of the difference, with ``ESS`` ArviZ's bulk ESS of our pooled chains and ``ESS_ref``
  the reference's (about 10k). ``z`` is Bonferroni over all 53 parameters of the nine
  problems and the two kernels for an overall false-failure rate of 1%:
  ``z = Phi^{-1}(1 - 0.01 / (2 * 53 * 2)) = 3.91``.
* sd: ``|sd / ref_sd - 1| < 0.10``. With ``ESS >= 400`` the relative Monte Carlo error of an sd
  is about ``1 / sqrt(2 ESS) <= 3.5%`` for near-normal marginals, so 10% is about a 3-sigma band.
* ``ESS >= 400`` and split R-hat ``< 1.01``, so that both bands are meaningful.
"""

import arviz as az
import numpy as np
import pytest
from scipy import stats

from vilab.inference import run_nuts
from vilab.samples import flatten_samples
from vilab.posteriordb import load_posteriordb

pytestmark = pytest.mark.slow

NUM_PARAMETERS = 53  # 7 + 4 + 4 + 6 + 3 + 5 + 8 + 10 + 6 over the nine references
FAILURE_RATE = 0.01
KERNELS = ("inductor", "vm")
Z = stats.norm.ppf(1 - FAILURE_RATE / (2 * NUM_PARAMETERS * len(KERNELS)))
MIN_ESS = 400
SD_TOLERANCE = 0.10

# The nine posteriors of ../shared/posteriordb (the ports in tests/data/posteriordb are not run
# here).
NAMES = [
    "arK-arK",
    "arma-arma11",
    "garch-garch11",
    "hmm_example-hmm_example",
    "kidiq-kidscore_momiq",
    "low_dim_gauss_mix-low_dim_gauss_mix",
    "mesquite-logmesquite",
    "nes2000-nes",
    "sblrc-blr",
]

# Dense mass for the correlated regressions (kidiq's beta has corr -0.99; sblrc is tight and
# correlated); a higher target acceptance keeps sblrc's tiny step sizes stable.
OPTIONS = {
    "arK-arK": dict(dense_mass=True),
    "kidiq-kidscore_momiq": dict(dense_mass=True),
    "mesquite-logmesquite": dict(dense_mass=True),
    "nes2000-nes": dict(dense_mass=True),
    "sblrc-blr": dict(dense_mass=True, target_accept=0.9),
}


def test_bonferroni_budget_counts_every_reference_parameter(posteriordb_path):
    total = sum(len(load_posteriordb(posteriordb_path, name).reference_draws) for name in NAMES)
    assert total == NUM_PARAMETERS


@pytest.mark.engine_path  # it vouches for each kernel by name
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", NAMES)
def test_nuts_matches_reference_means_and_sds(posteriordb_path, name, kernel):
    problem = load_posteriordb(posteriordb_path, name)
    # Each kernel alone for the whole run: `compiler="auto"` starts on the virtual machine and
    # switches to Inductor's kernel when it is ready. The Static Runtime leaf they replace is the
    # same graph, vouched for by the earlier sessions' runs.
    nuts = run_nuts(
        problem.model,
        *problem.args,
        num_samples=1000,
        num_warmup=1000,
        num_chains=4,
        seed=0,
        progress=False,
        compiler=kernel,
        **OPTIONS.get(name, {}),
        **problem.kwargs,
    )
    assert nuts.config["backend"] == "vectorized"  # the fast path is what this test vouches for
    assert nuts.config["leaf_backend"] == kernel, nuts.config["fuse_decision"]
    draws = flatten_samples(nuts.samples, num_batch_dims=2)
    summary = problem.reference_summary["parameters"]
    failures = []
    for parameter in problem.parameter_names:
        x, reference = draws[parameter], summary[parameter]
        ess, rhat = float(az.ess(x, method="bulk")), float(az.rhat(x))
        standard_error = reference["sd"] * np.sqrt(1 / ess + 1 / reference["ess_bulk_reference"])
        mean_error = (x.mean() - reference["mean"]) / standard_error
        sd_ratio = x.std(ddof=1) / reference["sd"]
        if ess < MIN_ESS or rhat >= 1.01 or abs(mean_error) >= Z or abs(sd_ratio - 1) >= SD_TOLERANCE:
            failures.append(
                f"{parameter}: mean error {mean_error:+.2f} se (|.| < {Z:.2f}), sd ratio "
                f"{sd_ratio:.3f}, ESS {ess:.0f} (>= {MIN_ESS}), R-hat {rhat:.3f}"
            )
    assert not failures, f"{name} (backend {nuts.config['backend']}): " + "; ".join(failures)
