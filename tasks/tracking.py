"""MLflow wiring shared by every stage: one tracking store, one experiment, artifacts under home."""

from __future__ import annotations

import json
import logging
import math
import subprocess
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STAGE_TAG = "lmforge.stage"  # curate, sft, align, quantize: which stage made the run
DATA_VERSION_TAG = "lmforge.data_version"  # the curated data version the run made or used


def use_mlflow(tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri`` and select ``experiment``.

    With a file-backed store the experiment's artifacts go to ``artifact_root`` rather than
    ``./mlruns`` of whatever directory the process was started in.

    Returns:
        The experiment id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        location = None
        if artifact_root is not None and tracking_uri.startswith(("sqlite:", "file:")):
            Path(artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(artifact_root).resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = existing.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def flat_params(section: str, fields: dict[str, Any], extra: dict[str, Any] | None = None) -> dict[str, str]:
    """MLflow params: every field of a config section as ``<section>.<name>`` (lists and dicts as JSON)
    plus ``extra``; values stringified."""
    params = {f"{section}.{k}": json.dumps(v) if isinstance(v, (list, dict)) else str(v) for k, v in fields.items()}
    params.update({k: str(v) for k, v in (extra or {}).items()})
    return params


def create_run(tracking_uri: str, experiment: str, run_name: str, stage: str, params: dict[str, str],
               tags: dict[str, str] | None = None, artifact_root: Path | None = None) -> str:
    """Create a stage's MLflow run (tagged with ``stage``) and log its params; returns the run id.

    Through ``MlflowClient`` with an explicit run id, not the fluent "active run": Prefect may run
    tasks on worker threads and the fluent API's active run is per thread.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param

    experiment_id = use_mlflow(tracking_uri, experiment, artifact_root)
    client = MlflowClient(tracking_uri)
    run = client.create_run(experiment_id, run_name=run_name,
                            tags={STAGE_TAG: stage, "mlflow.runName": run_name, **(tags or {})})
    items = [Param(k, v[:6000]) for k, v in params.items()]  # MLflow caps a param value at 6000 chars
    for start in range(0, len(items), 100):  # and a batch at 100 params
        client.log_batch(run.info.run_id, params=items[start : start + 100])
    return run.info.run_id


def mark_failed(tracking_uri: str, run_id: str, status: str = "FAILED") -> None:
    """End the run as FAILED (or KILLED when it can resume) so the UI does not show it running forever."""
    from mlflow import MlflowClient

    try:
        MlflowClient(tracking_uri).set_terminated(run_id, status=status)
    except Exception as err:  # noqa: BLE001 - bookkeeping must not hide the real error
        log.warning("could not mark MLflow run %s as %s: %s", run_id, status, err)


def is_metric(value: Any) -> bool:
    """A value MLflow can log as a metric: a finite int or float (bools are not numbers here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def code_commit() -> str:
    """The git commit of the running code (with a '+dirty' mark), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
