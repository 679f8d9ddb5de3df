"""Run directories shared by the training stages (tasks.runs): names, run.json, LATEST."""

from __future__ import annotations

import json

import pytest

from tasks.runs import StageRuns, read_run_file, update_run_file


def test_a_new_run_has_its_record_and_latest_names_only_what_was_published(tmp_path):
    runs = StageRuns(tmp_path, "align")
    assert runs.latest() is None and runs.latest_dir() is None and runs.names() == []

    info = runs.create({"data_version": "v1", "mlflow_run_id": None})
    run_dir = tmp_path / "runs" / "align" / info["name"]
    assert info["name"].startswith("align-") and info["run_dir"] == str(run_dir)
    assert json.loads((run_dir / "run.json").read_text()) == info
    assert runs.latest() is None  # created is not finished: quantize must not pick it up yet

    runs.set_latest(info["name"])
    assert runs.latest() == info["name"] and runs.latest_dir() == run_dir and runs.names() == [info["name"]]


def test_updating_a_record_keeps_the_other_fields(tmp_path):
    info = StageRuns(tmp_path, "sft").create({"data_version": "v1", "mlflow_run_id": None})
    updated = update_run_file(info["run_dir"], mlflow_run_id="abc")
    assert updated == {**info, "mlflow_run_id": "abc"} == read_run_file(info["run_dir"])


def test_a_directory_without_a_record_reads_as_none_and_cannot_be_updated(tmp_path):
    assert read_run_file(tmp_path) is None
    with pytest.raises(FileNotFoundError, match="run.json"):
        update_run_file(tmp_path, mlflow_run_id="abc")


def test_latest_naming_a_deleted_run_has_no_directory(tmp_path):
    runs = StageRuns(tmp_path, "sft")
    runs.set_latest("sft-20260101-000000-1")
    assert runs.latest() == "sft-20260101-000000-1" and runs.latest_dir() is None
