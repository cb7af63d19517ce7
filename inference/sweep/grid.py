r"""A sweep's grid: models x methods x seeds, its options, and a stable id per task.

A :class:`SweepSpec` is built from keyword arguments or a TOML file (:func:`load_spec`)::

    models = ["eight_schools", "posteriordb/*"]     # registry names, posteriordb/NAME, module:attr
    methods = ["meanfield", "fullrank", "nuts"]     # any name fit_svi accepts, and "nuts"
    seeds = [0, 1, 2]                               # or: num_seeds = 3
    posteriordb = "../shared/posteriordb"
    num_draws = 1000
    num_cpus = 1
    max_retries = 2

    [svi]                  # fit_svi options of the guide families
    num_steps = 2000
    [nuts]                 # run_nuts options of the "nuts" method
    num_samples = 1000
    [reference]            # run_nuts options (and seed) of the NUTS reference of a registry model
    num_samples = 2000
    [method_options.iaf]   # per method: guide_options of a family, or a VI method's options
    num_flows = 2

Each task's id is a hash of everything that decides its numbers (model, method, seed and the
options that reach it), so a rerun of the same sweep finds the tasks it already finished, and
a change of options makes new tasks instead of silently mixing results.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

__all__ = [
    "DEFAULT_NUTS",
    "DEFAULT_REFERENCE",
    "DEFAULT_SVI",
    "NUTS",
    "SweepSpec",
    "Task",
    "expand_tasks",
    "load_spec",
    "task_id",
    "validate_methods",
    "validate_options",
]

NUTS = "nuts"

# Deterministic choices: compiler="auto" fuses when the run's measured pace says so, which can
# differ between two runs; one batch of chains (chain_method="sequential") keeps NUTS's draws
# independent of how many cores a node has.
DEFAULT_SVI: dict[str, Any] = {"num_steps": 2000, "lr": 0.02, "compiler": "vm"}
DEFAULT_NUTS: dict[str, Any] = {
    "num_samples": 1000,
    "num_warmup": 1000,
    "num_chains": 4,
    "compiler": "vm",
    "chain_method": "sequential",
}
DEFAULT_REFERENCE: dict[str, Any] = {**DEFAULT_NUTS, "num_samples": 2000, "seed": 1_000_003}


class Task(NamedTuple):
    """One cell of the grid: ``method`` on ``model`` with ``seed``; ``options`` are the keyword
    options that reach it (``svi_options``/``guide_options`` or ``nuts_options``, ``num_draws``,
    and the reference it is scored against)."""

    model: str
    method: str
    seed: int
    options: dict

    @property
    def id(self) -> str:
        return task_id(self.model, self.method, self.seed, self.options)


def task_id(model: str, method: str, seed: int, options: Mapping[str, Any]) -> str:
    """A stable 20-hex-digit id: SHA-256 of the task's canonical JSON (sorted keys)."""
    text = json.dumps(
        {"model": model, "method": method, "seed": seed, "options": options},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:20]


@dataclass
class SweepSpec:
    """What to run and how.

    Attributes:
        models: registry names, ``"posteriordb/NAME"`` (``"posteriordb/*"``: every posterior
            with a port under ``posteriordb``), or ``"package.module:attr"`` where ``attr`` is a
            :class:`~vilab.models.registry.ModelSpec` or a zero-argument callable returning
            ``(model, args, kwargs)``.
        methods: guide names, VI method names (anything :func:`~vilab.inference.svi.api.fit_svi`
            accepts by name) and ``"nuts"``.
        seeds: one task per seed for every model and method.
        posteriordb: the posteriordb folder (``None``: ``$VILAB_POSTERIORDB`` or ``../shared/posteriordb``).
        svi_options, nuts_options: options of ``fit_svi`` and ``run_nuts`` (merged over the defaults).
        reference_options: ``run_nuts`` options of the reference of a model without reference
            draws, plus its ``seed`` (apart from the methods' seeds so NUTS is not scored against itself).
        method_options: per method name, its ``guide_options`` (a family's or a VI method's options).
        num_draws: draws of each fitted guide used for the metrics.
        num_cpus: CPUs each task declares to Ray (and the torch threads it uses).
        max_retries: how often Ray reruns a task whose worker or node died.
    """

    models: Sequence[str]
    methods: Sequence[str]
    seeds: Sequence[int] = (0,)
    posteriordb: Optional[str] = None
    svi_options: dict = field(default_factory=dict)
    nuts_options: dict = field(default_factory=dict)
    reference_options: dict = field(default_factory=dict)
    method_options: dict = field(default_factory=dict)
    num_draws: int = 1000
    num_cpus: int = 1
    max_retries: int = 2

    def __post_init__(self) -> None:
        for name in ("models", "methods", "seeds"):
            value = getattr(self, name)
            if isinstance(value, str) or not isinstance(value, Sequence) or not value:
                raise TypeError(f"{name}: expected a non-empty list; got {value!r}")
            setattr(self, name, list(dict.fromkeys(value)))
        if any(isinstance(s, bool) or not isinstance(s, int) for s in self.seeds):
            raise TypeError(f"seeds: expected a list of ints; got {self.seeds!r}")
        for name in ("num_draws", "num_cpus"):
            if (
                isinstance(getattr(self, name), bool)
                or not isinstance(getattr(self, name), int)
                or getattr(self, name) < 1
            ):
                raise ValueError(f"{name}: expected an int >= 1; got {getattr(self, name)!r}")
        if isinstance(self.max_retries, bool) or not isinstance(self.max_retries, int) or self.max_retries < 0:
            raise ValueError(f"max_retries: expected an int >= 0; got {self.max_retries!r}")
        self.svi_options = {**DEFAULT_SVI, **self.svi_options}
        self.nuts_options = {**DEFAULT_NUTS, **self.nuts_options}
        self.reference_options = {**DEFAULT_REFERENCE, **self.reference_options}
        unknown = sorted(set(self.method_options) - set(self.methods))
        if unknown:
            raise ValueError(f"method_options: expected options of methods in the sweep {self.methods}; got {unknown}")


_TOML_SECTIONS = {
    "svi": "svi_options",
    "nuts": "nuts_options",
    "reference": "reference_options",
    "method_options": "method_options",
}


def load_spec(path: Union[str, Path], **overrides: Any) -> SweepSpec:
    """Read a :class:`SweepSpec` from a TOML file; ``overrides`` (not ``None``) replace its keys.

    Raises:
        ValueError: the file has a key that is not a field of the spec.
    """
    with open(path, "rb") as handle:
        data = tomllib.load(handle)
    data = {_TOML_SECTIONS.get(key, key): value for key, value in data.items()}
    if "num_seeds" in data:
        data["seeds"] = list(range(int(data.pop("num_seeds"))))
    known = {f.name for f in fields(SweepSpec)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{path}: unknown key(s) {unknown}; expected some of {sorted(known | {'num_seeds'})} "
            "(sections [svi], [nuts], [reference], [method_options.NAME])"
        )
    for key, value in overrides.items():  # options given as dicts add to the file's
        if value is not None:
            data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    missing = [name for name in ("models", "methods") if name not in data]
    if missing:
        raise ValueError(f'{path}: expected keys {missing}; got none (e.g. methods = ["meanfield", "nuts"])')
    return SweepSpec(**data)


def validate_methods(methods: Sequence[str]) -> None:
    """Raise before any work if a method is neither ``"nuts"``, a guide name nor a VI method."""
    from vilab.guides import list_guides
    from vilab.inference.vi import METHODS

    known = [NUTS, *(g.name for g in list_guides()), *sorted(METHODS)]
    bad = [m for m in methods if m not in known]
    if bad:
        raise ValueError(
            f"methods: expected names from {known}; got {bad} (methods that are not yet "
            "registered in vilab.inference.vi.METHODS cannot run)"
        )


def validate_options(spec: SweepSpec) -> None:
    """Raise before any work if an option is not a parameter of the function it goes to:
    ``svi_options`` of ``fit_svi``, ``nuts_options`` and ``reference_options`` of ``run_nuts``,
    ``method_options[name]`` of the guide family or of the VI method ``name``."""
    from vilab.guides import list_guides
    from vilab.inference.nuts.api import run_nuts
    from vilab.inference.svi.api import fit_svi
    from vilab.inference.vi import get_method, is_method

    def check(options: Mapping[str, Any], function, where: str, allowed: Sequence[str] = ()) -> None:
        parameters = inspect.signature(function).parameters
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()) and function not in (
            fit_svi,
            run_nuts,
        ):  # their **kwargs are the model's data, not options
            return
        known = sorted(
            {
                name
                for name, p in parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY
                or (p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.default is not p.empty)
            }
            - {"seed", "progress"}
            | set(allowed)
        )  # the task sets these itself
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{where}: expected options among {known}; got {unknown}")

    check(spec.svi_options, fit_svi, "svi_options")
    check(spec.nuts_options, run_nuts, "nuts_options")
    check(spec.reference_options, run_nuts, "reference_options", allowed=("seed",))
    families = {info.name: info for info in list_guides()}
    for method, options in spec.method_options.items():
        if method in families:
            unknown = sorted(set(options) - set(families[method].options))
            if unknown:
                raise ValueError(
                    f"method_options.{method}: expected options among {list(families[method].options)}; got {unknown}"
                )
        elif is_method(method):
            check(options, get_method(method), f"method_options.{method}")
        elif options:
            raise ValueError(f"method_options.{method}: expected no options for {method!r}; got {sorted(options)}")


def expand_tasks(spec: SweepSpec, references: Mapping[str, dict]) -> list[Task]:
    """The grid's tasks in model, method, seed order; ``references[model]`` describes the
    reference each model's tasks are scored against (part of the task's identity)."""
    from vilab.inference.vi import is_method

    tasks = []
    for model in references:
        for method in spec.methods:
            for seed in spec.seeds:
                if method == NUTS:
                    options = {"nuts_options": spec.nuts_options}
                else:
                    options = {"guide_options": spec.method_options.get(method, {}), "num_draws": spec.num_draws}
                    if not is_method(method):  # a VI method takes its options from guide_options only
                        options["svi_options"] = spec.svi_options
                tasks.append(Task(model, method, seed, {**options, "reference": references[model]}))
    return tasks
