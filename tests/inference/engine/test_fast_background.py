r"""Fused kernels compiled in a forked process (:mod:`vilab.inference.engine.processes.server`).

Exact checks: the kernel the compile server compiles, loaded without Inductor's loader, returns
the eager step's values (recycled or not); a traced step installs it only after it passes the
step's own checks; one server compiles batch after batch, and a busy one gets a private helper; a
failing or killed server is reported, never waited on forever; a wrapper needing names the
loader does not provide is refused. Statistical check (slow): a NUTS run that switches to
the background kernel mid-run matches the Normal-Normal closed-form posterior.
"""

import time

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from vilab.inference.engine.processes import server as fast_background
from vilab.inference.engine.backends import inductor as fast_inductor
from vilab.inference.engine.processes.server import (
    BackgroundCompile,
    BackgroundCompiles,
    background_available,
    load_artifact,
)
from vilab.inference.engine.backends.inductor import compile_artifact, fusion_unavailable
from vilab.inference.engine.policy import FusePolicy
from vilab.inference.engine.step import CompiledStep
from vilab.inference.nuts.sampler import sample_vectorized_nuts

Z = 4.5  # two-sided z for a per-test failure budget of about 1e-5

pytestmark = [
    pytest.mark.skipif(bool(fusion_unavailable()), reason=fusion_unavailable() or "available"),
    pytest.mark.skipif(not background_available(), reason="needs fork and two cores"),
]


@pytest.fixture(autouse=True)
def fresh_server(tmp_path, monkeypatch):
    """A compile server forked after the test's monkeypatches (it inherits them), and an empty
    Inductor cache: a kernel an earlier test compiled would be loaded, not compiled."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    fast_background.shutdown()
    yield
    fast_background.shutdown()


def _wait(compilation: BackgroundCompile, timeout: float = 240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        outcome = compilation.result()
        if outcome is not None:
            return outcome
        time.sleep(0.05)
    compilation.close()
    raise AssertionError("the background compilation did not finish")


def _same(got, expected) -> bool:
    return all(
        torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(got, expected)
    )


@pytest.mark.parametrize("recycle", [False, True])
def test_a_kernel_compiled_by_the_server_returns_the_eager_values(leaf_like, recycle):
    step, inputs = leaf_like
    fused, why = _wait(BackgroundCompile(make_fx(step)(*inputs), inputs, recycle=recycle))
    assert why == "" and fused is not None
    assert bool(getattr(fused, "recycled", False)) == recycle
    for _ in range(3):
        assert _same(fused(*inputs), step(*inputs))


def test_a_traced_step_installs_the_background_kernel_after_its_checks(leaf_like):
    step, inputs = leaf_like
    compiled = CompiledStep(step, inputs, num_state=0, name="leaf", recycle=True)
    assert compiled.compiled and compiled.fuse_poll() is False  # nothing started: not fused
    assert compiled.fuse_start() and compiled.fusing
    assert not compiled.fuse_start()  # one compilation at a time
    deadline = time.monotonic() + 240.0
    while (outcome := compiled.fuse_poll()) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert outcome and compiled.backend == "inductor" and compiled.recycled and not compiled.fusing
    assert _same(compiled(*inputs), step(*inputs))


def test_a_kernel_compiled_by_the_server_from_the_sent_graph_matches_sblrc_style_matrix_products():
    # A regression product with an unbound row count, as in the sblrc leaf whose pickled and
    # re-traced graph compiled into a wrong kernel: the server must compile the graph as it is.
    def step(beta, x, y):
        mean = (x * beta.unsqueeze(-2)).sum(-1)
        return (beta * 2.0, ((y - mean) ** 2).sum(-1), torch.unbind(beta, -1)[0])

    inputs = (
        torch.randn(4, 5, dtype=torch.float64),
        torch.randn(100, 5, dtype=torch.float64),
        torch.randn(100, dtype=torch.float64),
    )
    fused, why = _wait(BackgroundCompile(make_fx(step)(*inputs), inputs, recycle=True))
    assert why == ""
    for got, expected in zip(fused(*inputs), step(*inputs)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def _plus_one(x):
    return (x + 1.0,)


def test_one_batch_compiles_in_order_and_one_failure_spares_the_others(leaf_like, monkeypatch):
    step, inputs = leaf_like
    good, bad = make_fx(step)(*inputs), make_fx(_plus_one)(inputs[0])
    bad_size = len(bad.graph.nodes)
    compile_artifact_ = fast_inductor.compile_artifact

    def picky(graph, example, key):
        if len(graph.graph.nodes) == bad_size:
            raise RuntimeError("not this one")
        return compile_artifact_(graph, example, key)

    monkeypatch.setattr(fast_inductor, "compile_artifact", picky)
    batch = BackgroundCompiles([(good, inputs, False), (bad, inputs[:1], False), (good, inputs, True)])
    tickets = [batch.ticket(index) for index in range(3)]
    last, why = _wait(tickets[2])  # taken out of order: the earlier results wait for their tickets
    assert why == "" and getattr(last, "recycled", False)
    assert _wait(tickets[1]) == (None, "RuntimeError: not this one")
    first, why = _wait(tickets[0])
    assert why == "" and not getattr(first, "recycled", False)
    for fused in (first, last):
        assert _same(fused(*inputs), step(*inputs))
    assert batch._closed and batch._process.is_alive() and not batch._server.busy  # kept for the next run
    with pytest.raises(ValueError, match="index"):
        batch.ticket(0)
    with pytest.raises(ValueError, match="jobs"):
        BackgroundCompiles([])


def test_one_server_compiles_batch_after_batch_and_a_busy_one_gets_a_private_helper(leaf_like):
    step, inputs = leaf_like
    graph = make_fx(step)(*inputs)
    first = BackgroundCompile(graph, inputs)
    second = BackgroundCompile(graph, inputs)  # while the shared server is busy
    assert first._batch._shared and not second._batch._shared
    assert _wait(first)[0] is not None and _wait(second)[0] is not None
    assert not second._process.is_alive()  # a private helper stops after its batch
    third = BackgroundCompile(graph, inputs)
    assert third._batch._shared and third._process is first._process
    assert _wait(third)[0] is not None


def test_a_server_runs_until_no_graph_of_its_batch_is_wanted(leaf_like, monkeypatch):
    step, inputs = leaf_like
    monkeypatch.setattr(fast_inductor, "compile_artifact", lambda graph, example, key: time.sleep(60))
    graph = make_fx(step)(*inputs)
    batch = BackgroundCompiles([(graph, inputs, False), (graph, inputs, False)])
    first, second = batch.ticket(0), batch.ticket(1)
    first.close()
    assert batch._process.is_alive() and second.result() is None
    second.close()
    assert not batch._process.is_alive()  # stopped mid-batch: the next batch forks a new server
    assert fast_background._SHARED is None


def test_a_graph_that_cannot_be_sent_is_reported_and_the_server_stays(leaf_like):
    step, inputs = leaf_like
    unsendable = torch.fx.symbolic_trace(torch.nn.Linear(3, 2))  # a call_module node
    fused, why = _wait(BackgroundCompile(unsendable, (torch.randn(4, 3),)))
    assert fused is None and "cannot be sent" in why
    server = fast_background._SHARED
    assert server is not None and server.process.is_alive() and not server.busy
    fused, why = _wait(BackgroundCompile(make_fx(step)(*inputs), inputs))
    assert why == "" and fast_background._SHARED is server


def test_a_failing_compilation_is_reported(leaf_like, monkeypatch):
    def broken(graph, example, key):
        raise RuntimeError("no compiler today")

    monkeypatch.setattr(fast_inductor, "compile_artifact", broken)  # the forked server inherits it
    step, inputs = leaf_like
    fused, why = _wait(BackgroundCompile(make_fx(step)(*inputs), inputs))
    assert fused is None and "no compiler today" in why


def test_a_server_that_dies_is_reported_and_a_running_one_is_stopped(leaf_like, monkeypatch):
    step, inputs = leaf_like
    monkeypatch.setattr(fast_inductor, "compile_artifact", lambda graph, example, key: time.sleep(60))
    slow = BackgroundCompile(make_fx(step)(*inputs), inputs)
    assert slow.result() is None
    process = slow._process
    slow.close()
    assert not process.is_alive()
    fast_background.shutdown()
    monkeypatch.setattr(fast_inductor, "compile_artifact", lambda graph, example, key: __import__("os")._exit(3))
    fused, why = _wait(BackgroundCompile(make_fx(step)(*inputs), inputs))
    assert fused is None and "exit code" in why


def test_the_loader_refuses_a_wrapper_that_needs_unknown_names(leaf_like, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    step, inputs = leaf_like
    artifact = compile_artifact(make_fx(step)(*inputs), inputs)
    assert artifact["kernels"] and all(path.endswith(".so") for path in artifact["kernels"].values())
    assert _same(load_artifact(artifact, inputs)(*inputs), step(*inputs))
    source = open(artifact["source"]).read()
    tampered = tmp_path / "wrapper.py"
    tampered.write_text(source.replace("args.clear()", "args.clear()\n        some_helper(args)"))
    with pytest.raises(RuntimeError, match="some_helper"):
        load_artifact({**artifact, "source": str(tampered)}, inputs)
    tampered.write_text(source.replace("args.clear()", "args.clear()\n        extern_kernels.fancy_mm(args)"))
    with pytest.raises(RuntimeError, match="fancy_mm"):
        load_artifact({**artifact, "source": str(tampered)}, inputs)


def test_background_availability_needs_two_cores_and_no_cuda(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0})
    assert not background_available()
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: {0, 1})
    assert background_available()
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    assert not background_available()


def _normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


@pytest.mark.slow
def test_nuts_switches_to_the_background_kernel_mid_run_and_matches_the_closed_form(monkeypatch, normal_normal_check):
    # Free compilation and a quick decision: the leaf starts compiling after ~0.05 s.
    for name in ("SECONDS_PER_GRAPH", "SECONDS_PER_OP", "SETUP_SECONDS", "CACHED_SECONDS"):
        monkeypatch.setattr(fast_inductor, name, 0.0)
    monkeypatch.setattr(FusePolicy, "check_after_background", 0.05)
    data = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6], dtype=torch.float64)
    # A cold compile (the fixture empties the cache) takes seconds: the run must outlast it.
    result = sample_vectorized_nuts(
        _normal_normal, (data,), {}, num_samples=30000, num_warmup=1000, num_chains=4, seed=3, progress=False, workers=1
    )  # compiles beside this process
    assert "leaf fused in the background" in result.fuse_decision
    assert "leaf fused at iteration" in result.fuse_decision, result.fuse_decision
    assert result.backend == "inductor"
    normal_normal_check(result.samples["loc"], data, min_ess=1000, z=Z)
