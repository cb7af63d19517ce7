"""Write the zoo's reference posteriors: long NUTS runs of each model's NumPyro twin.

Usage::

    python benchmarks/zoo_references.py                 # every zoo model without a closed form
    python benchmarks/zoo_references.py gp_numpyro bnn  # some of them

For each model: 4 chains x (1000 warm-up + 2500 draws) of NumPyro's NUTS (target accept 0.9)
on the twin in ``benchmarks/zoo_twins.py``, in float64. The file
``tests/data/zoo/<name>.json.gz`` keeps, per statistic the tests check, the mean, sd, bulk ESS
and R-hat, and 1000 thinned draws of the model's latent sites (for ``vilab.compare``). A run whose
statistics miss R-hat < 1.01 or ESS > 1000 is reported and written with ``"checks_passed": false``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(ROOT, "tests", "models"))
sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402
import numpyro  # noqa: E402
from numpyro.diagnostics import effective_sample_size, split_gelman_rubin  # noqa: E402
from numpyro.infer import MCMC, NUTS, init_to_value  # noqa: E402

from zoo import REFERENCE_DIR, ZOO  # noqa: E402
from zoo.modes import fold_weights  # noqa: E402
from zoo_twins import TWINS  # noqa: E402

__all__ = ["reference_run", "main"]

NUM_CHAINS, NUM_WARMUP, NUM_SAMPLES, NUM_STORED = 4, 1000, 2500, 1000


def _to_jax(value):
    if isinstance(value, np.ndarray):
        return jax.numpy.asarray(value)
    return value


def reference_run(entry, seed: int = 0, num_samples: int = NUM_SAMPLES, target_accept: float = 0.9) -> dict:
    """Run the twin and summarise it; returns the JSON-ready record."""
    data = entry.data()
    model, kwargs = TWINS[entry.name](data)
    fold = entry.options.get("fold")
    init = dict(init_strategy=init_to_value(values=fold["init_values"])) if fold else {}
    mcmc = MCMC(
        NUTS(model, target_accept_prob=target_accept, **init),
        num_warmup=NUM_WARMUP,
        num_samples=num_samples,
        num_chains=NUM_CHAINS,
        chain_method="sequential",
        progress_bar=False,
    )
    start = time.perf_counter()
    mcmc.run(jax.random.PRNGKey(seed), **{k: _to_jax(v) for k, v in kwargs.items()})
    seconds = time.perf_counter() - start
    grouped = {k: np.asarray(v, dtype=float) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    flat = {k: v.reshape((-1,) + v.shape[2:]) for k, v in grouped.items()}
    weights, folded = None, {}
    if fold:  # chains all in one of non-equivalent modes: weights stand the draws for the whole
        weights, in_mode, mode_mass = fold_weights(fold, flat, data)
        folded = {"in_mode": in_mode, "mode_mass": mode_mass}
    summary = {}
    for name, values in entry.stats(flat).items():
        chains = values.reshape(NUM_CHAINS, num_samples)
        if np.std(chains) == 0:
            continue  # a constant (e.g. the zero above a Cholesky factor's diagonal)
        summary[name] = _weighted_summary(values, chains, weights)
    keep = np.linspace(0, NUM_CHAINS * num_samples - 1, NUM_STORED).astype(int)
    draws = {site: np.round(flat[site][keep], 8).tolist() for site in entry.sites if site in flat}
    divergences = int(np.asarray(mcmc.get_extra_fields()["diverging"]).sum())
    passed = all(s["rhat"] < 1.01 and s["ess"] > 1000 for s in summary.values()) and divergences == 0
    passed = passed and folded.get("in_mode", 1.0) == 1.0
    return {
        **folded,
        "name": entry.name,
        "summary": summary,
        "draws": draws,
        "checks_passed": passed,
        "divergences": divergences,
        "seconds": seconds,
        "sampler": f"NumPyro {numpyro.__version__} NUTS, {NUM_CHAINS} x ({NUM_WARMUP} + {num_samples}), "
        f"target_accept {target_accept}, float64",
    }


def _weighted_summary(values, chains, weights):
    """Mean, sd, bulk ESS and R-hat of one statistic; with ``weights``, the weighted mean and sd,
    and the chains' ESS scaled by Kish's efficiency of the weights."""
    ess, rhat = float(effective_sample_size(chains)), float(split_gelman_rubin(chains))
    if weights is None:
        return {"mean": float(values.mean()), "sd": float(values.std(ddof=1)), "ess": ess, "rhat": rhat}
    mean = float(np.sum(weights * values))
    sd = float(np.sqrt(np.sum(weights * (values - mean) ** 2) * len(values) / (len(values) - 1)))
    kish = 1.0 / np.sum(weights**2) / len(values)
    return {"mean": mean, "sd": sd, "ess": ess * kish, "rhat": rhat}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo models (default: all with a NumPyro twin)")
    parser.add_argument("--num-samples", type=int, default=NUM_SAMPLES, help="draws per chain")
    parser.add_argument("--target-accept", type=float, default=0.9)
    args = parser.parse_args(argv)
    numpyro.enable_x64()
    numpyro.set_host_device_count(1)
    entries = [e for e in ZOO if e.name in TWINS and (not args.names or e.name in args.names)]
    os.makedirs(REFERENCE_DIR, exist_ok=True)
    for entry in entries:
        record = reference_run(entry, num_samples=args.num_samples, target_accept=args.target_accept)
        worst_rhat = max(s["rhat"] for s in record["summary"].values())
        min_ess = min(s["ess"] for s in record["summary"].values())
        print(
            f"{entry.name}: {record['seconds']:.0f} s, max R-hat {worst_rhat:.4f}, min ESS {min_ess:.0f}, "
            f"divergences {record['divergences']}, checks {'passed' if record['checks_passed'] else 'FAILED'}",
            flush=True,
        )
        with gzip.open(os.path.join(REFERENCE_DIR, f"{entry.name}.json.gz"), "wt") as handle:
            json.dump(record, handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
