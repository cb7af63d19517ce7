"""The von Mises-Fisher distribution against numerical integration and closed forms.

Monte Carlo checks use tolerance z * sd / sqrt(n) with z = 4.5 (a two-sided failure chance
of about 7e-6 per check).
"""

import math

import numpy as np
import pyro
import pytest
import torch
from scipy import integrate, special

from vilab.guides.amortized.von_mises_fisher import (
    HypersphericalUniform,
    VonMisesFisher,
    bessel_ratio,
    log_bessel_iv,
    sphere_log_area,
)

Z = 4.5
DIMS = (2, 3, 5, 10)
CONCENTRATIONS = (0.5, 5.0, 60.0)


def _unit(dim, index=1):
    loc = torch.zeros(dim)
    loc[index % dim] = 1.0
    return loc


def _marginal_log_normalizer(dim, kappa):
    """log of integral over the sphere of exp(k mu.z): |S^{p-2}| * int e^{kt}(1-t^2)^{(p-3)/2}."""
    value, _ = integrate.quad(lambda t: math.exp(kappa * (t - 1)) * (1 - t * t) ** ((dim - 3) / 2), -1, 1, limit=200)
    return math.log(value) + kappa + sphere_log_area(dim - 1)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", CONCENTRATIONS)
def test_density_integrates_to_one_on_the_sphere(dim, kappa):
    log_normalizer = VonMisesFisher(_unit(dim), torch.tensor(kappa)).log_normalizer()
    assert float(log_normalizer) == pytest.approx(-_marginal_log_normalizer(dim, kappa), abs=1e-8)


def test_density_on_the_two_sphere_integrates_to_one_in_spherical_coordinates():
    distribution = VonMisesFisher(torch.tensor([0.6, 0.0, 0.8]), torch.tensor(7.0))

    def density(phi, theta):
        z = torch.tensor([math.sin(theta) * math.cos(phi), math.sin(theta) * math.sin(phi), math.cos(theta)])
        return math.exp(float(distribution.log_prob(z))) * math.sin(theta)

    total, _ = integrate.dblquad(density, 0, math.pi, 0, 2 * math.pi, epsabs=1e-10)
    assert total == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("order", (0.0, 0.5, 1.5, 4.0, 30.0))
def test_log_bessel_matches_scipy_and_its_derivative(order):
    x = torch.tensor([1e-3, 0.7, 12.0, 900.0], requires_grad=True)
    values = log_bessel_iv(order, x)
    expected = np.log(special.ive(order, x.detach().numpy())) + x.detach().numpy()
    np.testing.assert_allclose(values.detach().numpy(), expected, rtol=1e-10)
    assert torch.autograd.gradcheck(lambda t: log_bessel_iv(order, t), (x,))
    ratio = bessel_ratio(order, x.detach())
    np.testing.assert_allclose(
        ratio.numpy(), special.ive(order + 1, x.detach().numpy()) / special.ive(order, x.detach().numpy()), rtol=1e-10
    )


def test_log_bessel_uses_the_series_where_scaled_bessel_underflows():
    value = log_bessel_iv(200.0, torch.tensor([1e-6]))
    expected = 200 * math.log(0.5e-6) - math.lgamma(201)
    assert torch.isfinite(value).all() and float(value) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", CONCENTRATIONS)
def test_samples_lie_on_the_sphere_with_the_mean_resultant_length(dim, kappa):
    loc = _unit(dim)
    distribution = VonMisesFisher(loc, torch.tensor(kappa))
    draws = distribution.rsample((8000,))
    assert draws.shape == (8000, dim)
    torch.testing.assert_close(draws.norm(dim=-1), torch.ones(8000))
    projection = draws @ loc
    expected = float(distribution.mean.norm())
    tolerance = Z * float(projection.std()) / math.sqrt(len(projection))
    assert float(projection.mean()) == pytest.approx(expected, abs=tolerance)
    # The orthogonal part is isotropic with mean zero.
    orthogonal = draws - projection.unsqueeze(-1) * loc
    scale = float(orthogonal.std(0).max()) / math.sqrt(len(draws))
    assert float(orthogonal.mean(0).abs().max()) < Z * scale + 1e-12


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", CONCENTRATIONS)
def test_reparameterized_gradient_in_concentration_matches_the_analytic_derivative(dim, kappa):
    num = 8000
    kappas = torch.full((num,), kappa, requires_grad=True)
    projection = VonMisesFisher(_unit(dim).expand(num, dim), kappas).rsample() @ _unit(dim)
    (per_sample,) = torch.autograd.grad(projection.sum(), kappas)
    analytic_kappa = torch.tensor(kappa, requires_grad=True)
    length = VonMisesFisher(_unit(dim), analytic_kappa).mean.norm()
    (expected,) = torch.autograd.grad(length, analytic_kappa)
    tolerance = Z * float(per_sample.std()) / math.sqrt(num)
    assert float(per_sample.mean()) == pytest.approx(float(expected), abs=tolerance)


def test_reparameterized_gradient_in_direction_matches_the_analytic_derivative():
    raw = torch.tensor([0.3, -1.0, 0.5, 0.2, 0.9])
    target = torch.tensor([1.0, 2.0, -0.5, 0.0, 0.3])
    kappa = torch.tensor(4.0)
    num = 10000
    per_draw_raw = raw.expand(num, 5).clone().requires_grad_(True)
    loc = per_draw_raw / per_draw_raw.norm(dim=-1, keepdim=True)
    values = VonMisesFisher(loc, kappa).rsample() @ target
    (per_sample,) = torch.autograd.grad(values.sum(), per_draw_raw)
    exact_raw = raw.clone().requires_grad_(True)
    exact_value = VonMisesFisher(exact_raw / exact_raw.norm(), kappa).mean @ target
    (expected,) = torch.autograd.grad(exact_value, exact_raw)
    tolerance = Z * per_sample.std(0) / math.sqrt(num)
    assert ((per_sample.mean(0) - expected).abs() <= tolerance).all()


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("kappa", CONCENTRATIONS)
def test_kl_to_uniform_matches_monte_carlo_and_quadrature(dim, kappa):
    distribution = VonMisesFisher(_unit(dim), torch.tensor(kappa))
    kl = float(torch.distributions.kl_divergence(distribution, HypersphericalUniform(dim)))
    draws = distribution.sample((8000,))
    log_ratio = distribution.log_prob(draws) + sphere_log_area(dim)
    tolerance = Z * float(log_ratio.std()) / math.sqrt(len(draws))
    assert kl == pytest.approx(float(log_ratio.mean()), abs=tolerance)
    # Quadrature: KL = log area + log C + k E[w], with E[w] from the marginal of w.
    log_z = _marginal_log_normalizer(dim, kappa)
    mean_w, _ = integrate.quad(
        lambda t: t * math.exp(kappa * t - log_z + sphere_log_area(dim - 1)) * (1 - t * t) ** ((dim - 3) / 2),
        -1,
        1,
        limit=200,
    )
    assert kl == pytest.approx(sphere_log_area(dim) - log_z + kappa * mean_w, rel=1e-6)


def test_batch_shapes_broadcast_expand_and_score():
    loc = torch.nn.functional.normalize(torch.randn(4, 1, 6), dim=-1)
    kappa = torch.rand(3) * 10 + 0.1
    distribution = VonMisesFisher(loc, kappa)
    assert distribution.batch_shape == (4, 3) and distribution.event_shape == (6,)
    draws = distribution.rsample((2,))
    assert draws.shape == (2, 4, 3, 6)
    assert distribution.log_prob(draws).shape == (2, 4, 3)
    assert distribution.expand((5, 4, 3)).sample().shape == (5, 4, 3, 6)
    assert VonMisesFisher(loc[:, 0], torch.rand(4, 1) + 1).batch_shape == (4,)
    uniform = HypersphericalUniform(6, (4, 3))
    assert uniform.rsample((2,)).shape == (2, 4, 3, 6)
    assert uniform.log_prob(draws).shape == (2, 4, 3)
    assert float(uniform.entropy()[0, 0]) == pytest.approx(sphere_log_area(6))


def test_loc_equal_to_first_axis_needs_no_reflection():
    distribution = VonMisesFisher(_unit(4, 0), torch.tensor(30.0))
    assert float((distribution.sample((4000,)) @ _unit(4, 0)).mean()) > 0.9


def test_invalid_arguments_are_rejected_with_the_argument_name():
    with pytest.raises(ValueError, match="loc: expected unit vectors"):
        VonMisesFisher(torch.tensor([1.0, 1.0, 0.0]), torch.tensor(1.0), validate_args=True)
    with pytest.raises(ValueError, match="loc: expected shape"):
        VonMisesFisher(torch.tensor([1.0]), torch.tensor(1.0))
    with pytest.raises(ValueError, match="dim: expected"):
        HypersphericalUniform(1)
    with pytest.raises(ValueError, match="order"):
        log_bessel_iv(-1.0, torch.tensor(1.0))


def test_usable_as_a_pyro_site_with_trace_elbo_gradients():
    raw = torch.tensor([0.5, 0.5, 0.5, 0.5], requires_grad=True)
    log_kappa = torch.tensor(1.0, requires_grad=True)

    def model():
        with pyro.plate("data", 3):
            pyro.sample("z", HypersphericalUniform(4))

    def guide():
        with pyro.plate("data", 3):
            pyro.sample("z", VonMisesFisher(raw / raw.norm(), log_kappa.exp()))

    loss = pyro.infer.Trace_ELBO().differentiable_loss(model, guide)
    loss.backward()
    expected = 3 * float(VonMisesFisher(raw / raw.norm(), log_kappa.exp()).kl_to_uniform().detach())
    # Trace_ELBO is a one-sample KL estimate here: only its sign and gradients are checked.
    assert expected > 0 and torch.isfinite(loss)
    assert log_kappa.grad is not None and torch.isfinite(log_kappa.grad)
    assert raw.grad is not None and torch.isfinite(raw.grad).all()
