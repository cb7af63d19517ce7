r"""The virtual machine's matrix ops and writes into views (:mod:`~vilab.inference.engine.backends.vm_matrix`,
:mod:`~vilab.inference.engine.backends.vm_views`).

Exact checks: triangular solves (every flag), Cholesky factors, products, a flow's dense-layer
and spline ops and their gradients, and ``copy_`` into strided views, traced with ``make_fx``,
return the eager values on batched, broadcast, transposed and strided operands; a matrix that is
not positive definite gets a NaN factor and LAPACK's info. Contract checks: writes and indices the
translation cannot follow are refused, naming why; a NUTS leaf with a Cholesky factor runs on the
virtual machine and repeats the fx graph's draws.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.backends import vm as fast_vm
from vilab.inference.engine.backends.vm import Unsupported, vm_step
from vilab.inference.nuts.sampler import sample_vectorized_nuts

pytestmark = pytest.mark.skipif(bool(fast_vm.vm_unavailable(wait=True)), reason=fast_vm.vm_unavailable() or "available")


def _values(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _close(function, *inputs, tol=1e-10):
    graph = make_fx(function)(*inputs)
    for got, want in zip(vm_step(graph, inputs)(*inputs), function(*inputs), strict=True):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, equal_nan=True)


def _triangular(*shape, seed=0):
    a = _values(*shape, seed=seed)
    return a + 3.0 * torch.eye(shape[-1], dtype=torch.float64)  # well conditioned either triangle


@pytest.mark.parametrize("upper", [False, True])
@pytest.mark.parametrize("left", [True, False])
@pytest.mark.parametrize("unitriangular", [False, True])
def test_triangular_solves_match_eager(upper, left, unitriangular):
    def step(a, batch, b, wide):
        def solve(a, b):
            return torch.linalg.solve_triangular(a, b, upper=upper, left=left, unitriangular=unitriangular)

        sides = (lambda m: m) if left else (lambda m: m.mT)  # B is (n, k) on the left, (k, n) on the right
        return (
            solve(a, sides(b)),
            solve(a.mT, sides(b)),  # a transposed view
            solve(batch, sides(b)),  # A batched, B broadcast
            solve(a, sides(wide[..., ::2])),  # B batched and strided, A broadcast
            solve(a, sides(b[:, :1])),  # one column
            solve(a[:1, :1], sides(b[:1])),  # 1 x 1
        )

    _close(
        step,
        _triangular(4, 4),
        _triangular(2, 4, 4, seed=1),
        _values(4, 3, seed=2),
        _values(3, 4, 6, seed=3),
    )


def test_cholesky_matches_eager_and_is_nan_where_not_positive_definite():
    def step(spd, above, below, indefinite):
        # Each factor reads one triangle (the lower, or the upper with upper=True): the other
        # is perturbed (``above``, ``below``) and must not change the result.
        factor, info = torch.linalg.cholesky_ex(above)
        upper, upper_info = torch.linalg.cholesky_ex(below, upper=True)
        return (
            factor,
            info,
            upper,
            upper_info,
            torch.linalg.cholesky(spd[0].mT),
            torch.linalg.cholesky_ex(indefinite)[1],
        )

    x = _values(3, 4, 4)
    spd = x @ x.mT + 0.5 * torch.eye(4, dtype=torch.float64)
    indefinite = spd.clone()
    indefinite[1, 2, 2] = -5.0  # fails at the third minor: LAPACK's info 3
    _close(step, spd, spd + torch.triu(spd, 1), spd + torch.tril(spd, -1), indefinite)
    # Eager returns a partial factor there; the virtual machine NaN, as JAX, and no error.
    graph = make_fx(torch.linalg.cholesky)(spd)  # eager raises on ``indefinite``
    (factor,) = vm_step(graph, (spd,))(indefinite)
    assert factor.isnan().flatten(1).all(1).tolist() == [False, True, False]
    torch.testing.assert_close(factor[0], torch.linalg.cholesky(indefinite[0]), rtol=1e-10, atol=1e-10)


def test_dense_layer_ops_and_their_gradients_match_eager():
    permutation = torch.tensor([3, 2, 1, 0, 4, 0])  # a reversal, a step and a repeat: three runs

    def step(x, weight, bias):
        def layer(x, weight, bias):
            hidden = torch.relu(torch.nn.functional.linear(x, weight, bias))
            return (
                hidden.index_select(-1, permutation).sum() + torch.addmm(bias, x, weight.t(), beta=0.5, alpha=2.0).sum()
            )

        return torch.func.grad(layer, argnums=(0, 1, 2))(x, weight, bias) + (
            torch.relu(x),
            torch.addmm(bias, x, weight.t(), beta=0.0),
        )

    x = _values(4, 5)
    x[0, 0], x[1, 1] = math.nan, 0.0
    _close(step, x, _values(5, 5, seed=1), _values(5, seed=2))


def test_copies_into_strided_views_and_diagonals_match_eager():
    def step(x, y, flags):
        buffer = x.new_empty_strided((3, 3), (3, 1))
        buffer.copy_(x)
        diagonal = buffer.as_strided((3,), (4,), 0)
        diagonal.copy_(y)  # writes through to buffer
        corner = buffer.as_strided((2, 2), (3, 1), 4)
        corner.copy_(flags)  # broadcast and converted from bool
        return (
            buffer * 1.0,
            diagonal + 1.0,
            x.diagonal(1),
            x.diagonal(-1),
            x.unsqueeze(0).expand(2, 3, 3).diagonal(0, -2, -1),
            torch.func.grad(lambda x: (x.diagonal() ** 2).sum())(x),
        )

    x = _values(3, 3)
    x[0, 0], x[0, 1], x[2, 1] = math.nan, math.inf, -math.inf  # copied as they are
    _close(step, x, _values(3, seed=1), torch.tensor([True, False]), tol=0)


@pytest.mark.parametrize(
    "function, message",
    [
        (lambda x: torch.tensor([1.0, 2.0]).copy_(x[:2]) * 1.0, "copy_ into a constant"),
        (lambda x: x[1:].as_strided((2,), (1,), 0) * 1.0, "not the whole of its storage"),
        (lambda x: x.as_strided((2,), (1,), 0) * 1.0, "not the whole of its storage"),  # an input
        (lambda x: x.index_select(0, (x > 0).long()[:2]), "not a constant"),
        (lambda x: x[(x > 0).long()], "not a constant integer tensor"),  # a computed index
        (lambda x: x[x > 0] * 1.0, "not a constant integer tensor|nonzero|op aten"),  # a boolean mask
        (lambda x: x.reshape(2, 2)[torch.tensor([0, 1]), torch.tensor([1, 1])], "by 2 tensors"),
        (lambda x: x.index_put((torch.tensor([0, 0]),), x[:2]), "without accumulate"),
    ],
)
def test_writes_and_indices_it_cannot_follow_are_refused(function, message):
    example = (_values(4),)
    with pytest.raises(Unsupported, match=message):
        vm_step(make_fx(function)(*example), example)


def test_spline_bin_ops_and_their_gradients_match_eager():
    # A spline flow's ops: softmax widths, bins found by a computed index (gather, whose
    # backward is scatter_add), fill_ of a view, sgn.
    def step(x, logits, bins):
        def spline(x, logits):
            widths = torch.softmax(logits, -1)
            edges = torch.cumsum(widths, -1)
            chosen = torch.gather(edges, -1, bins)
            return (chosen * x.unsqueeze(-1)).sum()

        filled = x * 1.0
        filled[1:].fill_(torch.tensor(2.0))
        return (*torch.func.grad(spline, argnums=(0, 1))(x, logits), torch.softmax(logits.mT, 0), filled, x.sgn())

    logits = _values(3, 5, seed=1)
    logits[0, 2] = -math.inf  # an excluded bin
    bins = torch.tensor([[0, 4], [2, 2], [4, 1]])  # a repeated bin accumulates twice
    _close(step, _values(3), logits, bins)


def test_a_nuts_leaf_with_a_cholesky_factor_runs_on_the_virtual_machine():
    x = torch.linspace(0.0, 1.0, 6)
    kernel = torch.exp(-0.5 * (x[:, None] - x[None, :]) ** 2 / 0.3**2)

    def gp(y):  # the factor of a latent-dependent covariance, as a GP model writes it
        scale = pyro.sample("scale", dist.HalfNormal(1.0))
        covariance = scale**2 * kernel + 0.1 * torch.eye(6)
        pyro.sample("y", dist.MultivariateNormal(torch.zeros(6), scale_tril=torch.linalg.cholesky(covariance)), obs=y)

    runs = [
        sample_vectorized_nuts(
            gp,
            (torch.sin(3.0 * x),),
            {},
            num_samples=40,
            num_warmup=0,
            num_chains=2,
            seed=4,
            progress=False,
            compiler=compiler,
        )
        for compiler in ("vm", "graph")
    ]
    assert "leaf on the virtual machine" in runs[0].fuse_decision, runs[0].fuse_decision
    torch.testing.assert_close(runs[0].samples["scale"], runs[1].samples["scale"], rtol=1e-9, atol=1e-9)


def test_advanced_indexing_by_a_constant_and_its_gradient_match_eager():
    # ``beta[g]`` written for one chain, batched over chains by vmap: index.Tensor(beta, [None, g])
    # and, in the gradient, index_put(zeros, [None, g], grad, accumulate=True); repeats add up.
    groups = torch.tensor([0, 0, 2, 1, 2, 2, -1])
    pairs = torch.tensor([[0, 1], [2, 0]])
    rows = torch.tensor([0, 2, 2, 1])

    def one_chain(b, m):
        return (b[groups] ** 2).sum() + (b[pairs].sum(-1) ** 2).sum() + (m[rows, 1:] ** 3).sum()

    def step(beta, matrix):
        def total(beta, matrix):
            return torch.func.vmap(one_chain)(beta, matrix).sum()

        return (torch.func.vmap(one_chain)(beta, matrix), *torch.func.grad(total, argnums=(0, 1))(beta, matrix))

    _close(step, _values(4, 3), _values(4, 3, 4, seed=1))


def test_a_nuts_leaf_indexing_a_latent_by_group_runs_on_the_virtual_machine():
    # A varying-intercept model as users write it (``a[group]`` on a latent built for one chain
    # by a matrix product, so the chains are batched by vmap): before, the leaf stayed fx code.
    group = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    y = torch.linspace(-1.0, 2.0, 8, dtype=torch.float64)

    def model(group, y):
        z = pyro.sample("z", dist.Normal(torch.zeros(3), 1.0).to_event(1))
        a = torch.eye(3, dtype=z.dtype) @ z  # written for one draw of z
        pyro.sample("y", dist.Normal(a[group], 1.0).to_event(1), obs=y)

    result = sample_vectorized_nuts(
        model, (group, y), {}, num_samples=100, num_warmup=100, num_chains=2, seed=0, progress=False, compiler="vm"
    )
    assert "leaf on the virtual machine" in result.fuse_decision, result.fuse_decision
