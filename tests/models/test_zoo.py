"""The zoo: user models ported as their sources write them, through run_nuts, fit_svi and compare.

Each model's NUTS means must sit within ``z`` combined Monte Carlo standard errors of its
reference (closed form, or a long NumPyro NUTS run of its twin), ``z`` from a 1e-3 failure
budget per model split over its statistics. Guides are not held to accuracy they cannot have:
a fit must end with finite losses and report ``converged`` and its backend, its draws must carry
the checked statistics, and where PSIS k-hat < 0.5 vouches for the guide its reweighted means
must match the reference within their Monte Carlo error. ``compare`` must score every reference
parameter. Cases broken by known vilab bugs are strict xfails naming the bug (see docs/zoo.md).
"""

import math
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))

import vilab  # noqa: E402
from vilab.inference.common.diagnostics import psis  # noqa: E402
from zoo import ZOO  # noqa: E402
from zoo import load_reference as _load_reference  # noqa: E402
from zoo.check import nuts_z_scores, tensor_draws, weighted_z_scores, z_threshold  # noqa: E402
from zoo.expected import KNOWN, TIMING_DEPENDENT  # noqa: E402
from zoo.modes import fold_weights  # noqa: E402

NUTS_OPTIONS = dict(num_samples=500, num_warmup=500, num_chains=4, seed=0, progress=False)
FAST_NUTS_OPTIONS = dict(num_samples=300, num_warmup=300, num_chains=2, seed=0, progress=False)
SVI_STEPS = 2000


def load_reference(entry):
    """The entry's reference; a model whose reference file was not generated yet is skipped
    with the command that generates it."""
    try:
        return _load_reference(entry)
    except FileNotFoundError as error:
        pytest.skip(str(error))


def _cases(check, entries=ZOO, extra=()):
    """One ``pytest.param`` per entry (and extra argument), a strict xfail where a known bug
    breaks it."""
    cases = []
    for entry in entries:
        for value in extra or (None,):
            key = (entry.name, check if value is None else f"{check}:{value}")
            reason = KNOWN.get(key) or KNOWN.get((entry.name, check))
            strict = (entry.name, check) not in TIMING_DEPENDENT
            marks = [pytest.mark.xfail(strict=strict, reason=reason)] if reason else []
            params = (entry,) if value is None else (entry, value)
            cases.append(
                pytest.param(*params, marks=marks, id=entry.name if value is None else f"{entry.name}-{value}")
            )
    return cases


def _assert_nuts_matches(entry, result, data):
    reference = load_reference(entry)
    weights, fold = None, entry.options.get("fold")
    if fold:  # every chain started in one mode: all must stay there, the weights give the rest
        weights, in_mode, _ = fold_weights(fold, tensor_draws(result.samples, 2), data)
        assert in_mode == 1.0, f"{entry.name}: {1 - in_mode:.1%} of the draws left the mode the chains started in"
    scores = nuts_z_scores(entry, result.samples, reference, weights)
    limit = z_threshold(len(scores))
    worst = max(scores, key=lambda k: abs(scores[k]))
    assert abs(scores[worst]) < limit, (
        f"{entry.name}: NUTS mean of {worst} is {scores[worst]:.1f} Monte Carlo errors from the "
        f"{reference['kind']} reference (limit {limit:.1f}); path {result.config.get('backend')}"
    )


def _assert_svi_reports(entry, result):
    assert np.all(np.isfinite(result.losses)), f"{entry.name}: non-finite loss"
    assert isinstance(result.converged, bool)
    assert result.config.get("backend") in ("compiled", "pyro")
    reference = load_reference(entry)
    draws = result.draws(4000, seed=0)
    statistics = entry.stats(tensor_draws(draws.samples, 1))
    assert set(reference["summary"]) <= set(statistics)
    log_weights = np.asarray(draws.log_weights.detach(), dtype=float)
    assert np.isfinite(log_weights).all()
    smoothed = psis(log_weights)
    if math.isfinite(smoothed.k_hat) and smoothed.k_hat < 0.5:
        scores = weighted_z_scores(entry, draws.samples, smoothed.log_weights, smoothed.ess, reference)
        worst = max(scores, key=lambda k: abs(scores[k]))
        limit = z_threshold(len(scores))
        assert abs(scores[worst]) < limit, (
            f"{entry.name}: k-hat {smoothed.k_hat:.2f} vouches for the guide, yet its reweighted mean of "
            f"{worst} is {scores[worst]:.1f} Monte Carlo errors from the reference (limit {limit:.1f})"
        )


def _check_run_nuts(entry, options):
    data = entry.data()
    model, args, kwargs = entry.inputs(data)
    if entry.options.get("fold"):
        options = dict(options, init_values=entry.options["fold"]["init_values"])
    refusal = entry.options.get("nuts_refusal")
    if refusal:  # NUTS cannot be right on this model: it must say so before sampling
        with pytest.raises(ValueError, match=refusal):
            vilab.run_nuts(model, *args, **options, **kwargs)
        return
    _assert_nuts_matches(entry, vilab.run_nuts(model, *args, **options, **kwargs), data)


@pytest.mark.slow
@pytest.mark.parametrize("entry", _cases("nuts"))
def test_run_nuts_matches_the_reference(entry):
    _check_run_nuts(entry, NUTS_OPTIONS)


@pytest.mark.slow
@pytest.mark.parametrize("entry,guide", _cases("svi", extra=("meanfield", "fullrank")))
def test_fit_svi_reports_its_fit(entry, guide):
    model, args, kwargs = entry.inputs(entry.data())
    if entry.options.get("svi_refusal"):  # vilab's guides are continuous: say so, before fitting
        with pytest.raises(ValueError, match=entry.options["svi_refusal"]):
            vilab.fit_svi(model, guide, *args, num_steps=SVI_STEPS, seed=0, progress=False, **kwargs)
        return
    result = vilab.fit_svi(model, guide, *args, num_steps=SVI_STEPS, seed=0, progress=False, **kwargs)
    _assert_svi_reports(entry, result)


@pytest.mark.slow
@pytest.mark.parametrize("entry", _cases("compare"))
def test_compare_scores_every_reference_parameter(entry):
    model, args, kwargs = entry.inputs(entry.data())
    reference = load_reference(entry)
    refusal = entry.options.get("compare_refusal") or entry.options.get("svi_refusal")
    if refusal:
        with pytest.raises(ValueError, match=refusal):
            vilab.compare(model, *args, guides=("meanfield",), reference=reference["draws"], progress=False, **kwargs)
        return
    report = vilab.compare(
        model,
        *args,
        guides=("meanfield",),
        reference=reference["draws"],
        svi_options=dict(num_steps=1000),
        num_draws=1000,
        progress=False,
        **kwargs,
    )
    rows = report.table[report.table["method"] == "meanfield"]
    expected = set(tensor_draws_names(reference["draws"]))
    assert expected <= set(rows["parameter"]), f"{entry.name}: compare left out {expected - set(rows['parameter'])}"
    assert np.isfinite(rows["mean_error_sd"]).all()


def tensor_draws_names(draws):
    """``compare``'s flat names (1-based, ``a[1,2]``) of reference draws given per site."""
    from vilab.samples import flatten_samples

    return [name for name, values in flatten_samples(draws, 1).items() if np.ptp(values) > 0]


FAST = [entry for entry in ZOO if entry.fast]


@pytest.mark.parametrize("entry", _cases("fast_nuts", FAST))
def test_fast_subset_run_nuts_matches_the_reference(entry):
    _check_run_nuts(entry, FAST_NUTS_OPTIONS)


@pytest.mark.parametrize("entry", _cases("fast_svi", FAST))
def test_fast_subset_fit_svi_reports_its_fit(entry):
    model, args, kwargs = entry.inputs(entry.data())
    assert not entry.options.get("svi_refusal")
    result = vilab.fit_svi(model, "meanfield", *args, num_steps=500, seed=0, progress=False, **kwargs)
    _assert_svi_reports(entry, result)


def test_the_zoo_has_thirty_models():
    assert len(ZOO) >= 30
    assert len({entry.name for entry in ZOO}) == len(ZOO)


@pytest.mark.parametrize("entry", ZOO, ids=[entry.name for entry in ZOO])
def test_each_reference_has_positive_spread_and_its_draws(entry):
    reference = load_reference(entry)
    assert reference["summary"]
    assert all(s["sd"] > 0 and s["ess"] > 100 for s in reference["summary"].values())
    assert reference["draws"]
    assert all(np.isfinite(np.asarray(v)).all() for v in reference["draws"].values())


def test_the_hmm_forward_pass_matches_summing_over_every_state_path():
    """``modes.hmm_log_likelihood`` (the HMM reference's weights) against brute-force enumeration."""
    import itertools

    from zoo.modes import hmm_log_likelihood

    rng = np.random.default_rng(0)
    probs_x, probs_y = rng.dirichlet(np.ones(2), size=(3, 2)), rng.uniform(0.05, 0.95, size=(3, 2, 4))
    sequences, lengths = (rng.random((2, 4, 4)) < 0.5).astype(float), [4, 3]
    expected = np.zeros(3)
    for n in range(3):
        for sequence, length in zip(sequences, lengths):
            total = 0.0
            for path in itertools.product(range(2), repeat=length):
                states = (0,) + path  # the chain starts from state 0
                tones = sequence[:length]
                emission = np.where(tones == 1, probs_y[n, list(path)], 1 - probs_y[n, list(path)]).prod()
                total += np.prod([probs_x[n, a, b] for a, b in zip(states[:-1], states[1:])]) * emission
            expected[n] += np.log(total)
    np.testing.assert_allclose(hmm_log_likelihood(probs_x, probs_y, sequences, lengths), expected, rtol=1e-12)
