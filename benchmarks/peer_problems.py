"""The problems of ``benchmarks/nuts_peers.py``: each posterior with its Pyro model, its peers'
ports (NumPyro, PyMC for nutpie) and its reference.

Two families, both found by iterating registries (a model added there is picked up here):

- ``posteriordb/<name>``: every posterior with a Pyro port (``vilab.posteriordb``) in the
  posteriordb folder (``$VILAB_POSTERIORDB`` or ``../shared/posteriordb``) and in the compact copies
  under ``tests/data/posteriordb``; the reference is posteriordb's (Stan, 10 x 1000 draws), the
  NumPyro ports are in ``numpyro_models.py`` and ``numpyro_ported.py``.
- ``zoo/<name>``: every model of the zoo (``tests/models/zoo``, written as its source writes it)
  that has a reference (closed form or stored NUTS run) and NUTS can be right on; NumPyro twins
  from ``zoo_twins.py``.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "models"))
sys.path.insert(0, str(ROOT / "benchmarks"))

__all__ = ["Problem", "problems", "select", "peer_ports", "ALIASES"]

COMPACT_POSTERIORDB = ROOT / "tests" / "data" / "posteriordb"
ALIASES = {
    "eight_schools": "posteriordb/eight_schools-eight_schools_noncentered",
    "kidiq": "posteriordb/kidiq-kidscore_momiq",
    "diamonds": "posteriordb/diamonds-diamonds",
    "gp_pois_regr": "posteriordb/gp_pois_regr-gp_pois_regr",
    "hmm_example": "posteriordb/hmm_example-hmm_example",
}
"""Short names accepted by ``--models``."""


@dataclass(frozen=True)
class Problem:
    """One posterior of the benchmark.

    Attributes:
        name: ``posteriordb/<name>`` or ``zoo/<name>``.
        pyro: () -> (model, args, kwargs), tensors in the default dtype.
        numpyro: () -> (model, kwargs) with NumPy data (``KeyError`` without a NumPyro port).
        pymc: () -> ``pm.Model`` (``KeyError`` without a PyMC port), or ``None`` for the zoo.
        reference: () -> statistic -> (mean, sd, ess of the reference's mean).
        statistics: site -> ``(n, *shape)`` draws -> statistic -> ``(n,)`` array.
    """

    name: str
    pyro: Callable[[], tuple]
    numpyro: Optional[Callable[[], tuple]]
    pymc: Optional[Callable[[], object]]
    reference: Callable[[], dict]
    statistics: Callable[[dict], dict]


def _numpy(value):
    """A tensor as NumPy, floating point as float64 (every sampler runs in float64)."""
    if not hasattr(value, "detach"):
        return value
    return (value.double() if value.is_floating_point() else value).detach().cpu().numpy()


def _flat_statistics(draws: dict) -> dict:
    from vilab.samples import flatten_samples

    return flatten_samples(draws, 1)


def _posteriordb(folder: Path, name: str) -> Problem:
    def load():
        from vilab.posteriordb import load_posteriordb

        return load_posteriordb(folder, name)

    def pyro():
        problem = load()
        return problem.model, problem.args, problem.kwargs

    def numpyro():
        from numpyro_models import NUMPYRO_MODELS
        from numpyro_ported import PORTED_MODELS

        model = {**NUMPYRO_MODELS, **PORTED_MODELS}[name]
        return model, {key: _numpy(value) for key, value in load().kwargs.items()}

    def pymc():
        from pymc_models import PYMC_MODELS

        return PYMC_MODELS[f"posteriordb/{name}"](**{key: _numpy(v) for key, v in load().kwargs.items()})

    def reference():
        parameters = load().reference_summary["parameters"]
        # posteriordb's references have a bulk ESS of about 10,000 (README); most summaries say.
        return {
            key: (value["mean"], value["sd"], value.get("ess_bulk_reference", 1e4)) for key, value in parameters.items()
        }

    return Problem(f"posteriordb/{name}", pyro, numpyro, pymc, reference, _flat_statistics)


def _zoo(entry) -> Problem:
    def pyro():
        return entry.inputs(entry.data())

    def numpyro():
        from zoo_twins import SPEED_TWINS

        return SPEED_TWINS[entry.name](entry.data())

    def reference():
        from zoo import load_reference

        summary = load_reference(entry)["summary"]
        return {key: (value["mean"], value["sd"], value["ess"]) for key, value in summary.items()}

    return Problem(f"zoo/{entry.name}", pyro, numpyro, None, reference, entry.stats)


def _zoo_has_reference(entry) -> bool:
    from zoo import REFERENCE_DIR

    return entry.closed_form is not None or os.path.exists(os.path.join(REFERENCE_DIR, f"{entry.name}.json.gz"))


def problems() -> dict[str, Problem]:
    """Every problem, by name: posteriordb posteriors first, then the zoo's models that have a
    reference, without those NUTS must refuse (``nuts_refusal``). Imports no peer library."""
    from vilab.posteriordb import default_posteriordb_path, list_posteriordb
    from zoo import ZOO

    found = {}
    for folder in (default_posteriordb_path(), COMPACT_POSTERIORDB):
        for name in list_posteriordb(folder):
            found.setdefault(f"posteriordb/{name}", _posteriordb(folder, name))
    for entry in ZOO:
        if _zoo_has_reference(entry) and "nuts_refusal" not in entry.options:
            found[f"zoo/{entry.name}"] = _zoo(entry)
    return found


def select(available: dict, names: Optional[list]) -> list[str]:
    """Problem names for ``--models`` (full names, their part after ``/``, or an alias).

    Raises:
        ValueError: for a name that matches no problem (the message lists them).
    """
    if not names:
        return list(available)
    short = {full.split("/", 1)[1]: full for full in available}
    chosen = []
    for name in names:
        full = ALIASES.get(name, short.get(name, name))
        if full not in available:
            raise ValueError(f"--models: expected names among {sorted(available)} or {sorted(ALIASES)}; got {name!r}")
        chosen.append(full)
    return chosen


def peer_ports() -> dict[str, set]:
    """Peer -> names of the problems it has a port of (``numpyro``; ``nutpie`` where PyMC
    imports). Imports JAX and PyMC: call it in the parent process, not in a timed worker."""
    from numpyro_models import NUMPYRO_MODELS
    from numpyro_ported import PORTED_MODELS
    from zoo_twins import TWINS

    ports = {
        "numpyro": {f"posteriordb/{name}" for name in {**NUMPYRO_MODELS, **PORTED_MODELS}}
        | {f"zoo/{name}" for name in TWINS}
    }
    try:
        import nutpie  # noqa: F401 - only whether it imports
        from pymc_models import PYMC_MODELS
    except ImportError as error:
        print(f"nutpie rows skipped: {error}")
        PYMC_MODELS = {}
    ports["nutpie"] = set(PYMC_MODELS)
    return ports
