"""One converter to ``arviz.InferenceData`` for MCMC ``(chain, draw)`` and VI draws.

VI draws enter as a single chain, so every ArviZ function that expects ``(chain, draw)`` works
on them; ``posterior.attrs["inference"]`` says which method made the draws. Array dimensions
that a site got from a ``pyro.plate`` are named after the plate, as ArviZ's ``from_pyro`` does.
"""

from __future__ import annotations

from typing import Mapping, Optional

import arviz as az
import numpy as np
import torch
from pyro.poutine.util import site_is_subsample

from vilab.samples import to_numpy
from vilab.inference.common.tracing import is_data_site, trace_model
from vilab.types import Model

__all__ = ["to_inference_data", "site_dims"]


def site_dims(trace) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    """Dimension names per sample site from its plates; unnamed dims get ``{site}_dim_{i}``."""
    dims, coords = {}, {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        shape = tuple(torch.as_tensor(site["value"]).shape)
        names = [f"{name}_dim_{i}" for i in range(len(shape))]
        batch_rank = len(site["fn"].batch_shape)
        for frame in site["cond_indep_stack"]:
            if frame.vectorized and frame.dim is not None:
                axis = batch_rank + frame.dim
                if 0 <= axis < len(shape) and shape[axis] == frame.size:
                    names[axis] = frame.name
                    coords[frame.name] = np.arange(frame.size)
        if names:
            dims[name] = names
    return dims, coords


def to_inference_data(
    model: Model,
    args: tuple,
    kwargs: dict,
    samples: Mapping[str, torch.Tensor],
    *,
    sample_stats: Optional[Mapping[str, object]] = None,
    log_likelihood: Optional[Mapping[str, torch.Tensor]] = None,
    inference: str = "nuts",
) -> az.InferenceData:
    """Build ``InferenceData`` from draws of shape ``(chain, draw, *site_shape)``.

    Args:
        model, args, kwargs: the model and its data (traced once for plate names and
            observed data).
        samples: site -> ``(chain, draw, *site_shape)``; latent and deterministic sites.
        sample_stats: per-draw statistics, ``(chain, draw)`` each (``diverging``, ``energy``,
            ``tree_depth``, ``step_size``, ``acceptance_rate``, ``lp``...).
        log_likelihood: observed site -> ``(chain, draw, *data_shape)``.
        inference: recorded in the groups' ``attrs["inference"]``.
    """
    trace = trace_model(model, args, kwargs)
    dims, coords = site_dims(trace)
    observed = {n: to_numpy(s["value"]) for n, s in trace.nodes.items() if is_data_site(s)}
    groups = {
        "posterior": {k: to_numpy(v) for k, v in samples.items()},
        "observed_data": observed or None,
        "log_likelihood": {k: to_numpy(v) for k, v in (log_likelihood or {}).items()} or None,
    }
    used = {k: v for k, v in dims.items() if k in samples or k in observed or k in (log_likelihood or {})}
    idata = az.from_dict(**{k: v for k, v in groups.items() if v is not None}, dims=used, coords=coords or None)
    if sample_stats:
        # Built apart: ArviZ applies ``dims`` by variable name across groups, and a statistic
        # may share its name with a model site (a regression may observe "log_weight").
        idata.extend(az.from_dict(sample_stats={k: _stat(v) for k, v in sample_stats.items()}))
    for group in idata.groups():
        idata[group].attrs["inference"] = inference
    return idata


def _stat(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)
