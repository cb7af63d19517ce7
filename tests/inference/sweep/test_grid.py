"""The grid: specs from keywords and TOML, stable task ids, and checks before any work."""

import pytest

from vilab.inference.sweep.grid import (
    DEFAULT_SVI,
    SweepSpec,
    Task,
    expand_tasks,
    load_spec,
    task_id,
    validate_methods,
    validate_options,
)
from vilab.inference.sweep.problems import load_problem, resolve_models


def test_task_id_is_stable_and_changes_with_anything_that_changes_the_numbers():
    options = {"svi_options": {"lr": 0.02, "num_steps": 10}}
    same = task_id("eight_schools", "meanfield", 0, {"svi_options": {"num_steps": 10, "lr": 0.02}})
    assert task_id("eight_schools", "meanfield", 0, options) == same
    assert len(same) == 20 and int(same, 16) >= 0
    others = {
        task_id("eight_schools", "meanfield", 1, options),
        task_id("eight_schools", "fullrank", 0, options),
        task_id("funnel", "meanfield", 0, options),
        task_id("eight_schools", "meanfield", 0, {"svi_options": {"lr": 0.02, "num_steps": 11}}),
    }
    assert same not in others and len(others) == 4


def test_expand_gives_every_model_method_and_seed_once_with_its_reference():
    spec = SweepSpec(["normal_normal", "beta_bernoulli"], ["meanfield", "nuts", "fullrank"], [0, 1])
    references = {"normal_normal": {"kind": "nuts"}, "beta_bernoulli": {"kind": "nuts", "seed": 5}}
    tasks = expand_tasks(spec, references)
    assert len(tasks) == 12 and len({t.id for t in tasks}) == 12
    assert {(t.model, t.method, t.seed) for t in tasks} == {
        (m, k, s) for m in references for k in ("meanfield", "nuts", "fullrank") for s in (0, 1)
    }
    nuts = next(t for t in tasks if t.method == "nuts")
    assert set(nuts.options) == {"nuts_options", "reference"} and nuts.options["nuts_options"]["compiler"] == "vm"
    vi = next(t for t in tasks if t.method == "meanfield" and t.model == "beta_bernoulli")
    assert vi.options["svi_options"] == DEFAULT_SVI and vi.options["reference"] == {"kind": "nuts", "seed": 5}


def test_spec_from_toml_with_sections_num_seeds_and_overrides(tmp_path):
    path = tmp_path / "sweep.toml"
    path.write_text(
        'models = ["normal_normal"]\nmethods = ["meanfield", "iaf"]\nnum_seeds = 3\nnum_draws = 123\n'
        "[svi]\nnum_steps = 50\n[nuts]\nnum_chains = 2\n[method_options.iaf]\nnum_flows = 3\n"
    )
    spec = load_spec(path, svi_options={"lr": 0.5}, seeds=None)
    assert spec.seeds == [0, 1, 2] and spec.num_draws == 123
    assert spec.svi_options == {**DEFAULT_SVI, "num_steps": 50, "lr": 0.5}
    assert spec.nuts_options["num_chains"] == 2 and spec.nuts_options["compiler"] == "vm"
    assert spec.method_options == {"iaf": {"num_flows": 3}}


@pytest.mark.parametrize(
    "text, match",
    [
        ('models = ["normal_normal"]\nmethods = ["meanfield"]\nnum_step = 3\n', r"unknown key\(s\) \['num_step'\]"),
        ('models = ["normal_normal"]\n', r"expected keys \['methods'\]"),
        (
            'models = ["normal_normal"]\nmethods = ["meanfield"]\n[method_options.iaf]\nnum_flows = 2\n',
            r"method_options: expected options of methods in the sweep",
        ),
    ],
)
def test_bad_toml_is_refused_naming_the_key(tmp_path, text, match):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_spec(path)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"models": "normal_normal", "methods": ["nuts"]}, TypeError, "models: expected a non-empty list"),
        ({"models": ["normal_normal"], "methods": []}, TypeError, "methods: expected a non-empty list"),
        (
            {"models": ["normal_normal"], "methods": ["nuts"], "seeds": [0.5]},
            TypeError,
            "seeds: expected a list of ints",
        ),
        (
            {"models": ["normal_normal"], "methods": ["nuts"], "num_cpus": 0},
            ValueError,
            "num_cpus: expected an int >= 1",
        ),
        ({"models": ["normal_normal"], "methods": ["nuts"], "max_retries": -1}, ValueError, "max_retries"),
    ],
)
def test_bad_spec_is_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        SweepSpec(**kwargs)


def test_unknown_method_is_refused_listing_the_known_ones():
    validate_methods(["meanfield", "iaf", "nuts"])
    with pytest.raises(ValueError, match=r"methods: expected names from \['nuts', 'meanfield'.*got \['hmc'\]"):
        validate_methods(["meanfield", "hmc"])


def test_models_resolve_registry_posteriordb_and_user_modules(posteriordb_path, tmp_path, monkeypatch):
    module = tmp_path / "sweep_user_models.py"
    module.write_text(
        "from vilab.models import get_model\n\ndef problem():\n    return get_model('normal_normal').load()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    names = resolve_models(["normal_normal", "posteriordb/*", "sweep_user_models:problem"], str(posteriordb_path))
    assert names[0] == "normal_normal" and names[-1] == "sweep_user_models:problem"
    assert "posteriordb/kidiq-kidscore_momiq" in names and len(names) == 2 + 9
    assert load_problem("sweep_user_models:problem", None).reference_draws is None
    kidiq = load_problem("posteriordb/kidiq-kidscore_momiq", str(posteriordb_path))
    assert set(kidiq.reference_draws) == {"beta[1]", "beta[2]", "sigma"}


@pytest.mark.parametrize(
    "name, match",
    [
        ("no_such_model", "models: model: unknown model 'no_such_model'"),
        ("posteriordb/no-such", r"models: expected posteriordb/NAME with NAME in \["),
        ("no_such_module_xyz:problem", "models: expected an importable module"),
        ("vilab.models:no_such_attribute", "models: expected module 'vilab.models' to define 'no_such_attribute'"),
    ],
)
def test_unknown_models_are_refused_before_any_work(name, match, posteriordb_path):
    with pytest.raises(ValueError, match=match):
        resolve_models([name], str(posteriordb_path))


def test_task_is_a_plain_record():
    task = Task("normal_normal", "meanfield", 3, {"num_draws": 5})
    assert task.id == task_id("normal_normal", "meanfield", 3, {"num_draws": 5})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"svi_options": {"num_step": 5}}, r"svi_options: expected options among \[.*'num_steps'.*got \['num_step'\]"),
        ({"nuts_options": {"warmup": 5}}, r"nuts_options: expected options among .* got \['warmup'\]"),
        (
            {"reference_options": {"chains": 2}},
            r"reference_options: expected options among .*'seed'.* got \['chains'\]",
        ),
        (
            {"method_options": {"iaf": {"flows": 2}}},
            r"method_options.iaf: expected options among \['num_flows'.* got \['flows'\]",
        ),
        ({"method_options": {"nuts": {"num_samples": 2}}}, r"method_options.nuts: expected no options for 'nuts'"),
        ({"svi_options": {"seed": 3}}, r"svi_options: expected options among .* got \['seed'\]"),
    ],
)
def test_options_that_reach_no_parameter_are_refused(options, match):
    spec = SweepSpec(["normal_normal"], ["iaf", "nuts"], **options)
    with pytest.raises(ValueError, match=match):
        validate_options(spec)


def test_the_default_options_pass_the_checks():
    validate_options(
        SweepSpec(
            ["normal_normal"],
            ["meanfield", "iaf", "nuts"],
            method_options={"iaf": {"num_flows": 2}},
            svi_options={"lr": 0.1},
        )
    )


def test_a_vi_method_is_accepted_and_its_task_carries_only_the_options_that_reach_it(monkeypatch):
    from vilab.inference import vi

    monkeypatch.setitem(vi.METHODS, "toy_method", "toy_module:fit")  # registered, as dadvi or pathfinder are
    validate_methods(["toy_method", "nuts"])
    spec = SweepSpec(["normal_normal"], ["toy_method"], method_options={"toy_method": {"num_draws": 7}})
    (task,) = expand_tasks(spec, {"normal_normal": {"kind": "nuts"}})
    assert set(task.options) == {"guide_options", "num_draws", "reference"}  # fit_svi drops svi_options for it
    assert task.options["guide_options"] == {"num_draws": 7}
