"""``fast_masks``: boolean-mask assignments become selects with the same values and gradients,
and whatever value-dependent shape is left is still reported."""

import pyro.distributions.transforms as T
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.graph.masks import data_dependent_shapes, mask_assignments_as_selects


def _values_and_gradients(fn, *inputs):
    def traced(*args):
        with torch.enable_grad():
            leaves = [a.detach().requires_grad_() for a in args]
            outputs = fn(*leaves)
            grads = torch.autograd.grad(sum(o.sum() for o in outputs), leaves)
        return (*[o.detach() for o in outputs], *grads)

    return traced


def _assignments(x, w):
    y = (x * w).exp()
    inside = (x > -1) & (x < 1)
    out = y.clone()
    out[~inside] = x[~inside]  # the mask written twice: two nodes, one value
    log_y = torch.log(y)
    log_y[~inside] = 0.0
    return out * 3, log_y


def test_assignments_and_their_backward_become_selects_with_the_same_values():
    fn = _values_and_gradients(_assignments)
    x = torch.linspace(-2, 2, 9, dtype=torch.float64)
    w = torch.rand(9, dtype=torch.float64)
    graph = make_fx(fn)(x, w)
    assert data_dependent_shapes(graph.graph)
    assert mask_assignments_as_selects(graph) == 5
    assert not data_dependent_shapes(graph.graph)
    for inputs in ((x, w), (torch.linspace(-0.5, 3, 9, dtype=torch.float64), w)):  # other mask
        for got, expected in zip(graph(*inputs), fn(*inputs)):
            assert torch.equal(got, expected)


def test_pyros_spline_traces_for_inputs_inside_and_outside_its_box():
    torch.manual_seed(0)
    spline = T.Spline(3, count_bins=8, bound=3.0).double()

    def forward(x):
        y = spline(x)
        return y, spline.log_abs_det_jacobian(x, y)

    fn = _values_and_gradients(forward)
    example = torch.randn(5, 3, dtype=torch.float64)
    graph = make_fx(fn)(example)
    mask_assignments_as_selects(graph)
    assert not data_dependent_shapes(graph.graph)
    x = torch.tensor(
        [[-5.0, 0.1, 2.9], [3.5, -2.0, 0.0], [1.0, 4.0, -3.2], [0.3, 0.2, 0.1], [9.0, -9.0, 2.5]], dtype=torch.float64
    )
    for got, expected in zip(graph(x), fn(x)):
        assert torch.allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_an_in_place_write_seen_through_a_view_is_left_alone():
    def through_view(x):
        y = x.clone()
        row = y[0]  # a view: a write to y shows in row
        y[y > 0] = 0.0
        return (row * 2,)

    graph = make_fx(through_view)(torch.randn(2, 3))
    mask_assignments_as_selects(graph)
    assert data_dependent_shapes(graph.graph)  # still reported, so never reused wrongly
    x = torch.tensor([[1.0, -1.0, 2.0], [0.5, -3.0, 1.0]])
    assert torch.equal(graph(x)[0], through_view(x)[0])
