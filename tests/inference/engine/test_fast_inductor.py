r"""Fused kernels (``compiler="inductor"``) for the NUTS leaf and merge.

Exact checks: a fused graph returns the eager values (NaN, inf and graph constants included) as
fresh tensors; a fused step keeps its state semantics. Statistical check: NUTS with fused leaves
matches the Normal-Normal closed-form posterior. Policy checks run on a fake clock.
"""

import os
import shutil

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.backends import inductor as fast_inductor
from vilab.inference.engine import policy as fast_policy
from vilab.inference.engine.backends.inductor import compile_fused, fusion_unavailable
from vilab.inference.engine.policy import FusePolicy
from vilab.inference.engine.step import CompiledStep, _all_close
from vilab.inference.nuts.sampler import sample_vectorized_nuts
from vilab.models.posteriordb.regression import blr

pytestmark = pytest.mark.skipif(bool(fusion_unavailable()), reason=fusion_unavailable() or "available")

Z = 4.5


def test_fused_graph_returns_the_eager_values_as_fresh_tensors(leaf_like):
    _step, inputs = leaf_like
    fused = compile_fused(make_fx(_step)(*inputs), inputs)
    got, expected = fused(*inputs), _step(*inputs)
    assert isinstance(got, tuple) and len(got) == len(expected)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True)
        assert all(a.data_ptr() != tensor.data_ptr() for tensor in inputs)
    again = fused(*inputs)
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(got, again))


def _hmm_like(logits, x, weights):
    # An HMM's 2x2 log-matrix products, a stick-breaking cumprod and an ordered vector's cumsum,
    # as in the HMM example's leaf; and a regression's product, large enough for BLAS.
    pairs = (logits.exp() @ logits.exp()).log()
    sticks = torch.cumprod(1.0 - torch.sigmoid(logits[..., 0]), -1)
    ordered = torch.cumsum(logits[..., 1].exp(), -1)
    return pairs, sticks, ordered, x @ weights


def test_small_matrix_products_and_scans_are_fused_and_large_products_call_blas():
    inputs = (
        torch.randn(4, 6, 2, 2, dtype=torch.float64),
        torch.randn(100, 5, dtype=torch.float64),
        torch.randn(5, 4, dtype=torch.float64),
    )
    source = open(fast_inductor.compile_artifact(make_fx(_hmm_like)(*inputs), inputs)["source"]).read()
    code = [line for line in source[source.index("def call(") :].splitlines() if not line.strip().startswith("#")]
    calls = "\n".join(code)
    assert "extern_kernels.bmm" not in calls and "aten.cumprod" not in calls and "aten.cumsum" not in calls
    assert "extern_kernels.mm(" in calls
    fused = compile_fused(make_fx(_hmm_like)(*inputs), inputs)
    for got, expected in zip(fused(*inputs), _hmm_like(*inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_fused_compiled_step_feeds_its_state_back_like_the_eager_step():
    def step(total, count, x):
        return total + x.sin(), count + 1, (total * x).sum()

    example = (
        torch.zeros(3, dtype=torch.float64),
        torch.zeros((), dtype=torch.long),
        torch.linspace(0.1, 1.0, 3, dtype=torch.float64),
    )
    compiled = CompiledStep(step, example, num_state=2)
    assert compiled.compiled and compiled.backend == "graph"
    assert compiled.fuse(), compiled.fuse_failure
    assert compiled.backend == "inductor"
    fused_state, eager_state = example[:2], example[:2]
    for _ in range(5):
        *fused_state, fused_out = compiled(*fused_state, example[2])
        *eager_state, eager_out = step(*eager_state, example[2])
    torch.testing.assert_close(fused_state[0], eager_state[0], rtol=1e-12, atol=1e-12)
    assert int(fused_state[1]) == 5
    torch.testing.assert_close(fused_out, eager_out, rtol=1e-12, atol=1e-12)


def test_a_step_that_was_not_traced_is_not_fused_and_says_why():
    step = CompiledStep(lambda x: (x + 1,), (torch.zeros(2),), compile=False)
    assert not step.fuse() and "not traced" in step.fuse_failure and step.backend == "eager"


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def test_nuts_with_fused_leaves_matches_the_closed_form_posterior(normal_normal_check):
    torch.set_default_dtype(torch.float64)
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6])
    result = sample_vectorized_nuts(
        normal_normal,
        (data,),
        {},
        num_samples=400,
        num_warmup=300,
        num_chains=4,
        seed=2,
        progress=False,
        compiler="inductor",
        workers=1,
    )
    assert result.backend == "inductor" and result.fuse_decision == "compiler='inductor'"
    normal_normal_check(result.samples["loc"], data, min_ess=300, z=Z)
    assert result.sample_stats["n_steps"].min() >= 1


def test_float32_rounding_of_a_reordered_gradient_passes_the_check_and_a_wrong_value_does_not():
    # A Normal likelihood's score for its location, sum(y - mu), and its log density: each
    # computed in two orders, as an eager step and a fused kernel may. The score cancels 2000
    # terms of size 5 to a result of size 30-60: rounding leaves errors of 3e-5 to 3e-4 there.
    y = 5.0 + torch.randn(4, 2000, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    mu = torch.full((4, 1), 5.0, dtype=torch.float32)
    eager = torch.stack([(y - mu).sum(-1), -0.5 * ((y - mu) ** 2).sum(-1)], -1)
    fused = torch.stack([y.sum(-1) - 2000 * mu[:, 0], -0.5 * ((y - mu) ** 2).flip(-1).cumsum(-1)[:, -1]], -1)
    assert not torch.equal(eager, fused) and _all_close((fused,), (eager,))
    wrong = fused.clone()
    wrong[2, 0] += 1e-2 * eager.abs().max()
    assert not _all_close((wrong,), (eager,))
    # float64 keeps rtol=1e-6: the same relative errors are rejected there.
    assert not _all_close((fused.double(),), (eager.double(),))


@pytest.mark.float32
def test_a_float32_model_runs_on_fused_kernels():
    # Its leaf sums 3000 terms in float32: the fused kernel rounds differently from the eager step.
    generator = torch.Generator().manual_seed(3)
    x = 5.0 + torch.randn(3000, 4, generator=generator)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 3.0]) + 0.3 * torch.randn(3000, generator=generator)
    result = sample_vectorized_nuts(
        blr, (x, y), {}, num_samples=50, num_warmup=50, num_chains=2, seed=0, progress=False, compiler="inductor"
    )
    assert result.backend == "inductor", result.fuse_decision
    assert result.samples["beta"].dtype == torch.float32


def test_short_runs_are_not_fused_under_auto():
    data = torch.tensor([0.3, 1.9, 1.1])
    result = sample_vectorized_nuts(
        normal_normal, (data,), {}, num_samples=30, num_warmup=30, num_chains=2, seed=0, progress=False
    )
    assert result.backend in ("vm", "graph")
    assert "fused at" not in result.fuse_decision and not result.fuse_decision.startswith(";")


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = _Clock()
    monkeypatch.setattr(fast_policy.time, "perf_counter", fake)
    return fake


class _Step:
    def __init__(self, name, num_ops, seconds_per_call, cached=False, recycle=False):
        self.name, self.num_ops, self.seconds, self.cached = name, num_ops, seconds_per_call, cached
        self.recycle = recycle

    def call_time(self):
        return self.seconds

    def compile_seconds(self):
        if self.cached:
            return fast_inductor.CACHED_SECONDS
        return fast_inductor.SECONDS_PER_GRAPH + fast_inductor.SECONDS_PER_OP * self.num_ops


def _decide(policy, clock, steps, calls_per_iteration, iterations=100, seconds=1.5):
    """Run the policy over ``iterations`` timed iterations taking ``seconds`` in all."""
    clock.now = 0.0
    assert policy.choose(0, [(step, 0) for step in steps]) == []  # the first iteration traces
    assert policy.choose(1, [(step, rate) for step, rate in zip(steps, calls_per_iteration)]) == []
    clock.now = seconds
    done = 1 + iterations
    return policy.choose(done, [(step, rate * done) for step, rate in zip(steps, calls_per_iteration)])


def test_auto_policy_fuses_a_step_only_when_its_remaining_calls_pay_for_its_compilation(clock):
    leaf, merge = _Step("leaf", 140, 200e-6), _Step("merge", 60, 80e-6)
    # 60 leaves and 6 merges per iteration, 1900 iterations left: the leaf saves ~15 s, the
    # merge ~0.6 s against ~2.2 s of compilation.
    policy = FusePolicy("auto", 2001, background=False)
    assert _decide(policy, clock, [leaf, merge], [60, 6]) == [leaf]
    assert "leaf fused" in policy.reason and "merge not fused" in policy.reason
    assert policy.decided and policy.choose(500, [(leaf, 10**6), (merge, 10**5)]) == []
    short = FusePolicy("auto", 150, background=False)
    assert _decide(short, clock, [leaf, merge], [60, 6]) == []


def test_auto_policy_counts_a_cached_graph_at_a_cache_hits_cost(clock):
    # ~2 s of saving: not worth a cold compilation of 140 ops (3.4 s), worth a cache hit (1 s).
    cold, cached = _Step("leaf", 140, 100e-6), _Step("leaf", 140, 100e-6, cached=True)
    fast_inductor._setup_done, setup = True, fast_inductor._setup_done
    try:
        assert _decide(FusePolicy("auto", 600, background=False), clock, [cold], [60]) == []
        assert _decide(FusePolicy("auto", 600, background=False), clock, [cached], [60]) == [cached]
    finally:
        fast_inductor._setup_done = setup


def test_auto_policy_expects_more_from_a_step_that_reuses_its_buffers(clock):
    # 60 calls of 50 µs per iteration, 1900 iterations left: a saving of 3.8 s at
    # EXPECTED_SPEEDUP, 5.0 s at RECYCLED_SPEEDUP, against 1.25 x 3.4 s of cold compilation.
    plain, recycled = _Step("leaf", 140, 50e-6), _Step("leaf", 140, 50e-6, recycle=True)
    fast_inductor._setup_done, setup = True, fast_inductor._setup_done
    try:
        assert _decide(FusePolicy("auto", 2001, background=False), clock, [plain], [60]) == []
        assert _decide(FusePolicy("auto", 2001, background=False), clock, [recycled], [60]) == [recycled]
    finally:
        fast_inductor._setup_done = setup


def test_background_policy_fuses_what_pays_once_its_kernel_is_ready(clock):
    # 0.015 s per iteration, 1900 iterations left (28.5 s). The leaf's kernel is ready after
    # ~5.1 s (Inductor's setup included) and saves ~10 s after that. A merge called 6 times per
    # iteration waits for the leaf, then compiles in ~3.9 s and saves ~0.4 s, more than a
    # tenth of its compile time; called once per iteration it saves ~0.07 s and is not fused.
    leaf, merge = _Step("leaf", 140, 200e-6), _Step("merge", 60, 80e-6)
    policy = FusePolicy("auto", 2001, background=True)
    assert _decide(policy, clock, [leaf, merge], [60, 6]) == [leaf, merge]
    assert "leaf fused in the background" in policy.reason and "merge fused in the background" in policy.reason
    rare = FusePolicy("auto", 2001, background=True)
    assert _decide(rare, clock, [leaf, merge], [60, 1]) == [leaf]
    assert "merge not fused" in rare.reason
    # A run that ends about when the kernel would be ready compiles nothing.
    assert _decide(FusePolicy("auto", 420, background=True), clock, [leaf], [60]) == []
    # The decision comes after 0.2 s of timed iterations instead of 0.5 s.
    early = FusePolicy("auto", 2001, background=True)
    assert _decide(early, clock, [leaf], [60], iterations=10, seconds=0.25) == [leaf]


def test_an_early_policy_sends_every_traced_step_after_the_first_iteration(clock):
    leaf, merge = _Step("leaf", 140, 200e-6), _Step("merge", 60, 80e-6)
    early = FusePolicy("auto", 2001, background=True, early=True)
    assert early.choose(0, []) == []  # the first iteration traces
    assert early.choose(1, [(leaf, 60), (merge, 1)]) == [leaf, merge]  # no timing, no estimate
    assert early.decided and "sent when traced" in early.reason
    # Without a compile server the compilation would block the run: timed as before.
    blocking = FusePolicy("auto", 2001, background=False, early=True)
    assert blocking.choose(1, [(leaf, 60)]) == [] and not blocking.decided


def test_a_compiled_graph_is_known_to_be_cached_and_a_changed_one_is_not(tmp_path, monkeypatch, leaf_like):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _step, inputs = leaf_like
    graph = make_fx(_step)(*inputs)
    assert not fast_inductor.is_cached(graph, inputs)
    compile_fused(make_fx(_step)(*inputs), inputs)
    assert fast_inductor.is_cached(graph, inputs)
    other = (inputs[0][:1], inputs[1][:1], inputs[2][:1])
    assert not fast_inductor.is_cached(make_fx(_step)(*other), other)


def _no_compiling(*args, **kwargs):
    raise AssertionError("compiled although the kernel is in the cache")


def _distinct(step, scale):
    """``step`` with one more output: a graph no other test compiled in this process (Inductor
    reuses a kernel compiled earlier in the process, whose files lie in that test's cache)."""
    return lambda *args: (*step(*args), args[0] * scale)


def test_a_compiled_kernel_loads_from_the_cache_without_inductor(tmp_path, monkeypatch, leaf_like):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    _step, inputs = leaf_like
    _step = _distinct(_step, 1.5)
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is None
    compile_fused(make_fx(_step)(*inputs), inputs)
    monkeypatch.setattr(fast_inductor, "_inductor_compile", _no_compiling)
    loaded = fast_inductor.load_cached(make_fx(_step)(*inputs), inputs)
    for a, b in zip(loaded(*inputs), _step(*inputs)):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True)
    other = (inputs[0][:1], inputs[1][:1], inputs[2][:1])
    assert fast_inductor.load_cached(make_fx(_step)(*other), other) is None
    marker = tmp_path / "vilab_fused" / fast_inductor.graph_key(make_fx(_step)(*inputs), inputs)
    marker.write_bytes(b"not an artifact")
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is None


def test_a_cached_kernel_whose_files_are_not_private_is_not_loaded(tmp_path, monkeypatch, leaf_like):
    # The marker names the code that loading runs: a source others can write, or one outside
    # the private directory (a shared temp dir, another user's), must not be run.
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    _step, inputs = leaf_like
    _step = _distinct(_step, 2.5)
    compile_fused(make_fx(_step)(*inputs), inputs)
    marker = cache / "vilab_fused" / fast_inductor.graph_key(make_fx(_step)(*inputs), inputs)
    artifact = torch.load(marker, weights_only=True)
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is not None
    source = artifact["source"]
    mode = os.stat(source).st_mode
    os.chmod(source, mode | 0o022)
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is None
    os.chmod(source, mode)
    outside = tmp_path / "elsewhere.py"
    shutil.copy(source, outside)
    torch.save({**artifact, "source": str(outside)}, marker)
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is None
    (cache / "link.py").symlink_to(outside)
    torch.save({**artifact, "source": str(cache / "link.py")}, marker)
    assert fast_inductor.load_cached(make_fx(_step)(*inputs), inputs) is None


def test_a_step_fused_before_is_fused_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))

    def step(total, x):
        return total + x.sin(), (total * x).sum()

    example = (torch.zeros(3, dtype=torch.float64), torch.linspace(0.1, 1.0, 3, dtype=torch.float64))
    first = CompiledStep(step, example, num_state=1)
    assert first.fuse() and not first.fused_from_cache
    monkeypatch.setattr(fast_inductor, "_inductor_compile", _no_compiling)
    again = CompiledStep(step, example, num_state=1)
    assert again.fuse() and again.fused_from_cache and again.backend == "inductor"
    for a, b in zip(again(*example), step(*example)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    background = CompiledStep(step, example, num_state=1)
    assert not background.fuse_start() and background.fused_from_cache  # nothing left to compile


def test_auto_policy_waits_for_half_a_second_of_timed_iterations(clock):
    policy = FusePolicy("auto", 10**6, background=False)
    step = _Step("leaf", 100, 1e-3)
    assert _decide(policy, clock, [step], [100], iterations=10, seconds=0.3) == []
    assert not policy.decided
    clock.now = 0.6
    assert policy.choose(20, [(step, 2000)]) == [step]


def test_explicit_policies_and_bad_compiler(clock):
    assert FusePolicy("inductor", 10).choose(0, []) is None
    never = FusePolicy("graph", 10**6)
    assert never.decided and never.choose(5, [(_Step("leaf", 1, 1.0), 10**6)]) == []
    with pytest.raises(ValueError, match="compiler"):
        FusePolicy("xla", 10)
    with pytest.raises(ValueError, match="compiler.*'xla'"):
        sample_vectorized_nuts(
            normal_normal,
            (torch.zeros(2),),
            {},
            num_samples=5,
            num_warmup=5,
            num_chains=1,
            progress=False,
            compiler="xla",
        )


def test_auto_policy_without_a_compiler_says_so(clock, monkeypatch):
    monkeypatch.setattr(fast_inductor.shutil, "which", lambda name: None)
    policy = FusePolicy("auto", 10**6)
    assert _decide(policy, clock, [_Step("leaf", 100, 1e-3)], [100]) == []
    assert "g++" in policy.reason


@pytest.mark.parametrize("guide_name", ["meanfield", "iaf"])
def test_fused_svi_steps_follow_the_traced_steps(guide_name):
    """Same seed, same noise stream: the fused step takes the traced step's trajectory."""
    from vilab.inference import fit_svi
    from vilab.models import conjugate

    x = conjugate.default_normal_data()
    runs = {
        compiler: fit_svi(
            conjugate.normal_normal,
            guide_name,
            20,
            x,
            num_steps=300,
            lr=0.05,
            early_stop=False,
            progress=False,
            seed=3,
            compiler=compiler,
        )
        for compiler in ("graph", "inductor")
    }
    assert runs["inductor"].config["fused"] and not runs["graph"].config["fused"]
    # Compiled now, or loaded from an earlier run's cache entry: the same kernel either way.
    assert runs["inductor"].config["fuse_decision"] in (
        "compiler='inductor'",
        "compiler='inductor'; loaded from the kernel cache at step 0",
    )
    torch.testing.assert_close(
        torch.tensor(runs["inductor"].losses), torch.tensor(runs["graph"].losses), rtol=1e-7, atol=1e-7
    )


def test_fit_svi_names_a_bad_compiler():
    from vilab.inference import fit_svi
    from vilab.models import conjugate

    with pytest.raises(ValueError, match="compiler.*'fast'"):
        fit_svi(
            conjugate.normal_normal,
            "meanfield",
            20,
            conjugate.default_normal_data(),
            num_steps=5,
            progress=False,
            compiler="fast",
        )


def test_a_graph_with_an_expanded_constant_has_a_key():
    graph = make_fx(lambda x: (x * 2.0,))(torch.ones(1))
    graph.register_buffer("_expanded", torch.zeros((), dtype=torch.float64).expand(1))
    graph.graph.get_attr("_expanded")
    graph.recompile()
    assert len(fast_inductor.graph_key(graph, (torch.ones(1),))) == 64


def test_the_former_torchscript_compiler_runs_the_fx_graph_with_a_warning():
    data = torch.tensor([0.3, 1.9, 1.1])
    with pytest.warns(FutureWarning, match="compiler='graph'"):
        result = sample_vectorized_nuts(
            normal_normal,
            (data,),
            {},
            num_samples=5,
            num_warmup=5,
            num_chains=2,
            seed=0,
            progress=False,
            compiler="torchscript",
        )
    assert result.backend == "graph" and "compiler='graph'" in result.fuse_decision
