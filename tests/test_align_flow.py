"""The align flow on real Prefect, real MLflow (temp SQLite) and real GRPO steps on the tiny model."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
from typer.testing import CliRunner

from configs.schema import load
from tests.align_helpers import make_sft_run, write_curated


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model gains nothing from two, and on a busy shared CPU two threads
    spin against each other."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture()
def align_env(tmp_path, tiny_model_dir, mlflow_uri):
    """A home with the tiny model, a curated version and a finished SFT run (LATEST)."""
    from tasks.models import load_tokenizer

    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    version = write_curated(home, load_tokenizer(tiny_model_dir))
    adapter = make_sft_run(home, tiny_model_dir, version)
    overrides = [
        f"home={home}", f"registry.tracking_uri={mlflow_uri}",
        "align.stages=[{name: instruction, max_steps: 1, reward_weights: {judge: 1.0}},"
        " {name: tasks, max_steps: 2, reward_weights: {label_match: 0.5, entity_recall: 0.3, format: 0.2}}]",
        f"align.judge.url={_dead_url()}", "align.judge.retries=0", "align.judge.timeout_s=2",
        "align.learning_rate=1e-3", "align.eval_max_samples_per_task=2", "evaluate.max_new_tokens=8",
    ]
    return home, version, adapter, overrides


def test_align_flow_trains_stages_evaluates_and_tracks(prefect_harness, align_env, mlflow_uri):
    from mlflow import MlflowClient

    from flows.align import align_flow

    home, version, sft_adapter, overrides = align_env
    cfg = load("tiny", overrides)
    result = align_flow(cfg)

    # Adapter and run bookkeeping
    assert result.sft_adapter == sft_adapter.resolve() and result.data_version == version
    assert result.method == "lora"
    assert (home / "runs" / "align" / "LATEST").read_text().strip() == result.run_name
    assert (home / "runs" / "align" / result.run_name / "adapter" / "adapter_config.json").is_file()
    assert [(s["name"], s["steps"], s["tasks"]) for s in result.stages] == [
        ("instruction", 1, ["sentiment", "ner", "summarization", "generation"]),
        ("tasks", 2, ["sentiment", "ner"]),
    ]
    # The judge port is closed: stage 1 still ran, scored by the rule-based fallback.
    assert result.judge_stats["failures"] >= 1 and result.judge_stats["fallback"] == 4
    assert result.judge_stats["judged"] == 0

    # Before/after evaluation on the validation split
    for name in ("sentiment_accuracy", "ner_f1", "summarization_rougeL", "format_compliance"):
        row = result.compare[name]
        assert row["before"] == result.before[name] and row["after"] == result.after[name]
        assert row["delta"] == pytest.approx(row["after"] - row["before"])
    assert result.before["n_examples"] == 8

    # MLflow: params, lineage tags, per-step metrics across both stages, results, artifacts
    client = MlflowClient(mlflow_uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lmforge.stage"] == "align" and run.data.tags["lmforge.data_version"] == version
    assert run.data.params["align.kl_beta"] == "0.04" and run.data.params["method"] == "lora"
    assert json.loads(run.data.params["align.stages"])[1]["reward_weights"]["label_match"] == 0.5
    steps = lambda key: sorted(m.step for m in client.get_metric_history(run.info.run_id, key))  # noqa: E731
    assert steps("rewards/judge/mean") == [1]
    assert steps("rewards/label_match/mean") == [2, 3] and steps("rewards/entity_recall/std") == [2, 3]
    for key in ("kl", "clip_ratio/region_mean", "completions/mean_length", "reward", "stage"):
        assert steps(key) == [1, 2, 3], key
    assert [m.value for m in client.get_metric_history(run.info.run_id, "weight/label_match")] == [0.5, 0.5]
    metrics = run.data.metrics
    assert metrics["before_format_compliance"] == result.before["format_compliance"]
    assert metrics["after_ner_f1"] == result.after["ner_f1"]
    assert metrics["delta_sentiment_accuracy"] == pytest.approx(result.compare["sentiment_accuracy"]["delta"])
    assert metrics["align_steps"] == 3
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "compare.md", "stages", "eval"} <= artifacts
    adapter_files = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert "adapter/adapter_config.json" in adapter_files and "adapter/adapter_model.safetensors" in adapter_files


def test_cli_align_reports_a_missing_sft_run_with_exit_code_2(prefect_harness, tmp_path, tiny_model_dir):
    from flows.cli import app

    home = tmp_path / "home"
    shutil.copytree(tiny_model_dir, home / "models" / "tiny")
    runner = CliRunner()
    result = runner.invoke(app, ["align", "-c", "tiny", f"home={home}"])
    assert result.exit_code == 2
    assert "no SFT run" in result.output and "lmforge finetune" in result.output
    result = runner.invoke(app, ["align", "-c", "tiny", f"home={home}", "--sft-run", "sft-nope"])
    assert result.exit_code == 2 and "SFT run 'sft-nope' not found" in result.output
    result = runner.invoke(app, ["align", "-c", "tiny", f"home={home}", "--adapter", str(tmp_path)])
    assert result.exit_code == 2 and "not a PEFT adapter directory" in result.output
