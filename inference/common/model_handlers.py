r"""Effect handlers that make a model's evaluation mean what the user asked for.

``full_plates``: a ``pyro.plate(name, size, subsample_size=n)`` draws ``n`` random indices on
every call and scales its sites by ``size / n``. That is right for a stochastic ELBO gradient,
but a posterior draw's log-likelihood, the ``observed_data`` group, PSIS weights and NUTS must
see every data point: under this handler each subsampled plate takes all ``size`` indices
(scale 1), as if ``subsample_size`` had not been given.

``improper_init``: ``pyro.distributions.ImproperUniform`` has a density (zero) but no
``sample``; a model using it is a factor graph that NUTS can sample. Wherever such a site would
be sampled without a value (a model's first trace, an autoguide's prototype, NUTS's
initialisation) this handler places it uniformly in :math:`(-2, 2)` on the unconstrained space,
as Stan initialises every parameter.

``proper_unobserved``: ``pyro.sample(name, d, obs=y, obs_mask=mask)`` adds a latent site
``name_unobserved`` of ``y``'s full shape whose density is masked out where ``y`` is observed;
those elements are replaced by data and so are never used, but under a flat (improper) density
NUTS lets them wander (R-hat and ESS then describe noise) and a guide's entropy term widens them
without bound (PSIS weights then carry their :math:`\log q`). This handler gives them the site's
own density :math:`d`, whose integral is one, so the posterior of every quantity the model uses
is unchanged while those elements become proper.

``unplated_as_event``: ``pyro.sample("a", dist.Normal(3, 0.5).expand([2]))`` outside any plate
(Statistical Rethinking's NumPyro port; Pyro's NUTS docstring writes
``dist.Normal(torch.zeros(3), torch.ones(3))``) has batch dims that no plate declares. NUTS and
NumPyro sum them into the joint density, but Pyro's ELBOs check every batch dim against a plate
(and a vectorising particle plate collides with them). This handler reinterprets those dims as
event dims, :math:`\log p(a) = \sum_i \log p(a_i)` either way, so the joint density is unchanged
while every remaining batch dim is a plate's. Observed sites keep their batch dims in the model
vilab evaluates draws with (their per-element log-likelihoods are what LOO and the
``log_likelihood`` group read); the ELBO's model reinterprets them too.
"""

from __future__ import annotations

from typing import Callable

import torch
from pyro.poutine.messenger import Messenger
from pyro.distributions import ImproperUniform
from pyro.poutine.subsample_messenger import SubsampleMessenger, _Subsample
from torch.distributions import transform_to

__all__ = [
    "full_plates",
    "proper_unobserved",
    "has_subsampling",
    "improper_init",
    "is_improper",
    "unplated_event_dims",
    "unplated_as_event",
    "for_inference",
]

# Stan's (and Pyro's init_to_uniform's) initial range on the unconstrained space.
_INIT_RADIUS = 2.0


class _FullPlates(Messenger):
    """While active, a plate built with ``subsample_size`` and no explicit ``subsample`` takes
    every index. Pyro fixes a plate's subsample size when the plate is constructed, before any
    handler sees a message, so the plate's own helper is wrapped for the duration (and restored
    on exit, also on error)."""

    _active = 0
    # In a list: a staticmethod stored as a class attribute would be unwrapped on access.
    _original: list = []

    def __enter__(self):
        cls = _FullPlates
        if cls._active == 0:
            cls._original[:] = [SubsampleMessenger.__dict__["_subsample"]]
            original = cls._original[0].__func__

            def every_index(name, size=None, subsample_size=None, subsample=None, *args, **kwargs):
                if size is not None and subsample is None and subsample_size is not None:
                    subsample_size, subsample = None, torch.arange(size)
                return original(name, size, subsample_size, subsample, *args, **kwargs)

            SubsampleMessenger._subsample = staticmethod(every_index)
        cls._active += 1
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            cls = _FullPlates
            cls._active -= 1
            if cls._active == 0:
                SubsampleMessenger._subsample = cls._original[0]


class _ProperUnobserved(Messenger):
    def __init__(self) -> None:
        super().__init__()
        self._observed: set[str] = set()

    def _process_message(self, msg) -> None:
        if msg["type"] != "sample":
            return
        name = msg["name"]
        if name.endswith("_observed") and msg["is_observed"]:
            self._observed.add(name[: -len("_observed")])
        elif (
            name.endswith("_unobserved")
            and name[: -len("_unobserved")] in self._observed
            and isinstance(msg["mask"], torch.Tensor)
        ):
            msg["mask"] = None


def is_improper(fn) -> bool:
    """Whether a site's distribution is an ``ImproperUniform`` (perhaps ``.to_event``-ed or masked)."""
    while not isinstance(fn, ImproperUniform) and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return isinstance(fn, ImproperUniform)


class _ImproperInit(Messenger):
    def _pyro_sample(self, msg) -> None:
        if msg["value"] is None and not msg["is_observed"] and is_improper(msg["fn"]):
            fn = msg["fn"]
            transform = transform_to(fn.support)
            shape = transform.inverse_shape(fn.batch_shape + fn.event_shape)
            unconstrained = (2 * torch.rand(shape, dtype=torch.get_default_dtype()) - 1) * _INIT_RADIUS
            msg["value"] = transform(unconstrained)


def improper_init(fn: Callable) -> Callable:
    """``fn`` with each ``ImproperUniform`` site that has no value placed uniformly in
    :math:`(-2, 2)` on its unconstrained space instead of sampled (which it cannot be)."""
    return _ImproperInit()(fn)


def full_plates(fn: Callable) -> Callable:
    """``fn`` with every subsampled ``pyro.plate`` running over its full size."""
    return _FullPlates()(fn)


def proper_unobserved(fn: Callable) -> Callable:
    """``fn`` with the never-used elements of each ``obs_mask`` site's ``name_unobserved``
    given the site's own (proper) density; see the module docstring."""
    return _ProperUnobserved()(fn)


class _UnplatedAsEvent(Messenger):
    """Reinterprets, by site name, a fixed number of rightmost batch dims as event dims. The
    count comes from a trace of the model as written: later runs (under a vectorising particle
    plate, or with draws batched on the left) add batch dims on the left only, so the count
    stays right where a count from the current ``fn`` would not."""

    def __init__(self, event_dims: dict[str, int]) -> None:
        super().__init__()
        self.event_dims = event_dims

    def _pyro_sample(self, msg) -> None:
        extra = self.event_dims.get(msg["name"], 0)
        if extra:
            msg["fn"] = msg["fn"].to_event(extra)


def unplated_event_dims(trace, *, observed: bool = False) -> dict[str, int]:
    """Latent (or, with ``observed``, observed) site outside every plate -> its number of batch
    dims, all of which no plate declares.

    A site inside a plate is left as written: reading its rightmost batch dims as event dims
    would move the plate's dim (Pyro has already checked it at its written position).
    Enumerated and subsample sites are left out too (their batch dims are enumeration's and
    the plate's own).
    """
    dims = {}
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] != observed or isinstance(site["fn"], _Subsample):
            continue
        if site["infer"].get("enumerate") or any(f.vectorized for f in site["cond_indep_stack"]):
            continue
        if site["fn"].batch_shape:
            dims[name] = len(site["fn"].batch_shape)
    return dims


def unplated_as_event(fn: Callable, event_dims: dict[str, int]) -> Callable:
    """``fn`` with the named sites' batch dims outside any plate read as event dims
    (``event_dims`` from :func:`unplated_event_dims`); the joint density is unchanged."""
    return _UnplatedAsEvent(event_dims)(fn)


def has_subsampling(trace) -> bool:
    """Whether a model trace holds a subsampled plate (fewer indices than its size)."""
    return any(
        site["type"] == "sample" and isinstance(site["fn"], _Subsample) and len(site["value"]) < site["fn"].size
        for site in trace.nodes.values()
    )


def _has_masked_unobserved(trace) -> bool:
    names = {name for name, site in trace.nodes.items() if site["type"] == "sample"}
    return any(
        name.endswith("_unobserved")
        and f"{name[: -len('_unobserved')]}_observed" in names
        and isinstance(site["mask"], torch.Tensor)
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
    )


def for_inference(model: Callable, trace, *, full_data: bool = False) -> Callable:
    """``model`` with the handlers its ``trace`` calls for, and no others (a model without
    ``obs_mask`` sites, ``ImproperUniform`` sites, subsampled plates or latent batch dims outside
    any plate comes back unchanged).

    Args:
        model: a Pyro model.
        trace: one trace of it.
        full_data: also run subsampled plates over their full size (for NUTS).
    """
    if full_data and has_subsampling(trace):
        model = full_plates(model)
    event_dims = unplated_event_dims(trace)
    if event_dims:
        model = unplated_as_event(model, event_dims)
    if _has_masked_unobserved(trace):
        model = proper_unobserved(model)
    if any(
        site["type"] == "sample" and not site["is_observed"] and is_improper(site["fn"])
        for site in trace.nodes.values()
    ):
        model = improper_init(model)
    return model
