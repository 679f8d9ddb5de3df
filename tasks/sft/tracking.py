"""The MLflow side of an SFT run: params, data version, results, adapter (run directories: :mod:`tasks.runs`).

Per-step metrics (loss, learning rate, tokens/s, peak RSS) are logged during training by
Lightning's ``MLFlowLogger`` into the run created here; this module logs everything else.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from configs.schema import SFTConfig
from tasks import tracking

log = logging.getLogger(__name__)


def flat_params(cfg: SFTConfig, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """MLflow params: every ``sft`` field as ``sft.<name>`` plus ``extra`` (values stringified)."""
    return tracking.flat_params("sft", cfg.model_dump(mode="json"), extra)


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str],
              data_version: str | None, artifact_root: Path | None = None, run_id: str | None = None,
              home: Path | None = None) -> str:
    """Create (or reopen, on resume) the MLflow run of an SFT run; returns its id.

    Args:
        tracking_uri: MLflow tracking URI.
        experiment: experiment name (created when missing).
        run_name: the SFT run name.
        params: flat params to log (see :func:`flat_params`); unchanged on resume.
        data_version: curated data version, tagged and logged as a dataset input when known.
        artifact_root: artifact location for a newly created experiment (file-backed stores only,
            see :func:`tasks.tracking.use_mlflow`).
        run_id: an existing run to continue (resume).
        home: lmforge home, to log the curated train split as an MLflow dataset input.
    """
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)  # as on a new run, for any fluent call after a resume
    if run_id is not None:
        MlflowClient(tracking_uri).update_run(run_id, status="RUNNING")
        return run_id
    tags = {tracking.DATA_VERSION_TAG: data_version} if data_version else {}
    run_id = tracking.create_run(tracking_uri, experiment, run_name, "sft", params, tags, artifact_root)
    if data_version and home is not None:
        _log_dataset_input(home, data_version, run_id)
    return run_id


def _log_dataset_input(home: Path, version: str, run_id: str) -> None:
    try:
        import mlflow

        from tasks.data.tracking import mlflow_dataset

        with mlflow.start_run(run_id=run_id):
            mlflow.log_input(mlflow_dataset(home, version, "train"), context="training")
    except (ImportError, OSError, KeyError) as err:  # the tag alone still names the version
        log.warning("could not log curated data %s as an MLflow dataset input: %s", version, err)


def log_curve(tracking_uri: str, run_id: str, points: list[dict[str, Any]], png: Path | None) -> None:
    """Log each curve point's metrics as ``curve/<metric>`` at its step (MLflow draws them), and the plot."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    metrics = [Metric(f"curve/{name}", float(value), now, int(p["step"]))
               for p in points for name, value in p["metrics"].items()
               if tracking.is_metric(value) and not name.startswith(("n_", "eval_"))]
    metrics += [Metric("curve/train_seconds", float(p["train_seconds"]), now, int(p["step"])) for p in points]
    for start in range(0, len(metrics), 900):  # MLflow accepts at most 1000 metrics per batch
        client.log_batch(run_id, metrics=metrics[start : start + 900])
    if png is not None and Path(png).is_file():
        client.log_artifact(run_id, str(png), artifact_path="sft")


def log_results(tracking_uri: str, run_id: str, summary: dict[str, Any], run_dir: Path,
                evaluations: dict[str, dict[str, float]] | None = None) -> None:
    """Log the training summary, evaluation metric sets (prefixed) and the adapter as artifacts.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: the run from :func:`start_run`.
        summary: what :func:`tasks.sft.train.train_sft` returned.
        run_dir: the SFT run directory (adapter/ and metrics.json are uploaded).
        evaluations: prefix -> metrics, e.g. ``{"base": {...}, "tuned": {...}}``.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    values: dict[str, float] = {
        "train_seconds": summary["train_seconds"],
        "tokens_per_s_mean": summary["tokens_per_s"],
        "peak_rss_mb_train": summary["peak_rss_mb"],
        "tokens_seen": summary["tokens_seen"],
        "train_records": summary["data"]["kept"],
        "train_records_dropped_too_long": summary["data"]["dropped_too_long"],
    }
    if summary.get("final_loss") is not None:
        values["final_loss"] = summary["final_loss"]
    for prefix, metrics in (evaluations or {}).items():
        for name, value in metrics.items():
            if tracking.is_metric(value):
                values[f"{prefix}_{name}"] = float(value)
    step = int(summary.get("steps", 0))
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])
    client.log_artifacts(run_id, str(Path(run_dir) / "adapter"), artifact_path="adapter")
    client.log_artifact(run_id, str(Path(run_dir) / "metrics.json"), artifact_path="sft")
    client.set_terminated(run_id, status="FINISHED")
