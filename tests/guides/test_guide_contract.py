"""Contract tests run over every guide in the registry: shapes, gradients, summaries, save/load."""

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from vilab.guides import get_guide, list_guides, load_guide, save_guide
from vilab.inference import fit_svi
from vilab.models import get_model

GUIDES = [info.name for info in list_guides()]


@pytest.fixture(scope="module")
def problem():
    torch.set_default_dtype(torch.float64)
    model, args, kwargs = get_model("eight_schools").load()
    return model, args, kwargs


@pytest.fixture(scope="module")
def fitted(problem):
    """One short fit per guide, shared by the tests that only read a fitted guide."""
    model, args, kwargs = problem
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fit_svi(model, name, *args, num_steps=20, progress=False, **kwargs)
        return cache[name]

    return get


@pytest.mark.parametrize("name", GUIDES)
def test_samples_have_site_shapes_including_deterministic_sites(fitted, name):
    result = fitted(name)
    samples = result.sample(7)
    assert set(samples) == {"mu", "tau", "eta", "theta"}
    assert samples["mu"].shape == (7,) and samples["eta"].shape == (7, 8) and samples["theta"].shape == (7, 8)
    assert (samples["tau"] > 0).all()
    assert torch.allclose(samples["theta"], samples["mu"][:, None] + samples["tau"][:, None] * samples["eta"])


@pytest.mark.parametrize("name", GUIDES)
def test_gradients_reach_every_parameter(problem, name):
    model, args, kwargs = problem
    guide = get_guide(name, model)
    with poutine.block():
        guide(*args, **kwargs)
    loss = Trace_ELBO(num_particles=4, vectorize_particles=True).differentiable_loss(model, guide, *args, **kwargs)
    loss.backward()
    params = dict(guide.named_parameters())
    assert params, "a guide must have parameters"
    for param_name, param in params.items():
        assert param.grad is not None, f"{name}: no gradient reaches {param_name}"
        assert torch.isfinite(param.grad).all(), f"{name}: non-finite gradient at {param_name}"
        assert param.grad.abs().sum() > 0, f"{name}: zero gradient at {param_name}"


@pytest.mark.parametrize("name", GUIDES)
def test_median_and_quantiles_are_site_dicts(problem, fitted, name):
    model, args, kwargs = problem
    guide = fitted(name).guide
    median = guide.median(*args, **kwargs)
    assert median["mu"].shape == () and median["eta"].shape == (8,)
    quantiles = guide.quantiles([0.1, 0.5, 0.9], *args, **kwargs)
    assert quantiles["eta"].shape == (3, 8)
    assert (quantiles["tau"] > 0).all()
    assert (quantiles["mu"][1:] >= quantiles["mu"][:-1]).all()


@pytest.mark.parametrize("name", GUIDES)
def test_save_load_round_trip(problem, fitted, name, tmp_path):
    model, args, kwargs = problem
    guide = fitted(name).guide
    path = tmp_path / f"{name}.safetensors"
    save_guide(guide, path, name=name)  # a fitted Laplace guide is Pyro's Gaussian at the MAP
    loaded = load_guide(path, model, *args, **kwargs)
    for key, value in guide.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key
    torch.manual_seed(3)
    first = poutine.trace(guide).get_trace(*args, **kwargs)
    torch.manual_seed(3)
    second = poutine.trace(loaded).get_trace(*args, **kwargs)
    assert torch.allclose(first.nodes["eta"]["value"], second.nodes["eta"]["value"])


def test_load_rejects_a_truncated_file(problem, fitted, tmp_path):
    model, args, kwargs = problem
    guide = fitted("meanfield").guide
    path = tmp_path / "g.safetensors"
    save_guide(guide, path, name="meanfield")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        load_guide(path, model, *args, **kwargs)


def test_unknown_guide_lists_known_names(problem):
    with pytest.raises(ValueError, match="unknown guide 'nope'; known guides: meanfield"):
        get_guide("nope", problem[0])


def test_unknown_option_is_named(problem):
    with pytest.raises(ValueError, match=r"unknown options \['rank'\]"):
        get_guide("meanfield", problem[0], rank=2)


def test_guide_object_passes_through(problem):
    guide = get_guide("meanfield", problem[0])
    assert get_guide(guide, problem[0]) is guide
    with pytest.raises(TypeError, match="guide: expected a guide name or a callable"):
        get_guide(3, problem[0])
