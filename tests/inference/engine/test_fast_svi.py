r"""The compiled SVI step (``fit_svi(backend="compiled")``) against Pyro's own ELBOs and SVI.

Exact checks: with the same random stream, :func:`elbo_loss` equals Pyro's ``Trace_ELBO``,
``TraceMeanField_ELBO`` and ``RenyiELBO(alpha=0)`` (IWAE) losses and gradients to rounding, and
the compiled step equals the eager one. Statistical checks: both backends reach the closed-form
posterior of the Normal-Normal model (tolerances as in ``test_svi.py``). Contract checks: every
fallback is announced, and a NaN on the compiled path keeps the last finite parameters.
"""

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from scipy.stats import norm

from vilab.guides import get_guide
from vilab.inference import NonFiniteLossError, fit_svi
from vilab.inference.engine.svi_step import CompiledSVIError, CompiledSVIStep, elbo_loss
from vilab.models import conjugate, get_model
from svi_fits import fit_normal_normal

Z = norm.ppf(1 - 0.001 / 2)
OPT_TOL = 0.02


def _eight_schools():
    return get_model("eight_schools").load()


def _pyro_loss_and_grads(elbo, model, guide, args, kwargs):
    loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    params = list(guide.parameters())
    return loss, torch.autograd.grad(loss, params, allow_unused=True)


@pytest.mark.parametrize(
    "objective, pyro_elbo, particles",
    [
        # max_plate_nesting given: Pyro's guess would run the model once and shift the random stream
        ("trace", lambda: Trace_ELBO(max_plate_nesting=1), 1),
        ("trace", lambda: Trace_ELBO(num_particles=3, vectorize_particles=True, max_plate_nesting=1), 3),
        ("meanfield", lambda: TraceMeanField_ELBO(max_plate_nesting=1), 1),
    ],
)
@pytest.mark.parametrize("guide_name", ["meanfield", "fullrank", "iaf"])
def test_elbo_loss_and_gradient_equal_pyros(objective, pyro_elbo, particles, guide_name):
    model, args, kwargs = _eight_schools()
    pyro.clear_param_store()
    guide = get_guide(guide_name, model)
    guide(*args, **kwargs)
    torch.manual_seed(3)
    expected, expected_grads = _pyro_loss_and_grads(pyro_elbo(), model, guide, args, kwargs)
    torch.manual_seed(3)
    with pyro.validation_enabled(False):
        got = elbo_loss(model, guide, args, kwargs, objective, particles, max_plate_nesting=1)
    got_grads = torch.autograd.grad(got, list(guide.parameters()), allow_unused=True)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    for a, b in zip(got_grads, expected_grads):
        assert (a is None) == (b is None)
        if a is not None:
            assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_iwae_loss_equals_renyi_alpha_zero():
    model, args, kwargs = _eight_schools()
    pyro.clear_param_store()
    guide = get_guide("meanfield", model)
    guide(*args, **kwargs)
    torch.manual_seed(4)
    expected = RenyiELBO(alpha=0.0, num_particles=5, vectorize_particles=True, max_plate_nesting=1).loss(
        model, guide, *args, **kwargs
    )
    torch.manual_seed(4)
    with pyro.validation_enabled(False):
        got = elbo_loss(model, guide, args, kwargs, "iwae", 5, max_plate_nesting=1)
    assert math.isclose(float(got.detach()), expected, rel_tol=1e-10)


@pytest.mark.parametrize(
    "guide_name", ["meanfield", "fullrank", "lowrank", "map", "laplace", "iaf", "planar", "radial", "sylvester", "nsf"]
)
def test_compiled_step_equals_pyro_svi_step(guide_name):
    """Same start, same noise: one compiled step and one Pyro ``SVI`` step with ``ClippedAdam``
    give the same loss and the same parameters."""
    from pyro.infer import SVI
    from pyro.optim import ClippedAdam

    model, args, kwargs = _eight_schools()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = get_guide(guide_name, model)
    compiled = CompiledSVIStep(model, guide, args, kwargs, lr=0.05, lr_decay_per_step=0.99)
    start = {name: value.detach().clone() for name, value in guide.named_parameters()}
    noise = [torch.randn(shape, dtype=dtype) for shape, dtype in compiled._noise]
    step_size = torch.tensor(compiled._step_size(1))
    out = compiled._fn(*compiled.state, step_size, *noise)

    svi = SVI(model, guide, ClippedAdam({"lr": 0.05, "lrd": 0.99, "clip_norm": 10.0}), Trace_ELBO())
    generator_state = torch.get_rng_state()
    torch.manual_seed(11)  # replay the same noise through Pyro: the guide draws it with normal_()
    draws = iter(noise)
    original = torch.Tensor.normal_

    def replay(tensor, *a, **k):
        value = next(draws)  # the compiled step's draws carry a particle dimension of size 1
        assert value.numel() == tensor.numel()
        return tensor.copy_(value.reshape(tensor.shape))

    torch.Tensor.normal_ = replay
    try:
        loss = svi.step(*args, **kwargs)
    finally:
        torch.Tensor.normal_ = original
        torch.set_rng_state(generator_state)
    assert math.isclose(loss, float(out[0][0]), rel_tol=1e-9, abs_tol=1e-9)
    stepped = compiled._unflatten(out[1])
    assert any(not torch.equal(value, start[name]) for name, value in guide.named_parameters())
    for (name, value), new in zip(guide.named_parameters(), stepped):
        assert torch.allclose(new, value.detach(), rtol=1e-8, atol=1e-10), name


@pytest.mark.parametrize("backend", ["compiled", "pyro"])
def test_both_backends_reach_normal_normal_posterior(backend):
    x = conjugate.default_normal_data()
    result = fit_normal_normal(x, backend=backend)
    assert result.config["backend"] == backend
    elbo, se = result.elbo_estimate(20000, seed=1)
    log_evidence = conjugate.normal_normal_log_evidence(x)
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL


def test_small_compiled_fits_run_on_one_thread_and_restore_the_setting(monkeypatch):
    import vilab.inference.engine.svi_step as fast_svi

    seen = []
    step = fast_svi.CompiledSVIStep.step
    monkeypatch.setattr(
        fast_svi.CompiledSVIStep, "step", lambda self: seen.append(torch.get_num_threads()) or step(self)
    )
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fit_svi(
            conjugate.normal_normal,
            "meanfield",
            20,
            conjugate.default_normal_data(),
            num_steps=5,
            progress=False,
            backend="compiled",
        )
        assert seen == [1] * 5 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_iwae_objective_compiles_and_trains():
    x = conjugate.default_normal_data()
    result = fit_svi(
        conjugate.normal_normal,
        "meanfield",
        20,
        x,
        num_steps=300,
        elbo="iwae",
        num_particles=4,
        progress=False,
        backend="compiled",
    )
    assert result.config["backend"] == "compiled"
    assert result.losses[-1] < result.losses[0]


def test_guide_function_falls_back_with_a_warning():
    x = conjugate.default_normal_data()

    def guide(num_obs, x):
        loc = pyro.param("q_loc", torch.tensor(0.0))
        pyro.sample("loc", dist.Normal(loc, 0.5))

    with pytest.warns(RuntimeWarning, match="falling back to Pyro's SVI"):
        result = fit_svi(conjugate.normal_normal, guide, 20, x, num_steps=20, progress=False)
    assert result.config["backend"] == "pyro"
    with pytest.raises(CompiledSVIError, match="not a torch.nn.Module"):
        fit_svi(conjugate.normal_normal, guide, 20, x, num_steps=20, progress=False, backend="compiled")


def test_random_subsampling_is_not_compiled():
    x = conjugate.default_normal_data()

    def model(x):
        loc = pyro.sample("loc", dist.Normal(torch.tensor(0.0), 1.0))
        with pyro.plate("data", len(x), subsample_size=5) as index:
            pyro.sample("x", dist.Normal(loc, 1.0), obs=x[index])

    with pytest.raises(CompiledSVIError, match="random numbers with aten.randperm"):
        fit_svi(model, "meanfield", x, num_steps=5, progress=False, backend="compiled")


def test_value_dependent_shapes_are_not_compiled():
    def model():
        z = pyro.sample("z", dist.Normal(torch.zeros(4), 1.0).to_event(1))
        positive = z[z > 0]  # how many entries depends on the draw
        pyro.factor("f", -(positive**2).sum())

    with pytest.raises(CompiledSVIError, match="value-dependent shapes"):
        fit_svi(model, "meanfield", num_steps=5, progress=False, backend="compiled")


def test_nan_on_the_compiled_path_names_the_site_and_keeps_finite_parameters():
    def model():
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.factor("pull", 3.0 * z)  # the posterior is N(3, 1): draws above 4 soon happen
        pyro.factor("explodes", torch.where(z > 4.0, torch.tensor(float("nan")), torch.tensor(0.0)))

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no fallback: this must run compiled
        with pytest.raises(NonFiniteLossError, match="non-finite at step") as info:
            fit_svi(model, "meanfield", num_steps=200, lr=0.5, progress=False, backend="compiled")
    error = info.value
    assert error.site == "explodes"
    assert 0 < error.step < 200 and len(error.result.losses) == error.step
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name


@pytest.mark.slow
def test_a_background_fused_step_takes_over_mid_run_and_reaches_the_posterior(monkeypatch, tmp_path):
    from vilab.inference.engine.backends import inductor as fast_inductor
    from vilab.inference.engine import policy as fast_policy
    from vilab.inference.engine.processes.server import background_available

    if fast_inductor.fusion_unavailable() or not background_available():
        pytest.skip("needs g++ and a second core")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled, not loaded from a cache
    # Free compilation and a quick decision: the step starts compiling after ~0.05 s.
    for name in ("SECONDS_PER_GRAPH", "SECONDS_PER_OP", "SETUP_SECONDS", "CACHED_SECONDS"):
        monkeypatch.setattr(fast_inductor, name, 0.0)
    monkeypatch.setattr(fast_policy.FusePolicy, "check_after_background", 0.05)
    x = conjugate.default_normal_data()
    # A cold compile (an empty cache) takes seconds: the run must outlast it.
    result = fit_svi(
        conjugate.normal_normal,
        "meanfield",
        20,
        x,
        num_steps=150000,
        lr=0.05,
        lr_decay=0.01,
        early_stop=False,
        progress=False,
        backend="compiled",
    )
    assert "fused in the background" in result.config["fuse_decision"]
    assert "fused at step" in result.config["fuse_decision"], result.config["fuse_decision"]
    assert result.config["fused"]
    again = fit_svi(
        conjugate.normal_normal, "meanfield", 20, x, num_steps=2000, lr=0.05, progress=False, backend="compiled"
    )
    assert "loaded from the kernel cache" in again.config["fuse_decision"] and again.config["fused"]
    elbo, se = result.elbo_estimate(20000, seed=1)
    log_evidence = conjugate.normal_normal_log_evidence(x)
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL


def _radon(county, log_radon=None):
    """Varying-intercept radon model, indexed ``a[county]`` as Pyro's and Stan's versions are."""
    mu_a = pyro.sample("mu_a", dist.Normal(0.0, 10.0))
    sigma_a = pyro.sample("sigma_a", dist.HalfCauchy(5.0))
    with pyro.plate("county", 5):
        a = pyro.sample("a", dist.Normal(mu_a, sigma_a))
    sigma_y = pyro.sample("sigma_y", dist.HalfCauchy(5.0))
    with pyro.plate("data", len(county)):
        pyro.sample("obs", dist.Normal(a[county], sigma_y), obs=log_radon)


def test_group_indexed_model_compiles_with_one_particle():
    generator = torch.Generator().manual_seed(0)
    county = torch.randint(0, 5, (40,), generator=generator)
    log_radon = torch.randn(5, generator=generator)[county] + 0.3 * torch.randn(40, generator=generator)
    pyro.clear_param_store()
    guide = get_guide("meanfield", _radon)
    guide(county, log_radon)
    torch.manual_seed(3)
    expected, _ = _pyro_loss_and_grads(Trace_ELBO(), _radon, guide, (county, log_radon), {})
    torch.manual_seed(3)
    with pyro.validation_enabled(False):
        got = elbo_loss(_radon, guide, (county, log_radon), {}, "trace", 1, max_plate_nesting=1)
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-10)
    result = fit_svi(
        _radon, "meanfield", county, log_radon, num_steps=20, num_particles=1, backend="compiled", progress=False
    )
    assert result.config["backend"] == "compiled" and all(math.isfinite(loss) for loss in result.losses)


def test_group_indexed_model_with_several_particles_runs_them_one_at_a_time():
    generator = torch.Generator().manual_seed(0)
    county = torch.randint(0, 5, (40,), generator=generator)
    log_radon = torch.randn(40, generator=generator)
    with pytest.warns(RuntimeWarning, match="one particle at a time"):
        result = fit_svi(_radon, "meanfield", county, log_radon, num_steps=10, num_particles=3, progress=False)
    assert result.config["backend"] == "pyro" and all(math.isfinite(loss) for loss in result.losses)


def test_matrix_algebra_on_a_latent_with_several_particles_runs_them_one_at_a_time():
    x = torch.linspace(-1.0, 1.0, 5)

    def gp(y):  # cholesky(K) @ f_tilde, as posteriordb's gp_pois_regr: no particle plate fits it
        length = pyro.sample("length", dist.LogNormal(0.0, 1.0))
        f_tilde = pyro.sample("f_tilde", dist.Normal(torch.zeros(5), 1.0).to_event(1))
        kernel = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / length**2) + 1e-6 * torch.eye(5)
        pyro.sample("y", dist.Normal(torch.linalg.cholesky(kernel) @ f_tilde, 0.5).to_event(1), obs=y)

    with pytest.warns(RuntimeWarning, match="one particle at a time"):
        result = fit_svi(gp, "meanfield", torch.sin(x), num_steps=10, num_particles=3, progress=False)
    assert result.config["backend"] == "pyro" and all(math.isfinite(loss) for loss in result.losses)


def test_the_compiled_step_on_the_virtual_machine_reaches_the_posterior():
    from vilab.inference.engine.backends.vm import vm_unavailable

    if vm_unavailable(wait=True):
        pytest.skip(f"no virtual machine here: {vm_unavailable()}")
    x = conjugate.default_normal_data()
    result = fit_normal_normal(x, seed=0, backend="compiled", compiler="vm")
    assert result.config["step_runner"] == "vm", result.config["fuse_decision"]
    elbo, se = result.elbo_estimate(20000, seed=1)
    log_evidence = conjugate.normal_normal_log_evidence(x)
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL


def test_the_fullrank_step_on_the_virtual_machine_reaches_the_posterior():
    # The full-rank guide's step has a triangular solve and a Cholesky backward (copy_ into
    # strided views): both on the virtual machine. The guide family holds the Gaussian posterior,
    # so the ELBO reaches the log evidence.
    from vilab.inference.engine.backends.vm import vm_unavailable

    if vm_unavailable(wait=True):
        pytest.skip(f"no virtual machine here: {vm_unavailable()}")
    features, y = conjugate.default_regression_data()
    result = fit_svi(
        conjugate.linear_regression,
        "fullrank",
        features,
        y,
        num_steps=2000,
        lr=0.05,
        lr_decay=0.01,
        early_stop=False,
        progress=False,
        seed=0,
        backend="compiled",
        compiler="vm",
    )
    assert result.config["step_runner"] == "vm", result.config["fuse_decision"]
    elbo, se = result.elbo_estimate(20000, seed=1)
    log_evidence = conjugate.linear_regression_log_evidence(features, y)
    assert elbo <= log_evidence + Z * se + 1e-9
    assert log_evidence - elbo <= Z * se + OPT_TOL


@pytest.mark.filterwarnings("ignore:fit_svi. guide .* did not converge")
@pytest.mark.parametrize("guide_name", ["lowrank", "iaf", "nsf"])
def test_lowrank_and_flow_steps_run_on_the_virtual_machine(guide_name):
    from vilab.inference.engine.backends.vm import vm_unavailable

    if vm_unavailable(wait=True):
        pytest.skip(f"no virtual machine here: {vm_unavailable()}")
    features, y = conjugate.default_regression_data()
    result = fit_svi(
        conjugate.linear_regression,
        guide_name,
        features,
        y,
        num_steps=20,
        early_stop=False,
        progress=False,
        seed=0,
        backend="compiled",
        compiler="vm",
    )
    assert result.config["step_runner"] == "vm", result.config["fuse_decision"]
    assert all(math.isfinite(loss) for loss in result.losses)
