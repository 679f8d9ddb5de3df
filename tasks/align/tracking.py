"""MLflow bookkeeping of an alignment run: params, per-step metrics, before/after evaluation, adapter.

Everything goes through ``MlflowClient`` with an explicit run id (no fluent "active run"), because
Prefect may run tasks on worker threads and the fluent API's active run is per thread.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from configs.schema import AlignConfig
from tasks import tracking
from tasks.tracking import is_metric

SFT_RUN_TAG = "lmforge.sft_run_id"
EVAL_KEYS = ("accuracy", "macro_f1", "precision", "recall", "f1", "rougeL", "compliance", "perplexity")


def flat_params(cfg: AlignConfig, extra: dict[str, Any] | None = None) -> dict[str, str]:
    """MLflow params: every ``align`` field as ``align.<name>`` (stages and judge as JSON) plus ``extra``."""
    fields = cfg.model_dump(mode="json")
    fields["judge"] = {k: v for k, v in fields["judge"].items() if k != "api_key_env"}
    return tracking.flat_params("align", fields, extra)


def start_run(tracking_uri: str, experiment: str, run_name: str, params: dict[str, str],
              tags: dict[str, str] | None = None, artifact_root: Path | None = None) -> str:
    """Create the MLflow run of an alignment run and log its params; returns the run id."""
    return tracking.create_run(tracking_uri, experiment, run_name, "align", params, tags, artifact_root)


class MlflowSink:
    """A :data:`tasks.align.trainer.MetricSink` that logs each step's metrics into one run."""

    def __init__(self, tracking_uri: str, run_id: str):
        from mlflow import MlflowClient

        self.client = MlflowClient(tracking_uri)
        self.run_id = run_id

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(_key(k), float(v), now, int(step)) for k, v in metrics.items() if math.isfinite(v)]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])


def _key(name: str) -> str:
    # MLflow keys allow letters, digits, _ - . space / only.
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)


def log_results(tracking_uri: str, run_id: str, result: dict[str, Any], run_dir: Path,
                evaluations: dict[str, dict[str, float]] | None = None) -> dict[str, dict[str, float | None]]:
    """Log the run summary, ``before_``/``after_`` metrics, their deltas and the artifacts; finish the run.

    Args:
        tracking_uri: MLflow tracking URI.
        run_id: the run from :func:`start_run`.
        result: what :func:`tasks.align.trainer.train_stages` returned.
        run_dir: the alignment run directory (adapter/, stages/, eval/ are uploaded).
        evaluations: ``{"before": metrics, "after": metrics}`` (empty when evaluation is off).

    Returns:
        The comparison table ``{metric: {"before", "after", "delta"}}`` (also logged as compare.md).
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(tracking_uri)
    now = int(time.time() * 1000)
    step = int(result.get("steps", 0))
    values: dict[str, float] = {"align_seconds": float(result["seconds"]), "align_steps": float(step)}
    for prefix, metrics in (evaluations or {}).items():
        values.update({f"{prefix}_{k}": float(v) for k, v in metrics.items() if is_metric(v)})
    table = compare(evaluations or {})
    values.update({f"delta_{k}": row["delta"] for k, row in table.items() if row["delta"] is not None})
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
    run_dir = Path(run_dir)
    client.log_artifacts(run_id, str(run_dir / "adapter"), artifact_path="adapter")
    for stage_dir in sorted((run_dir / "stages").glob("*")):
        if (stage_dir / "history.json").is_file():
            client.log_artifact(run_id, str(stage_dir / "history.json"), artifact_path=f"stages/{stage_dir.name}")
    if (run_dir / "eval").is_dir():
        client.log_artifacts(run_id, str(run_dir / "eval"), artifact_path="eval")
    if table:
        client.log_text(run_id, compare_markdown(table), "compare.md")
    client.set_terminated(run_id, status="FINISHED")
    return table


def compare(evaluations: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Before/after/delta of every quality metric both evaluations report (perplexity: lower is better)."""
    before, after = evaluations.get("before") or {}, evaluations.get("after") or {}
    names = sorted(k for k in set(before) | set(after) if k.endswith(EVAL_KEYS))
    table = {}
    for name in names:
        b = before.get(name) if is_metric(before.get(name)) else None
        a = after.get(name) if is_metric(after.get(name)) else None
        table[name] = {"before": b, "after": a, "delta": a - b if a is not None and b is not None else None}
    return table


def compare_markdown(table: dict[str, dict[str, float | None]]) -> str:
    """The comparison as a markdown table (before = SFT adapter, after = aligned adapter)."""
    def cell(value: float | None, spec: str = ".4f") -> str:
        return "-" if value is None else format(value, spec)

    lines = ["| metric | SFT (before) | aligned (after) | delta |", "|---|---|---|---|"]
    lines += [f"| {k} | {cell(r['before'])} | {cell(r['after'])} | {cell(r['delta'], '+.4f')} |"
              for k, r in table.items()]
    return "\n".join(lines) + "\n"
