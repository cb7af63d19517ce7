r"""Stochastic variational inference: ``fit_svi`` fits a guide and returns a plain record.

The objective is the evidence lower bound

.. math:: \mathcal L(q) = \mathbb E_{q(z)}[\log p(x, z) - \log q(z)] = \log p(x) - \mathrm{KL}(q \,\|\, p(z \mid x)),

estimated with ``Trace_ELBO`` (score/reparameterised), ``TraceMeanField_ELBO`` (analytic KL
where Pyro knows it) or the importance-weighted bound of Burda et al. (``RenyiELBO(alpha=0)``).
"""

from __future__ import annotations

import inspect
import numbers
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Optional

import numpy as np
import pyro
import torch
from pyro.infer.autoguide import AutoLaplaceApproximation

from vilab.guides.registry import get_guide, guide_name
from vilab.inference.engine.api import resolve_compiler
from vilab.inference.common.enumeration import enumerated_objective, hide_enumerated
from vilab.inference.svi.guide_draws import draw_from_guide
from vilab.inference.svi.init import LaplaceStart, prepare_guide, window_size
from vilab.inference.svi.subsampling import FullDataCheck
from vilab.inference.svi.steppers import BACKENDS, ELBOS, make_stepper, non_finite_site
from vilab.inference.common.model_handlers import (
    for_inference,
    full_plates,
    has_subsampling,
    unplated_as_event,
    unplated_event_dims,
)
from vilab.inference.common.tracing import evaluate_draws, is_posterior_site
from vilab.inference.common.validation import (
    check_model,
    check_model_kwargs,
    check_positive_int,
    check_seed,
    keyword_options,
)
from vilab.types import Guide, Model, Samples
from vilab.errors import LaplaceError, NonFiniteLossError

from vilab.inference.svi.loop import _optimise, _warn_not_converged

__all__ = ["SVIResult", "GuideSample", "NonFiniteLossError", "LaplaceError", "fit_svi", "ELBOS", "check_svi_options"]

INITS = ("auto", "laplace", "guide")
# Default particles per step after a Laplace start (see fit_svi's num_particles).
LAPLACE_PARTICLES = 4


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
        converged: whether the convergence test of
            :class:`~vilab.inference.svi.convergence.IterateMonitor` passed (stationary iterates and
            a flat ELBO over the last window); ``config["convergence"]`` holds its numbers.
        name: the guide's registry name or class name.
        config: the run's settings and what it cost: ``gradient_evaluations`` (log-density
            gradients: steps x particles, plus the Laplace start's), ``init`` (how the guide was
            started), ``convergence`` (the last test's numbers), ``backend``...
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

    def _full_data(self):
        """Model, guide and model trace, over every index of a subsampled plate (if any)."""
        trace = check_model(self.model, self.args, self.kwargs, allow_enumerated=True)
        if not has_subsampling(trace):
            return self.model, self.guide, trace
        model = full_plates(self.model)
        return model, full_plates(self.guide), check_model(model, self.args, self.kwargs, allow_enumerated=True)

    def draws(self, num_samples: int = 1000, *, seed: Optional[int] = None) -> "GuideSample":
        """Guide draws with log weights :math:`\\log p(x, z) - \\log q(z)` and log-likelihoods.

        Both are evaluated on the full data: a subsampled ``pyro.plate`` runs over all its
        indices here (:func:`~vilab.inference.common.model_handlers.full_plates`).

        Returns:
            A :class:`GuideSample`: every sample site (latent and deterministic) with shape
            ``(num_samples, *site_shape)``, ``(num_samples,)`` log weights, and per-observation
            log-likelihoods of each observed site.
        """
        check_positive_int(num_samples, "num_samples")
        with torch.random.fork_rng():
            if seed is not None:
                torch.manual_seed(seed)
            model, guide, trace = self._full_data()
            guide_draws = draw_from_guide(guide, self.args, self.kwargs, num_samples, trace)
            evaluation = evaluate_draws(model, self.args, self.kwargs, guide_draws.samples)
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

    def inference_data(
        self, num_samples: int = 1000, *, seed: Optional[int] = None, draws: Optional["GuideSample"] = None
    ):
        """The guide's draws as ``arviz.InferenceData`` (one chain of ``num_samples`` draws),
        with ``log_likelihood``, ``observed_data`` and each draw's log weight in ``sample_stats``.
        Pass ``draws`` (from :meth:`draws`) to convert those instead of drawing anew."""
        from vilab.inference.common.arviz_io import to_inference_data

        draws = draws if draws is not None else self.draws(num_samples, seed=seed)
        return to_inference_data(
            self._full_data()[0],
            self.args,
            self.kwargs,
            {k: v.unsqueeze(0) for k, v in draws.samples.items()},
            log_likelihood={k: v.unsqueeze(0) for k, v in draws.log_likelihood.items()},
            sample_stats={"log_weight": draws.log_weights.unsqueeze(0)},
            inference=f"vi:{self.name}",
        )


def fit_svi(
    model: Model,
    guide: str | Guide = "meanfield",
    *args: Any,
    num_steps: int = 2000,
    lr: float = 0.01,
    lr_decay: float = 0.1,
    elbo: str = "trace",
    num_particles: Optional[int] = None,
    vectorize_particles: bool = True,
    guide_options: Optional[dict] = None,
    init: str = "auto",
    early_stop: bool = True,
    min_steps: Optional[int] = None,
    window: Optional[int] = None,
    seed: Optional[int] = 0,
    progress: bool = True,
    backend: str = "auto",
    compiler: str = "auto",
    **kwargs: Any,
) -> SVIResult:
    r"""Fit a guide to ``model(*args, **kwargs)`` by maximising the ELBO with Adam.

    The Gaussian families (``meanfield``, ``fullrank``, ``lowrank``) and the flows start at the
    Laplace approximation of the unconstrained posterior (:mod:`~vilab.inference.svi.init`), and
    each location's Adam step is scaled by its Laplace sd, so the run does not depend on the
    posterior's scale; ``laplace`` takes its mode from L-BFGS and runs no SVI steps. The run is
    ``converged`` only when :class:`~vilab.inference.svi.convergence.IterateMonitor`'s test passes
    (split R-hat of the iterates over the last ``window`` steps below 1.1 and no significant
    ELBO trend); the fit is then the average of that window's iterates. A run whose budget ends
    first returns ``converged=False`` (its last iterate) with a ``RuntimeWarning``.

    Args:
        model: a Pyro model; ``*args, **kwargs`` are its data. A ``pyro.plate`` with
            ``subsample_size`` subsamples during fitting (Pyro scales its sites by
            ``size / subsample_size``); :meth:`SVIResult.draws` and ``inference_data`` evaluate
            every draw on the full plate, and a passed convergence test counts only once the
            full-data ELBO confirms it (:mod:`~vilab.inference.svi.subsampling`). ``pyro.param`` sites in the model are learned with the
            guide. ``ImproperUniform`` sites start uniformly in (-2, 2) on the unconstrained space.
        guide: a registry name (``meanfield``, ``fullrank``, ``lowrank``, ``laplace``, ``map``,
            ``iaf``, ``nsf``, ``planar``, ``radial``, ``sylvester``) or a guide object.
        num_steps: maximum number of optimisation steps.
        lr: Adam's initial learning rate; it decays exponentially to ``lr * lr_decay``. With a
            Laplace start it is in units of each location's Laplace sd (and of
            :math:`\log \sigma` for scales).
        elbo: ``"trace"`` (Trace_ELBO), ``"meanfield"`` (analytic KL) or ``"iwae"``. A model
            with enumerated discrete sites (``config_enumerate``) needs ``"trace"``, which then
            runs as ``TraceEnum_ELBO`` summing them out (Pyro's SVI; ``result.elbo == "enum"``);
            a named guide covers the other sites, and ``draws`` draw the discrete ones from
            their conditional posterior.
        num_particles: Monte Carlo samples per step (vectorised when ``vectorize_particles``).
            ``None`` (default): 4 for a guide started at the Laplace approximation, else 1. At one
            particle the gradient noise biases the fitted scales upwards (docs/vi-convergence.md
            has the measurement).
        guide_options: options of a named guide family, e.g. ``{"num_flows": 4}``.
        init: ``"auto"`` (default): start a registry guide of a family that has one at the
            Laplace approximation when the mode and a positive-definite Hessian are found, else
            at the family's own start (``config["init"]`` says which and why);
            ``"laplace"``: the same, but raise ``LaplaceError`` when there is none;
            ``"guide"``: the family's own start (``init_to_median``) and plain Adam steps.
        early_stop: stop as soon as the convergence test passes (checked every ``window / 4``
            steps from ``min_steps`` on, default ``window``).
        window: iterates per convergence test and per average (default ``num_steps / 4``,
            clamped to 40-1000, a multiple of 4).
        seed: an int in ``[0, 2**32 - 1]`` that seeds Pyro's RNG and clears the param store, or
            ``None``, which leaves both untouched.
        backend: ``"compiled"`` runs each step as one traced graph
            (:mod:`~vilab.inference.engine.svi_step`: a guide module with reparameterised sites and a
            model without parameters of its own); ``"pyro"`` runs Pyro's ``SVI``; ``"auto"``
            (default) compiles where it can and otherwise falls back to Pyro with a warning.
            Both run the same objective and the same (preconditioned) ``ClippedAdam`` update.
        compiler: for the compiled step: ``"graph"`` (the traced graph as ``torch.fx`` code),
            ``"vm"`` (a program of the virtual machine, :mod:`~vilab.inference.engine.backends.vm`:
            milliseconds to translate; the fx graph where it does not translate), ``"inductor"``
            (one fused C++ kernel per step, seconds to compile, needs ``g++``), or ``"auto"``:
            the virtual machine where it is faster, fused once the run's pace shows the
            compilation will pay for itself
            (:class:`~vilab.inference.engine.policy.FusePolicy`; only long runs qualify), compiling
            in a background process while the run goes on where a second core is free; or
            ``"eager"``: the engine off, Pyro's ``SVI`` (also forced by the environment variable
            ``VILAB_ENGINE=off``; ``backend="compiled"`` is then refused).
            ``result.config["fused"]`` and ``["fuse_decision"]`` say what ran and why; a
            compilation that blocks the run is counted in ``["setup_seconds"]``.

    Returns:
        An :class:`SVIResult`.

    Raises:
        NonFiniteLossError: the loss became NaN/inf; the guide keeps its last finite parameters.
        CompiledSVIError: ``backend="compiled"`` and the step cannot be compiled.
        LaplaceError: ``guide="laplace"`` and the Hessian at the fitted mode is not positive
            definite, or ``init="laplace"`` and no Laplace start exists.

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
    from vilab.inference.svi.checks import check_guide
    from vilab.inference.svi.methods import get_method, is_method

    check_model_kwargs(model, kwargs, "fit_svi", keyword_options(fit_svi))
    given_compiler, compiler = compiler, resolve_compiler(compiler)  # "eager" where VILAB_ENGINE=off
    check_svi_options(
        num_steps=num_steps,
        num_particles=1 if num_particles is None else num_particles,
        lr=lr,
        lr_decay=lr_decay,
        compiler=compiler,
        min_steps=min_steps,
        seed=seed,
        elbo=elbo,
        backend=backend,
    )
    if init not in INITS:
        raise ValueError(f"init: expected one of {INITS}; got {init!r}")
    check_guide(guide, guide_options)
    if is_method(guide):
        _refuse_svi_options(
            guide,
            num_steps=num_steps,
            lr=lr,
            lr_decay=lr_decay,
            elbo=elbo,
            num_particles=num_particles,
            vectorize_particles=vectorize_particles,
            init=init,
            early_stop=early_stop,
            min_steps=min_steps,
            window=window,
            backend=backend,
            compiler=given_compiler,
        )
    window = window_size(num_steps, window)
    min_steps = window if min_steps is None else min_steps
    if seed is not None:
        pyro.set_rng_seed(seed)
        pyro.clear_param_store()
    trace = check_model(model, args, kwargs, allow_enumerated=not is_method(guide))
    # obs_mask sites get proper densities where unused; ImproperUniform sites are placed, not
    # sampled, where an autoguide's prototype trace needs a value (model_handlers).
    model = for_inference(model, trace)
    if is_method(guide):
        return get_method(guide)(model, *args, seed=seed, progress=progress, **(guide_options or {}), **kwargs)
    name = guide_name(guide)
    # Enumerated discrete sites are summed out by TraceEnum_ELBO; a named guide covers the rest.
    elbo, backend = enumerated_objective(trace, guide, elbo, backend)
    guide = get_guide(
        guide, hide_enumerated(model, trace) if isinstance(guide, str) else model, **(guide_options or {})
    )
    start = time.perf_counter()
    guide, laplace, step_scales, init_note = prepare_guide(guide, name, init, model, args, kwargs)
    if num_particles is None:
        num_particles = LAPLACE_PARTICLES if laplace is not None and laplace.ok else 1
    config = {
        "lr": lr,
        "lr_decay": lr_decay,
        "num_particles": num_particles,
        "num_steps": num_steps,
        "init": init_note,
        "window": window,
    }
    if isinstance(guide, AutoLaplaceApproximation) and laplace is not None and laplace.ok:
        return _laplace_result(model, guide, args, kwargs, name, elbo, laplace, start, config)
    # Pyro's ELBOs want every batch dim of an observed site declared by a plate: the objective
    # reads unplated ones as event dims (same density); draws keep per-element log-likelihoods.
    objective = unplated_as_event(model, unplated_event_dims(trace, observed=True))
    # A subsampled loss's noise hides a drifting scale: the full-data ELBO confirms a pass.
    confirm = None
    if has_subsampling(trace):
        full_trace = check_model(full_plates(model), args, kwargs, allow_enumerated=True)
        confirm = FullDataCheck(model, guide, args, kwargs, full_trace, window, seed=seed or 0)
    stepper = make_stepper(
        backend,
        compiler,
        objective,
        guide,
        args,
        kwargs,
        elbo,
        num_particles,
        vectorize_particles,
        lr,
        lr_decay ** (1.0 / num_steps),
        step_scales,
    )
    setup_seconds = time.perf_counter() - start
    losses, check, average = _optimise(
        stepper,
        objective,
        guide,
        args,
        kwargs,
        name,
        elbo,
        start,
        num_steps,
        window,
        min_steps,
        early_stop,
        progress,
        compiler,
        config,
        _raise_non_finite,
        confirm,
    )
    converged = check is not None and check.converged
    if converged:  # Polyak-Ruppert: the mean of the stationary window's iterates
        stepper.set_flat(average)
    stepper.finish()
    config["convergence"] = check.as_dict() if check is not None else {}
    config["gradient_evaluations"] = len(losses) * num_particles + (laplace.num_gradient_evaluations if laplace else 0)
    if confirm is not None:  # each a full-data ELBO from FullDataCheck.num_draws guide draws
        config["full_data_elbo_evaluations"] = confirm.num_evaluations
    if not converged:
        _warn_not_converged(name, len(losses), check, window, init_note)
    if isinstance(guide, AutoLaplaceApproximation):
        guide = _laplace(guide, args, kwargs)
    config.update(backend=stepper.backend, setup_seconds=setup_seconds + config.pop("fuse_seconds", 0.0))
    return SVIResult(model, guide, args, kwargs, losses, time.perf_counter() - start, converged, name, elbo, config)


def _refuse_svi_options(method: str, **given: Any) -> None:
    """A method that is not SVI on a guide takes its options in ``guide_options``; an SVI option
    set away from its default would be ignored silently, so it is refused."""
    defaults = {name: parameter.default for name, parameter in inspect.signature(fit_svi).parameters.items()}
    changed = sorted(name for name, value in given.items() if value != defaults[name])
    if changed:
        raise TypeError(
            f"fit_svi: {', '.join(changed)}: options of SVI on a guide, which method {method!r} "
            f"does not run; expected them at their defaults; got "
            f"{', '.join(f'{n}={given[n]!r}' for n in changed)}. Pass {method!r}'s own options "
            "in guide_options."
        )


def _laplace_result(model, guide, args, kwargs, name, elbo, laplace: LaplaceStart, start, config) -> SVIResult:
    """``guide="laplace"`` with a mode from L-BFGS: no SVI steps; converged when L-BFGS and the
    Newton polish converged and the Hessian is positive definite (both checked)."""
    guide = _laplace(guide, args, kwargs)
    config.update(
        backend="lbfgs",
        setup_seconds=0.0,
        fused=False,
        fuse_decision="",
        gradient_evaluations=laplace.num_gradient_evaluations,
        convergence={},
    )
    return SVIResult(
        model, guide, args, kwargs, [-laplace.log_density], time.perf_counter() - start, True, name, elbo, config
    )


def check_svi_options(
    *,
    num_steps=2000,
    num_particles=1,
    lr=0.01,
    lr_decay=0.1,
    compiler="auto",
    min_steps=None,
    seed=0,
    elbo="trace",
    backend="auto",
    **_,
) -> None:
    """Check :func:`fit_svi`'s option values (defaults for those not given), before any fit."""
    check_positive_int(num_steps, "num_steps")
    check_positive_int(num_particles, "num_particles")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not float(lr) > 0:
        raise ValueError(f"lr: expected > 0 (a number); got {lr!r}")
    if isinstance(lr_decay, bool) or not isinstance(lr_decay, numbers.Real) or not 0 < float(lr_decay) <= 1:
        raise ValueError(f"lr_decay: expected in (0, 1] (a number); got {lr_decay!r}")
    resolve_compiler(compiler, stacklevel=5)
    if elbo not in ELBOS:
        raise ValueError(f"elbo: expected one of {ELBOS}; got {elbo!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}; got {backend!r}")
    if min_steps is not None:
        check_positive_int(min_steps, "min_steps", 0)
    check_seed(seed, allow_none=True)


def _laplace(guide: AutoLaplaceApproximation, args, kwargs):
    try:
        return guide.laplace_approximation(*args, **kwargs)
    except torch.linalg.LinAlgError as error:
        raise LaplaceError(
            "fit_svi: guide 'laplace' needs a positive-definite Hessian of -log p(x, z) at the MAP "
            f"estimate, and the fitted mode has none ({str(error).split('(')[-1].rstrip(').')}). The "
            "mode is degenerate or not a maximum: e.g. a centred hierarchical model whose density "
            "grows without bound as a scale goes to 0. Reparameterise (non-centred) or use another "
            "guide."
        ) from error


def _raise_non_finite(model, guide, args, kwargs, step, losses, start, name, elbo, stepper):
    site = stepper.failing_site(
        lambda: non_finite_site(
            model, guide, args, kwargs, getattr(stepper, "num_particles", 1), getattr(stepper, "max_plate_nesting", 0)
        )
    )
    where = f" (site {site!r} has a non-finite value or log density)" if site else ""
    result = SVIResult(model, guide, args, kwargs, losses, time.perf_counter() - start, False, name, elbo)
    raise NonFiniteLossError(
        f"fit_svi: the loss became non-finite at step {step}{where}; the guide keeps its parameters "
        f"from step {step - 1}. Try a smaller lr, a tighter init_scale, or check the model's priors.",
        step,
        site,
        result,
    )
