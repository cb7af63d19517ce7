"""Bad arguments fail before any fit: guide names, option dicts, seeds and model keywords."""

import sys

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference import compare, fit_svi, run_nuts


def normal_mean(y):
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y)):
        pyro.sample("obs", dist.Normal(mu, 1.0), obs=y)


Y = torch.tensor([0.3, -0.2, 0.5])


@pytest.fixture
def no_nuts(monkeypatch):
    """Any call of run_nuts from compare fails the test: checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("run_nuts ran before the arguments were checked")

    monkeypatch.setattr(sys.modules["vilab.inference.comparison.api"], "run_nuts", refuse)


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(guides=("meanfield", "fulrank")), r"guides\[1\]: unknown guide 'fulrank' \(did you mean 'fullrank'\?\)"),
        (
            dict(guides=("iaf",), guide_options={"iaf": {"num_flow": 2}}),
            r"guide_options\['iaf'\]: unknown option 'num_flow' \(did you mean 'num_flows'\?\)",
        ),
        (
            dict(guides=("meanfield",), guide_options={"meanfeild": {}}),
            r"unknown guide name .*'meanfeild'.*did you mean 'meanfield'",
        ),
        (dict(svi_options={"num_step": 10}), r"svi_options: unknown option 'num_step' \(did you mean 'num_steps'\?\)"),
        (
            dict(nuts_options={"num_sample": 10}),
            r"nuts_options: unknown option 'num_sample' \(did you mean 'num_samples'\?\)",
        ),
        (dict(nuts_options={"num_samples": 0}), "num_samples: expected an int >= 1; got 0"),
        (dict(svi_options={"lr": -1.0}), "lr: expected > 0"),
        (dict(guides="meanfield"), r"guides: expected a sequence.*write guides=\('meanfield',\)"),
    ],
)
def test_compare_checks_guides_and_options_before_running_nuts(no_nuts, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        compare(normal_mean, Y, progress=False, **options)


def test_fit_svi_names_a_misspelled_guide_and_family_option():
    with pytest.raises(ValueError, match=r"unknown guide 'fullrnak' \(did you mean 'fullrank'\?\)"):
        fit_svi(normal_mean, "fullrnak", Y, progress=False)
    with pytest.raises(ValueError, match=r"unknown option 'init_scal' \(did you mean 'init_scale'\?\)"):
        fit_svi(normal_mean, "meanfield", Y, guide_options={"init_scal": 0.1}, progress=False)


@pytest.mark.parametrize("seed", ["abc", None, 1.5, -1, True])
def test_run_nuts_and_compare_name_a_bad_seed(no_nuts, seed):
    with pytest.raises((TypeError, ValueError), match="seed: expected an int in"):
        run_nuts(normal_mean, Y, seed=seed, progress=False)
    with pytest.raises((TypeError, ValueError), match="seed: expected an int in"):
        compare(normal_mean, Y, seed=seed, progress=False)


@pytest.mark.parametrize("seed", ["abc", 1.5, 2**40])
def test_fit_svi_names_a_bad_seed_and_allows_none(seed):
    with pytest.raises((TypeError, ValueError), match=r"seed: expected an int in \[0, 4294967295\] or None"):
        fit_svi(normal_mean, "meanfield", Y, seed=seed, progress=False)


def test_fit_svi_allows_seed_none():
    result = fit_svi(normal_mean, "meanfield", Y, seed=None, num_steps=5, progress=False, backend="pyro")
    assert result.num_steps == 5


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: run_nuts(normal_mean, Y, num_step=500, progress=False),
            r"run_nuts: keyword 'num_step' is neither an option of run_nuts nor a parameter of the model.*"
            r"did you mean run_nuts's option 'num_samples'\?",
        ),
        (
            lambda: fit_svi(normal_mean, "meanfield", Y, num_step=5, progress=False),
            r"fit_svi: keyword 'num_step'.*did you mean fit_svi's option 'num_steps'\?",
        ),
        (lambda: compare(normal_mean, Y, num_draw=50, progress=False), r"compare: keyword 'num_draw'.*'num_draws'"),
    ],
)
def test_misspelled_keyword_options_do_not_reach_the_model(no_nuts, call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_model_keywords_still_reach_the_model():
    result = fit_svi(normal_mean, "meanfield", y=Y, num_steps=5, progress=False, backend="pyro")
    assert result.kwargs == {"y": Y}


def test_guides_of_one_class_get_distinct_names():
    from vilab.inference.comparison.arguments import method_names

    guides = [
        pyro.infer.autoguide.AutoNormal(normal_mean),
        "meanfield",
        pyro.infer.autoguide.AutoNormal(normal_mean),
        "meanfield",
    ]
    assert method_names(guides) == ["AutoNormal", "meanfield", "AutoNormal_2", "meanfield_2"]
