"""Load posteriordb reference posteriors as ``(model, data, reference draws)`` problems.

A posteriordb folder (e.g. ``../shared/posteriordb/kidiq-kidscore_momiq``) holds ``data.json``
(Stan data-block fields), ``reference_draws.json`` (10 chains of flat, 1-based parameter names),
``reference_summary.json`` and ``posteriordb_info.json``, each possibly gzipped (``*.json.gz``,
as in the compact copies under ``tests/data/posteriordb``). :data:`POSTERIORDB_PORTS` maps each
folder name to a Pyro port in ``vilab.models.posteriordb_*``; a port is a model function whose
parameters are named after the data fields it uses, so :func:`load_posteriordb` passes it the
data dict's fields as keyword arguments::

    problem = load_posteriordb(default_posteriordb_path(), "kidiq-kidscore_momiq")
    nuts = run_nuts(problem.model, *problem.args, **problem.kwargs)
"""

from __future__ import annotations

import gzip
import inspect
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import numpy as np
import torch

from vilab.samples import flatten_samples, unflatten_name
from vilab.models.posteriordb import ported
from vilab.models.posteriordb.mixture import hmm_example, low_dim_gauss_mix
from vilab.models.posteriordb.regression import blr, kidscore_momiq, logmesquite, nes
from vilab.models.posteriordb.timeseries import ar_k, arma11, garch11
from vilab.types import Model

__all__ = [
    "POSTERIORDB_PORTS",
    "PosteriorDBProblem",
    "default_posteriordb_path",
    "list_posteriordb",
    "load_posteriordb",
    "model_kwargs",
    "flatten_samples",
    "unflatten_samples",
]

ENV_VAR = "VILAB_POSTERIORDB"

POSTERIORDB_PORTS: dict[str, Model] = {
    "arK-arK": ar_k,
    "arma-arma11": arma11,
    "garch-garch11": garch11,
    "hmm_example-hmm_example": hmm_example,
    "kidiq-kidscore_momiq": kidscore_momiq,
    "low_dim_gauss_mix-low_dim_gauss_mix": low_dim_gauss_mix,
    "mesquite-logmesquite": logmesquite,
    "nes2000-nes": nes,
    "sblrc-blr": blr,
    # Ported for the VI accuracy study; compact data and reference draws in tests/data/posteriordb.
    "diamonds-diamonds": ported.diamonds,
    "earnings-earn_height": ported.earn_height,
    "earnings-logearn_interaction_z": ported.logearn_interaction_z,
    "earnings-logearn_logheight_male": ported.logearn_logheight_male,
    "eight_schools-eight_schools_noncentered": ported.eight_schools_noncentered,
    "gp_pois_regr-gp_pois_regr": ported.gp_pois_regr,
    "kidiq-kidscore_interaction": ported.kidscore_interaction,
    "kidiq-kidscore_momhsiq": ported.kidscore_momhsiq,
    "kidiq_with_mom_work-kidscore_interaction_z": ported.kidscore_interaction_z,
    "kilpisjarvi_mod-kilpisjarvi": ported.kilpisjarvi,
    "mesquite-logmesquite_logvash": ported.logmesquite_logvash,
    "mesquite-mesquite": ported.mesquite,
}
"""posteriordb folder name -> Pyro port (a model taking the data fields as keyword arguments)."""


@dataclass
class PosteriorDBProblem:
    """One posteriordb posterior with its Pyro port.

    Attributes:
        name: posteriordb name (the folder), e.g. ``"kidiq-kidscore_momiq"``.
        model: The Pyro port; call as ``model(*args, **kwargs)``.
        args: Positional arguments (always empty: the data go in ``kwargs``).
        kwargs: The data fields the port uses, as tensors (ints stay ints).
        reference_draws: flat name (``"beta[1]"``) -> array of shape ``(chains, draws)``.
        reference_summary: ``reference_summary.json`` as a dict (``["parameters"][name]`` holds
            mean, sd, quantiles and the reference's ESS).
        description: posteriordb's title and description of the model and data.
    """

    name: str
    model: Model
    args: tuple
    kwargs: dict[str, Any]
    reference_draws: dict[str, np.ndarray]
    reference_summary: dict[str, Any] = field(repr=False)
    description: str = ""

    @property
    def parameter_names(self) -> list[str]:
        """The reference's flat parameter names, in posteriordb's order."""
        return list(self.reference_draws)


def default_posteriordb_path() -> Path:
    """The posteriordb references: ``$VILAB_POSTERIORDB``, else ``../shared/posteriordb``
    relative to the repository or to the working directory, whichever exists.

    Raises:
        FileNotFoundError: if ``$VILAB_POSTERIORDB`` names no folder, or no default exists.
    """
    if os.environ.get(ENV_VAR):
        path = Path(os.environ[ENV_VAR]).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"{ENV_VAR}: expected a posteriordb folder; got {str(path)!r}, which does not exist"
            )
        return path
    repository = Path(__file__).resolve().parents[1]
    candidates = [repository.parent / "shared" / "posteriordb", Path.cwd().parent / "shared" / "posteriordb"]
    for path in candidates:
        if path.is_dir():
            return path
    tried = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(f"posteriordb: no references found (tried {tried}); set {ENV_VAR}=PATH")


def list_posteriordb(path: Union[str, Path]) -> list[str]:
    """Names of the posteriors under ``path`` that have a Pyro port and a ``data.json``."""
    path = _existing_folder(path)
    return sorted(name for name in POSTERIORDB_PORTS if _json_file(path / name / "data.json") is not None)


def load_posteriordb(path: Union[str, Path], name: str) -> PosteriorDBProblem:
    """Load posterior ``name`` from the posteriordb folder ``path``.

    Raises:
        ValueError: if ``name`` has no port (the message lists the known names) or the data
            lack a field the port needs.
        FileNotFoundError: if ``path``, the posterior's folder or one of its files is missing.
    """
    if name not in POSTERIORDB_PORTS:
        known = ", ".join(sorted(POSTERIORDB_PORTS))
        raise ValueError(f"name: expected a posteriordb posterior with a port ({known}); got {name!r}")
    folder = _existing_folder(path) / name
    if not folder.is_dir():
        raise FileNotFoundError(f"name: posterior folder {str(folder)!r} does not exist")
    model = POSTERIORDB_PORTS[name]
    kwargs = model_kwargs(model, _read_json(folder / "data.json"))
    chains = _read_json(folder / "reference_draws.json")
    draws = {key: np.stack([np.asarray(chain[key], dtype=np.float64) for chain in chains]) for key in chains[0]}
    info = _read_json(folder / "posteriordb_info.json") if _json_file(folder / "posteriordb_info.json") else {}
    return PosteriorDBProblem(
        name=name,
        model=model,
        args=(),
        kwargs=kwargs,
        reference_draws=draws,
        reference_summary=_read_json(folder / "reference_summary.json"),
        description=_describe(info),
    )


def model_kwargs(model: Model, data: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of ``data`` that ``model`` takes, keyed by its parameter names.

    Lists become tensors of the default float dtype; int and float scalars stay Python
    numbers. Fields the model does not take are ignored.

    Raises:
        ValueError: if a parameter without default is not in ``data``.
    """
    kwargs, missing = {}, []
    for parameter in inspect.signature(model).parameters.values():
        if parameter.name in data:
            value = data[parameter.name]
            kwargs[parameter.name] = (
                torch.tensor(value, dtype=torch.get_default_dtype()) if isinstance(value, list) else value
            )
        elif parameter.default is inspect.Parameter.empty:
            missing.append(parameter.name)
    if missing:
        raise ValueError(f"data: expected fields {missing} for {model.__name__}; got fields {sorted(data)}")
    return kwargs


def unflatten_samples(flat: Mapping[str, Any], num_batch_dims: int) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_samples`: ``{"beta[1]": a, "beta[2]": b}`` -> ``{"beta": stack}``.

    Args:
        flat: flat name -> array of shape ``batch`` (``num_batch_dims`` leading dims).
        num_batch_dims: number of leading sample dims (``2`` for ``(chain, draw)``).

    Returns:
        site -> tensor of shape ``(*batch, *site_shape)`` in the default float dtype.
    """
    grouped: dict[str, dict[tuple[int, ...], Any]] = {}
    for flat_name, value in flat.items():
        site, index = unflatten_name(flat_name)
        grouped.setdefault(site, {})[index] = torch.as_tensor(np.asarray(value), dtype=torch.get_default_dtype())
    sites = {}
    for site, entries in grouped.items():
        shape = tuple(max(index[d] for index in entries) + 1 for d in range(len(next(iter(entries)))))
        batch = next(iter(entries.values())).shape
        if len(batch) != num_batch_dims:
            raise ValueError(
                f"num_batch_dims: expected {len(batch)} for {site!r} (draws of shape {tuple(batch)}); got {num_batch_dims}"
            )
        value = torch.empty(tuple(batch) + shape)
        for index, entry in entries.items():
            value[(Ellipsis,) + index] = entry
        sites[site] = value
    return sites


def _existing_folder(path: Union[str, Path]) -> Path:
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path: expected a str or path; got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"path: expected a posteriordb folder; got {str(path)!r}, which does not exist")
    return path


def _json_file(path: Path) -> Path | None:
    """``path``, else its gzipped sibling ``path.gz`` (compact test data), else ``None``."""
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    found = _json_file(path)
    if found is None:
        raise FileNotFoundError(f"posteriordb: missing file {str(path)!r} (nor {path.name}.gz)")
    with gzip.open(found, "rt") if found.suffix == ".gz" else open(found) as handle:
        return json.load(handle)


def _describe(info: Mapping[str, Any]) -> str:
    model, data = info.get("model_info", {}), info.get("data_info", {})
    parts = [model.get("title"), model.get("description"), data.get("title")]
    return ". ".join(str(p).strip().rstrip(".") for p in parts if p)
