r"""The virtual machine for traced steps (:mod:`vilab.inference.engine.backends.vm`).

Exact checks: each group of ATen ops, traced with ``make_fx``, returns the eager values (NaN, inf,
views with negative and zero strides, integer and boolean results included); the samplers' real
leaf and merge graphs agree with their traced graphs (matrix ops: ``test_fast_vm_matrix.py``).
Contract checks: recycled buffers, layout checks, errors naming what is not supported,
a library that cannot be built. Statistical check: NUTS on the virtual machine matches the
Normal-Normal closed-form posterior.
"""

import math
import os
import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.backends import vm as fast_vm
from vilab.inference.engine.backends import vm_program as fast_vm_program
from vilab.inference.engine.step import _all_close, _call_time
from vilab.inference.nuts.sampler import sample_vectorized_nuts
from vilab.inference.engine.backends.vm import Unsupported, vm_step

pytestmark = pytest.mark.skipif(bool(fast_vm.vm_unavailable(wait=True)), reason=fast_vm.vm_unavailable() or "available")


def _values(*shape, special=True, seed=0):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if special and x.numel() >= 4:
        flat = x.view(-1)
        flat[0], flat[1], flat[2], flat[3] = math.nan, math.inf, -math.inf, 0.0
    return x


def _same(function, *inputs):
    graph = make_fx(function)(*inputs)
    got = vm_step(graph, inputs)(*inputs)
    expected = function(*inputs)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, equal_nan=True)


def _elementwise(x, y):
    return (
        x + y,
        x - 2.5 * y,
        x * y,
        x / y,
        -x,
        x.exp(),
        x.log(),
        x.log1p(),
        x.sqrt(),
        torch.sigmoid(x),
        torch.nn.functional.softplus(x),
        torch.nn.functional.softplus(x, beta=2.0, threshold=3.0),
        torch.logaddexp(x, y),
        torch.fmin(x, y),
        torch.fmax(x, y),
        torch.maximum(x, y),
        x**2,
        x**0.5,
        x**-1.0,
        x**3.0,
        x.clamp(-0.5, 0.7),
        x.clamp(min=0.1),
        torch.where(x > y, x, y),
        x < y,
        x <= 0.5,
        x > y,
        x >= y,
        x == y,
        x != 0.0,
        torch.xlogy(x, y),
        torch.nan_to_num(x),
        x.abs(),
        x.tanh(),
        torch.expm1(x),
        torch.nn.functional.logsigmoid(x),
        x.isnan(),
        x.isinf(),
        x.sign(),
        1.0 - x,
        torch.erf(x),
        torch.erfc(x),
        torch.lgamma(x),
        x.atan(),
        x.sin(),
        x.cos(),
        x.mean(1),
        x.mean(0, keepdim=True),
    )


def test_elementwise_ops_match_eager_with_nan_inf_and_zero():
    _same(_elementwise, _values(3, 5), _values(3, 5, special=False, seed=1).abs() + 0.1)


def test_digamma_matches_eager_to_its_series_accuracy():
    # Its own asymptotic series, not PyTorch's: equal to 1e-15 relative, 4e-10 near a pole (reflection).
    x = torch.cat([_values(20), torch.tensor([0.0, -0.0, -1.0, -2.5, 1e-8, 50.0], dtype=torch.float64)])
    for values in (x, -x - 0.5, x * 7.0):
        got = vm_step(make_fx(lambda v: (torch.digamma(v),))(values), (values,))(values)[0]
        torch.testing.assert_close(got, torch.digamma(values), rtol=1e-9, atol=1e-11, equal_nan=True)


def test_broadcasting_and_logical_ops_match_eager():
    def step(x, y, mask):
        both = (x > 0) & mask
        return x + y, torch.where(both | ~mask, x, y), both ^ mask, (x * y).masked_fill(mask, -1.0)

    x, y = _values(4, 1, 3), _values(5, 1, special=False)
    _same(step, x, y, _values(4, 5, 3, special=False, seed=3) > 0)


def test_views_and_copies_match_eager():
    def step(x, y):
        sliced = x[:, 1:4:2] * 2.0
        parts = torch.unbind(x, 1)
        return (
            sliced,
            x.t() + 1.0,
            x.flip(0).flip(1),
            x.unsqueeze(0).expand(2, 3, 5),
            x[1],
            torch.cat([x, y], 1),
            torch.stack([x, x * 2.0], 1),
            parts[2] + parts[0],
            torch.nn.functional.pad(x, (2, 1)),
            torch.nn.functional.pad(x, (-1, 2, 1, 0), value=3.0),
            x.transpose(0, 1).reshape(15),
            x.reshape(5, 3).sum(0),
            x.permute(1, 0)[2:].contiguous(),
        )

    _same(step, _values(3, 5), _values(3, 2, seed=1))


def test_reductions_scans_and_products_match_eager():
    def step(x, a, b, mask):
        values, indices = x.max(1)
        return (
            x.sum(-1),
            x.sum((0, 1)),
            x.sum(0, keepdim=True),
            x.prod(1),
            x.amax(0),
            x.amin(1),
            values,
            indices,
            mask.any(),
            mask.any(1),
            torch.cumsum(x, 1),
            torch.cumprod(x, 0),
            a @ b,
            torch.bmm(a.expand(2, 4, 3), b.expand(2, 3, 2)),
            x.max(),
            x.min(),
        )

    x = _values(3, 5, special=False)
    x[1, 2] = math.nan  # max, argmax and sum propagate it
    _same(
        step,
        x,
        _values(4, 3, special=False, seed=1),
        _values(3, 2, special=False, seed=2),
        _values(3, 5, seed=3, special=False) > 1.0,
    )


def test_gradients_of_a_log_density_match_eager():
    # The backward ops a leaf's gradient uses: slice_backward, select_backward, sigmoid and
    # softplus and log-sigmoid backward, sums over broadcast dimensions.
    def step(z, data):
        def log_density(z):
            scale = torch.nn.functional.softplus(z[:, 0])
            weight = torch.sigmoid(z[:, 1:3])
            mean = (weight.unsqueeze(1) * data[..., :2]).sum(-1)
            return (-(((data[:, 2] - mean) / scale.unsqueeze(-1)) ** 2) - scale.log().unsqueeze(-1)).sum(
                -1
            ) + torch.nn.functional.logsigmoid(z[:, 3])

        return torch.func.grad(lambda z: log_density(z).sum())(z), log_density(z)

    _same(step, _values(4, 4, special=False), _values(6, 3, special=False, seed=5))


def test_integer_boolean_and_float32_inputs_and_outputs_round_trip():
    def step(count, flag, x32, x64):
        return count + 1, ~flag, x32 * 2.0, (x64 > 0).to(torch.int64) + count, x32.to(torch.float64), x64.float()

    _same(
        step,
        torch.arange(4),
        torch.tensor([True, False, True, True]),
        torch.linspace(-1.0, 1.0, 4, dtype=torch.float32),
        _values(4, special=False),
    )


def test_in_place_ops_write_through_to_later_readers():
    def step(x):
        y = x * 1.0
        y.clamp_(-0.5, 0.5)
        return y + 1.0, y

    _same(step, _values(3, 4, special=False))


def test_an_unknown_op_is_named_and_nothing_runs():
    graph = make_fx(lambda x: (torch.special.bessel_j0(x),))(torch.randn(3, dtype=torch.float64))
    with pytest.raises(Unsupported, match="bessel_j0"):
        vm_step(graph, (torch.randn(3, dtype=torch.float64),))


def test_inputs_with_another_layout_are_refused():
    example = (torch.randn(3, 4, dtype=torch.float64),)
    step = vm_step(make_fx(lambda x: (x * 2.0,))(*example), example)
    with pytest.raises(ValueError, match="input 0: expected shape"):
        step(torch.randn(4, 3, dtype=torch.float64).t())


def test_recycled_outputs_live_two_calls_and_timing_leaves_them_alone():
    example = (torch.randn(5, dtype=torch.float64),)
    graph = make_fx(lambda x: (x + 1.0,))(*example)
    step = vm_step(graph, example, recycle=True)
    first = step(example[0])[0]
    kept = first.clone()
    second = step(example[0] * 3.0)[0]
    _call_time(step, (example[0] * 5.0,))  # timing while the caller holds `first` and `second`
    assert torch.equal(first, kept) and torch.equal(second, example[0] * 3.0 + 1.0)
    third = step(example[0] * 7.0)[0]
    assert third.data_ptr() == first.data_ptr()  # the buffers of the call before last


def test_loops_merge_dimensions_and_run_the_longest_innermost():
    contiguous = [[400, 4, 2, 1], [400, 4, 2, 1]]
    assert fast_vm_program._coalesce((2, 100, 2, 2), contiguous) == ((800,), [[1], [1]])
    # a size-1 dimension goes; a broadcast operand stops the merge where it steps differently
    assert fast_vm_program._coalesce((3, 1, 4), [[4, 4, 1], [0, 0, 1]]) == ((3, 4), [[4, 1], [0, 1]])
    # batched 2x2 products: 400 rows of 2 become 8 rows of 100 (output, left, right operand)
    shape, strides = fast_vm_program._longest_inside((100, 2, 2, 2), [[4, 2, 0, 1], [4, 2, 1, 0], [4, 0, 2, 1]])
    assert shape == (2, 2, 2, 100) and strides == [[2, 0, 1, 4], [2, 1, 0, 4], [0, 2, 1, 4]]
    assert fast_vm_program._longest_inside((100, 8), [[8, 1]]) == ((100, 8), [[8, 1]])  # inner long enough


def test_merged_and_reordered_loops_match_eager():
    # The hmm leaf's shapes: batched 2x2 products, logsumexp over a middle dimension, sums whose
    # reduced dimension becomes the innermost loop, broadcasts over middle dimensions.
    def step(a, b, x, row):
        top = x.amax(1, keepdim=True)
        return (
            torch.bmm(a, b),
            (x - top).exp().sum(1).log() + top.squeeze(1),
            x.sum(1),
            x.sum((0, 2)),
            (x * row).exp(),
            x.amax(1),
            x.prod(1),
            torch.einsum("cij,cjk->cik", a, b).sum(0),
        )

    a, b = _values(100, 2, 2, special=False), _values(100, 2, 2, special=False, seed=1)
    x = _values(2, 50, 2, 2, special=False, seed=2)
    _same(step, a, b, x, _values(1, 50, 1, 2, special=False, seed=3))
    x[1, 7, 0, 1] = math.nan
    _same(step, a, b, x, _values(1, 50, 1, 2, special=False, seed=3))


def test_a_library_that_cannot_be_built_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with pytest.raises(RuntimeError, match="cannot build vm.c"):
        fast_vm.build_library()
    assert list(tmp_path.iterdir()) == []  # no partial library left behind


def test_a_library_is_built_for_each_machine(monkeypatch):
    path = fast_vm._library_path()
    monkeypatch.setattr(fast_vm, "_machine", lambda: b"another CPU")
    assert fast_vm._library_path() != path and fast_vm._library_path().parent == path.parent


def test_a_first_use_builds_in_the_background_and_the_run_goes_on(monkeypatch, tmp_path):
    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path))
    # a compiler that rejects the native flags: the portable build follows
    monkeypatch.setattr(fast_vm, "_NATIVE_FLAGS", ("-fno-such-option-anywhere",))
    monkeypatch.setattr(fast_vm, "_library", None)
    monkeypatch.setattr(fast_vm, "_build", None)
    monkeypatch.setattr(fast_vm, "_library_error", "")
    assert "being built" in fast_vm.vm_unavailable()  # at once, not after the build
    assert fast_vm.vm_unavailable(wait=True) == ""
    assert [path.name for path in tmp_path.iterdir()] == [fast_vm._library_path().name]
    example = (torch.randn(3, dtype=torch.float64),)
    assert torch.equal(vm_step(make_fx(lambda x: (x * 2.0,))(*example), example)(*example)[0], example[0] * 2.0)


def test_a_build_keeps_other_installations_libraries_and_removes_long_unused_ones(monkeypatch, tmp_path):
    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path))
    target = fast_vm._library_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    other, old = target.parent / "fast_vm-another0version.so", target.parent / "fast_vm-long0unused000.so"
    other.write_bytes(b"")
    old.write_bytes(b"")
    long_ago = time.time() - fast_vm.STALE_LIBRARY_SECONDS - 3600
    os.utime(old, (long_ago, long_ago))
    fast_vm.build_library()
    assert target.exists() and other.exists() and not old.exists()


def test_a_child_forked_mid_build_builds_and_loads_its_own_library(monkeypatch, tmp_path):
    """A forked chain process inherits the build thread's object, not the thread: it must not
    read that as a finished build and try to load a library that is not there yet."""
    monkeypatch.setenv("VILAB_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(fast_vm, "_library", None)
    monkeypatch.setattr(fast_vm, "_build", None)
    monkeypatch.setattr(fast_vm, "_library_error", "")
    assert "being built" in fast_vm.vm_unavailable()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover -- the child reports through the pipe
        os.close(read)
        os.write(write, repr(fast_vm.vm_unavailable(wait=True)).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read()
    os.waitpid(pid, 0)
    assert child == "''", child
    assert fast_vm.vm_unavailable(wait=True) == ""


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def test_nuts_on_the_virtual_machine_matches_the_closed_form_posterior(normal_normal_check):
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6])
    result = sample_vectorized_nuts(
        normal_normal, (data,), {}, num_samples=400, num_warmup=300, num_chains=4, seed=2, progress=False, compiler="vm"
    )
    assert result.backend == "vm", result.fuse_decision
    assert "leaf on the virtual machine; merge on the virtual machine" in result.fuse_decision
    normal_normal_check(result.samples["loc"], data, min_ess=300, z=4.5)


def test_the_virtual_machine_repeats_the_fx_graphs_draws_to_rounding():
    # Same seed, same trajectory: the two differ only in rounding, which takes many iterations
    # of step-size adaptation to grow; without adaptation the draws agree.
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2])
    runs = [
        sample_vectorized_nuts(
            normal_normal,
            (data,),
            {},
            num_samples=60,
            num_warmup=0,
            num_chains=3,
            seed=4,
            progress=False,
            compiler=compiler,
        )
        for compiler in ("vm", "graph")
    ]
    assert runs[0].backend == "vm" and runs[1].backend == "graph"
    torch.testing.assert_close(runs[0].samples["loc"], runs[1].samples["loc"], rtol=1e-9, atol=1e-9)
    assert _all_close((runs[0].sample_stats["n_steps"],), (runs[1].sample_stats["n_steps"],))
