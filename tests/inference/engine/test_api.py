"""The engine's interface: the eager switch (``compiler="eager"``, ``VILAB_ENGINE=off``) and the
step protocol."""

import math

import arviz as az
import pytest
import torch

from vilab.inference import fit_svi, run_nuts
from vilab.inference.engine import api as engine
from vilab.models import conjugate

Z = 4.5


def _exact():
    x = conjugate.default_normal_data()
    exact = conjugate.normal_normal_posterior(x)["loc"]
    return x, float(exact.mean), float(exact.stddev)


def test_run_nuts_eager_matches_the_closed_form_posterior_and_reports_the_eager_path():
    x, mean, sd = _exact()
    result = run_nuts(
        conjugate.normal_normal, 20, x, num_samples=500, num_warmup=300, num_chains=2, compiler="eager", progress=False
    )
    assert result.config["backend"] == "vectorized"
    assert result.config["compiler"] == "eager"
    assert result.config["leaf_backend"] == "eager"
    assert "compiler='eager'" in result.config["fuse_decision"]
    draws = result.samples["loc"]
    ess = float(az.ess(draws.numpy()))
    assert ess > 200
    assert abs(float(draws.mean()) - mean) < Z * sd / math.sqrt(ess)
    assert abs(float(draws.std()) - sd) < Z * sd / math.sqrt(2 * ess)


def test_fit_svi_eager_matches_the_closed_form_posterior_and_reports_the_eager_path():
    x, mean, sd = _exact()
    result = fit_svi(
        conjugate.normal_normal, "meanfield", 20, x, num_steps=2000, lr=0.05, compiler="eager", progress=False
    )
    assert result.converged
    assert result.config["backend"] == "pyro"  # Pyro's SVI: plain eager PyTorch
    assert result.config["step_runner"] == "eager"
    assert not result.config["fused"]
    draws = result.sample(4000, seed=0)["loc"]
    # A converged meanfield fit of a Gaussian posterior is that posterior, up to the iterate
    # average's noise: well inside a tenth of a posterior sd.
    assert abs(float(draws.mean()) - mean) < 0.1 * sd
    assert abs(float(draws.std()) - sd) < 0.1 * sd


@pytest.mark.filterwarnings("ignore:run_nuts. R-hat:RuntimeWarning")  # 20 draws: the path is under test
def test_vilab_engine_off_forces_eager_at_the_entry_point(monkeypatch):
    monkeypatch.setenv(engine.ENGINE_ENV, "off")
    assert engine.resolve_compiler("vm") == "eager"
    x, _, _ = _exact()
    result = run_nuts(
        conjugate.normal_normal, 20, x, num_samples=20, num_warmup=20, num_chains=2, compiler="vm", progress=False
    )
    assert (result.config["compiler"], result.config["leaf_backend"]) == ("eager", "eager")
    monkeypatch.setenv(engine.ENGINE_ENV, "on")
    assert engine.resolve_compiler("vm") == "vm"


def test_a_bad_engine_switch_or_compiler_is_refused_with_the_expected_values(monkeypatch):
    monkeypatch.setenv(engine.ENGINE_ENV, "sometimes")
    with pytest.raises(ValueError, match="VILAB_ENGINE: expected 'on' or 'off'; got 'sometimes'"):
        engine.resolve_compiler("auto")
    monkeypatch.delenv(engine.ENGINE_ENV)
    with pytest.raises(ValueError, match=r"compiler: expected one of .*'eager'.*; got 'fast'"):
        engine.resolve_compiler("fast")


def test_fit_svi_refuses_the_compiled_backend_with_the_engine_off():
    x, _, _ = _exact()
    with pytest.raises(ValueError, match="backend: expected 'auto' or 'pyro' with the engine off"):
        fit_svi(conjugate.normal_normal, "meanfield", 20, x, num_steps=10, compiler="eager", backend="compiled")


def test_nuts_steps_satisfy_the_step_protocol_and_report_how_they_run():
    x, _, _ = _exact()
    potential, background = engine.batched_potential(
        conjugate.normal_normal, (20, x), {}, num_chains=2, seed=0, compiler="eager", total=10, split=False
    )
    assert not potential.compiled and not background
    steps = engine.nuts_run_steps(
        potential,
        lambda a, b: (a + b, a * b),
        1,
        compiler="eager",
        total_iterations=10,
        background=False,
        split=False,
    )
    merge = steps.merge(False, (torch.ones(2), torch.ones(2)))
    assert isinstance(merge, engine.Step)
    assert (merge.backend, merge.compiled) == ("eager", False)
    assert steps.info == engine.StepInfo("eager", False, "compiler='eager'")
