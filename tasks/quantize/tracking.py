"""Publish a quantisation report: Prefect markdown artifact and an MLflow run with the report files."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from tasks.tracking import DATA_VERSION_TAG, STAGE_TAG, use_mlflow

log = logging.getLogger(__name__)

EXPORT_TAG = "lmforge.export_id"


def log_export(summary: dict[str, Any], tracking_uri: str, experiment: str, artifact_root: Path | None = None,
               data_version: str | None = None) -> str:
    """Record an export in MLflow: a run ``quantize-<export_id>`` with per-variant size/speed/metrics.

    Metrics are named ``<variant>.<what>`` (e.g. ``int4.ir_mb``, ``int4.tok_s_8``,
    ``int4.sentiment_accuracy``); report.md, report.png and export.json are artifacts; the selected
    variant and its path are tags so the registry stage can find them.

    Returns:
        The MLflow run id.
    """
    import mlflow

    experiment_id = use_mlflow(tracking_uri, experiment, artifact_root)
    root = Path(summary["root"])
    with mlflow.start_run(run_name=f"quantize-{summary['export_id']}", experiment_id=experiment_id) as run:
        tags = {STAGE_TAG: "quantize", EXPORT_TAG: summary["export_id"],
                "lmforge.selected_variant": summary["selected"],
                "lmforge.selected_path": summary["selected_path"], "lmforge.adapter_sha256": summary["adapter_sha256"]}
        if data_version:
            tags[DATA_VERSION_TAG] = data_version
        mlflow.set_tags(tags)
        mlflow.log_params({"export_id": summary["export_id"], "base_dir": summary["base_dir"],
                           "adapter_dir": summary["adapter_dir"], "selection_policy": summary["selection"]["policy"]})
        for row in summary["rows"]:
            name = row["variant"]
            values = {"ir_mb": (row.get("ir_bytes") or 0) / 1e6 or None, "dir_mb": (row.get("dir_bytes") or 0) / 1e6,
                      "peak_rss_mb": row.get("peak_rss_mb"), "model_rss_mb": row.get("model_rss_mb")}
            values |= {k: v for k, v in row.items() if k.startswith(("tok_s_", "latency_p"))}
            values |= {k: v for k, v in row.get("metrics", {}).items() if isinstance(v, (int, float))}
            # The paired intervals vs fp32 the selection was made on: <variant>.<task>.diff / .low / .high / .drop_ub
            for task, c in summary["selection"].get("compare", {}).get(name, {}).items():
                values |= {f"{task}.diff": c["difference"], f"{task}.low": c["low"], f"{task}.high": c["high"],
                           f"{task}.drop_ub": c["drop_upper"]}
            mlflow.log_metrics({f"{name}.{k}": float(v) for k, v in values.items()
                                if isinstance(v, (int, float)) and math.isfinite(v)})
        for task, d in (summary.get("merge_check") or {}).get("tasks", {}).items():
            mlflow.log_metrics({f"merge_check.{task}.diff": d["difference"], f"merge_check.{task}.low": d["low"],
                                f"merge_check.{task}.high": d["high"]})
        for file in ("report.md", "report.png", "export.json"):
            if (root / file).is_file():
                mlflow.log_artifact(str(root / file), artifact_path="quantize")
        return run.info.run_id


def publish_markdown(markdown: str, export_id: str) -> None:
    """The report as a Prefect markdown artifact (visible on the flow run page)."""
    from prefect.artifacts import create_markdown_artifact

    create_markdown_artifact(markdown=markdown, key=f"quantize-{export_id}".lower()[:60],
                             description="Quantisation comparison report")


@task(name="quantize-log-mlflow", cache_policy=NO_CACHE)
def log_export_task(summary: dict, tracking_uri: str, experiment: str, artifact_root: Path | None = None,
                    data_version: str | None = None) -> str:
    """Prefect wrapper of :func:`log_export`."""
    return log_export(summary, tracking_uri, experiment, artifact_root, data_version)


@task(name="quantize-publish-report", cache_policy=NO_CACHE)
def publish_markdown_task(markdown: str, export_id: str) -> None:
    """Prefect wrapper of :func:`publish_markdown`."""
    publish_markdown(markdown, export_id)
