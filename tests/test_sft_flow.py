"""The finetune flow end to end on the tiny model: real Prefect, real MLflow (SQLite), real training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sft_helpers import sst2_records

VERSION = "v-sft-test"


def _write_curated(home: Path, tokenizer) -> None:
    """A curated version in the on-disk layout of the data stage (schema in the project brief)."""
    import datasets

    records = sst2_records(tokenizer, 56)
    splits = {"train": records[:40], "validation": records[40:48], "test": records[48:]}
    root = home / "data" / VERSION
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(
        str(root / "dataset"))
    for split, rows in splits.items():
        (root / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "card.json").write_text(json.dumps({"version": VERSION, "counts": {}}))
    (home / "data" / "LATEST").write_text(VERSION + "\n")


@pytest.fixture()
def flow_config(tmp_home, tiny_model_dir, mlflow_uri, monkeypatch, tmp_path):
    from configs.schema import load
    from tasks.models import load_tokenizer

    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root for a bare SQLite URI is ./mlruns
    _write_curated(tmp_home, load_tokenizer(tiny_model_dir))
    overrides = [f"home={tmp_home}", f"model.base={tiny_model_dir}", f"registry.tracking_uri={mlflow_uri}",
                 "sft.max_steps=4", "sft.learning_rate=0.003", "sft.cpu_threads=1", "evaluate.max_samples_per_task=4",
                 "evaluate.max_new_tokens=4"]
    return load("tiny", overrides), overrides


def test_finetune_flow_trains_evaluates_and_tracks(prefect_harness, flow_config):
    from mlflow import MlflowClient

    from flows.finetune import finetune_flow
    from tasks.runs import StageRuns, read_run_file

    cfg, _ = flow_config
    result = finetune_flow(cfg, progress_bar=False)

    adapter = Path(result.adapter_dir)
    assert (adapter / "adapter_model.safetensors").is_file() and (adapter / "adapter_config.json").is_file()
    assert StageRuns(cfg.home, "sft").latest() == result.run_name and result.data_version == VERSION
    assert read_run_file(result.run_dir)["mlflow_run_id"] == result.mlflow_run_id  # what --resume reopens
    assert result.train["steps"] == 4 and result.train["data"]["kept"] == 40
    assert "sentiment_accuracy" in result.base and "sentiment_accuracy" in result.tuned

    client = MlflowClient(cfg.tracking_uri())
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(cfg.artifact_root().resolve().as_uri())
    assert run.data.tags["lmforge.data_version"] == VERSION
    assert run.data.params["data_version"] == VERSION and run.data.params["sft.lora_r"] == "8"
    assert run.data.params["sft.method"] == "lora" and run.data.params["train_records"] == "40"
    loss = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted(m.step for m in loss) == [0, 1, 2, 3]  # one point per optimiser step
    for name in ("train/lr", "train/tokens_per_s", "train/peak_rss_mb"):
        assert len(client.get_metric_history(run.info.run_id, name)) == 4, name
    for name in ("base_sentiment_accuracy", "tuned_sentiment_accuracy", "base_n_examples", "tuned_format_compliance"):
        assert name in run.data.metrics, name
    assert run.data.metrics["tuned_n_examples"] == 4
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "adapter")}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= artifacts
    assert any(d.name == "lmforge-data-train" for d in (i.dataset for i in run.inputs.dataset_inputs))

    # --resume continues the same run directory and MLflow run (here: 2 more steps, no evaluation).
    longer = cfg.model_copy(update={"sft": cfg.sft.model_copy(update={"max_steps": 6, "evaluate": False})})
    resumed = finetune_flow(longer, resume=True, progress_bar=False)
    assert resumed.run_name == result.run_name and resumed.mlflow_run_id == result.mlflow_run_id
    assert resumed.train["resumed_from"].endswith("step-00000004/state.ckpt")
    assert [s for s, _ in resumed.train["loss_curve"]] == [1, 2, 3, 4, 5, 6]
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 6


def test_cli_finetune_reports_bad_inputs_clearly(prefect_harness, flow_config):
    from flows.cli import app

    _, overrides = flow_config
    runner = CliRunner()
    result = runner.invoke(app, ["finetune", "-c", "tiny", "--resume", *overrides])
    assert result.exit_code == 2
    assert "no SFT run to resume" in result.output

    result = runner.invoke(app, ["finetune", "-c", "tiny", "--data-version", "nope", *overrides])
    assert result.exit_code == 2 and "data version 'nope' not found" in result.output

    result = runner.invoke(app, ["finetune", "-c", "tiny", *overrides, "sft.tasks=[ner]"])
    assert result.exit_code == 2 and "no training records for sft.tasks=['ner']" in result.output
