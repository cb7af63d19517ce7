r"""Fused kernels whose buffers are allocated once (:mod:`vilab.inference.engine.backends.recycle`).

Exact checks: the recycled call returns the ordinary call's values; a call's outputs survive the
next call and share memory with the call after it (the documented lifetime); a step that feeds
its outputs back, as the NUTS leaf loop does, follows the eager step; sources the rewrite does
not understand are left alone.
"""

import ast
import textwrap

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.backends import inductor as fast_inductor
from vilab.inference.engine.backends.inductor import compile_fused, fusion_unavailable
from vilab.inference.engine.step import CompiledStep
from vilab.inference.engine.backends.recycle import RECYCLE_DEPTH, _plan, recycled_call

pytestmark = pytest.mark.skipif(bool(fusion_unavailable()), reason=fusion_unavailable() or "available")


def test_recycled_kernel_returns_the_eager_values_and_reuses_its_buffers_two_calls_later(leaf_like):
    _step, inputs = leaf_like
    fused = compile_fused(make_fx(_step)(*inputs), inputs, recycle=True)
    assert getattr(fused, "recycled", False)
    first = fused(*inputs)
    kept = tuple(tensor.clone() for tensor in first)
    second = fused(*inputs)
    for a, b, c in zip(first, kept, _step(*inputs)):
        assert torch.equal(a.isnan(), c.isnan()) and torch.equal(a.nan_to_num(), c.nan_to_num())
        assert torch.equal(a.nan_to_num(), b.nan_to_num())  # survived the next call
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(first, second))
    for _ in range(RECYCLE_DEPTH - 1):
        later = fused(*inputs)
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(first, later))


def test_a_recycled_step_fed_its_own_outputs_follows_the_eager_step():
    def step(total, count, x):
        return total + x.sin() * total.cos(), count + 1, (total * x).sum()

    example = (
        torch.linspace(-1.0, 1.0, 5, dtype=torch.float64),
        torch.zeros((), dtype=torch.long),
        torch.linspace(0.1, 1.0, 5, dtype=torch.float64),
    )
    compiled = CompiledStep(step, example, num_state=2, recycle=True)
    assert compiled.fuse(), compiled.fuse_failure
    assert compiled.backend == "inductor" and compiled.recycled
    fused_state, eager_state = example[:2], example[:2]
    for _ in range(7):
        *fused_state, fused_out = compiled(*fused_state, example[2])
        *eager_state, eager_out = step(*eager_state, example[2])
    torch.testing.assert_close(fused_state[0], eager_state[0], rtol=1e-12, atol=1e-12)
    assert int(fused_state[1]) == 7
    torch.testing.assert_close(fused_out, eager_out, rtol=1e-12, atol=1e-12)


def test_steps_that_keep_their_outputs_get_fresh_tensors():
    example = (torch.ones(3, dtype=torch.float64),)
    compiled = CompiledStep(lambda x: (x * 2.0,), example)
    assert compiled.fuse() and not compiled.recycled


def test_the_nuts_leaf_and_merge_run_recycled(monkeypatch, tmp_path):
    import pyro
    import pyro.distributions as dist

    from vilab.inference.engine.backends import artifacts
    from vilab.inference.nuts.sampler import sample_vectorized_nuts

    made = []

    def spy(*args, **kwargs):
        made.append(recycled_call(*args, **kwargs))
        return made[-1]

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # compiled here, then loaded
    monkeypatch.setattr(fast_inductor, "recycled_call", spy)
    monkeypatch.setattr(artifacts, "recycled_call", spy)

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
        with pyro.plate("data", data.shape[0]):
            pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)

    data = torch.tensor([0.3, 1.9, 1.1], dtype=torch.float64)
    result = sample_vectorized_nuts(
        model,
        (data,),
        {},
        num_samples=5,
        num_warmup=5,
        num_chains=2,
        seed=0,
        progress=False,
        compiler="inductor",
        workers=1,
    )  # `made` counts here
    assert result.backend == "inductor"
    assert len(made) == 2 and all(call is not None for call in made)  # the leaf and the merge
    again = sample_vectorized_nuts(
        model,
        (data,),
        {},
        num_samples=5,
        num_warmup=5,
        num_chains=2,
        seed=0,
        progress=False,
        compiler="inductor",
        workers=1,
    )
    assert again.backend == "inductor"
    assert len(made) == 4 and all(call is not None for call in made)  # loaded from the cache: recycled too


def _function(source: str) -> ast.FunctionDef:
    return ast.parse(textwrap.dedent(source)).body[0]


def test_sources_the_rewrite_does_not_understand_are_left_alone():
    assigned_twice = """
    def call(args):
        a, = args
        buf0 = empty_strided_cpu((2,), (1,), torch.float64)
        buf0 = empty_strided_cpu((2,), (1,), torch.float64)
        return (buf0,)
    """
    uses_runner = """
    def call(self, args):
        a, = args
        buf0 = empty_strided_cpu((2,), (1,), torch.float64)
        self.partitions[0](buf0)
        return (buf0,)
    """
    allocates_nothing = """
    def call(args):
        a, = args
        return (a,)
    """
    for source in (assigned_twice, uses_runner, allocates_nothing):
        assert _plan(_function(source)) is None
    assert recycled_call(len, [], (torch.zeros(1),)) is None  # no Python source


def test_views_of_inputs_stay_in_the_per_call_body():
    source = """
    def call(args):
        a, = args
        buf0 = empty_strided_cpu((2,), (1,), torch.float64)
        buf1 = reinterpret_tensor(a, (2,), (1,), 0)
        buf2 = reinterpret_tensor(buf0, (2,), (1,), 0)
        kernel(buf1, buf2)
        return (buf2,)
    """
    setup, body = _plan(_function(source))
    pooled = ast.unparse(setup)
    assert "buf0 = empty_strided_cpu" in pooled and "buf2 = reinterpret_tensor(buf0" in pooled
    assert "buf1" not in pooled and "buf1 = reinterpret_tensor(a" in ast.unparse(body)


def test_a_fused_svi_step_reuses_its_buffers_and_a_nan_keeps_the_last_good_parameters():
    """The SVI step reads only the previous state, so it is recycled; a rejected step copies
    the state out of the buffers, and the error still names the site and leaves finite values."""
    import warnings

    import pyro
    import pyro.distributions as dist

    from vilab.inference import fit_svi
    from vilab.inference.engine.svi_step import CompiledSVIStep
    from vilab.inference.svi.api import NonFiniteLossError

    fused = []
    original = CompiledSVIStep.fuse

    def spy(self):
        result = original(self)
        fused.append(bool(getattr(self._fn, "recycled", False)))
        return result

    def model():
        z = pyro.sample("z", dist.Normal(torch.tensor(0.0), 1.0))
        pyro.factor("pull", 3.0 * z)  # the posterior is N(3, 1): draws above 4 soon happen
        pyro.factor("explodes", torch.where(z > 4.0, torch.tensor(float("nan")), torch.tensor(0.0)))

    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        patch.setattr(CompiledSVIStep, "fuse", spy)
        warnings.simplefilter("error", RuntimeWarning)
        with pytest.raises(NonFiniteLossError, match="non-finite at step") as info:
            fit_svi(
                model,
                "meanfield",
                num_steps=200,
                lr=0.5,
                progress=False,
                backend="compiled",
                compiler="inductor",
                seed=0,
            )
    assert fused == [True]
    assert info.value.site == "explodes" and 0 < info.value.step < 200
    for name, value in pyro.get_param_store().items():
        assert torch.isfinite(value).all(), name
