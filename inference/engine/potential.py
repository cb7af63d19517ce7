r"""Turn a Pyro model into a potential energy evaluated for a batch of chains in one call.

For chains :math:`c = 1..C` with unconstrained states :math:`z_c \in \mathbb{R}^D`, the potential is

.. math::
    U(z_c) = -\log p\big(x, T^{-1}(z_c)\big) - \log \big|\det J_{T^{-1}}(z_c)\big|,

where :math:`T^{-1}` maps each latent site's unconstrained block to its support (Pyro's
``biject_to``). The batch is evaluated by running the model once under an outer plate of size
:math:`C` (as Pyro vectorizes ELBO particles) with every latent site conditioned on its batched
value. Whether the model broadcasts correctly over that plate is never assumed: at construction
the batched potential, its gradient and every ``pyro.deterministic`` site are compared with
one-chain evaluations at several random points, and :class:`VectorizationError` is raised when
they differ or the batched run fails. A model written for one chain (matrix algebra on a
latent vector, a Cholesky of a kernel built from scalar hyperparameters, sums over a site) does
not broadcast over that plate; it is then evaluated one chain at a time under
``torch.func.vmap``, which vectorises the same single-chain program over the batch, and checked
the same way (``mode == "vmap"``). Only a model that neither can run (Python control flow on
latent values) is refused. The verified function is then traced once with
``torch.fx`` (``make_fx``) into a graph of tensor operations computing :math:`U` and
:math:`\nabla U` together, which removes Pyro's per-call bookkeeping from the sampler's hot loop;
the graph is simplified (:func:`~vilab.inference.engine.graph.simplify.simplify`) and itself checked
against the untraced potential.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
from pyro.poutine.util import site_is_subsample
import torch
from pyro.distributions.util import scale_and_mask
from torch.distributions import biject_to

from vilab.inference.engine.graph.simplify import data_dependent_shapes, mask_assignments_as_selects, simplify
from vilab.errors import VectorizationError
from vilab.inference.common.tracing import max_plate_nesting

__all__ = ["VectorizationError", "LatentSite", "BatchedPotential"]

_CHAIN_PLATE = "_vilab_chains"


@dataclass(frozen=True)
class LatentSite:
    """A latent sample site and its slice of the flat unconstrained vector.

    Attributes:
        name: site name.
        shape: constrained value shape of one draw, ``batch_shape + event_shape``.
        batch_ndim: number of batch (plate) dimensions of the site's distribution.
        unconstrained_shape: shape of the site's unconstrained block.
        offset: start of the block in the flat vector of length ``D``.
        transform: map from unconstrained to constrained space.
    """

    name: str
    shape: torch.Size
    batch_ndim: int
    unconstrained_shape: torch.Size
    offset: int
    transform: Any

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)


def _trace(model: Callable, args: tuple, kwargs: dict) -> poutine.Trace:
    return poutine.trace(model).get_trace(*args, **kwargs)


def _sample_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


def _latent_sites(trace: poutine.Trace) -> list[LatentSite]:
    sites, offset = [], 0
    for name, site in _sample_sites(trace):
        if site["is_observed"]:
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise VectorizationError(
                f"site {name!r} is discrete; the vectorized sampler handles continuous latents only"
            )
        transform = biject_to(fn.support)
        shape = site["value"].shape
        unconstrained_shape = transform.inverse_shape(shape)
        sites.append(LatentSite(name, shape, len(fn.batch_shape), unconstrained_shape, offset, transform))
        offset += math.prod(unconstrained_shape)
    return sites


def _deterministic_shapes(trace: poutine.Trace) -> dict[str, torch.Size]:
    return {
        name: site["value"].shape for name, site in _sample_sites(trace) if site["infer"].get("_deterministic", False)
    }


class BatchedPotential:
    r"""Potential energy and gradient of a Pyro model for a ``(C, D)`` batch of unconstrained states.

    Args:
        model: Pyro model.
        model_args: positional arguments of ``model``.
        model_kwargs: keyword arguments of ``model`` (observations included).
        num_chains: batch size :math:`C` used by the sampler; the check runs at this size.
        num_checks: random points at which the batched evaluation is compared with one-chain
            evaluations.
        rtol: relative tolerance of that comparison.
        compile: trace the verified potential and gradient into a ``torch.fx`` graph.
        seed: seed of the prior trace that discovers the latent sites and of the check points.

    Raises:
        VectorizationError: the model has discrete latents, or its batched evaluation fails or
            disagrees with one-chain evaluation.
    """

    def __init__(
        self,
        model: Callable,
        model_args: tuple = (),
        model_kwargs: dict | None = None,
        *,
        num_chains: int = 4,
        num_checks: int = 3,
        rtol: float = 1e-6,
        compile: bool = True,
        seed: int = 0,
    ) -> None:
        self.model, self.model_args, self.model_kwargs = model, tuple(model_args), dict(model_kwargs or {})
        self.dtype = torch.get_default_dtype()
        trace = self._prior_trace(seed)
        self.max_plate_nesting = max_plate_nesting(trace, count_batch_dims=True)
        self.sites = _latent_sites(trace)
        self.deterministic_shapes = _deterministic_shapes(trace)
        # Numbers per chain in the largest site: a proxy for the size of the potential's tensors.
        self.site_numel = max((site["value"].numel() for _, site in _sample_sites(trace)), default=1)
        self.dim = sum(site.size for site in self.sites)
        if self.dim == 0:
            raise VectorizationError("the model has no continuous latent sites to sample")
        self._value_and_grad = self.eager_value_and_grad
        generator = torch.Generator().manual_seed(seed + 1)
        self.mode = "plate"
        try:
            self._verify(num_chains, num_checks, rtol, generator)
        except VectorizationError as plate_error:
            self.mode = "vmap"
            try:
                self._verify(num_chains, num_checks, rtol, generator)
            except VectorizationError as vmap_error:
                raise VectorizationError(f"{plate_error}; and under torch.func.vmap: {vmap_error}") from vmap_error
        self.compiled, self.graph_module, self.compile_failure = False, None, ""
        if compile:
            self._compile(num_chains, rtol, generator)

    # ---- unconstrained <-> constrained -------------------------------------------------------
    def constrain(self, z: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Map ``z`` of shape ``(B, D)`` to constrained site values ``(B, *shape)`` and the
        log absolute Jacobian determinant of that map, shape ``(B,)``."""
        values, log_det = {}, torch.zeros(z.shape[0], dtype=z.dtype)
        for site in self.sites:
            block = z[:, site.offset : site.offset + site.size].reshape(z.shape[0], *site.unconstrained_shape)
            value = site.transform(block)
            jac = site.transform.log_abs_det_jacobian(block, value)
            log_det = log_det + jac.reshape(z.shape[0], -1).sum(-1)
            values[site.name] = value
        return values, log_det

    def unconstrain(self, values: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`constrain`: site values ``(B, *shape)`` to ``z`` of shape ``(B, D)``."""
        blocks = [site.transform.inv(values[site.name]).reshape(values[site.name].shape[0], -1) for site in self.sites]
        return torch.cat(blocks, dim=-1)

    def _batched_value(self, site: LatentSite, value: torch.Tensor) -> torch.Tensor:
        # The chain plate sits left of every model plate, so a site with fewer batch dims than
        # max_plate_nesting needs singleton dims between the chain dim and its own dims.
        padding = (1,) * (self.max_plate_nesting - site.batch_ndim)
        return value.reshape(value.shape[0], *padding, *site.shape)

    def run_model(self, z: torch.Tensor) -> tuple[poutine.Trace, torch.Tensor]:
        """Run the model under the chain plate for ``z`` of shape ``(B, D)``; return the trace and
        the log Jacobian ``(B,)``."""
        values, log_det = self.constrain(z)
        data = {site.name: self._batched_value(site, values[site.name]) for site in self.sites}

        def batched_model(*args, **kwargs):
            with pyro.plate(_CHAIN_PLATE, z.shape[0], dim=-(self.max_plate_nesting + 1)):
                return self.model(*args, **kwargs)

        with pyro.validation_enabled(False):
            trace = _trace(poutine.condition(batched_model, data=data), self.model_args, self.model_kwargs)
        return trace, log_det

    def log_density(self, z: torch.Tensor) -> torch.Tensor:
        r"""Log joint density in unconstrained space, :math:`-U(z)`, shape ``(B,)``."""
        if self.mode == "vmap":
            with pyro.validation_enabled(False):
                return torch.func.vmap(self._single_log_density)(z)
        trace, log_det = self.run_model(z)
        batch = z.shape[0]
        total = log_det
        # Validation off here too: a distribution may build others inside log_prob (DiscreteHMM
        # does), and their support checks read tensor values, which no tracer can do.
        with pyro.validation_enabled(False):
            for name, site in _sample_sites(trace):
                if site["infer"].get("_deterministic", False):
                    continue
                log_prob = site["fn"].log_prob(site["value"])
                log_prob = scale_and_mask(log_prob, site["scale"], site["mask"])
                total = total + self._per_chain(log_prob, batch, name)
        return total

    def _per_chain(self, log_prob: torch.Tensor | float, batch: int, name: str) -> torch.Tensor:
        log_prob = torch.as_tensor(log_prob, dtype=self.dtype)
        nesting = self.max_plate_nesting + 1
        if log_prob.dim() > nesting:
            raise VectorizationError(
                f"site {name!r}: log_prob has {log_prob.dim()} dims, more than the {nesting} plate "
                "dims; declare its independent dims with a plate or .to_event()"
            )
        log_prob = log_prob.reshape((1,) * (nesting - log_prob.dim()) + log_prob.shape)
        if log_prob.shape[0] not in (1, batch):
            raise VectorizationError(f"site {name!r}: log_prob does not broadcast over chains")
        return log_prob.reshape(log_prob.shape[0], -1).sum(-1).expand(batch)

    def deterministic(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """Values of the ``pyro.deterministic`` sites for ``z`` of shape ``(B, D)``, each
        ``(B, *site_shape)``."""
        if not self.deterministic_shapes:
            return {}
        if self.mode == "vmap":
            names = list(self.deterministic_shapes)
            with torch.no_grad(), pyro.validation_enabled(False):
                values = torch.func.vmap(
                    lambda point: tuple(self._single_trace(point).nodes[n]["value"] for n in names)
                )(z)
            return dict(zip(names, values))
        with torch.no_grad():
            trace, _ = self.run_model(z)
        out = {}
        for name, shape in self.deterministic_shapes.items():
            value = trace.nodes[name]["value"]
            numel = math.prod(shape)
            if value.numel() == z.shape[0] * numel:
                out[name] = value.reshape(z.shape[0], *shape)
            elif value.numel() == numel:
                out[name] = value.reshape(shape).expand(z.shape[0], *shape)
            else:
                raise VectorizationError(
                    f"deterministic site {name!r} has shape {tuple(value.shape)} for {z.shape[0]} "
                    f"chains; expected {(z.shape[0], *shape)}"
                )
        return out

    # ---- potential and gradient --------------------------------------------------------------
    def _single_trace(self, point: torch.Tensor) -> poutine.Trace:
        values, _ = self.constrain(point.unsqueeze(0))
        data = {name: value[0] for name, value in values.items()}
        return _trace(poutine.condition(self.model, data=data), self.model_args, self.model_kwargs)

    def _single_log_density(self, point: torch.Tensor) -> torch.Tensor:
        # One chain's log density, a scalar, for vmap: no plate over chains, no in-place ops.
        _, log_det = self.constrain(point.unsqueeze(0))
        total = log_det[0]
        for _, site in _sample_sites(self._single_trace(point)):
            if not site["infer"].get("_deterministic", False):
                log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                total = total + torch.as_tensor(log_prob, dtype=self.dtype).sum()
        return total

    def eager_value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return self._eager_value_and_grad(z)
        except torch.linalg.LinAlgError:
            return self._chainwise_value_and_grad(z)

    def _chainwise_value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # A factorisation that fails at one chain's point (a covariance that is not positive-
        # definite there) fails the whole batch. Chains are then evaluated one by one, and a
        # failing one gets potential +inf, which the sampler counts as a divergence (as Stan's
        # and NumPyro's NaN densities are) instead of ending the run.
        potentials, grads = [], []
        for point in z:
            try:
                potential, grad = self.single_chain_value_and_grad(point)
            except torch.linalg.LinAlgError:
                potential, grad = torch.tensor(math.inf, dtype=z.dtype), torch.zeros_like(point)
            potentials.append(potential.to(z.dtype))
            grads.append(grad.to(z.dtype))
        return torch.stack(potentials), torch.stack(grads)

    def _eager_value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Both modes differentiate with ordinary autograd (through vmap's batched ops in "vmap"
        # mode), not torch.func.grad: under that transform every tensor the model reads,
        # its data included, refuses to become a NumPy array, so NumPyro-style code such as
        # ``len(np.unique(dept))`` (NumPyro's ucbadmit example) would fail.
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            potential = -self.log_density(z)
            (grad,) = torch.autograd.grad(potential.sum(), z)
        return potential.detach(), grad

    def __call__(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Potential ``(C,)`` and its gradient ``(C, D)`` at ``z`` of shape ``(C, D)``; ``+inf``
        (a divergence) for a chain whose point fails a factorisation in the model."""
        try:
            return self._value_and_grad(z)
        except torch.linalg.LinAlgError:
            return self._chainwise_value_and_grad(z)

    def single_chain_value_and_grad(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference evaluation of one state ``(D,)`` with the model run unbatched."""
        with torch.enable_grad():
            z = z.detach().requires_grad_(True)
            values, log_det = self.constrain(z.unsqueeze(0))
            values = {name: value[0] for name, value in values.items()}
            with pyro.validation_enabled(False):
                trace = _trace(poutine.condition(self.model, data=values), self.model_args, self.model_kwargs)
            log_joint = log_det[0]
            for _, site in _sample_sites(trace):
                if not site["infer"].get("_deterministic", False):
                    log_prob = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
                    log_joint = log_joint + torch.as_tensor(log_prob).sum()
            (grad,) = torch.autograd.grad(-log_joint, z)
        return -log_joint.detach(), grad

    def _prior_trace(self, seed: int, tries: int = 20) -> poutine.Trace:
        # A prior whose support holds points where the model fails (a covariance that is not
        # positive-definite) fails on some draws only: try a few before giving up.
        for attempt in range(tries):
            with torch.random.fork_rng(), pyro.validation_enabled(False):
                torch.manual_seed(seed + 7919 * attempt)
                try:
                    return _trace(self.model, self.model_args, self.model_kwargs)
                except torch.linalg.LinAlgError:
                    if attempt == tries - 1:
                        raise
        raise AssertionError("unreachable")

    def _check_points(self, num_chains: int, generator: torch.Generator, tries: int = 20) -> torch.Tensor:
        # Distinct points per chain so that any mixing of chains inside the model shows up; points
        # where the model's factorisations fail say nothing about batching, so others are drawn.
        for _ in range(tries):
            z = 4.0 * torch.rand(num_chains, self.dim, generator=generator, dtype=self.dtype) - 2.0
            try:
                self._eager_value_and_grad(z)
            except torch.linalg.LinAlgError:
                continue
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError, AssertionError):
                return z  # a failure of another kind is the verification's to report
            return z
        raise VectorizationError(f"the model's factorisations failed at {tries} batches of random points")

    def _verify(self, num_chains: int, num_checks: int, rtol: float, generator: torch.Generator) -> None:
        batch = max(num_chains, 2)
        for _ in range(num_checks):
            z = self._check_points(batch, generator)
            try:
                potential, grad = self.eager_value_and_grad(z)
                deterministic = self.deterministic(z)
            except (RuntimeError, ValueError, TypeError, IndexError, NotImplementedError, AssertionError) as error:
                raise VectorizationError(f"the model fails when run for a batch of chains: {error}") from error
            for chain in range(batch):
                reference, reference_grad = self.single_chain_value_and_grad(z[chain])
                self._compare("potential", potential[chain], reference, rtol)
                self._compare("gradient", grad[chain], reference_grad, rtol)
            self._verify_deterministic(z, deterministic, rtol)

    def _verify_deterministic(self, z: torch.Tensor, batched: dict[str, torch.Tensor], rtol: float) -> None:
        for chain in range(z.shape[0]):
            values, _ = self.constrain(z[chain : chain + 1])
            with pyro.validation_enabled(False), torch.no_grad():
                trace = _trace(
                    poutine.condition(self.model, data={k: v[0] for k, v in values.items()}),
                    self.model_args,
                    self.model_kwargs,
                )
            for name in batched:
                self._compare(f"deterministic site {name!r}", batched[name][chain], trace.nodes[name]["value"], rtol)

    @staticmethod
    def _compare(what: str, batched: torch.Tensor, reference: torch.Tensor, rtol: float) -> None:
        reference = torch.as_tensor(reference, dtype=batched.dtype)
        both_nan = torch.isnan(batched) & torch.isnan(reference)
        close = torch.isclose(batched, reference, rtol=rtol, atol=rtol) | both_nan
        if batched.shape != reference.shape or not bool(close.all()):
            raise VectorizationError(
                f"{what} evaluated for a batch of chains differs from one-chain evaluation; the model "
                "does not broadcast over an outer plate (e.g. matrix algebra or Python control flow on "
                "latent values)"
            )

    def _compile(self, num_chains: int, rtol: float, generator: torch.Generator) -> None:
        from torch.fx.experimental.proxy_tensor import make_fx

        example = self._check_points(num_chains, generator)
        try:
            with warnings.catch_warnings(), pyro.validation_enabled(False):
                warnings.simplefilter("ignore")
                module = make_fx(lambda z: self.eager_value_and_grad(z))(example)
                mask_assignments_as_selects(module)
                if data_dependent_shapes(module.graph):  # right only for the traced values
                    self.compile_failure = "the traced graph has shapes that depend on latent values"
                    return
                module = simplify(module)
            # The sampler's hot loop runs this graph inside its traced leaf (or on the virtual
            # machine, or fused); alone, as fx code, it serves initialisation and step-size search.
            graph = module
            for _ in range(2):
                z = self._check_points(num_chains, generator)
                expected = self.eager_value_and_grad(z)
                got = graph(z)
                self._compare("traced potential", got[0], expected[0], rtol)
                self._compare("traced gradient", got[1], expected[1], rtol)
        except (RuntimeError, VectorizationError, TypeError, ValueError) as error:
            # A model with value-dependent control flow traces to a graph that is wrong elsewhere;
            # the verified eager path stays correct, only slower (the sampler warns).
            self.compile_failure = f"{type(error).__name__}: {str(error)[:200]}"
            return
        self._value_and_grad = graph
        # The verified fx graph, cheaper to trace again (into a sampler step) than the model.
        self.graph_module = module
        self.compiled = True
