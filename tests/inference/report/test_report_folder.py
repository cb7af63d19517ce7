"""ComparisonReport.save writes its folder whole: a crash leaves the previous report, a folder
of other files is refused, and a report replaces the previous one without mixing files."""

import dataclasses
import os
import warnings

import pytest

import vilab.inference.report.save as report_module
from vilab.run_folders import RunFolderError


@pytest.fixture(scope="module")
def report():
    from vilab import compare, get_model

    model, args, kwargs = get_model("normal_normal").load()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short NUTS run warns about its ESS
        return compare(
            model,
            *args,
            guides=("meanfield",),
            svi_options={"num_steps": 20},
            num_draws=20,
            nuts_options={"num_samples": 20, "num_warmup": 20, "num_chains": 1},
            progress=False,
            **kwargs,
        )


def test_a_crash_while_saving_leaves_the_previous_report_whole(report, tmp_path, monkeypatch):
    out = tmp_path / "report"
    report.save(out)
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "render_comparison_html", crash)
    with pytest.raises(KeyboardInterrupt):
        dataclasses.replace(report, reference_name="another reference").save(out)
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert os.listdir(tmp_path) == ["report"]  # no temporary folder left beside it


def test_a_report_replaces_the_previous_one_whole(report, tmp_path):
    out = tmp_path / "report"
    out.mkdir()
    (out / "planar.nc").write_bytes(b"from an earlier report")
    report.save(out)
    assert not (out / "planar.nc").exists() and (out / "meanfield.nc").exists()
    assert (out / "run.json").exists() and (out / "report.html").exists()


def test_a_file_or_a_folder_of_other_files_is_refused_untouched(report, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="is a file"):
        report.save(tmp_path / "notes.txt")
    with pytest.raises(RunFolderError, match=r"holds files that are not a comparison report \(notes.txt\)"):
        report.save(tmp_path)
    assert os.listdir(tmp_path) == ["notes.txt"] and (tmp_path / "notes.txt").read_text() == "mine"
