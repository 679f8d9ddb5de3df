"""The pipeline's stage cache: keys follow the code that computes each stage, results record the
commit they were computed with, and a stored result can be re-checked before it is reused."""

from __future__ import annotations

import shutil

import pytest

from configs.schema import load
from flows.pipeline import stage_inputs
from tasks.code_hash import PACKAGES, REPO_ROOT, stage_sources
from tasks.results import FinetuneResult, RegistrationResult, StageResult
from tasks.stage_cache import cached_stage, stage_key

STAGES = ("finetune", "align", "quantize", "evaluate", "register")


@pytest.fixture()
def source_tree(tmp_path):
    """A copy of the project's packages whose files a test may edit."""
    root = tmp_path / "src"
    for package in PACKAGES:
        shutil.copytree(REPO_ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _keys(root) -> dict[str, str]:
    inputs = stage_inputs(load("tiny"), "base-sha", "data-v1", code_root=root)
    return {stage: stage_key(stage, inputs[stage]) for stage in STAGES}


@pytest.mark.parametrize(("edited", "first_invalidated"), [
    ("tasks/sft/module.py", "finetune"),
    ("tasks/align/trainer.py", "align"),
    ("tasks/quantize/export.py", "finetune"),  # evaluation's OpenVINO engine exports the base IR with it
    ("tasks/quantize/report.py", "quantize"),
    ("tasks/quantize/probe.py", "quantize"),  # run as `python -m tasks.quantize.probe`, never imported
    ("tasks/holdout.py", "evaluate"),
    ("tasks/pyfunc_model.py", "register"),
])
def test_editing_a_stage_file_invalidates_it_and_everything_downstream_only(source_tree, edited, first_invalidated):
    before = _keys(source_tree)
    with (source_tree / edited).open("a", encoding="utf-8") as file:
        file.write("\n# an edit that changes what the stage computes\n")
    after = _keys(source_tree)
    cut = STAGES.index(first_invalidated)
    assert {s: after[s] for s in STAGES[:cut]} == {s: before[s] for s in STAGES[:cut]}, "upstream stages kept"
    assert all(after[s] != before[s] for s in STAGES[cut:]), "this stage and every later one re-run"


def test_a_file_no_stage_runs_changes_no_key(source_tree):
    before = _keys(source_tree)
    assert not any("serving/routes/openai.py" == str(p) for s in STAGES for p in stage_sources(s, source_tree))
    with (source_tree / "serving" / "routes" / "openai.py").open("a", encoding="utf-8") as file:
        file.write("\n# gateway code: not part of any pipeline stage\n")
    assert _keys(source_tree) == before


def test_stage_sources_follow_imports_inside_functions():
    # tasks.quantize.steps imports export/merge/qat inside build_variant only.
    sources = {str(p) for p in stage_sources("quantize")}
    assert {"flows/quantize.py", "tasks/quantize/export.py", "tasks/quantize/qat.py",
            "tasks/quantize/merge.py"} <= sources
    assert not any(s.startswith(("tasks/sft/", "tasks/align/", "configs/")) for s in sources)


def test_a_stored_result_keeps_the_commit_it_was_computed_with(tmp_path, monkeypatch):
    import tasks.stage_cache

    monkeypatch.setattr(tasks.stage_cache, "code_commit", lambda: "commit-that-trained")
    def trained() -> dict:
        return {"adapter_dir": str(tmp_path), "run_dir": str(tmp_path), "run_name": "r1", "data_version": "v1"}

    first, reused = cached_stage(tmp_path, "finetune", {"code": "h1"}, trained, FinetuneResult,
                                 path_keys=("adapter_dir",))
    assert not reused and first.code_commit == "commit-that-trained" and first.code_hash == "h1"
    assert isinstance(first, FinetuneResult) and first.adapter_dir == tmp_path
    monkeypatch.setattr(tasks.stage_cache, "code_commit", lambda: "commit-checked-out-later")
    again, reused = cached_stage(tmp_path, "finetune", {"code": "h1"}, lambda: pytest.fail("must be reused"),
                                 FinetuneResult, path_keys=("adapter_dir",))
    assert reused and again.code_commit == "commit-that-trained" and again == first


def test_a_stored_result_older_code_cannot_read_is_computed_again(tmp_path):
    """A stored file that no longer validates against the stage's result type (written before a field was
    added) is a cache miss, not a crash or a half-filled result."""
    runs = []

    def run() -> dict:
        runs.append(1)
        return {"name": "m", "version": str(len(runs)), "model_uri": "models:/m/1"}

    cached_stage(tmp_path, "register", {"k": 1}, lambda: {"version": "0"}, StageResult)  # an old, thinner result
    result, reused = cached_stage(tmp_path, "register", {"k": 1}, run, RegistrationResult)
    assert not reused and result.version == "1" and runs == [1]


def test_still_valid_can_refuse_a_stored_result(tmp_path):
    runs = []

    def run():
        runs.append(1)
        return {"name": "m", "version": str(len(runs)), "model_uri": "models:/m/1"}

    cached_stage(tmp_path, "register", {"k": 1}, run, RegistrationResult)
    result, reused = cached_stage(tmp_path, "register", {"k": 1}, run, RegistrationResult,
                                  still_valid=lambda stored: True)
    assert reused and result.version == "1"
    result, reused = cached_stage(tmp_path, "register", {"k": 1}, run, RegistrationResult,
                                  still_valid=lambda stored: stored.version != "1")
    assert not reused and result.version == "2" and len(runs) == 2
