"""The ``align`` flow: SFT adapter -> GRPO reward stages -> aligned adapter, evaluated and tracked.

    lmforge align --config configs/pipeline.yaml                 # from <home>/runs/sft/LATEST
    lmforge align -c pipeline --sft-run sft-20260101-120000-42   # from a named SFT run

Steps: import (or reuse) the base model -> find the SFT adapter -> open the MLflow run (params,
lineage tags) -> evaluate the SFT adapter on the validation split ("before") -> train the stages
(per-step reward components, KL, clip ratio, completion length to MLflow) -> evaluate the aligned
adapter ("after") -> log before/after/delta, per-stage histories and the adapter; point
``<home>/runs/align/LATEST`` at the run.

Why GRPO: see :mod:`tasks.align` (TRL 1.16 has no PPOTrainer; GRPO is PPO's clipped objective
with a group-relative baseline).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow

from configs.schema import LmforgeConfig
from tasks.align import run as align_run
from tasks.align import tracking
from tasks.evaluate import evaluate_task
from tasks.models import import_base_model
from tasks.results import AlignResult
from tasks.runtime import torch_threads
from tasks.sft.data import validation_records
from tasks.tracking import DATA_VERSION_TAG, mark_failed


@flow(name="align", log_prints=True)
def align_flow(cfg: LmforgeConfig, sft_adapter: Path | None = None, sft_run: str | None = None,
               data_version: str | None = None) -> AlignResult:
    """Align the SFT adapter with the ``align`` section's reward stages.

    Args:
        cfg: the full config (sections used: model, sft, align, evaluate, registry).
        sft_adapter: adapter directory to start from (wins over ``sft_run``).
        sft_run: SFT run name under ``<home>/runs/sft``; both None = ``<home>/runs/sft/LATEST``.
        data_version: curated version for prompts and evaluation; None = the SFT run's version,
            else ``<home>/data/LATEST``.

    Returns:
        ``adapter_dir``, ``run_dir``, ``run_name``, ``mlflow_run_id``, ``data_version``, ``sft_adapter``,
        ``method``, ``stages`` (per-stage summaries), ``before`` / ``after`` metrics, ``compare``
        (metric -> before/after/delta), ``judge_stats`` (None without a judge URL) and ``stage_seconds``.
    """
    started = time.perf_counter()
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    model_dir = manifest["path"]
    sft = align_run.resolve_sft_task(cfg.home, sft_adapter, sft_run)
    version = data_version or sft["data_version"] or _latest_data_version(cfg)
    method = sft["method"] or cfg.sft.method
    run = align_run.prepare_run_task(cfg.home, sft, version, method, cfg.align)

    params = tracking.flat_params(cfg.align, {
        "base_model": cfg.model.base, "base_model_sha256": manifest["source_sha256"], "method": method,
        "sft_adapter": sft["adapter_dir"], "sft_run": sft["sft_run"] or "", "data_version": version,
        "config_fingerprint": cfg.fingerprint(),
    })
    tags = {DATA_VERSION_TAG: version}
    if sft["mlflow_run_id"]:
        tags[tracking.SFT_RUN_TAG] = sft["mlflow_run_id"]
    run_id = align_run.start_tracking_task(cfg.tracking_uri(), cfg.registry.experiment, run, params, tags,
                                           cfg.artifact_root())
    try:
        evaluations: dict[str, dict[str, float]] = {}
        records = validation_records(cfg.home, version, cfg.sft.tasks) if cfg.align.evaluate else None
        with torch_threads(cfg.align.num_threads):
            if records is not None:
                evaluations["before"] = _evaluate(cfg, model_dir, run, "before", sft["adapter_dir"], records)
            result = align_run.train_task(cfg.home, model_dir, run, cfg.align, cfg.tracking_uri(), run_id)
            if records is not None:
                evaluations["after"] = _evaluate(cfg, model_dir, run, "after", result["adapter_dir"], records)
        table = align_run.log_results_task(cfg.tracking_uri(), run_id, result, run["run_dir"], evaluations)
    except BaseException:
        mark_failed(cfg.tracking_uri(), run_id)
        raise
    align_run.publish_run_task(cfg.home, run["name"])
    if table:
        print("alignment before/after on the validation split:\n" + tracking.compare_markdown(table))
    return AlignResult(
        adapter_dir=result["adapter_dir"], run_dir=run["run_dir"], run_name=run["name"], mlflow_run_id=run_id,
        data_version=version, sft_adapter=sft["adapter_dir"], method=method, stages=result["stages"],
        before=evaluations.get("before", {}), after=evaluations.get("after", {}), compare=table,
        judge_stats=result.get("judge_stats"), stage_seconds=round(time.perf_counter() - started, 1),
    )


def _evaluate(cfg: LmforgeConfig, model_dir: str, run: dict[str, Any], prefix: str, adapter: str,
              records: list[dict[str, Any]]) -> dict[str, float]:
    settings = cfg.evaluate
    if cfg.align.eval_max_samples_per_task is not None:
        settings = settings.model_copy(update={"max_samples_per_task": cfg.align.eval_max_samples_per_task})
    out = evaluate_task(model_dir, settings, Path(run["run_dir"]) / "eval" / prefix, records=records,
                        adapter_dir=adapter, max_length=cfg.model.max_seq_len, artifact_key=f"align-{prefix}",
                        cache_dir=cfg.home / "cache" / "eval")
    return out["metrics"]


def _latest_data_version(cfg: LmforgeConfig) -> str:
    from tasks.data import read_latest

    version = read_latest(cfg.home)
    if version is None:
        raise align_run.AlignRunError(f"no curated data under {cfg.home / 'data'}: run `lmforge curate` first")
    return version
