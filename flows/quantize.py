"""The ``quantize`` flow: base + adapter -> deployable variants, a comparison report, a selected variant.

    lmforge quantize --config configs/pipeline.yaml [--adapter PATH] [--data-version V]

Variants under ``<home>/exports/<export_id>/``: merged_hf + adapter (vLLM), fp32_ir, the PTQ and QAT
IRs from ``quantize.variants``, base_ir (+ adapter for openvino_genai runtime LoRA). The adapter is
validated against the base before anything is exported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow

from configs.schema import LmforgeConfig
from tasks.models import import_base_model
from tasks.quantize.steps import (
    build_variant_task,
    measure_variant_task,
    merge_check_task,
    plan_task,
    report_task,
    resolve_adapter,
    validate_task,
)
from tasks.quantize.tracking import log_export_task, publish_markdown_task
from tasks.results import ExportResult


@flow(name="quantize", log_prints=True)
def quantize_flow(
    cfg: LmforgeConfig,
    adapter_dir: Path | None = None,
    data_version: str | None = None,
    samples: list[tuple[str, str]] | None = None,
    eval_records: list[dict] | None = None,
    log_mlflow: bool = True,
) -> ExportResult:
    """Export every configured variant, measure and compare them, select one by policy, record it.

    Args:
        cfg: the full config (quantize drives the work, evaluate the scoring, model the base).
        adapter_dir: PEFT adapter; None = the newest aligned adapter, else the newest SFT run's.
        data_version: curated data version for calibration/QAT/evaluation; None = LATEST.
        samples: (prompt, completion) pairs to use instead of the curated train split.
        eval_records: records to score instead of the curated validation split (of the trained tasks,
            ``sft.tasks``: the model is tuned for them).
        log_mlflow: record the export as an MLflow run.

    Returns:
        Summary: export_id, root, selected, selected_path, rows, report paths, markdown, mlflow_run_id.
    """
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    base_dir = Path(manifest["path"])
    adapter = resolve_adapter(cfg.home, adapter_dir)
    info = validate_task(adapter, base_dir, cfg.quantize)  # a bad adapter stops the run before data or export work
    if samples is None or eval_records is None:
        from tasks.quantize.steps import curated_inputs

        curated_samples, curated_records = curated_inputs(cfg.home, data_version)
        samples = curated_samples if samples is None else samples
        if eval_records is None:
            eval_records = [r for r in curated_records if cfg.sft.tasks is None or r["task"] in cfg.sft.tasks]
    plan, info = plan_task(cfg.home, base_dir, adapter, cfg.quantize, samples, info)
    for name in plan.variants:
        build_variant_task(plan, name, cfg.quantize, samples, info)
    rows: list[dict[str, Any]] = []
    for name in plan.variants:  # fp32_ir comes before the variants it screens
        reference = next((r.get("eval_table") for r in rows if r["variant"] == "fp32_ir"), None)
        rows.append(measure_variant_task(plan, name, cfg.quantize, cfg.evaluate, eval_records, reference))
    # The merge check scores base + runtime LoRA on alignment's examples, so alignment's cached evaluation is reused.
    stage_examples = cfg.align.eval_max_samples_per_task or cfg.sft.eval_max_samples_per_task
    merge_eval = (cfg.evaluate.model_copy(update={"max_samples_per_task": stage_examples}) if stage_examples
                  else cfg.evaluate)
    merge = merge_check_task(plan, rows, merge_eval, eval_records, cfg.home / "cache" / "eval")
    summary = report_task(plan, rows, cfg.quantize, merge)
    publish_markdown_task(summary["markdown"], plan.export_id)
    run_id = None
    if log_mlflow:
        run_id = log_export_task(summary, cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root(),
                                 data_version)
    return ExportResult.model_validate({**summary, "mlflow_run_id": run_id})
