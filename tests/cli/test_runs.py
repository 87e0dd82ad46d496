"""Run directories of the CLI: refusal of existing runs, atomic files, reports."""

import json

import pytest

from salr.cli.runs import markdown_table, RunDirectory
from salr.io.files import atomic_write_text


def test_existing_nonempty_run_directory_is_refused(tmp_path):
    (tmp_path / "old.txt").write_text("x")
    with pytest.raises(ValueError, match="already exists.*--overwrite"):
        RunDirectory(tmp_path)
    RunDirectory(tmp_path, overwrite=True)  # allowed when asked


def test_a_file_where_the_run_directory_should_be_is_refused(tmp_path):
    target = tmp_path / "run"
    target.write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        RunDirectory(target)


def test_metrics_accumulate_and_files_are_complete(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.update_metrics(a=1.5)
    run.update_metrics(b=[1, 2])
    assert json.loads((run.path / "metrics.json").read_text()) == {"a": 1.5, "b": [1, 2]}
    run.write_report("t", [("numbers", markdown_table(["k", "v"], [("x", 0.123456)]))])
    report = (run.path / "report.md").read_text()
    assert "| x | 0.1235 |" in report and report.startswith("# t")
    assert sorted(p.name for p in run.path.iterdir()) == ["metrics.json", "report.md"]  # no temp files left


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.json"
    target.write_text("old")


    with pytest.raises(TypeError):
        atomic_write_text(target, 123)  # not text: the write fails before the rename
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]
