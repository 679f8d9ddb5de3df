"""The curate flow on real Prefect and real MLflow: artifact, dataset inputs, cache reuse, CLI.

The shipped data is curated in test_curate_build.py; here a small crafted source keeps each flow
run quick, since what is under test is the wiring (Prefect cache and artifact, MLflow, CLI).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from configs.schema import load

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("data.sources=[{name: tr, task: sentiment, format: sst2, path: train.tsv, split: train},"
           " {name: dv, task: sentiment, format: sst2, path: dev.tsv, split: eval}]")


@pytest.fixture(scope="module")
def flow_env(tmp_path_factory, tiny_model_dir):
    """A state dir with the session's tiny model already imported, a crafted raw dir and an MLflow store."""
    root = tmp_path_factory.mktemp("curate-flow")
    shutil.copytree(tiny_model_dir, root / "home" / "models" / "tiny")
    raw = root / "raw"
    raw.mkdir()
    rng = random.Random(1)
    words = [f"{a}{b}" for a in ("mo", "ri", "ta", "ve", "lu", "sk") for b in ("ndo", "pel", "rak", "sto", "vim")]
    lines = [f"{' '.join(rng.sample(words, 8))}\t{i % 2}" for i in range(60)]
    (raw / "train.tsv").write_text("\n".join(lines[:40]) + "\n")
    (raw / "dev.tsv").write_text("\n".join(lines[40:]) + "\n")
    overrides = [f"home={root / 'home'}", f"registry.tracking_uri=sqlite:///{root / 'mlflow.db'}",
                 f"data.raw_dir={raw}", SOURCES, "data.train_examples=24", "data.eval_examples_per_task=6"]
    return root, overrides


def _artifact(key: str):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    # Every field is given explicitly: the server rejects the nulls the client sends for omitted ones.
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=1, offset=0,
        )
    return found[0]


def test_curate_flow_publishes_card_logs_dataset_and_reuses_version(prefect_harness, flow_env):
    import mlflow

    from flows.curate import curate_flow
    from tasks.data import load_curated

    root, overrides = flow_env
    cfg = load(REPO / "configs" / "tiny.yaml", overrides)
    first = curate_flow(cfg)
    path = Path(first.path)
    assert first.reused is False and path.parent == cfg.home / "data"
    assert len(load_curated(cfg.home)["train"]) == 24

    artifact = _artifact("data-card")
    assert f"Data card `{first.version}`" in artifact.data and "## Quarantine" in artifact.data

    client = mlflow.MlflowClient(cfg.tracking_uri())
    run = client.get_run(first.mlflow_run_id)
    assert run.info.run_name == f"curate-{first.version}"
    assert run.data.tags["lmforge.data_version"] == first.version
    inputs = {(d.dataset.name, d.dataset.digest) for d in run.inputs.dataset_inputs}
    assert inputs == {(f"lmforge-data-{s}", f"{first.version}-{s}") for s in ("train", "validation", "test")}
    contexts = {t.value for d in run.inputs.dataset_inputs for t in d.tags if t.key == "mlflow.data.context"}
    assert contexts == {"train", "validation", "test"}
    assert run.data.metrics["examples.train.total"] == 24
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "data_card")}
    assert logged == {f"data_card/{n}" for n in ("card.md", "card.json", "lengths.png", "quarantine.jsonl")}
    # Artifacts go beside the SQLite store, not into ./mlruns of whatever directory we run in.
    assert client.get_experiment(run.info.experiment_id).artifact_location == (root / "mlartifacts").as_uri()

    # Same inputs again: the Prefect cache hands back the same version; nothing is rebuilt or re-logged.
    stamp = (path / "card.json").stat().st_mtime_ns
    second = curate_flow(cfg)
    assert second.reused is True and second.version == first.version
    assert (path / "card.json").stat().st_mtime_ns == stamp
    assert second.mlflow_run_id == first.mlflow_run_id
    runs = client.search_runs([run.info.experiment_id], f"tags.`lmforge.data_version` = '{first.version}'")
    assert len(runs) == 1

    # The cached result points at a deleted directory: the flow notices and rebuilds.
    shutil.rmtree(path)
    third = curate_flow(cfg)
    assert third.version == first.version and (path / "card.json").is_file()


def test_cli_curate_prints_card_and_exits_2_on_missing_sources(prefect_harness, flow_env):
    from flows.cli import app

    _, overrides = flow_env
    runner = CliRunner()
    args = ["curate", "-c", "tiny", *overrides, "data.train_examples=16"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Data card" in result.output and "Cleaning rules" in result.output and "(built)" in result.output

    as_json = runner.invoke(app, [*args, "--json"])
    assert as_json.exit_code == 0, as_json.output
    summary = json.loads(as_json.stdout[as_json.stdout.index("{"):])
    assert summary["reused"] is True and summary["counts"]["train"]["total"] == 16

    missing = runner.invoke(app, ["curate", "-c", "tiny", *overrides, "data.raw_dir=/nonexistent"])
    assert missing.exit_code == 2 and "source file(s) not found" in missing.output
