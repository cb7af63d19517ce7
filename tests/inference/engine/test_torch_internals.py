"""PyTorch's internals, behind their adapter: used on the tested releases; elsewhere, or where an
import fails, the engine takes the public path (fx code, the virtual machine, ``torch.compile``)
with one ``RuntimeWarning`` and still gives the closed-form posterior."""

from __future__ import annotations

import warnings

import pytest
import torch
from scipy.stats import norm
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference import run_nuts
from vilab.inference.engine.backends import artifacts, inductor, torch_internals
from vilab.inference.engine.backends.vm import vm_step
from vilab.models import conjugate
from svi_fits import fit_normal_normal

# As in test_fast_svi: a 0.1% two-sided failure budget on Monte Carlo error, and the optimiser's
# gap to the optimum in nats (KL(q || p) of a Gaussian 0.2 posterior sd off the posterior mean).
Z = norm.ppf(1 - 0.001 / 2)
OPT_TOL = 0.02


@pytest.fixture(autouse=True)
def _fresh_adapter():
    torch_internals.reset()
    yield
    torch_internals.reset()


@pytest.fixture
def future_release(monkeypatch):
    """A PyTorch newer than the releases the internals were tested on."""
    monkeypatch.setattr(torch_internals, "_version", lambda: (2, 99))


@pytest.fixture
def failing_import(monkeypatch):
    """Every import of a private PyTorch module fails, as on a release that moved it."""
    real = torch_internals._import

    def fail(name):
        if name.startswith("torch._"):
            raise ImportError(f"No module named {name!r} (simulated)")
        return real(name)

    monkeypatch.setattr(torch_internals, "_import", fail)


def _internals_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "PyTorch internals" in str(w.message)]


def test_the_internals_are_used_exactly_on_the_tested_releases():
    low, high = torch_internals.TESTED_VERSIONS
    if low <= torch_internals._version() <= high:
        assert torch_internals.problem() == ""
        assert torch_internals.empty_strided_cpu() is not torch_internals._public_empty_strided
        assert set(torch_internals.wrapper_names()) >= {"empty_strided_cpu", "reinterpret_tensor", "tensor_data_ptr"}
    else:
        assert torch.__version__ in torch_internals.problem()


def test_op_overloads_are_recognised_through_the_public_class():
    assert isinstance(torch.ops.aten.mul.Tensor, torch_internals.OpOverload)
    assert not isinstance(torch.mul, torch_internals.OpOverload)


def test_an_untested_release_uses_no_internal(future_release):
    assert "2.13-2.14" in torch_internals.problem() and "public APIs only" in torch_internals.problem()
    assert "PyTorch internals unavailable" in inductor.fusion_unavailable()
    assert torch_internals.empty_strided_cpu() is torch_internals._public_empty_strided
    for internal in (torch_internals.inductor, torch_internals.wrapper_names):
        with pytest.raises(torch_internals.InternalsUnavailable, match="outside the releases"):
            internal()
    with pytest.raises(RuntimeError, match="outside the releases"):  # a cached kernel is not loaded
        artifacts.load_artifact({"source": "/nonexistent", "kernels": {}, "constants": []}, ())


def test_a_failed_import_is_reported_once_and_kept(failing_import):
    with pytest.warns(RuntimeWarning, match="importing torch._inductor.compile_fx.compile_fx failed.*simulated"):
        with pytest.raises(torch_internals.InternalsUnavailable):
            torch_internals.inductor()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # known now: no second warning, no second import
        with pytest.raises(torch_internals.InternalsUnavailable, match="simulated"):
            torch_internals.wrapper_names()
        assert "simulated" in inductor.fusion_unavailable()
        torch_internals.preload()


def test_the_virtual_machine_runs_on_the_public_allocator(future_release, monkeypatch):
    from vilab.inference.engine.backends import vm as fast_vm

    monkeypatch.setattr(fast_vm, "_empty", torch_internals.empty_strided_cpu())
    if fast_vm.vm_unavailable(wait=True):
        pytest.skip(f"no virtual machine here: {fast_vm.vm_unavailable()}")
    example = (torch.linspace(-1.0, 1.0, 5, dtype=torch.float64),)
    step = vm_step(make_fx(lambda x: (x.exp() * 2.0, x.sum()))(*example), example)
    got = step(*example)
    torch.testing.assert_close(got[0], example[0].exp() * 2.0)
    torch.testing.assert_close(got[1], example[0].sum())


def test_nuts_on_an_untested_release_warns_once_and_matches_the_closed_form(future_release, normal_normal_check):
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = run_nuts(
            _normal_normal,
            data,
            num_samples=400,
            num_warmup=300,
            num_chains=4,
            seed=2,
            chain_method="sequential",
            progress=False,
        )
    assert len(_internals_warnings(record)) == 1, [str(w.message) for w in record]
    assert result.config["backend"] == "vectorized" and result.config["leaf_backend"] in ("vm", "graph")
    assert "fused at" not in result.config["fuse_decision"]
    normal_normal_check(result.samples["loc"], data, min_ess=300, z=4.5)


def _normal_normal(data):
    import pyro
    import pyro.distributions as dist

    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def _fit_meanfield(compiler: str):
    x = conjugate.default_normal_data()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = fit_normal_normal(x, seed=0, backend="compiled", compiler=compiler)
    elbo, se = result.elbo_estimate(20000, seed=1)
    log_evidence = conjugate.normal_normal_log_evidence(x)
    # The posterior is Gaussian: the optimal mean-field ELBO is log p(x) itself.
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL
    return result, _internals_warnings(record)


def test_svi_on_an_untested_release_warns_once_and_reaches_the_posterior(future_release):
    result, warned = _fit_meanfield("auto")
    assert len(warned) == 1 and "compiler='auto' keeps the traced step unfused" in str(warned[0].message)
    assert result.config["backend"] == "compiled" and not result.config["fused"]


@pytest.mark.slow
def test_svi_fuses_with_torch_compile_when_an_internal_import_fails(failing_import):
    """``compiler="inductor"`` without the internals: ``torch.compile``'s kernel, checked against
    the eager step like any fused step (tens of seconds to compile)."""
    result, warned = _fit_meanfield("inductor")
    assert len(warned) == 1 and "simulated" in str(warned[0].message)
    assert result.config["fused"] and result.config["step_runner"] == "inductor"
