"""Log a curated version to MLflow with ``mlflow.data`` so runs show which data they used."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

from prefect import task

from tasks.data.store import SPLITS, read_card, version_dir
from tasks.tracking import DATA_VERSION_TAG, STAGE_TAG, use_mlflow

log = logging.getLogger(__name__)
_COLUMNS = ["id", "task", "source", "input", "prompt", "completion", "label"]


def mlflow_dataset(home: Path, version: str, split: str):
    """An ``mlflow.data`` dataset for one split of a curated version.

    Other stages log it with ``mlflow.log_input(mlflow_dataset(home, v, "train"), context="training")``;
    name and digest are fixed by version and split, so every run that used the same data points at
    the same dataset entry.
    """
    import mlflow.data
    import pandas as pd

    path = version_dir(home, version) / f"{split}.jsonl"
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    frame = pd.DataFrame([{**{c: r[c] for c in _COLUMNS if c != "label"},
                           "label": json.dumps(r["label"], ensure_ascii=False)} for r in rows], columns=_COLUMNS)
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    with warnings.catch_warnings():
        # MLflow registers its local artifact source under two schemes and warns that a local path
        # matches both; either one is the same LocalArtifactDatasetSource.
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(path.resolve().as_uri())
    return mlflow.data.from_pandas(frame, source=source, targets="completion",
                                   name=f"lmforge-data-{split}", digest=f"{version}-{split}"[:36])


def log_curated(home: Path, version: str, tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Record a curated version in MLflow (once per version and tracking store).

    Creates a run ``curate-<version>`` tagged with the version, logs each split as a dataset input,
    the counts as metrics and the card, quarantine and histogram as artifacts. A version that is
    already logged is not logged again.

    Args:
        home: lmforge state directory.
        version: curated data version.
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created when missing).
        artifact_root: artifact location for a newly created experiment in a file-backed store
            (``LmforgeConfig.artifact_root()``); a tracking server picks its own.

    Returns:
        The MLflow run id.
    """
    import mlflow

    experiment_id = use_mlflow(tracking_uri, experiment, artifact_root)
    existing = mlflow.search_runs([experiment_id], filter_string=f"tags.`{DATA_VERSION_TAG}` = '{version}'",
                                  output_format="list", max_results=1)
    if existing:
        log.info("data version %s already logged in MLflow run %s", version, existing[0].info.run_id)
        return existing[0].info.run_id
    card: dict[str, Any] = read_card(home, version)
    path = version_dir(home, version)
    with mlflow.start_run(run_name=f"curate-{version}", experiment_id=experiment_id) as run:
        mlflow.set_tags({DATA_VERSION_TAG: version, STAGE_TAG: "curate"})
        mlflow.log_params({"data_version": version, "seed": card["seed"], "config_sha256": card["config_sha256"]})
        for split in SPLITS:
            mlflow.log_input(mlflow_dataset(home, version, split), context=split)
            for task_name, count in card["counts"][split].items():
                mlflow.log_metric(f"examples.{split}.{task_name}", count)
        mlflow.log_metric("quarantined", card["quarantined"])
        for name in ("card.md", "card.json", "lengths.png", "quarantine.jsonl"):
            mlflow.log_artifact(str(path / name), artifact_path="data_card")
        return run.info.run_id


@task(name="log-dataset-mlflow", retries=1)
def log_curated_task(home: Path, version: str, tracking_uri: str, experiment: str, artifact_root: Path) -> str:
    """Prefect wrapper around :func:`log_curated`."""
    return log_curated(home, version, tracking_uri, experiment, artifact_root)
