"""Models with enumerated discrete sites: Pyro's GMM tutorial, the coal-mining change point
(Stan User's Guide, with the change year a Pyro site instead of a hand-written marginal) and
Pyro's HMM example ``model_1``."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate

__all__ = ["gmm_model", "coal_change_point", "hmm_model_1"]

K = 2  # Fixed number of components.


@config_enumerate
def gmm_model(data):
    """Pyro's "Gaussian Mixture Model" tutorial."""
    # Global variables.
    weights = pyro.sample("weights", dist.Dirichlet(0.5 * torch.ones(K)))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 2.0))
    with pyro.plate("components", K):
        locs = pyro.sample("locs", dist.Normal(0.0, 10.0))

    with pyro.plate("data", len(data)):
        # Local variables.
        assignment = pyro.sample("assignment", dist.Categorical(weights))
        pyro.sample("obs", dist.Normal(locs[assignment], scale), obs=data)


def coal_change_point(D, r_e, r_l):
    """Stan User's Guide, "Change point models": early rate ``e``, late rate ``l``, a change
    year ``s`` uniform over ``1..T`` (Stan marginalises it by hand; in Pyro it is an
    enumerated site, 0-based)."""
    T = len(D)
    e = pyro.sample("e", dist.Exponential(r_e))
    l = pyro.sample("l", dist.Exponential(r_l))
    s = pyro.sample("s", dist.Categorical(logits=torch.zeros(T)), infer={"enumerate": "parallel"})
    t = torch.arange(1, T + 1)
    with pyro.plate("years", T):
        pyro.sample("D", dist.Poisson(torch.where(t < s + 1, e, l)), obs=D)


def hmm_model_1(sequences, lengths, args, batch_size=None, include_prior=True):
    """Pyro's HMM example, ``model_1``: a Bernoulli HMM, sequences in a sequential plate and
    time steps under ``pyro.markov``, the hidden state enumerated."""
    # Sometimes it is safe to ignore jit warnings. Here we use the
    # pyro.util.ignore_jit_warnings context manager to silence warnings about
    # conversion to integer, since we know all three numbers will be the same
    # across all invocations to the model.
    with pyro.util.ignore_jit_warnings():
        num_sequences, max_length, data_dim = map(int, sequences.shape)
        assert lengths.shape == (num_sequences,)
        assert lengths.max() <= max_length
    with poutine.mask(mask=include_prior):
        probs_x = pyro.sample("probs_x", dist.Dirichlet(0.9 * torch.eye(args.hidden_dim) + 0.1).to_event(1))
        probs_y = pyro.sample("probs_y", dist.Beta(0.1, 0.9).expand([args.hidden_dim, data_dim]).to_event(2))
    tones_plate = pyro.plate("tones", data_dim, dim=-1)
    # We subsample batch_size items out of num_sequences items. Note that since
    # we're using dim=-1 for the notes plate, we need to batch over a different
    # dimension, here dim=-2.
    for i in pyro.plate("sequences", len(sequences), batch_size):
        length = lengths[i]
        sequence = sequences[i, :length]
        x = 0
        for t in pyro.markov(range(length)):
            x = pyro.sample(
                "x_{}_{}".format(i, t),
                dist.Categorical(probs_x[x]),
                infer={"enumerate": "parallel"},
            )
            with tones_plate:
                pyro.sample(
                    "y_{}_{}".format(i, t),
                    dist.Bernoulli(probs_y[x.squeeze(-1)]),
                    obs=sequence[t],
                )
