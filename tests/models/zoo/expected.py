"""Zoo cases that known vilab bugs break: (model, check) -> the bug, for strict xfail marks.

``check`` is ``nuts``, ``svi`` (both guides) or ``svi:<guide>``, ``compare``, ``fast_nuts`` or
``fast_svi``. Remove an entry when the fix is merged; a strict xfail that starts passing fails.
``TIMING_DEPENDENT`` cases fail only on some runs (they depend on the machine's pace): they are
non-strict xfails.
Found by ``benchmarks/zoo_table.py`` (same seeds and settings as the tests).
"""

from __future__ import annotations

__all__ = ["KNOWN", "TIMING_DEPENDENT"]

_SUBSAMPLE_NUTS = (
    "run_nuts does not refuse a subsampled plate: a misleading 'does not broadcast' fallback "
    "warning, then Pyro's NotImplementedError instead of a ValueError naming the plate"
)

_UNPLATED = (
    "fit_svi (and compare) refuse a latent site whose batch shape lies outside any plate "
    "(`dist.Normal(3, 0.5).expand([2])` in Statistical Rethinking's NumPyro port, `Normal(zeros(3), ones(3))` "
    "in Pyro's NUTS docstring): Pyro's "
    "Trace_ELBO shape check, after a compiled-step fallback; run_nuts and NumPyro accept the model"
)

_ASSERT_PROBE = (
    "run_nuts crashes on NumPyro's BNN example: the model's own shape asserts (`assert w1.shape == "
    "(D_X, D_H)`) fail when the vectorized sampler runs it for a batch of chains, and the AssertionError "
    "escapes from the chain worker as a ChainError instead of a fallback to Pyro's NUTS"
)
_CHOLESKY = (
    "run_nuts crashes (ChainError from torch.linalg.cholesky: not positive-definite) when a warmup "
    "proposal makes the GP kernel matrix singular; NumPyro and Stan count such a proposal as divergent"
)

# a chain's crash depends on which chain reaches the singular kernel first (not the same across runs)
TIMING_DEPENDENT: set = {("gp_numpyro", "nuts")}

KNOWN: dict = {
    **{
        (name, check): _UNPLATED
        for name in ("kline_poisson", "kline_gamma_poisson", "logistic_docstring")
        for check in ("svi", "compare")
    },
    # the same bug on the predator-prey model's z_init, theta and sigma (fit_svi's z_init fails first)
    # and on the LKJ example's theta (`dist.HalfCauchy(torch.ones(d))`, no plate)
    ("lkj_covariance", "svi"): _UNPLATED,
    ("lkj_covariance", "compare"): _UNPLATED,
    ("lotka_volterra", "svi"): _UNPLATED,
    ("lotka_volterra", "compare"): _UNPLATED,
    # and on the BNN's weights (`Normal(zeros((D_X, D_H)), ...)`, no plate)
    ("bnn", "svi"): _UNPLATED,
    ("bnn", "compare"): _UNPLATED,
    ("coin_fairness_subsampled", "nuts"): _SUBSAMPLE_NUTS,
    ("bnn", "nuts"): _ASSERT_PROBE,
    ("gp_numpyro", "nuts"): _CHOLESKY,
}
