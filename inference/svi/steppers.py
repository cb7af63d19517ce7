"""How one SVI step is taken: Pyro's ``SVI`` with a (preconditioned) ``ClippedAdam`` where the
compiled step (:class:`~vilab.inference.engine.api.CompiledSVIStep`) cannot run the model and guide, the
choice between the two, and where a non-finite loss came from."""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Optional

import numpy as np
import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO

from vilab.inference.engine.api import svi_step
from vilab.inference.svi.optim import scaled_clipped_adam

__all__ = ["ELBOS", "BACKENDS", "CLIP", "make_stepper", "make_elbo", "non_finite_site"]

ELBOS = ("trace", "meanfield", "iwae")
BACKENDS = ("auto", "compiled", "pyro")
# ClippedAdam's element-wise gradient clamp.
CLIP = 10.0


def make_elbo(elbo: str, num_particles: int, vectorize: bool):
    if elbo == "trace":
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)
    if elbo == "meanfield":
        return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)
    if elbo == "enum":  # set by fit_svi for models with enumerated sites (vilab.inference.common.enumeration)
        return TraceEnum_ELBO(num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)
    if elbo == "iwae":
        if num_particles < 2:
            raise ValueError(f"num_particles: the importance-weighted bound needs >= 2; got {num_particles}")
        return RenyiELBO(alpha=0.0, num_particles=num_particles, vectorize_particles=vectorize)
    raise ValueError(f"elbo: expected one of {ELBOS}; got {elbo!r}")


class _PyroStepper:
    """Pyro's ``SVI`` with ``ClippedAdam``; remembers the last parameters with a finite loss."""

    backend = "pyro"
    # No size known in advance: the thread setting is left as the user has it.
    numel = math.inf

    def __init__(self, model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd, step_scales=None):
        optim = scaled_clipped_adam(lr, lrd, CLIP, step_scales)
        self.svi = SVI(model, guide, optim, make_elbo(elbo, num_particles, vectorize))
        self.args, self.kwargs, self.good = args, kwargs, None

    def step(self) -> float:
        try:
            loss = self.svi.step(*self.args, **self.kwargs)
        except ValueError as error:  # Pyro's validation rejects NaN parameters before the loss is NaN
            if "nan" not in str(error).lower() and _params_finite():
                raise
            return float("nan")
        if np.isfinite(loss):
            self.good = _snapshot()
        return loss

    def failing_site(self, find):
        site = find()  # at the parameters that failed
        if self.good is not None:
            _restore(self.good)
        return site

    def finish(self) -> None:
        pass

    @staticmethod
    def flat() -> torch.Tensor:
        """Every parameter in Pyro's store (unconstrained), as one vector."""
        return torch.cat([p.detach().reshape(-1) for _, p in pyro.get_param_store().named_parameters()])

    def units(self) -> torch.Tensor:
        """The step scale of every parameter in the store's order (NaN where none is set)."""
        scales = self.svi.optim.pt_optim_args["step_scales"]
        return torch.cat(
            [
                scales[id(p)].reshape(-1) if id(p) in scales else torch.full((p.numel(),), math.nan)
                for _, p in pyro.get_param_store().named_parameters()
            ]
        )

    @staticmethod
    def set_flat(flat: torch.Tensor) -> None:
        offset = 0
        with torch.no_grad():
            for _, p in pyro.get_param_store().named_parameters():
                p.copy_(flat[offset : offset + p.numel()].reshape(p.shape))
                offset += p.numel()


def make_stepper(backend, compiler, model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd, step_scales):
    """The run's stepper: the engine's step (:func:`~vilab.inference.engine.api.svi_step`), or
    Pyro's ``SVI`` (``backend="pyro"``, ``compiler="eager"``: the engine off, or where the
    engine's step cannot run the model and guide, with a warning)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")
    make_elbo(elbo, num_particles, vectorize)  # validates the objective's options
    step, why_not = svi_step(
        backend,
        compiler,
        model,
        guide,
        args,
        kwargs,
        objective=elbo,
        num_particles=num_particles,
        vectorize=vectorize,
        lr=lr,
        lr_decay_per_step=lrd,
        clip=CLIP,
        step_scales=step_scales,
    )
    if step is not None:
        return step
    if why_not:
        how = "Pyro's SVI"
        if (
            num_particles > 1
            and vectorize
            and not _particles_vectorise(model, guide, args, kwargs, elbo, num_particles)
        ):
            # The model indexes a latent's leading dim (``a[county]``) or does matrix algebra on
            # it (``cholesky(K) @ f``), where a particle plate sits: Pyro's vectorised particles
            # fail the same way, one at a time do not.
            vectorize, how = False, "Pyro's SVI with one particle at a time (vectorize_particles=False)"
        warnings.warn(
            f"fit_svi: the compiled SVI step cannot run this model and guide ({why_not}); falling back to {how}",
            RuntimeWarning,
            stacklevel=3,
        )
    return _PyroStepper(model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd, step_scales)


def _particles_vectorise(model, guide, args, kwargs, elbo, num_particles) -> bool:
    """Whether Pyro's ELBO runs with ``num_particles`` vectorised particles (one evaluation)."""
    try:
        with pyro.poutine.block(), torch.no_grad():
            make_elbo(elbo, num_particles, True).loss(model, guide, *args, **kwargs)
    except (RuntimeError, IndexError, ValueError):
        return False
    return True


def _snapshot() -> dict[str, torch.Tensor]:
    store = pyro.get_param_store()
    return {name: store._params[name].detach().clone() for name in store.keys()}


def _restore(snapshot: dict[str, torch.Tensor]) -> None:
    store = pyro.get_param_store()
    with torch.no_grad():
        for name, value in snapshot.items():
            store._params[name].copy_(value)


def _params_finite() -> bool:
    return all(bool(torch.isfinite(v).all()) for _, v in pyro.get_param_store().items())


def non_finite_site(model, guide, args, kwargs, num_particles: int = 1, plate_nesting: int = 0) -> Optional[str]:
    from pyro import poutine

    # The compiled step draws its particles in this plate: replaying it (same RNG state) gives
    # the failing step's own draws.
    particles = (
        pyro.plate("num_particles_vectorized", num_particles, dim=-(plate_nesting + 1))
        if num_particles > 1
        else contextlib.nullcontext()
    )
    try:
        with pyro.validation_enabled(False), particles:
            return _first_non_finite_site(poutine, model, guide, args, kwargs)
    except (ValueError, RuntimeError):  # the bad parameters may break the model itself
        return None


def _first_non_finite_site(poutine, model, guide, args, kwargs) -> Optional[str]:
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    for trace in (guide_trace, model_trace):
        for name, site in trace.nodes.items():
            if site["type"] == "sample":
                value = site["value"]
                if (
                    not torch.isfinite(torch.as_tensor(value, dtype=torch.get_default_dtype())).all()
                    or not torch.isfinite(site["fn"].log_prob(value)).all()
                ):
                    return name
    return None
