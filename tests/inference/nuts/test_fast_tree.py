"""NUTS trajectories for all chains (:mod:`vilab.inference.nuts.tree`).

Exact checks: the merge hands the next sub-tree the merged tree's edge in the drawn direction;
a transition built from traced (and fused, buffer-reusing) leaves and merges reproduces the
eager transition from the same random stream (states to 1e-9, tree depths and step counts
exactly).
"""

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.nuts.adaptation import Metric
from vilab.inference.engine.backends.inductor import fusion_unavailable
from vilab.inference.engine import step as fast_leaf
from vilab.inference.engine.step import LEAF_FIELDS
from vilab.inference.nuts.tree import _MERGED_LEAF_FIELDS, TREE_FIELDS, TreeBuilder, merge_fields
from vilab.inference.engine.potential import BatchedPotential

C, D = 3, 2


def _correlated(data):
    loc = pyro.sample("loc", dist.Normal(torch.zeros(2), 3.0).to_event(1))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.MultivariateNormal(loc, torch.tensor([[1.0, 0.8], [0.8, 1.0]])), obs=data)


def _random_inputs(generator):
    def real(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    def flag():
        return torch.rand(C, generator=generator) < 0.5

    shapes = {"potential_proposal": (C,), "energy_proposal": (C,), "log_weight": (C,), "sum_accept": (C,)}
    tree = []
    for name in TREE_FIELDS:
        if name in ("turning", "diverging"):
            tree.append(flag())
        elif name in ("num_steps", "depth"):
            tree.append(torch.randint(0, 5, (C,), generator=generator))
        else:
            tree.append(real(*shapes.get(name, (C, D))))
    sub = []
    for name in LEAF_FIELDS[:_MERGED_LEAF_FIELDS]:
        if name in ("turning", "diverging"):
            sub.append(flag())
        elif name == "num_steps":
            sub.append(torch.randint(0, 5, (C,), generator=generator))
        else:
            sub.append(real(*shapes.get(name, (C, D))))
    extra = (
        flag(),
        flag(),
        torch.ones(C, D, dtype=torch.float64),
        torch.rand(2, C, generator=generator, dtype=torch.float64),
        torch.rand(C, generator=generator, dtype=torch.float64),
    )
    return (*tree, *sub, *extra)


def test_the_merge_hands_the_next_subtree_the_edge_in_the_drawn_direction():
    inputs = _random_inputs(torch.Generator().manual_seed(0))
    *merged, z_next, r_next, grad_next, step, active, going_right, any_active = merge_fields(*inputs)
    tree = dict(zip(TREE_FIELDS, merged))
    uniforms, step_size = inputs[-2], inputs[-1]
    right = uniforms[1] < 0.5
    assert torch.equal(going_right, right)
    for got, name in ((z_next, "z"), (r_next, "r"), (grad_next, "grad")):
        assert torch.equal(got, torch.where(right.unsqueeze(-1), tree[f"{name}_right"], tree[f"{name}_left"]))
    assert torch.equal(step.squeeze(-1), torch.where(right, step_size, -step_size))
    assert torch.equal(active, ~tree["turning"] & ~tree["diverging"])
    assert bool(any_active) == bool(active.any())


def _transitions(compile: bool, fuse: bool, steps: int = 6):
    data = torch.tensor([[0.5, 0.2], [1.5, 1.1], [-0.3, 0.1], [0.9, 1.3]], dtype=torch.float64)
    potential = BatchedPotential(_correlated, (data,), {}, num_chains=C, seed=0)
    builder = TreeBuilder(potential, C, max_tree_depth=6, generator=torch.Generator().manual_seed(1), compile=compile)
    if fuse:
        builder.fuse()
    metric = Metric(torch.ones(C, D, dtype=torch.float64), dense=False)
    z = torch.tensor([[0.1, -0.2], [1.0, 0.5], [-0.5, 0.3]], dtype=torch.float64)
    value, grad = potential(z)
    step_size = torch.tensor([0.3, 0.5, 0.8], dtype=torch.float64)
    states = []
    for _ in range(steps):
        tree = builder.transition(z, value, grad, metric, step_size)
        z, value, grad = tree.z_proposal.clone(), tree.potential_proposal.clone(), tree.grad_proposal.clone()
        states.append((z, tree.depth.clone(), tree.num_steps.clone()))
    return states, builder


def _assert_same(states, reference):
    for (z, depth, steps), (z_ref, depth_ref, steps_ref) in zip(states, reference):
        torch.testing.assert_close(z, z_ref, rtol=1e-9, atol=1e-9)
        assert torch.equal(depth, depth_ref) and torch.equal(steps, steps_ref)


@pytest.mark.engine_path
def test_traced_transitions_reproduce_the_eager_ones():
    eager, _ = _transitions(compile=False, fuse=False)
    traced, builder = _transitions(compile=True, fuse=False)
    assert builder.compiled
    _assert_same(traced, eager)


@pytest.mark.engine_path
@pytest.mark.skipif(bool(fusion_unavailable()), reason=fusion_unavailable() or "available")
def test_fused_buffer_reusing_transitions_reproduce_the_eager_ones(monkeypatch):
    # Values, not speed, are under test: a busy machine must not turn the fused kernel away.
    monkeypatch.setattr(fast_leaf, "FUSED_MAX_TIME_RATIO", float("inf"))
    eager, _ = _transitions(compile=False, fuse=False)
    fused, builder = _transitions(compile=True, fuse=True)
    assert builder.backend == "inductor"
    assert all(step.recycled for step, _ in builder.step_calls())
    _assert_same(fused, eager)
