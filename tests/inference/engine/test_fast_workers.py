"""Chains split over processes (:mod:`vilab.inference.engine.processes.workers`).

Exact checks: each batch of a split run is the unsplit run of its chains and seed, in batch
order; ``init_values`` and seeds reach the right batch; a batch's errors come back as the same
kind. Statistical check: a split run matches the Normal-Normal closed-form posterior (z = 4.5).
"""

import gc
import os
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch

from vilab.inference.engine.processes import workers as fast_workers
from vilab.inference.engine.processes.chains import ChainError, cannot_fork
from vilab.inference.nuts.sampler import sample_vectorized_nuts
from vilab.inference.engine.processes.workers import (
    ThrottledReport,
    batch_seed,
    batch_sizes,
    frozen_heap,
    resolve_workers,
    run_batches,
)
from vilab.inference.engine.potential import VectorizationError

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
DATA = torch.tensor([0.3, 1.9, 1.1, 0.4, 2.2, 1.0, 0.7, 1.6], dtype=torch.float64)


def normal_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 2.0))
    with pyro.plate("data", data.shape[0]):
        pyro.sample("obs", dist.Normal(loc, 1.0), obs=data)


def test_batches_are_even_and_cover_every_chain():
    assert batch_sizes(4, 2) == [2, 2] and batch_sizes(5, 2) == [3, 2] and batch_sizes(7, 3) == [3, 2, 2]
    assert batch_sizes(3, 3) == [1, 1, 1] and batch_sizes(6, 1) == [6]


def test_the_first_batch_keeps_the_seed_and_no_batch_repeats_another_runs():
    assert batch_seed(7, 0) == 7
    seeds = {batch_seed(seed, index) for seed in range(50) for index in range(4)}
    assert len(seeds) == 200 and all(0 <= seed < 2**63 for seed in seeds)


# Where this process may not fork (torch 2.14, a daemonic process...), chains are not split.
requires_fork = pytest.mark.skipif(bool(cannot_fork()), reason=f"needs forked workers: {cannot_fork()}")


@pytest.mark.parametrize(
    "workers, message",
    [
        (0, "positive integer"),
        (-1, "positive integer"),
        (1.5, "positive"),
        (True, "positive"),
        ("2", "positive"),
        (5, "at most num_chains=4"),
    ],
)
def test_bad_workers_are_refused_naming_the_argument(workers, message):
    with pytest.raises(ValueError, match=f"workers: .*{message}"):
        resolve_workers(workers, 4)
    with pytest.raises(ValueError, match="workers: "):
        sample_vectorized_nuts(
            normal_normal, (DATA,), {}, num_samples=5, num_warmup=5, num_chains=4, progress=False, workers=workers
        )


@requires_fork
def test_default_workers_is_one_per_core_at_most_one_per_chain(monkeypatch):
    monkeypatch.setattr(fast_workers, "cores", lambda: 2)
    assert resolve_workers(None, 4) == 2 and resolve_workers(None, 1) == 1
    monkeypatch.setattr(fast_workers, "cores", lambda: 16)
    assert resolve_workers(None, 4) == 4
    monkeypatch.setattr(fast_workers, "cores", lambda: 1)
    assert resolve_workers(None, 4) == 1


@requires_fork
def test_each_batch_is_the_unsplit_run_of_its_chains_and_seed():
    torch.set_default_dtype(torch.float64)
    options = dict(num_samples=40, num_warmup=30, seed=11, progress=False, compiler="vm")
    split = sample_vectorized_nuts(normal_normal, (DATA,), {}, num_chains=3, workers=2, **options)
    first = sample_vectorized_nuts(normal_normal, (DATA,), {}, num_chains=2, workers=1, **options)
    second = sample_vectorized_nuts(
        normal_normal, (DATA,), {}, num_chains=1, workers=1, **{**options, "seed": batch_seed(11, 1)}
    )
    assert split.samples["loc"].shape == (3, 40)
    for key in ("samples", "sample_stats"):
        for name, value in getattr(split, key).items():
            expected = torch.cat([getattr(first, key)[name], getattr(second, key)[name]])
            assert torch.equal(value, expected), (key, name)
    assert torch.equal(split.inverse_mass_matrix, torch.cat([first.inverse_mass_matrix, second.inverse_mass_matrix]))
    assert split.fuse_decision.startswith("chains split over 2 processes (2 + 1); compiler='vm'")
    assert split.backend == "vm" and split.compiled and split.sampling_time > 0 and split.warmup_time > 0


@requires_fork
def test_a_split_run_matches_the_closed_form_posterior(normal_normal_check):
    torch.set_default_dtype(torch.float64)
    result = sample_vectorized_nuts(
        normal_normal, (DATA,), {}, num_samples=400, num_warmup=300, num_chains=4, seed=5, progress=False, workers=2
    )
    assert "chains split over 2 processes (2 + 2); not fused: the batches use every core" in result.fuse_decision
    normal_normal_check(result.samples["loc"], DATA, min_ess=300)


def _echo(*, num_chains, seed, report, init_values, **options):
    report.update(3)
    report.close()
    if options.get("fail") == "value":
        raise ValueError("init_values: not finite")
    if options.get("fail") == "vectorization":
        raise VectorizationError("a matrix product over the chains")
    if options.get("fail") == "other":
        raise RuntimeError("something else")
    return num_chains, seed, init_values


def test_batches_get_their_chains_seed_and_init_values_in_order():
    init = {"loc": torch.arange(5.0).unsqueeze(-1)}
    results = run_batches(_echo, [3, 2], 9, {"init_values": init}, total=6, progress=False)
    assert [(chains, seed) for chains, seed, _ in results] == [(3, 9), (2, batch_seed(9, 1))]
    assert torch.equal(results[0][2]["loc"], init["loc"][:3]) and torch.equal(results[1][2]["loc"], init["loc"][3:])


@requires_fork
@pytest.mark.parametrize(
    "fail, kind, message",
    [
        ("value", ValueError, "init_values: not finite"),
        ("vectorization", VectorizationError, "matrix product"),
        ("other", ChainError, "RuntimeError: something else"),
    ],
)
def test_a_batch_error_comes_back_as_its_kind(fail, kind, message):
    with pytest.raises(kind, match=message):
        run_batches(_echo, [1, 1], 0, {"init_values": None, "fail": fail}, total=2, progress=False)


def test_progress_is_sent_in_bursts_and_all_of_it_arrives():
    sent = []
    report = ThrottledReport(sent.append, interval=3600.0)
    for _ in range(100):
        report.update(1)
    assert sent == []
    report.close()
    assert sent == [100]
    eager = ThrottledReport(sent.append, interval=0.0)
    eager.update(2)
    eager.update(5)
    eager.close()
    assert sent == [100, 2, 5]


def test_frozen_heap_thaws_on_exit_and_leaves_a_callers_freeze_alone():
    assert gc.get_freeze_count() == 0
    with frozen_heap():
        assert gc.get_freeze_count() > 0
    assert gc.get_freeze_count() == 0
    gc.freeze()
    try:
        count = gc.get_freeze_count()
        with frozen_heap():
            pass
        assert gc.get_freeze_count() == count
    finally:
        gc.unfreeze()


def _run_in_pool(workers):
    """A vectorized run inside a worker of ``multiprocessing.Pool`` (a daemonic process)."""
    try:
        result = sample_vectorized_nuts(
            normal_normal, (DATA,), {}, num_samples=10, num_warmup=10, num_chains=2, progress=False, workers=workers
        )
    except ValueError as error:
        return str(error)
    return result.samples["loc"].shape


@requires_fork
def test_a_pool_worker_keeps_its_chains_in_its_own_process():
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(1) as pool:
        assert pool.apply(_run_in_pool, (None,)) == (2, 10)
        assert "daemonic process" in pool.apply(_run_in_pool, (2,))


def _warning_batch(num_chains, seed, report, **options):
    warnings.warn("this batch ran its leaf eagerly", RuntimeWarning)
    return num_chains


@pytest.mark.skipif(bool(cannot_fork()), reason=cannot_fork() or "forks")
def test_a_warning_in_a_batch_process_reaches_the_caller_once():
    # Before, a batch's warnings died with its process: a leaf that fell back to eager PyTorch
    # (several times slower) said so only where the chains were not split.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run_batches(_warning_batch, [2, 2], 0, {}, total=0, progress=False) == [2, 2]
    assert [str(w.message) for w in caught].count("this batch ran its leaf eagerly") == 1
