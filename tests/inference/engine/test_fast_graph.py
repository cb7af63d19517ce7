"""``fast_graph.simplify`` removes operations from a traced graph without changing its values."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.graph.simplify import data_dependent_shapes, simplify

SCALE = torch.tensor([0.5, 2.0])


def mixture_log_density_and_grad(z):
    """Slices of z, a constant-only subexpression, and reductions over 2 entries, with gradient."""
    with torch.enable_grad():
        z = z.detach().requires_grad_(True)
        loc, log_scale, logits = z[:, :2], z[:, 2:4], z[:, 4:6]
        data = torch.linspace(-2, 2, 7).reshape(1, 7, 1)
        components = -0.5 * ((data - loc.unsqueeze(1)) / log_scale.exp().unsqueeze(1)) ** 2 - log_scale.unsqueeze(1)
        weights = torch.log_softmax(logits, -1).unsqueeze(1)
        blocks = torch.cat([loc, log_scale, logits], -1)  # every gradient flows through a slice
        prior = -0.5 * (blocks / SCALE.log().exp().repeat(3)) ** 2  # SCALE.log().exp() is constant
        value = torch.logsumexp(components + weights, -1).sum(-1) + prior.sum(-1)
        (grad,) = torch.autograd.grad(value.sum(), z)
    return value.detach(), grad


def test_simplified_graph_has_fewer_nodes_and_the_same_values():
    example = torch.randn(3, 6, dtype=torch.float64)
    graph = make_fx(mixture_log_density_and_grad)(example)
    before = len(graph.graph.nodes)
    simplify(graph)
    targets = {str(node.target) for node in graph.graph.nodes}
    assert len(graph.graph.nodes) < before
    assert not {"aten.logsumexp.default", "aten._log_softmax.default", "aten.slice_backward.default"} & targets
    for _ in range(3):
        z = 3 * torch.randn(3, 6, dtype=torch.float64)
        for got, expected in zip(graph(z), mixture_log_density_and_grad(z)):
            assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_in_place_writes_are_not_folded_into_constants():
    def masked(z):
        constant = torch.zeros(3, dtype=z.dtype)
        constant.masked_fill_(z > 0, 1.0)  # written in place: depends on z, not constant
        return (constant + z,)

    graph = simplify(make_fx(masked)(torch.randn(3, dtype=torch.float64)))
    z = torch.tensor([-1.0, 2.0, -3.0], dtype=torch.float64)
    assert torch.equal(graph(z)[0], masked(z)[0])


@pytest.mark.parametrize("size", [1, 2, 4, 5])
def test_small_sums_are_unrolled_exactly_and_large_ones_kept(size):
    def total(x):
        return (x.sum(-1, keepdim=True) * 2,)

    graph = simplify(make_fx(total)(torch.randn(3, size, dtype=torch.float64)))
    x = torch.randn(3, size, dtype=torch.float64)
    assert torch.allclose(graph(x)[0], total(x)[0], rtol=1e-14)
    has_sum = any(node.target is torch.ops.aten.sum.dim_IntList for node in graph.graph.nodes)
    assert has_sum == (size > 4)


def test_boolean_mask_indexing_is_flagged_as_value_dependent():
    def masked(x):
        y = x.clone()
        y[x > 0] = x[x > 0] * 2  # how many entries are written depends on x
        return y

    def elementwise(x):
        return torch.where(x > 0, x * 2, x)

    example = torch.randn(6)
    assert data_dependent_shapes(make_fx(masked)(example).graph)
    assert data_dependent_shapes(make_fx(lambda x: x.nonzero())(example).graph)
    assert not data_dependent_shapes(make_fx(elementwise)(example).graph)
    assert not data_dependent_shapes(make_fx(lambda x: x[torch.tensor([0, 2])])(example).graph)


def test_a_mask_computed_from_constants_only_is_not_value_dependent():
    # An LKJ Cholesky factor's density selects its lower triangle with a mask built from
    # ``arange``: the same entries for every input, so the traced graph stays right (NumPyro's
    # ucbadmit model ran every leaf eagerly for it). The simplifier leaves its empty sums alone.
    def lower_triangle(x):
        rows = torch.arange(3)
        mask = rows[:, None] > rows[None, :]
        return x.reshape(3, 3)[mask].sum(), x[:0].sum(0)

    example = torch.randn(9, dtype=torch.float64)
    graph = make_fx(lower_triangle)(example)
    assert not data_dependent_shapes(graph.graph)
    assert data_dependent_shapes(make_fx(lambda x: x[x > 0])(example).graph)  # a mask of the input
    simplified = simplify(graph)
    for got, want in zip(simplified(example), lower_triangle(example)):
        torch.testing.assert_close(got, want)


def test_duplicates_identities_and_negations_are_removed_with_the_same_values():
    def redundant(x):
        a, b = -x, -x  # the same op twice: merged
        c = (x + torch.zeros(3, dtype=x.dtype)) * torch.ones(3, dtype=x.dtype)  # identity constants
        d = a + b * -1.0  # a difference written as a sum
        square = x.unsqueeze(0) * x.unsqueeze(1)
        return (
            a + b + c + d + (-(-x)),
            x.unsqueeze(0) + x.unsqueeze(0),
            square.permute(0, 1) + square.permute(1, 0),
        )  # identity permute dropped, not the swap

    graph = simplify(make_fx(redundant)(torch.randn(3, dtype=torch.float64)))
    calls = [node.target for node in graph.graph.nodes if node.op == "call_function"]
    aten = torch.ops.aten
    assert calls.count(aten.neg.default) == 1
    assert calls.count(aten.unsqueeze.default) == 2
    assert calls.count(aten.permute.default) == 1
    assert calls.count(aten.mul.Tensor) == 1  # the outer product only
    x = torch.tensor([1.5, float("nan"), -float("inf")], dtype=torch.float64)
    for got, expected in zip(graph(x), redundant(x)):
        assert torch.equal(got.isnan(), expected.isnan())
        assert torch.equal(got.nan_to_num(), expected.nan_to_num())


def test_random_ops_are_never_merged():
    def draws(x):
        return (x + torch.randn(3, dtype=x.dtype), x + torch.randn(3, dtype=x.dtype))

    graph = simplify(make_fx(draws)(torch.randn(3, dtype=torch.float64)))
    first, second = graph(torch.zeros(3, dtype=torch.float64))
    assert not torch.equal(first, second)


def test_a_step_that_cannot_be_compiled_runs_eagerly_and_says_why():
    from vilab.inference.engine.step import CompiledStep

    def value_dependent(x):
        return (x * float(x.sum()),)  # reads a value: make_fx refuses it

    step = CompiledStep(value_dependent, (torch.ones(3, dtype=torch.float64),), num_state=1)
    assert not step.compiled and "RuntimeError" in step.failure
    x = torch.arange(3, dtype=torch.float64)
    assert torch.equal(step(x)[0], value_dependent(x)[0])


def test_a_step_whose_check_point_fails_a_cholesky_is_checked_nearer_its_traced_point():
    # A GP leaf: one leapfrog from the traced point can reach a covariance that is not positive
    # definite, where the traced graph raises as PyTorch does. That is no reason to run every
    # leaf eagerly (NumPyro's GP example ran 16x slower): the check moves towards the traced point.
    from vilab.inference.engine.step import CompiledStep

    eye = torch.eye(2, dtype=torch.float64)

    def leaf(x):  # the state moves x -> x + 2.5: (2 - x) I is not positive definite there
        factor = torch.linalg.cholesky((2.0 - x)[..., None, None] * eye)
        return (x + 2.5, factor.diagonal(dim1=-2, dim2=-1).sum(-1))

    step = CompiledStep(leaf, (torch.tensor([0.25, 0.0], dtype=torch.float64),), num_state=1)
    assert step.compiled and step.backend == "graph", step.failure
    x = torch.tensor([1.0, -1.0], dtype=torch.float64)
    torch.testing.assert_close(step(x), leaf(x), rtol=0, atol=0)


def test_triangles_become_constant_selects_with_identical_values():
    def triangles(x):
        return (x.tril(), x.tril(-1), x.triu(1) * 2)

    example = torch.randn(2, 4, 3, dtype=torch.float64)
    graph = simplify(make_fx(triangles)(example))
    calls = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert not calls & {torch.ops.aten.tril.default, torch.ops.aten.triu.default}
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    x[0, 0, 2] = float("inf")  # above the diagonal: zeroed by both
    for got, expected in zip(graph(x), triangles(x)):
        assert torch.equal(got, expected)


def test_mean_and_sum_of_one_number_become_views():
    def single(x):
        return (x.mean() * 2, x.sum() + 1, x.reshape(1, 1).mean())

    graph = simplify(make_fx(single)(torch.randn(1, dtype=torch.float64)))
    calls = {node.target for node in graph.graph.nodes if node.op == "call_function"}
    assert not calls & {torch.ops.aten.mean.default, torch.ops.aten.sum.default}
    x = torch.tensor([0.3], dtype=torch.float64)
    for got, expected in zip(graph(x), single(x)):
        assert got.shape == expected.shape and torch.equal(got, expected)


def test_ops_around_an_in_place_write_are_not_merged():
    def written_between(x):
        y = x.clone()
        first = y * 2
        y.add_(1.0)  # the same op of the same node, but another value after this write
        second = y * 2
        return (first + second,)

    graph = simplify(make_fx(written_between)(torch.randn(3, dtype=torch.float64)))
    x = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    assert torch.equal(graph(x)[0], written_between(x)[0])
