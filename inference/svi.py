r"""Stochastic variational inference: ``fit_svi`` fits a guide and returns a plain record.

The objective is the evidence lower bound

.. math:: \mathcal L(q) = \mathbb E_{q(z)}[\log p(x, z) - \log q(z)] = \log p(x) - \mathrm{KL}(q \,\|\, p(z \mid x)),

estimated with ``Trace_ELBO`` (score/reparameterised), ``TraceMeanField_ELBO`` (analytic KL
where Pyro knows it) or the importance-weighted bound of Burda et al. (``RenyiELBO(alpha=0)``).
"""
from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterator, NamedTuple, Optional

import numpy as np
import pyro
import torch
from pyro.infer import SVI, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.autoguide import AutoLaplaceApproximation
from pyro.optim import ClippedAdam
from tqdm.auto import tqdm

from vilab.guides.registry import get_guide, guide_name
from vilab.inference.convergence import has_converged
from vilab.inference.fast_leaf import threads_for
from vilab.inference.fast_inductor import COMPILERS
from vilab.inference.fast_policy import FusePolicy
from vilab.inference.fast_svi import CompiledSVIError, CompiledSVIStep
from vilab.inference.guide_draws import draw_from_guide
from vilab.inference.tracing import evaluate_draws, is_posterior_site
from vilab.inference.validation import check_model, check_positive_int
from vilab.types import Guide, Model, Samples
from vilab.errors import LaplaceError, NonFiniteLossError

__all__ = ["SVIResult", "GuideSample", "NonFiniteLossError", "LaplaceError", "fit_svi", "ELBOS"]

ELBOS = ("trace", "meanfield", "iwae")
BACKENDS = ("auto", "compiled", "pyro")
# ClippedAdam's element-wise gradient clamp.
CLIP = 10.0


class GuideSample(NamedTuple):
    """Draws of a fitted guide: ``samples`` (site -> ``(S, *shape)``), ``log_weights`` ``(S,)``
    and ``log_likelihood`` (observed site -> ``(S, *data_shape)``)."""

    samples: Samples
    log_weights: torch.Tensor
    log_likelihood: dict[str, torch.Tensor]


@dataclass
class SVIResult:
    """What ``fit_svi`` returns.

    Attributes:
        guide: the fitted guide (for ``laplace``, the Gaussian at the MAP).
        losses: the loss (negative ELBO estimate) at each step.
        wall_time: seconds spent fitting, setup (tracing a compiled step) included.
        converged: whether the loss stopped changing beyond its noise.
        name: the guide's registry name or class name.
    """

    model: Model
    guide: Guide
    args: tuple
    kwargs: dict
    losses: list[float]
    wall_time: float
    converged: bool
    name: str
    elbo: str = "trace"
    config: dict = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.losses)

    def _model_trace(self):
        return check_model(self.model, self.args, self.kwargs)

    def draws(self, num_samples: int = 1000, *, seed: Optional[int] = None) -> "GuideSample":
        """Guide draws with log weights :math:`\\log p(x, z) - \\log q(z)` and log-likelihoods.

        Returns:
            A :class:`GuideSample`: every sample site (latent and deterministic) with shape
            ``(num_samples, *site_shape)``, ``(num_samples,)`` log weights, and per-observation
            log-likelihoods of each observed site.
        """
        check_positive_int(num_samples, "num_samples")
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            trace = self._model_trace()
            guide_draws = draw_from_guide(self.guide, self.args, self.kwargs, num_samples, trace)
            evaluation = evaluate_draws(self.model, self.args, self.kwargs, guide_draws.samples)
        keep = {n for n, s in trace.nodes.items() if is_posterior_site(s)}
        samples = {k: v for k, v in evaluation["values"].items() if k in keep}
        return GuideSample(samples, evaluation["log_joint"] - guide_draws.log_q, evaluation["log_likelihood"])

    def sample(self, num_samples: int = 1000, *, seed: Optional[int] = None) -> Samples:
        """``num_samples`` posterior draws: site -> ``(num_samples, *site_shape)``, latent and
        ``pyro.deterministic`` sites."""
        return self.draws(num_samples, seed=seed).samples

    def elbo_estimate(self, num_samples: int = 1000, *, seed: Optional[int] = 0) -> tuple[float, float]:
        """Monte Carlo ELBO :math:`\\frac1S\\sum_s \\log w_s` and its standard error."""
        log_weights = self.draws(num_samples, seed=seed).log_weights.double()
        return float(log_weights.mean()), float(log_weights.std() / np.sqrt(num_samples))

    def inference_data(self, num_samples: int = 1000, *, seed: Optional[int] = None,
                       draws: Optional["GuideSample"] = None):
        """The guide's draws as ``arviz.InferenceData`` (one chain of ``num_samples`` draws),
        with ``log_likelihood``, ``observed_data`` and each draw's log weight in ``sample_stats``.
        Pass ``draws`` (from :meth:`draws`) to convert those instead of drawing anew."""
        from vilab.inference.arviz_io import to_inference_data

        draws = draws if draws is not None else self.draws(num_samples, seed=seed)
        return to_inference_data(
            self.model, self.args, self.kwargs, {k: v.unsqueeze(0) for k, v in draws.samples.items()},
            log_likelihood={k: v.unsqueeze(0) for k, v in draws.log_likelihood.items()},
            sample_stats={"log_weight": draws.log_weights.unsqueeze(0)}, inference=f"vi:{self.name}")


def _make_elbo(elbo: str, num_particles: int, vectorize: bool):
    if elbo == "trace":
        return Trace_ELBO(num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)
    if elbo == "meanfield":
        return TraceMeanField_ELBO(num_particles=num_particles, vectorize_particles=vectorize and num_particles > 1)
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

    def __init__(self, model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd):
        optim = ClippedAdam({"lr": lr, "lrd": lrd, "clip_norm": CLIP})
        self.svi = SVI(model, guide, optim, _make_elbo(elbo, num_particles, vectorize))
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


def _make_stepper(backend, model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd):
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")
    _make_elbo(elbo, num_particles, vectorize)  # validates the objective's options
    if backend != "pyro":
        try:
            if num_particles > 1 and not vectorize:
                raise CompiledSVIError("vectorize_particles=False asks for one particle at a time")
            return CompiledSVIStep(model, guide, args, kwargs, objective=elbo, num_particles=num_particles,
                                   lr=lr, lr_decay_per_step=lrd, clip=CLIP)
        except CompiledSVIError as error:
            if backend == "compiled":
                raise
            warnings.warn(f"fit_svi: the compiled SVI step cannot run this model and guide ({error}); "
                          "falling back to Pyro's SVI", RuntimeWarning, stacklevel=3)
    return _PyroStepper(model, guide, args, kwargs, elbo, num_particles, vectorize, lr, lrd)


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


def _non_finite_site(model, guide, args, kwargs) -> Optional[str]:
    from pyro import poutine

    try:
        with pyro.validation_enabled(False):
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
                if not torch.isfinite(torch.as_tensor(value, dtype=torch.get_default_dtype())).all() or \
                        not torch.isfinite(site["fn"].log_prob(value)).all():
                    return name
    return None


def fit_svi(
    model: Model,
    guide: str | Guide = "meanfield",
    *args: Any,
    num_steps: int = 2000,
    lr: float = 0.01,
    lr_decay: float = 0.1,
    elbo: str = "trace",
    num_particles: int = 1,
    vectorize_particles: bool = True,
    guide_options: Optional[dict] = None,
    early_stop: bool = True,
    min_steps: Optional[int] = None,
    seed: Optional[int] = 0,
    progress: bool = True,
    backend: str = "auto",
    compiler: str = "auto",
    **kwargs: Any,
) -> SVIResult:
    r"""Fit a guide to ``model(*args, **kwargs)`` by maximising the ELBO with Adam.

    Args:
        model: a Pyro model; ``*args, **kwargs`` are its data.
        guide: a registry name (``meanfield``, ``fullrank``, ``lowrank``, ``laplace``, ``map``,
            ``iaf``, ``nsf``, ``planar``, ``radial``, ``sylvester``) or a guide object.
        num_steps: maximum number of optimisation steps.
        lr: Adam's initial learning rate; it decays exponentially to ``lr * lr_decay``.
        elbo: ``"trace"`` (Trace_ELBO), ``"meanfield"`` (analytic KL) or ``"iwae"``.
        num_particles: Monte Carlo samples per step (vectorised when ``vectorize_particles``).
        guide_options: options of a named guide family, e.g. ``{"num_flows": 4}``.
        early_stop: stop once the loss has converged, checked from ``min_steps`` on (default
            half of ``num_steps``: single-sample ELBO noise hides slow early progress, and the
            decaying learning rate does the rest).
        seed: seeds Pyro's RNG and clears the param store (``None`` leaves both untouched).
        backend: ``"compiled"`` runs each step as one traced graph
            (:mod:`~vilab.inference.fast_svi`: a guide module with reparameterised sites and a
            model without parameters of its own); ``"pyro"`` runs Pyro's ``SVI``; ``"auto"``
            (default) compiles where it can and otherwise falls back to Pyro with a warning.
            Both run the same objective and the same ``ClippedAdam`` update.
        compiler: for the compiled step: ``"torchscript"`` (Static Runtime), ``"inductor"``
            (one fused C++ kernel per step, seconds to compile, needs ``g++``), or ``"auto"``:
            fuse once the run's pace shows the compilation will pay for itself
            (:class:`~vilab.inference.fast_policy.FusePolicy`; only long runs qualify), compiling
            in a background process while the run goes on where a second core is free.
            ``result.config["fused"]`` and ``["fuse_decision"]`` say what ran and why; a
            compilation that blocks the run is counted in ``["setup_seconds"]``.

    Returns:
        An :class:`SVIResult`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the guide keeps its last finite parameters.
        CompiledSVIError: ``backend="compiled"`` and the step cannot be compiled.
        LaplaceError: ``guide="laplace"`` and the Hessian at the fitted mode is not positive
            definite.

    Example:
        >>> import pyro, pyro.distributions as dist, torch
        >>> def model(y):
        ...     mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        ...     with pyro.plate("data", len(y)):
        ...         pyro.sample("y", dist.Normal(mu, 1.0), obs=y)
        >>> y = torch.linspace(2.0, 4.0, 20)  # posterior of mu: mean 3.0, sd 0.22
        >>> from vilab.inference import fit_svi
        >>> result = fit_svi(model, "meanfield", y, num_steps=1000, lr=0.1, progress=False)
        >>> result.converged, round(float(result.sample(4000, seed=0)["mu"].mean()), 1)
        (True, 3.0)
    """
    check_positive_int(num_steps, "num_steps")
    check_positive_int(num_particles, "num_particles")
    if not lr > 0:
        raise ValueError(f"lr: expected > 0; got {lr!r}")
    if not 0 < lr_decay <= 1:
        raise ValueError(f"lr_decay: expected in (0, 1]; got {lr_decay!r}")
    if compiler not in COMPILERS:
        raise ValueError(f"compiler: expected one of {COMPILERS}; got {compiler!r}")
    min_steps = num_steps // 2 if min_steps is None else check_positive_int(min_steps, "min_steps", 0)
    if seed is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    check_model(model, args, kwargs)
    from vilab.inference.vi import get_method, is_method  # here: the methods import this module

    if is_method(guide):
        return get_method(guide)(model, *args, seed=seed, progress=progress, **(guide_options or {}), **kwargs)
    name = guide_name(guide)
    guide = get_guide(guide, model, **(guide_options or {}))
    start = time.perf_counter()
    stepper = _make_stepper(backend, model, guide, args, kwargs, elbo, num_particles, vectorize_particles,
                            lr, lr_decay ** (1.0 / num_steps))
    setup_seconds = time.perf_counter() - start
    losses: list[float] = []
    converged = False
    bar = tqdm(range(num_steps), desc=f"SVI {name}", disable=not progress, leave=False)
    policy = FusePolicy(compiler if isinstance(stepper, CompiledSVIStep) else "torchscript", num_steps)
    fused_at = ""
    with threads_for(stepper.numel), _cancelling(stepper):
        for step in bar:
            if not policy.decided:
                setup_seconds += _maybe_fuse(policy, stepper, step)
                if getattr(stepper, "fused_from_cache", False):
                    fused_at = f"; loaded from the kernel cache at step {step}"
            elif policy.background and stepper.fusing:
                fused_at = _poll_fusion(stepper, step)
            loss = stepper.step()
            if not np.isfinite(loss):
                _raise_non_finite(model, guide, args, kwargs, step, losses, start, name, elbo, stepper)
            losses.append(float(loss))
            if step % 50 == 0:
                bar.set_postfix(elbo=f"{-np.mean(losses[-50:]):.4g}")
            if early_stop and step + 1 >= min_steps and (step + 1) % 50 == 0 and has_converged(losses):
                converged = True
                break
    bar.close()
    stepper.finish()
    converged = converged or has_converged(losses)
    if isinstance(guide, AutoLaplaceApproximation):
        guide = _laplace(guide, args, kwargs)
    return SVIResult(model, guide, args, kwargs, losses, time.perf_counter() - start, converged, name, elbo,
                     {"lr": lr, "lr_decay": lr_decay, "num_particles": num_particles, "num_steps": num_steps,
                      "backend": stepper.backend, "setup_seconds": setup_seconds,
                      "fused": bool(getattr(stepper, "fused", False)),
                      "fuse_decision": policy.reason + fused_at})


def _maybe_fuse(policy: FusePolicy, stepper, step: int) -> float:
    """Ask ``policy`` whether to fuse the compiled step before step ``step``; returns the
    seconds spent compiling (counted as setup, as a JIT's first call is; none for a
    compilation started in the background)."""
    chosen = policy.choose(step, [(stepper, step)])
    if chosen is not None and not chosen:
        return 0.0
    if chosen and policy.background:
        stepper.fuse_start()
        return 0.0
    start = time.perf_counter()
    if not stepper.fuse():
        warnings.warn(f"fit_svi: no fused kernel ({stepper.fuse_failure}); the traced step keeps running",
                      RuntimeWarning, stacklevel=3)
    return time.perf_counter() - start


def _poll_fusion(stepper, step: int) -> str:
    """What became of the stepper's background compilation once it is over (``""`` until then)."""
    outcome = stepper.fuse_poll()
    if outcome is None:
        return ""
    return f"; fused at step {step}" if outcome else f"; not fused: {stepper.fuse_failure}"


@contextlib.contextmanager
def _cancelling(stepper) -> Iterator[None]:
    """Stop the stepper's background compilation, if any, when the run ends."""
    try:
        yield
    finally:
        cancel = getattr(stepper, "fuse_cancel", None)
        if cancel is not None:
            cancel()


def _laplace(guide: AutoLaplaceApproximation, args, kwargs):
    try:
        return guide.laplace_approximation(*args, **kwargs)
    except torch.linalg.LinAlgError as error:
        raise LaplaceError(
            "fit_svi: guide 'laplace' needs a positive-definite Hessian of -log p(x, z) at the MAP "
            f"estimate, and the fitted mode has none ({str(error).split('(')[-1].rstrip(').')}). The "
            "mode is degenerate or not a maximum: e.g. a centred hierarchical model whose density "
            "grows without bound as a scale goes to 0. Reparameterise (non-centred) or use another "
            "guide.") from error


def _raise_non_finite(model, guide, args, kwargs, step, losses, start, name, elbo, stepper):
    site = stepper.failing_site(lambda: _non_finite_site(model, guide, args, kwargs))
    where = f" (site {site!r} has a non-finite value or log density)" if site else ""
    result = SVIResult(model, guide, args, kwargs, losses, time.perf_counter() - start, False, name, elbo)
    raise NonFiniteLossError(
        f"fit_svi: the loss became non-finite at step {step}{where}; the guide keeps its parameters "
        f"from step {step - 1}. Try a smaller lr, a tighter init_scale, or check the model's priors.",
        step, site, result)
