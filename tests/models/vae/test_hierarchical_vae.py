"""The two-level VAE: sites and shapes, rebuild from config, the function-preserving warm
start from a one-level VAE, and the errors of its options."""

import pyro
import pytest
import torch
from pyro import poutine

from vilab.inference.vae.checkpoints import load_module, save_module
from vilab.inference.vae.objectives import log_importance_weights
from vilab.models.vae.hierarchical import HierarchicalPrior, embed_one_level
from vilab.models.vae.vae import VAEConfig, build_vae

pytestmark = pytest.mark.float32

SMALL = dict(encoder_hidden=(16,), decoder_hidden=(16,), num_components=3, hidden_layer="gated")


def two_level(prior="vamp", **options):
    return build_vae(VAEConfig((1, 8, 8), latent_dim=3, prior=prior, latent_levels=2, **{**SMALL, **options}))


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_two_level_sites_have_the_documented_shapes(prior):
    vae = two_level(prior)
    assert isinstance(vae.model.prior, HierarchicalPrior)
    trace = poutine.trace(vae.model).get_trace(None, batch_size=5)
    assert trace.nodes["z"]["value"].shape == (5, 6)  # [z_1, z_2]
    assert trace.nodes["x"]["value"].shape == (5, 1, 8, 8)
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    log_w = log_importance_weights(vae.model, vae.guide, x, num_samples=7)
    assert log_w.shape == (7, 4) and torch.isfinite(log_w).all()


def test_two_level_elbo_reaches_every_parameter():
    vae = two_level()
    x = torch.bernoulli(torch.full((4, 1, 8, 8), 0.5))
    pyro.infer.Trace_ELBO().differentiable_loss(vae.model, vae.guide, x).backward()
    missing = [name for name, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_saved_two_level_weights_rebuild_the_same_model(tmp_path):
    vae = two_level()
    save_module(vae, str(tmp_path / "w.safetensors"))
    other = build_vae(VAEConfig.from_dict(vae.config.to_dict()))
    load_module(other, str(tmp_path / "w.safetensors"))
    x = torch.bernoulli(torch.full((3, 1, 8, 8), 0.5))
    z = vae.guide.distribution(x).sample((2,))
    torch.testing.assert_close(other.guide.log_density(x, z), vae.guide.log_density(x, z))
    torch.testing.assert_close(other.model.prior().log_prob(z), vae.model.prior().log_prob(z))
    torch.testing.assert_close(other.model.decoder(z), vae.model.decoder(z))
    saved_before = {k: v for k, v in vae.config.to_dict().items() if k != "latent_levels"}
    assert VAEConfig.from_dict(saved_before).latent_levels == 1


@pytest.mark.parametrize("prior", ["standard", "vamp"])
def test_warm_start_from_a_one_level_vae_keeps_every_importance_weight(prior):
    one = build_vae(VAEConfig((1, 8, 8), latent_dim=3, prior=prior, **SMALL))
    with torch.no_grad():  # any trained-looking weights, not the initial ones
        for p in one.parameters():
            p.add_(0.3 * torch.randn_like(p))
    two = two_level(prior)
    unset = embed_one_level(two, one.state_dict())
    assert unset and all(".lower." in k or ".conditional." in k for k in unset)
    x = torch.bernoulli(torch.full((5, 1, 8, 8), 0.5))
    pyro.set_rng_seed(3)
    expected = log_importance_weights(one.model, one.guide, x, num_samples=11)
    pyro.set_rng_seed(3)
    # z_2 is drawn first with the same noise; z_1's prior and guide cancel.
    actual = log_importance_weights(two.model, two.guide, x, num_samples=11)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-4)


def test_warm_start_errors_name_the_problem():
    one = build_vae(VAEConfig((1, 8, 8), latent_dim=3, **SMALL))
    with pytest.raises(ValueError, match="vae: expected a two-level VAE"):
        embed_one_level(one, one.state_dict())
    wider = build_vae(VAEConfig((1, 8, 8), latent_dim=4, **SMALL))
    two = two_level()
    before = {k: v.clone() for k, v in two.state_dict().items()}
    with pytest.raises(ValueError, match=r"state: '.*' has shape .*; the two-level model's"):
        embed_one_level(two, wider.state_dict())
    assert all(torch.equal(before[k], v) for k, v in two.state_dict().items())  # left as it was
    with pytest.raises(ValueError, match="state: 'extra' has no counterpart"):
        embed_one_level(two_level(), {"extra": torch.zeros(1)})


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(latent_levels=3), "latent_levels: expected 1 or 2; got 3"),
        (dict(latent_levels=2, guide="iaf"), "guide: the two-level VAE .* mean-field guide only"),
        (dict(latent_levels=2, prior="mixture"), "prior: the two-level VAE's top prior"),
    ],
)
def test_unsupported_two_level_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        build_vae(VAEConfig((1, 8, 8), latent_dim=3, **{**SMALL, **options}))
