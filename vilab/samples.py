"""Conversions between site dictionaries and flat, Stan-style parameter names.

Site ``"beta"`` of shape ``(2,)`` flattens to ``"beta[1]"`` and ``"beta[2]"`` (1-based, as Stan
and posteriordb name them); a matrix site ``"L"`` of shape ``(2, 2)`` to ``"L[1,1]"``, ...
"""

from __future__ import annotations

import itertools
import re
from typing import Mapping

import numpy as np
import torch

from vilab.types import ArrayLike

__all__ = ["flatten_samples", "to_numpy", "unflatten_name", "match_reference", "masked_out_names"]

_FLAT_NAME = re.compile(r"^(?P<site>[^\[\]]+)(\[(?P<index>[0-9, ]+)\])?$")


def to_numpy(value: ArrayLike) -> np.ndarray:
    """Detach and convert a tensor (or array-like) to a float64 numpy array."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        if value.dtype == torch.bool:
            return value.numpy()
        return value.to(torch.float64).numpy()
    return np.asarray(value, dtype=np.float64)


def flatten_samples(samples: Mapping[str, ArrayLike], num_batch_dims: int) -> dict[str, np.ndarray]:
    """Flatten every site into scalar parameters with 1-based Stan names.

    Args:
        samples: site name -> array of shape ``(*batch, *site_shape)``.
        num_batch_dims: how many leading dims are draws (``2`` for ``(chain, draw)``,
            ``1`` for ``(sample,)``).

    Returns:
        flat name -> array of shape ``batch``.
    """
    if num_batch_dims < 0:
        raise ValueError(f"num_batch_dims: expected >= 0; got {num_batch_dims}")
    flat: dict[str, np.ndarray] = {}
    for name, value in samples.items():
        array = to_numpy(value)
        site_shape = array.shape[num_batch_dims:]
        if not site_shape:
            flat[name] = array
            continue
        for index in itertools.product(*(range(n) for n in site_shape)):
            label = ",".join(str(i + 1) for i in index)
            flat[f"{name}[{label}]"] = array[(Ellipsis,) + index]
    return flat


def unflatten_name(flat_name: str) -> tuple[str, tuple[int, ...]]:
    """Split ``"beta[2,1]"`` into ``("beta", (1, 0))`` (0-based index)."""
    match = _FLAT_NAME.match(flat_name)
    if match is None:
        raise ValueError(f"flat_name: expected 'site' or 'site[i,j]'; got {flat_name!r}")
    index = match.group("index")
    if index is None:
        return match.group("site"), ()
    return match.group("site"), tuple(int(i) - 1 for i in index.split(","))


def match_reference(flat_samples: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> list[str]:
    """Names present in both ``flat_samples`` and ``reference``, in the reference's order.

    Raises:
        ValueError: if no name is shared, listing a few names of each side.
    """
    shared = [name for name in reference if name in flat_samples]
    if not shared:
        ours = ", ".join(list(flat_samples)[:8])
        theirs = ", ".join(list(reference)[:8])
        raise ValueError(
            f"reference: no parameter name matches the model's sites; model has [{ours}], reference has [{theirs}]"
        )
    return shared


def masked_out_names(trace) -> set[str]:
    """Flat names of latent elements that no density in ``trace`` sees.

    ``pyro.sample(name, d, obs=y, obs_mask=mask)`` adds a latent site ``f"{name}_unobserved"``
    of the data's full shape whose density is masked (``~mask``) where ``y`` is observed; those
    elements are replaced by data and so are no part of the posterior (any sampler leaves them
    wandering under a flat density).
    """
    names: set[str] = set()
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or not name.endswith("_unobserved"):
            continue
        if f"{name[: -len('_unobserved')]}_observed" not in trace.nodes or not isinstance(site["mask"], torch.Tensor):
            continue
        value = torch.as_tensor(site["value"])
        batch_shape = value.shape[: value.dim() - site["fn"].event_dim]
        seen = site["mask"].expand(batch_shape).reshape(batch_shape + (1,) * site["fn"].event_dim).expand(value.shape)
        for index in itertools.product(*(range(n) for n in value.shape)):
            if not bool(seen[index]):
                names.add(f"{name}[{','.join(str(i + 1) for i in index)}]")
    return names
