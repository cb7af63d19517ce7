"""VAE model: sites and shapes, decoders, priors, input validation, rebuild from config."""

import pyro
import pytest
import torch
from pyro import poutine

from vilab.inference.vae.checkpoints import load_module, save_module
from vilab.models.vae.vae import GUIDES, VAEConfig, build_vae
from vilab.models.vae.priors import MixturePrior, VampPrior
from vilab.guides.amortized.encoders import MLPEncoder

pytestmark = pytest.mark.float32

SMALL = dict(encoder_hidden=(16,), decoder_hidden=(16,), num_components=3, num_flows=2)


@pytest.mark.parametrize("architecture", ["mlp", "conv"])
@pytest.mark.parametrize("levels", [2, 17])
def test_model_sites_have_the_documented_shapes(architecture, levels):
    vae = build_vae(VAEConfig((1, 8, 8), latent_dim=3, num_levels=levels, architecture=architecture, **SMALL))
    trace = poutine.trace(vae.model).get_trace(None, batch_size=5)
    assert trace.nodes["z"]["value"].shape == (5, 3)
    x = trace.nodes["x"]["value"]
    assert x.shape == (5, 1, 8, 8) and x.max() <= levels - 1
    trace.compute_log_prob()
    assert trace.nodes["x"]["log_prob"].shape == (5,)


def test_model_scores_data_under_a_guide():
    vae = build_vae(VAEConfig((1, 8, 8), latent_dim=3, **SMALL))
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    loss = pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in vae.parameters())


def test_wrong_image_size_is_a_clear_error():
    vae = build_vae(VAEConfig((1, 28, 28), latent_dim=2, **SMALL))
    with pytest.raises(ValueError, match=r"expects images of shape \(batch, 1, 28, 28\); got \(4, 1, 8, 8\)"):
        vae.model(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValueError, match="the encoder expects images"):
        vae.guide(torch.zeros(4, 1, 8, 8))


@pytest.mark.parametrize(
    "value, binary",
    [
        (0.0, True),
        (1.0, True),
        (0.5, False),
        (1e-30, False),
        (1.0 - 2.0**-24, False),
        (2.0, False),
        (-0.5, False),
        (float("nan"), False),
        (float("inf"), False),
    ],
)
def test_binary_check_is_exact(value, binary):
    from vilab.models.vae.vae import _is_binary

    x = torch.bernoulli(torch.full((64, 1, 8, 8), 0.5))
    x[17, 0, 3, 5] = value
    assert _is_binary(x) is binary
    assert _is_binary(x.double()) is binary
    if binary:
        assert _is_binary(x.to(torch.uint8)) and _is_binary(x.bool())


def test_non_binary_data_for_a_bernoulli_decoder_is_a_clear_error():
    vae = build_vae(VAEConfig((1, 8, 8), latent_dim=2, **SMALL))
    with pytest.raises(ValueError, match="binary pixels"):
        vae.model(torch.full((2, 1, 8, 8), 0.5))


def test_out_of_range_levels_for_a_categorical_decoder_are_a_clear_error():
    vae = build_vae(VAEConfig((1, 8, 8), latent_dim=2, num_levels=17, **SMALL))
    with pytest.raises(ValueError, match="integer pixels in 0..16"):
        vae.model(torch.full((2, 1, 8, 8), 17.0))


@pytest.mark.parametrize(
    "field,value", [("guide", "maf"), ("prior", "gamma"), ("architecture", "rnn"), ("hidden_layer", "relu")]
)
def test_unknown_options_are_rejected(field, value):
    with pytest.raises(ValueError, match=f"{field}: expected"):
        build_vae(VAEConfig((1, 8, 8), **{field: value}))


def test_gated_layers_are_only_for_the_mlp():
    with pytest.raises(ValueError, match="hidden_layer: .*'gated' with architecture 'conv'"):
        build_vae(VAEConfig((1, 8, 8), architecture="conv", hidden_layer="gated"))


def test_gated_layer_is_a_sigmoid_gated_linear_map():
    from vilab.guides.amortized.encoders import GatedDense

    layer = GatedDense(5, 3)
    x = torch.randn(4, 5)
    weight, bias = layer.linear.weight, layer.linear.bias
    expected = (x @ weight[:3].T + bias[:3]) * torch.sigmoid(x @ weight[3:].T + bias[3:])
    torch.testing.assert_close(layer(x), expected)


def test_gated_vae_trains_and_reloads_and_old_configs_default_to_elu(tmp_path):
    config = VAEConfig((1, 8, 8), latent_dim=3, hidden_layer="gated", prior="vamp", **SMALL)
    vae = build_vae(config)
    assert sum(type(m).__name__ == "GatedDense" for m in vae.modules()) == 2  # encoder + decoder
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in vae.parameters())
    save_module(vae, str(tmp_path / "w.safetensors"))
    other = build_vae(VAEConfig.from_dict(config.to_dict()))
    load_module(other, str(tmp_path / "w.safetensors"))
    z = torch.randn(2, 3)
    torch.testing.assert_close(vae.model.decoder(z), other.model.decoder(z))
    saved_before = {k: v for k, v in VAEConfig((1, 8, 8)).to_dict().items() if k != "hidden_layer"}
    assert VAEConfig.from_dict(saved_before).hidden_layer == "elu"


def test_mixture_prior_is_a_normalised_density():
    prior = MixturePrior(1, num_components=3)()
    grid = torch.linspace(-15, 15, 6001).unsqueeze(-1)
    mass = torch.trapezoid(prior.log_prob(grid).exp(), grid.squeeze(-1))
    assert abs(mass.item() - 1) < 1e-3


def test_vamp_prior_is_the_mean_of_encoder_posteriors_at_pseudo_inputs():
    encoder = MLPEncoder((1, 8, 8), 2, hidden_dims=(8,))
    prior = VampPrior(encoder, num_components=4)
    z = torch.randn(6, 2)
    loc, scale = encoder(prior.pseudo_inputs)
    expected = torch.distributions.Normal(loc, scale).log_prob(z.unsqueeze(1)).sum(-1)
    expected = torch.logsumexp(expected, 1) - torch.log(torch.tensor(4.0))
    torch.testing.assert_close(prior().log_prob(z), expected)
    assert not any(name.startswith("_encoder") for name, _ in prior.named_parameters())


def test_vamp_prior_initialised_from_data_puts_pseudo_inputs_on_the_images():
    encoder = MLPEncoder((1, 8, 8), 2, hidden_dims=(8,))
    prior = VampPrior(encoder, num_components=3)
    images = torch.rand(5, 1, 8, 8)
    images[0, 0, 0, 0] = 1.0  # clipped to 1 - margin: the sigmoid cannot reach 1
    prior.init_from_data(images, margin=0.05)
    expected = images[:3].clamp(0.05, 0.95)
    torch.testing.assert_close(prior.pseudo_inputs, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="images: expected at least 3"):
        prior.init_from_data(images[:2])
    with pytest.raises(ValueError, match=r"images: expected a tensor of shape \(N, 1, 8, 8\)"):
        prior.init_from_data(torch.rand(5, 64))


def test_matrix_product_mixture_density_equals_the_broadcast_one_with_gradients():
    from vilab.models.vae.priors import DiagonalGaussianMixture

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(7, generator=generator, dtype=torch.float64, requires_grad=True)
    locs = torch.randn(7, 5, generator=generator, dtype=torch.float64, requires_grad=True)
    scales = (0.05 + torch.rand(7, 5, generator=generator, dtype=torch.float64)).requires_grad_()
    z = 3 * torch.randn(4, 3, 5, generator=generator, dtype=torch.float64)  # (samples, batch, D)
    fast = DiagonalGaussianMixture(logits, locs, scales).log_prob(z)
    reference = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(logits=logits),
        torch.distributions.Independent(torch.distributions.Normal(locs, scales), 1),
    ).log_prob(z)
    assert fast.shape == (4, 3)
    torch.testing.assert_close(fast, reference, rtol=1e-10, atol=1e-9)
    for a, b in zip(
        torch.autograd.grad(fast.sum(), (logits, locs, scales)),
        torch.autograd.grad(reference.sum(), (logits, locs, scales)),
    ):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("guide", GUIDES)
@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_saved_weights_rebuild_the_same_model(tmp_path, guide, prior):
    config = VAEConfig((1, 8, 8), latent_dim=3, guide=guide, prior=prior, **SMALL)
    vae = build_vae(config)
    save_module(vae, str(tmp_path / "w.safetensors"))
    other = build_vae(VAEConfig.from_dict(config.to_dict()))
    load_module(other, str(tmp_path / "w.safetensors"))
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    z = torch.randn(3, 3)
    torch.testing.assert_close(vae.model.decoder(z), other.model.decoder(z))
    torch.testing.assert_close(vae.model.prior().log_prob(z), other.model.prior().log_prob(z))
    pyro.set_rng_seed(1)
    first = vae.guide.distribution(x).rsample()
    pyro.set_rng_seed(1)
    torch.testing.assert_close(first, other.guide.distribution(x).rsample())


def test_reconstruct_and_prior_samples_are_pixel_means():
    vae = build_vae(VAEConfig((1, 8, 8), latent_dim=2, num_levels=17, **SMALL))
    x = torch.randint(0, 17, (3, 1, 8, 8)).float()
    assert vae.reconstruct(x).shape == (3, 1, 8, 8)
    samples = vae.sample_prior(5)
    assert samples.shape == (5, 1, 8, 8) and samples.min() >= 0 and samples.max() <= 16
