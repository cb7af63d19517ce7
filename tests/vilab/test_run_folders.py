"""Property tests of the run-folder logic: settings differences, the refusal of a run with
other settings, folders swapped whole, log rows trimmed on resume, and flags in CLI errors."""

import csv
import json
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vilab.cli.main import build_parser
from vilab.cli.errors import PYTHON_NAMES, to_flags
from vilab.inference.vae.runs import RESUMABLE_SETTINGS, check_run_folder, trim_metrics
from vilab.run_folders import RunFolderError, atomic_directory, flatten_settings, settings_differences

keys = st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True)
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.text(max_size=5),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.integers(0, 9), max_size=3),
)
nested = st.recursive(leaves, lambda children: st.dictionaries(keys, children, max_size=3), max_leaves=6)
configs = st.dictionaries(keys, nested, min_size=1, max_size=4)
few = settings(max_examples=40, deadline=None)


def _canonical(value):
    """A leaf as JSON reads it back, numbers by value (1 == 1.0 == -0.0 + 1) but bools apart."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (int, float)):
        return repr(float(value) + 0.0)
    return json.dumps([_canonical(item) for item in value])


@given(config=configs)
@few
def test_settings_read_back_from_json_equal_those_written(config):
    assert settings_differences(json.loads(json.dumps(config)), config) == {}


@given(old=configs, new=configs)
@few
def test_differences_are_symmetric_and_name_every_changed_leaf(old, new):
    forward, backward = settings_differences(old, new), settings_differences(new, old)
    assert forward.keys() == backward.keys()
    assert all(backward[key] == (after, before) for key, (before, after) in forward.items())
    flat_old, flat_new = flatten_settings(old), flatten_settings(new)
    for key in set(flat_old) | set(flat_new):
        assert (key in forward) == (
            key not in flat_old or key not in flat_new or _canonical(flat_old[key]) != _canonical(flat_new[key])
        )


@given(old=configs, new=configs)
@few
def test_ignored_settings_never_count_as_differences(old, new):
    differences = settings_differences(old, new)
    ignored = set(list(differences)[::2])
    assert settings_differences(old, new, ignore=ignored) == {k: v for k, v in differences.items() if k not in ignored}


def _run_config(latent, lr, epochs):
    return {
        "vae": {"latent_dim": latent, "encoder_hidden": [16]},
        "data": "digits",
        "training": {"learning_rate": lr, "max_epochs": epochs, "patience": None, "seed": 0},
        "data_dir": None,
    }


values = st.tuples(st.integers(1, 64), st.floats(1e-5, 1.0), st.integers(1, 100))


@given(old=values, new=values)
@few
def test_a_run_folder_takes_only_the_same_model_and_optimisation_and_records_the_rest(old, new):
    with tempfile.TemporaryDirectory() as folder:
        recorded = _run_config(*old)
        Path(folder, "config.json").write_text(json.dumps(recorded))
        requested = _run_config(*new)
        changed = {key: value for key, value in settings_differences(recorded, requested).items()}
        refused = {key: value for key, value in changed.items() if key not in RESUMABLE_SETTINGS}
        if refused:
            with pytest.raises(RunFolderError) as error:
                check_run_folder(folder, requested)
            assert error.value.differences == refused
            for key in refused:
                assert key in str(error.value)
        else:
            written = check_run_folder(folder, requested)
            assert written.get("resumes", []) == ([{k: list(v) for k, v in changed.items()}] if changed else [])
        assert json.loads(Path(folder, "config.json").read_text()) == recorded  # nothing written


files = st.dictionaries(st.from_regex(r"[a-z]{1,6}\.(txt|nc)", fullmatch=True), st.binary(max_size=20), max_size=4)


def _contents(path):
    return {name: (path / name).read_bytes() for name in os.listdir(path)}


@given(old=files, new=files, crash=st.booleans())
@few
def test_a_folder_is_replaced_whole_or_left_whole(old, new, crash):
    with tempfile.TemporaryDirectory() as root:
        path = Path(root, "report")
        if old:
            path.mkdir()
            for name, data in old.items():
                (path / name).write_bytes(data)
        try:
            with atomic_directory(path) as tmp:
                for name, data in new.items():
                    (tmp / name).write_bytes(data)
                if crash:
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            pass
        expected = old if crash else new
        assert (_contents(path) if path.exists() else {}) == expected
        assert os.listdir(root) == (["report"] if path.exists() else [])  # nothing left beside it


@given(
    steps=st.lists(st.lists(st.integers(0, 60), max_size=8).map(sorted), min_size=1, max_size=3),
    resume_at=st.integers(0, 60),
)
@few
def test_trimming_keeps_exactly_the_rows_before_the_checkpoint(steps, resume_at):
    with tempfile.TemporaryDirectory() as out:
        for version, version_steps in enumerate(steps):
            os.makedirs(os.path.join(out, "logs", f"csv-{version}"))
            with open(os.path.join(out, "logs", f"csv-{version}", "metrics.csv"), "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["epoch", "step", "loss"])
                writer.writerows([[0, step, step / 10] for step in version_steps])
        keep = f"csv-{len(steps) - 1}"
        dropped = trim_metrics(out, resume_at, keep=keep)
        assert dropped == sum(step >= resume_at for version in steps[:-1] for step in version)
        for version, version_steps in enumerate(steps):
            with open(os.path.join(out, "logs", f"csv-{version}", "metrics.csv")) as file:
                kept = [int(row["step"]) for row in csv.DictReader(file)]
            assert kept == (
                version_steps if f"csv-{version}" == keep else [step for step in version_steps if step < resume_at]
            )
        assert trim_metrics(out, resume_at, keep=keep) == 0  # trimming twice changes nothing


_COMPARE_FLAGS = build_parser().parse_args(["compare"]).cli_flags


@given(name=st.sampled_from(sorted(set(PYTHON_NAMES) & set(_COMPARE_FLAGS))), got=st.integers())
def test_an_argument_name_becomes_its_flag(name, got):
    message = f"{name}: expected an int >= 1; got {got}"
    assert to_flags(message, _COMPARE_FLAGS) == f"{_COMPARE_FLAGS[name]}: expected an int >= 1; got {got}"
    assert to_flags(f"svi_options['{name}'] is bad", _COMPARE_FLAGS).count(_COMPARE_FLAGS[name]) == 1


@given(prose=st.text(alphabet=st.characters(blacklist_characters=":='\"-"), max_size=40))
def test_prose_without_argument_syntax_is_left_alone(prose):
    assert to_flags(prose, _COMPARE_FLAGS) == prose
