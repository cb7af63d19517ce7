r"""A Gaussian on the model's unconstrained space, as a Pyro guide.

Methods that produce :math:`q(z) = \mathcal N(z; \mu, L L^\top)` over the flat unconstrained
vector :math:`z \in \mathbb R^D` (DADVI, Pathfinder, batch-and-match) return it as an
``AutoMultivariateNormal`` with its parameters set, so that drawing, ``median()``,
``quantiles()``, ELBO and PSIS work as for any fitted guide. The flat layout is the one of
:class:`~vilab.inference.engine.potential.BatchedPotential` (latent sites in trace order, each
site's unconstrained block flattened); :func:`gaussian_guide` checks that the guide's
layout agrees.
"""

from __future__ import annotations

import pyro
import torch
from pyro.infer.autoguide import AutoMultivariateNormal

__all__ = ["gaussian_guide"]


def gaussian_guide(
    model, args: tuple, kwargs: dict, loc: torch.Tensor, scale_tril: torch.Tensor, sites=None
) -> AutoMultivariateNormal:
    r"""An ``AutoMultivariateNormal`` guide fixed at :math:`\mathcal N(\mu, L L^\top)`.

    Args:
        model: the Pyro model; ``args, kwargs`` its data.
        loc: :math:`\mu`, shape ``(D,)``.
        scale_tril: :math:`L`, lower triangular with a positive diagonal, shape ``(D, D)``
            (a ``(D,)`` vector means a diagonal :math:`L`).
        sites: optional ``BatchedPotential.sites``; when given, the guide's latent sites and
            their sizes must follow the same order.

    Returns:
        The guide; its parameters live in Pyro's param store like any autoguide's.
    """
    loc = torch.as_tensor(loc, dtype=torch.get_default_dtype()).detach()
    scale_tril = torch.as_tensor(scale_tril, dtype=loc.dtype).detach()
    if scale_tril.dim() == 1:
        scale_tril = torch.diag(scale_tril)
    guide = AutoMultivariateNormal(model)
    with pyro.poutine.block():
        guide(*args, **kwargs)  # sets up the prototype trace and the parameters
    if guide.latent_dim != loc.shape[-1] or scale_tril.shape != (loc.shape[-1], loc.shape[-1]):
        raise ValueError(
            f"loc/scale_tril: expected shapes ({guide.latent_dim},) and "
            f"({guide.latent_dim}, {guide.latent_dim}); got {tuple(loc.shape)} and "
            f"{tuple(scale_tril.shape)}"
        )
    if sites is not None:
        layout = [(name, site["fn"].support) for name, site in guide.prototype_trace.iter_stochastic_nodes()]
        if [name for name, _ in layout] != [site.name for site in sites]:
            raise ValueError(
                f"sites: the guide's latent order {[n for n, _ in layout]} differs from {[site.name for site in sites]}"
            )
    diagonal = scale_tril.diagonal()
    if not bool((diagonal > 0).all()):
        raise ValueError("scale_tril: expected a positive diagonal")
    with torch.no_grad():
        guide.loc.data.copy_(loc)
        guide.scale = diagonal.clone()
        guide.scale_tril = scale_tril / diagonal[:, None]
    return guide
