r"""One SVI step (ELBO, its gradient and the optimizer update) as a single traced graph.

On a small model every step of Pyro's SVI re-runs the model and the guide through Pyro's
effect handlers, builds an autograd graph and walks one Python optimizer per parameter: tens of
milliseconds of interpreter work for a few hundred floating-point numbers. When the guide is a
``torch.nn.Module`` whose latent sites are all reparameterised and the model has no parameters of
its own, the step is a pure function of tensors,

.. math:: (u_t, m_t, v_t, \eta_t, \epsilon_t) \mapsto
    (\hat{\mathcal L}, u_{t+1}, m_{t+1}, v_{t+1}),

where :math:`u` are the guide's unconstrained parameters, :math:`m, v` Adam's moments,
:math:`\eta_t` the bias-corrected step size and :math:`\epsilon_t` the standard-normal noise
the guide would draw. :class:`CompiledSVIStep` traces that function once with ``make_fx`` (the
guide's own noise draws become an input), shrinks the graph
(:mod:`~vilab.inference.engine.graph.simplify`) and runs it as ``torch.fx`` code, or on the virtual
machine (:mod:`~vilab.inference.engine.backends.vm`) where it translates and is faster, after
checking it against the eager computation, with the same noise, at two parameter values. The update is
exactly Pyro's ``ClippedAdam`` (element-wise gradient clamp, exponential learning-rate decay).

Anything outside that contract raises :class:`CompiledSVIError`, and ``fit_svi`` falls back to
Pyro's SVI (with a warning): guide functions, models with parameters, non-reparameterised or
enumerated sites, random ops other than standard-normal noise (e.g. random subsampling),
value-dependent shapes, and graphs that disagree with the eager step. Boolean-mask
*assignments* (``y[mask] = x[mask]``, as in Pyro's spline flows) are rewritten as selects
first (:mod:`~vilab.inference.engine.graph.masks`); reading a masked subset (``z[z > 0]``) is not.
Like any tracer (Pyro's ``JitTrace_ELBO`` included), it assumes the model and guide are functions
of their arguments and parameters: Python state that changes between calls (a call counter)
is baked into the graph at its traced value.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from typing import Any, Callable, Sequence

import pyro
import torch
import torch.fx as fx
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.nn import PyroModule
from pyro.poutine.util import prune_subsample_sites

from vilab.inference.engine.graph.simplify import data_dependent_shapes, mask_assignments_as_selects, simplify
from vilab.inference.engine.backends.torch_internals import OpOverload
from vilab.inference.engine.backends.inductor import predicted_compile_seconds
from vilab.inference.engine.backends.vm import Unsupported, vm_step
from vilab.inference.engine.step import Fusable, _all_close, _call_time, check_fused
from vilab.errors import CompiledSVIError
from vilab.inference.common.tracing import max_plate_nesting

__all__ = ["CompiledSVIError", "CompiledSVIStep", "elbo_loss"]

aten = torch.ops.aten
BETAS = (0.9, 0.999)
EPS = 1e-8


def _per_particle(value: torch.Tensor, num_particles: int, inner_dims: int) -> torch.Tensor:
    """Sum a site's log density over everything but the particle dimension: ``(P,)``."""
    value = torch.as_tensor(value)
    if inner_dims and value.dim() > 0:
        value = value.sum(tuple(range(max(value.dim() - inner_dims, 0), value.dim())))
    value = value.reshape(-1)
    if value.numel() == 1:
        return value.expand(num_particles)
    if value.numel() != num_particles:
        raise CompiledSVIError(f"a site's log density has {value.numel()} particle entries; expected {num_particles}")
    return value


def _analytic_kl(guide_site: dict, model_site: dict):
    try:
        kl = torch.distributions.kl_divergence(guide_site["fn"], model_site["fn"])
    except NotImplementedError:
        return None
    return scale_and_mask(kl, scale=guide_site["scale"], mask=guide_site["mask"])


def _particle_elbos(
    model, guide, args, kwargs, objective: str, num_particles: int, max_plate_nesting: int
) -> torch.Tensor:
    r"""``(P,)`` single-sample ELBOs :math:`\log p(x, z_p) - \log q(z_p)` of vectorised particles.

    One particle runs without the particle plate, as Pyro's ``Trace_ELBO`` does: a model that
    indexes a latent by group (``a[county]``, as Pyro's and Stan's varying-intercept models do)
    reads its first dimension, which the particle plate would occupy.
    """
    particles = (
        pyro.plate("num_particles_vectorized", num_particles, dim=-(max_plate_nesting + 1))
        if num_particles > 1
        else contextlib.nullcontext()
    )
    with particles:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    model_trace, guide_trace = prune_subsample_sites(model_trace), prune_subsample_sites(guide_trace)
    model_trace.compute_log_prob()
    guide_trace.compute_log_prob()
    elbo = torch.zeros(num_particles)
    analytic = set()
    if objective == "meanfield":
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and name in model_trace.nodes:
                kl = _analytic_kl(site, model_trace.nodes[name])
                if kl is not None:
                    analytic.add(name)
                    elbo = elbo - _per_particle(kl, num_particles, max_plate_nesting)
    for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
        for name, site in trace.nodes.items():
            if site["type"] == "sample" and name not in analytic and not (sign < 0 and site["is_observed"]):
                elbo = elbo + sign * _per_particle(site["log_prob"], num_particles, max_plate_nesting)
    return elbo


def elbo_loss(model, guide, args, kwargs, objective: str, num_particles: int, max_plate_nesting: int) -> torch.Tensor:
    r"""The negative ELBO estimate as a differentiable scalar (reparameterised guides only).

    ``"trace"`` and ``"meanfield"`` average :math:`P` single-sample ELBOs (``"meanfield"`` uses
    :math:`\mathrm{KL}(q \,\|\, p)` in closed form where PyTorch has it); ``"iwae"`` is
    :math:`\log \frac1P \sum_p w_p` (Burda et al. 2016).
    """
    elbos = _particle_elbos(model, guide, args, kwargs, objective, num_particles, max_plate_nesting)
    if objective == "iwae":
        return -(torch.logsumexp(elbos, 0) - math.log(num_particles))
    return -elbos.mean()


def _check_eligible(model, guide, args, kwargs) -> int:
    """Raise :class:`CompiledSVIError` unless the step is a pure function of the guide's
    parameters and reparameterised noise; return the model's plate nesting."""
    if not isinstance(guide, torch.nn.Module):
        raise CompiledSVIError("the guide is not a torch.nn.Module")
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)  # also builds the guide's parameters
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    plate_nesting = max_plate_nesting(model_trace, guide_trace)
    guide_trace, model_trace = prune_subsample_sites(guide_trace), prune_subsample_sites(model_trace)
    for name, site in guide_trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        if site["infer"].get("enumerate") or not getattr(site["fn"], "has_rsample", False):
            raise CompiledSVIError(f"guide site {name!r} is not reparameterised")
    for name, site in model_trace.nodes.items():
        if site["type"] == "param":
            raise CompiledSVIError(f"the model has its own parameter {name!r}")
        if site["type"] == "sample" and not site["is_observed"] and name not in guide_trace.nodes:
            raise CompiledSVIError(f"model site {name!r} is not in the guide")
    store = pyro.get_param_store()._params
    used = {id(store.get(name)) for name, site in guide_trace.nodes.items() if site["type"] == "param"}
    if used != {id(param) for param in guide.parameters()}:
        raise CompiledSVIError("the guide has parameters outside its module")
    return plate_nesting


class _LocalParameters:
    """Run a guide module on given tensors in place of its parameters (Pyro's module-local
    parameter mode, so no value comes from the global param store). A parameter registered
    under two names (Pyro's flow guides alias their first weight) is one input."""

    def __init__(self, guide: torch.nn.Module) -> None:
        self.unique: list[torch.nn.Parameter] = []
        self.slots: list[tuple[torch.nn.Module, str, int]] = []
        index = {}
        for name, param in guide.named_parameters(remove_duplicate=False):
            *path, leaf = name.split(".")
            module = guide
            for part in path:
                module = getattr(module, part)
            if id(param) not in index:
                index[id(param)] = len(self.unique)
                self.unique.append(param)
            self.slots.append((module, leaf, index[id(param)]))
        for module in guide.modules():
            # Module-local mode expects state created when the module was built in that mode.
            if isinstance(module, PyroModule) and not hasattr(module._pyro_context, "param_state"):
                module._pyro_context.param_state = {"params": {}, "constraints": {}}

    def call(self, tensors: Sequence[torch.Tensor], fn: Callable[[], Any]):
        saved = [module._parameters[leaf] for module, leaf, _ in self.slots]
        try:
            for module, leaf, i in self.slots:
                module._parameters[leaf] = tensors[i]
            with pyro.settings.context(module_local_params=True):
                return fn()
        finally:
            for (module, leaf, _), tensor in zip(self.slots, saved):
                module._parameters[leaf] = tensor

    def write(self, tensors: Sequence[torch.Tensor]) -> None:
        with torch.no_grad():
            for value, tensor in zip(self.unique, tensors):
                value.copy_(tensor)


class CompiledSVIStep(Fusable):
    """The compiled SVI step for one model, guide and objective (see the module docstring);
    ``fit_svi`` drives it like its Pyro stepper (``step``, ``failing_site``, ``finish``).

    Args:
        model, guide: the Pyro model and a guide module already fitted to its sites.
        args, kwargs: the model's data.
        objective: ``"trace"``, ``"meanfield"`` or ``"iwae"``.
        num_particles: particles per step (always vectorised here).
        lr, lr_decay_per_step, clip: ``ClippedAdam``'s ``lr``, ``lrd`` and ``clip_norm``.
        step_scales: ``id(parameter) -> tensor``, a per-element step scale (a diagonal
            preconditioner: the update of :class:`~vilab.inference.svi.optim.ScaledClippedAdam`);
            parameters not in it have scale 1.

    Raises:
        CompiledSVIError: the step cannot be traced, or the traced graph disagrees with the
            eager computation.
    """

    backend = "compiled"
    runner = "graph"  # how the traced step runs: fx code, "vm" (:meth:`run_on_vm`) or "inductor"
    name = "SVI step"
    fused, fuse_failure, vm_failure = False, "", ""
    # Each step reads only the previous step's state, so the fused step may reuse its buffers
    # (:mod:`~vilab.inference.engine.backends.recycle`); a rejected step's state is copied out of them.
    recycle = True

    def __init__(
        self,
        model,
        guide,
        args: tuple,
        kwargs: dict,
        *,
        objective: str = "trace",
        num_particles: int = 1,
        lr: float = 0.01,
        lr_decay_per_step: float = 1.0,
        clip: float = 10.0,
        step_scales: dict | None = None,
    ) -> None:
        self.model, self.guide, self.args, self.kwargs = model, guide, args, kwargs
        self.objective, self.num_particles, self.clip = objective, num_particles, clip
        self.lr, self.lrd, self.t = lr, lr_decay_per_step, 0
        self.rejected: list = []
        self.rng_state = torch.get_rng_state()
        self.max_plate_nesting = _check_eligible(model, guide, args, kwargs)
        self.params = _LocalParameters(guide)
        self.shapes = [p.shape for p in self.params.unique]
        flat = torch.cat([p.detach().reshape(-1) for p in self.params.unique])
        self.state = (flat, torch.zeros_like(flat), torch.zeros_like(flat))
        self.step_scale = _flat_scale(self.params.unique, step_scales or {}, flat)
        # Natural units for the convergence test: NaN where the parameter has no step scale.
        self.natural_units = torch.cat(
            [
                (step_scales or {})[id(p)].detach().reshape(-1).to(flat.dtype)
                if id(p) in (step_scales or {})
                else torch.full((p.numel(),), math.nan, dtype=flat.dtype)
                for p in self.params.unique
            ]
        )
        self._fn, self._noise = self._compile()
        data = [x for x in (*args, *kwargs.values()) if isinstance(x, torch.Tensor)]
        # Sizes that decide whether intra-op threads pay (see ``threads_for``).
        self.numel = num_particles * max([flat.numel(), *(x.numel() for x in data)])
        # Inputs refilled in place every step: a fresh tensor per input per call costs the
        # compiled step about a tenth of its time. ``normal_`` draws the same stream as the
        # ``randn`` calls of the eager guide, which ``failing_site`` relies on.
        self._step_input = torch.zeros((), dtype=self.state[0].dtype)
        self._noise_inputs = [torch.empty(shape, dtype=dtype) for shape, dtype in self._noise]

    # -- the pure step -------------------------------------------------------------------------
    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in self.shapes:
            size = math.prod(shape)
            out.append(flat[offset : offset + size].view(shape))
            offset += size
        return out

    def _loss(self, flat: torch.Tensor) -> torch.Tensor:
        def run():
            with pyro.validation_enabled(False):
                return elbo_loss(
                    self.model,
                    self.guide,
                    self.args,
                    self.kwargs,
                    self.objective,
                    self.num_particles,
                    self.max_plate_nesting,
                )

        return self.params.call(self._unflatten(flat), run)

    def _step(self, params, m, v, step_size, *noise):
        # All parameters live in one flat vector so that Adam is a handful of ops, not a few per
        # parameter.
        with torch.enable_grad():
            leaf = params.detach().requires_grad_()
            loss = self._loss(leaf)
            (grad,) = torch.autograd.grad(loss, leaf, allow_unused=True)
        if grad is None:
            grad = torch.zeros_like(params)
        elif self.step_scale is not None:  # Adam on params / scale: gradient and clip in scaled units
            grad = (grad * self.step_scale).clamp(-self.clip, self.clip)
        else:
            grad = grad.clamp(-self.clip, self.clip)
        m = m * BETAS[0] + grad * (1 - BETAS[0])
        v = v * BETAS[1] + grad * grad * (1 - BETAS[1])
        update = m / (v.sqrt() + EPS)
        params = params - step_size * (update if self.step_scale is None else self.step_scale * update)
        loss = loss.detach()
        return torch.stack([loss, loss + params.sum()]), params, m, v

    def _step_size(self, t: int) -> float:
        lr = self.lr * self.lrd**t
        return lr * math.sqrt(1 - BETAS[1] ** t) / (1 - BETAS[0] ** t)

    # -- compilation ---------------------------------------------------------------------------
    def _compile(self):
        from torch.fx.experimental.proxy_tensor import make_fx

        dtype = self.state[0].dtype
        example = (*[x.clone() for x in self.state], torch.tensor(self._step_size(1), dtype=dtype))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                graph = make_fx(self._step)(*example)
        except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError, IndexError) as error:
            raise CompiledSVIError(
                f"the step cannot be traced ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            ) from error
        mask_assignments_as_selects(graph)  # y[mask] = x[mask] as where(mask, x, y)
        dynamic = data_dependent_shapes(graph.graph)
        if dynamic:
            raise CompiledSVIError(
                f"the step has value-dependent shapes ({', '.join(dynamic[:3])}: "
                "boolean-mask indexing), which a traced graph cannot follow"
            )
        noise = _noise_to_input(graph)
        graph = simplify(graph)
        checks = []
        state = example
        for seed in (0, 1):
            inputs = (*state, *_draw_like(noise, seed))
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                try:
                    expected = self._step(*state)
                except (RuntimeError, TypeError, ValueError, AttributeError, NotImplementedError, IndexError) as error:
                    # Module-local parameters are the one thing the eager step adds to Pyro's own
                    # path; a guide that cannot run that way keeps Pyro's SVI.
                    raise CompiledSVIError(
                        f"the guide cannot run on substituted parameters ({type(error).__name__}: {str(error)[:200]})"
                    ) from error
            checks.append((inputs, expected))
            state = (*expected[1:], torch.tensor(self._step_size(2), dtype=dtype))
        for inputs, expected in checks:
            try:
                got = graph(*inputs)
            except (RuntimeError, TypeError, ValueError, IndexError) as error:
                raise CompiledSVIError(f"the traced step fails ({str(error).splitlines()[0][:200]})") from error
            if not _all_close(got, expected):
                raise CompiledSVIError(
                    "the traced step disagrees with the eager step (data-dependent control flow in the model or guide?)"
                )
        self._graph, self._checks = graph, checks
        return graph, noise

    def run_on_vm(self, require_faster: bool = True) -> bool:
        """Run the traced step as a program of the virtual machine
        (:func:`~vilab.inference.engine.backends.vm.vm_step`: milliseconds to translate) if it
        translates, reproduces the eager checks and (with ``require_faster``) is faster than the
        fx graph; returns whether it now runs there (:attr:`vm_failure` says why not)."""
        if self.fused or self.runner == "vm":
            return self.runner == "vm"
        try:
            program = vm_step(self._graph, self._checks[0][0], recycle=self.recycle)
        except Unsupported as error:
            self.vm_failure = f"not translated: {error}"
            return False
        program, why = check_fused(program, self._checks[0][0], self._checks, self._fn, require_faster)
        if program is None:
            self.vm_failure = why.replace("the fused kernel", "the program")
            return False
        self._fn, self.runner = program, "vm"
        return True

    # -- fusion (FusePolicy's step protocol) ---------------------------------------------------
    def call_time(self) -> float:
        return 0.0 if self.fused else _call_time(self._fn, self._checks[1][0])

    def compile_seconds(self) -> float:
        return 0.0 if self.fused else predicted_compile_seconds(self._graph, self._checks[0][0])

    @property
    def is_fused(self) -> bool:
        return self.fused

    def _fusion_inputs(self):
        return self._graph, self._checks[0][0], self._checks

    def _install(self, fused: Callable) -> None:
        self._fn, self.fused, self.runner = fused, True, "inductor"

    # -- running -------------------------------------------------------------------------------
    def step(self) -> float:
        """One optimisation step; returns the loss. On a non-finite loss or parameter the
        state is left as it was (the caller raises)."""
        t = self.t + 1
        self._step_input.fill_(self._step_size(t))
        # Kept so that a failing step's draws can be replayed by the eager guide (same stream).
        self.rng_state = torch.get_rng_state()
        for noise in self._noise_inputs:
            noise.normal_()
        out = self._fn(*self.state, self._step_input, *self._noise_inputs)
        loss, health = out[0].tolist()
        if not math.isfinite(health):
            # Copies: a recycled kernel overwrites its buffers two calls later.
            self.rejected = [tensor.clone() for tensor in self._unflatten(out[1])]
            self.state = tuple(tensor.clone() for tensor in self.state)
            return float("nan")
        self.state, self.t = tuple(out[1:]), t
        return loss

    def failing_site(self, find: Callable[[], Any]):
        """``find()`` (an eager search for the site with a non-finite value or density) at the
        failing step, then the last good parameters back in the guide. The failing loss came
        from the current parameters and that step's noise, replayed here for the eager guide; a
        finite loss with a non-finite update points at the rejected new values instead."""
        state = torch.get_rng_state()
        try:
            self.write_back()
            torch.set_rng_state(self.rng_state)
            site = find()
            if site is None and self.rejected:
                self.write_back(self.rejected)
                site = find()
            return site
        finally:
            torch.set_rng_state(state)
            self.write_back()

    def finish(self) -> None:
        """Leave the fitted parameters in the guide."""
        self.write_back()

    def flat(self) -> torch.Tensor:
        """The current parameters as one flat vector (valid until the next step)."""
        return self.state[0]

    def units(self) -> torch.Tensor:
        """Each parameter's step scale, flat (NaN where none was given)."""
        return self.natural_units

    def set_flat(self, flat: torch.Tensor) -> None:
        """Replace the current parameters (e.g. by an average of iterates); Adam's moments stay."""
        self.state = (flat.to(self.state[0].dtype).clone(), *self.state[1:])

    def write_back(self, params: Sequence[torch.Tensor] | None = None) -> None:
        """Copy the current (or the given) parameters into the guide and so into Pyro's param
        store."""
        self.params.write(self._unflatten(self.state[0]) if params is None else params)


def _flat_scale(params, step_scales: dict, flat: torch.Tensor) -> torch.Tensor | None:
    """The step scales of ``params`` as one flat vector like ``flat`` (``None``: all ones)."""
    if not any(id(p) in step_scales for p in params):
        return None
    pieces = [
        step_scales[id(p)].detach().reshape(-1) if id(p) in step_scales else torch.ones(p.numel()) for p in params
    ]
    return torch.cat(pieces).to(flat.dtype)


def _is_random(node: fx.Node) -> bool:
    target = node.target
    return (
        node.op == "call_function"
        and isinstance(target, OpOverload)
        and torch.Tag.nondeterministic_seeded in target.tags
    )


def _noise_to_input(gm: fx.GraphModule) -> list[tuple[torch.Size, torch.dtype]]:
    """Replace every standard-normal draw in the graph by a new input, in draw order; any other
    random op makes the step uncompilable."""
    graph = gm.graph
    placeholders = [node for node in graph.nodes if node.op == "placeholder"]
    draws = []
    for node in list(graph.nodes):
        if not _is_random(node):
            continue
        standard = node.target is aten.normal_.default and len(node.args) == 1 and not node.kwargs
        if not standard:
            raise CompiledSVIError(
                f"the step draws random numbers with {node.target} "
                "(only standard-normal reparameterised noise is supported)"
            )
        value = node.meta["val"]
        with graph.inserting_after(placeholders[-1] if not draws else draws[-1][0]):
            placeholder = graph.placeholder(f"noise_{len(draws)}")
        placeholder.meta["val"] = value
        node.replace_all_uses_with(placeholder)
        graph.erase_node(node)
        draws.append((placeholder, tuple(value.shape), value.dtype))
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()
    return [(shape, dtype) for _, shape, dtype in draws]


def _draw_like(noise, seed: int) -> list[torch.Tensor]:
    """The noise the eager step draws after ``torch.manual_seed(seed)`` (same order, same ops)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return [torch.empty(shape, dtype=dtype).normal_() for shape, dtype in noise]
