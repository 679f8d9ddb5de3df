"""``lmforge run``: curate → finetune → align → quantize → evaluate → register → gate/promote.

Each stage is a subflow whose result is stored by content (``tasks.stage_cache``): re-running after
a failure reuses every finished stage whose inputs (config, upstream stages, and the source files
that compute it) did not change and resumes at the one that failed. The final markdown report
links the MLflow runs and the registered version.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact

from configs.schema import LmforgeConfig
from tasks.code_hash import REPO_ROOT as CODE_ROOT
from tasks.code_hash import STAGE_ENTRY_MODULES, stage_code_hash
from tasks.holdout import evaluate_holdout_task
from tasks.models import import_base_model
from tasks.registry import gate_inputs, holds_registration, register_task, version_aliases
from tasks.results import (
    AlignResult,
    CurateResult,
    EvaluationResult,
    ExportResult,
    FinetuneResult,
    PipelineResult,
    RegistrationResult,
)
from tasks.stage_cache import cached_stage, stage_key
from tasks.tracking import use_mlflow

STAGES = ("curate", "finetune", "align", "quantize", "evaluate", "register")


@flow(name="pipeline")
def pipeline_flow(cfg: LmforgeConfig) -> PipelineResult:
    """Run every stage on ``cfg``; returns per-stage results, the registered version and its aliases."""
    from flows.align import align_flow
    from flows.curate import curate_flow
    from flows.finetune import finetune_flow
    from flows.quantize import quantize_flow

    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    reused: dict[str, bool] = {}

    data = curate_flow(cfg)
    reused["curate"] = data.reused
    inputs = stage_inputs(cfg, manifest["source_sha256"], data.version)

    sft, reused["finetune"] = cached_stage(
        cfg.home, "finetune", inputs["finetune"], lambda: finetune_flow(cfg, data_version=data.version),
        FinetuneResult, path_keys=("adapter_dir",))
    aligned, reused["align"] = cached_stage(
        cfg.home, "align", inputs["align"],
        lambda: align_flow(cfg, sft_adapter=sft.adapter_dir, data_version=data.version),
        AlignResult, path_keys=("adapter_dir",))
    exported, reused["quantize"] = cached_stage(
        cfg.home, "quantize", inputs["quantize"],
        lambda: quantize_flow(cfg, adapter_dir=aligned.adapter_dir, data_version=data.version),
        ExportResult, path_keys=("selected_path",))
    evaluated, reused["evaluate"] = cached_stage(
        cfg.home, "evaluate", inputs["evaluate"],
        lambda: evaluate_holdout_task(cfg.home, exported.selected_path, data.version, cfg.evaluate),
        EvaluationResult)

    lineage = {
        "data_version": data.version, "config_hash": cfg.fingerprint(),
        # The commit that built the registered files (the export), recorded when that stage ran.
        "code_commit": exported.code_commit or "unknown",
        "stage_code": json.dumps({stage: {"commit": result.code_commit, "code_hash": result.code_hash}
                                  for stage, result in (("finetune", sft), ("align", aligned),
                                                        ("quantize", exported), ("evaluate", evaluated))}),
        "base_model": cfg.model.base, "base_sha256": manifest["source_sha256"],
        "quant_format": exported.selected, "sft_method": cfg.sft.method,
        "curate_run_id": data.mlflow_run_id or "", "sft_run_id": sft.mlflow_run_id or "",
        "align_run_id": aligned.mlflow_run_id or "", "quantize_run_id": exported.mlflow_run_id or "",
        # Why this variant: per task, its paired 95% interval against the fp32 IR (empty when fp32 won).
        "quality_vs_fp32": json.dumps(exported.quality_vs_fp32()),
    }
    artifacts = {"openvino": exported.selected_path, "adapter": aligned.adapter_dir}
    if exported.merged_hf is not None:
        artifacts["merged_hf"] = exported.merged_hf
    key = register_key(inputs["register"])
    registered, reused["register"] = cached_stage(
        cfg.home, "register", inputs["register"],
        lambda: _register_and_gate(cfg, artifacts, evaluated.metrics, lineage, exported, key), RegistrationResult,
        # A stored registration counts only while this registry still has that version.
        still_valid=lambda stored: holds_registration(cfg.registry.model_name, stored.version, key))
    if reused["register"]:  # aliases move after registration (promote, rollback, the MLflow UI)
        registered = registered.model_copy(update={"aliases": version_aliases(cfg.registry.model_name,
                                                                              registered.version)})

    report = _report(cfg, data, sft, aligned, exported, evaluated, registered, reused)
    create_markdown_artifact(markdown=report, key="lmforge-pipeline", description="lmforge pipeline run")
    return PipelineResult(data=data, finetune=sft, align=aligned, quantize=exported, evaluate=evaluated,
                          register=registered, reused=reused, report=report)


def stage_inputs(cfg: LmforgeConfig, base_sha256: str, data_version: str,
                 code_root: Path | None = None) -> dict[str, dict[str, Any]]:
    """What each cached stage's result depends on: its config sections, the key of the stage before
    it (so a change anywhere upstream invalidates everything after it) and its own code hash.

    Args:
        cfg: the full config.
        base_sha256: the imported base model's source hash.
        data_version: the curated data version.
        code_root: the source tree the code hashes are taken over (default: this checkout).
    """
    root = code_root or CODE_ROOT
    code = {stage: stage_code_hash(stage, root) for stage in STAGE_ENTRY_MODULES}
    finetune = {"base_sha256": base_sha256, "model": cfg.model.model_dump(mode="json"), "data_version": data_version,
                "sft": cfg.sft.model_dump(mode="json"), "evaluate": cfg.evaluate.model_dump(mode="json"),
                "code": code["finetune"]}
    align = {"sft": stage_key("finetune", finetune), "align": cfg.align.model_dump(mode="json"), "code": code["align"]}
    quantize = {"align": stage_key("align", align), "quantize": cfg.quantize.model_dump(mode="json"),
                "code": code["quantize"]}
    evaluate = {"quantize": stage_key("quantize", quantize), "evaluate": cfg.evaluate.model_dump(mode="json"),
                "code": code["evaluate"]}
    # The registry this run writes to is part of what "registered" means; the gates only decide the aliases.
    version = {"evaluate": stage_key("evaluate", evaluate), "tracking_uri": cfg.tracking_uri(),
               "registry": cfg.registry.model_dump(mode="json", exclude={"gates", "tracking_uri"}),
               "code": code["register"]}
    register = {"version": version, "gates": cfg.registry.gates.model_dump(mode="json")}
    return {"finetune": finetune, "align": align, "quantize": quantize, "evaluate": evaluate, "register": register}


def register_key(register_inputs: dict[str, Any]) -> str:
    """Identity of a registration (the version tag that makes re-registering idempotent): everything
    in the register stage's inputs except the gates, so re-gating reuses the version."""
    return stage_key("register-version", register_inputs["version"])


def _register_and_gate(cfg: LmforgeConfig, artifacts: dict[str, Path], metrics: dict[str, float],
                       lineage: dict[str, str], exported: ExportResult, key: str) -> RegistrationResult:
    measured = gate_inputs(exported.selected_row())
    registered = register_task(cfg.registry, artifacts, metrics, {**lineage, "gate_measurements": json.dumps(measured)},
                               key, size_mb=measured["size_mb"], latency_ms=measured["latency_ms"],
                               run_name=f"register-{lineage['data_version'][:8]}")
    return RegistrationResult(**dataclasses.asdict(registered), gate_inputs=measured)


def _report(cfg: LmforgeConfig, data: CurateResult, sft: FinetuneResult, aligned: AlignResult,
            exported: ExportResult, evaluated: EvaluationResult, registered: RegistrationResult,
            reused: dict[str, bool]) -> str:
    seconds = {"curate": data.stage_seconds, "finetune": sft.stage_seconds, "align": aligned.stage_seconds,
               "quantize": exported.stage_seconds, "evaluate": evaluated.stage_seconds,
               "register": registered.stage_seconds}
    stage_rows = "\n".join(
        f"| {s} | {'reused' if reused.get(s) else 'ran'} | {seconds.get(s) if seconds.get(s) is not None else '-'} |"
        for s in STAGES)
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(evaluated.metrics.items()))
    gate = "passed" if not registered.gate_reasons else "failed: " + "; ".join(registered.gate_reasons)
    return (
        f"# lmforge pipeline: {cfg.name}\n\n"
        f"- tracking: `{cfg.tracking_uri()}` experiment `{cfg.registry.experiment}`\n"
        f"- data version `{data.version}`; base `{cfg.model.base}`; selected variant `{exported.selected}`\n"
        f"- registered **{registered.name} v{registered.version}** (`{registered.model_uri}`), "
        f"aliases: {', '.join(registered.aliases) or 'none'}; gates {gate}\n"
        f"- MLflow runs: curate `{data.mlflow_run_id}`, finetune `{sft.mlflow_run_id}`, "
        f"align `{aligned.mlflow_run_id}`, quantize `{exported.mlflow_run_id}`, "
        f"register `{registered.run_id}`\n\n"
        f"## Stages\n| stage | status | seconds |\n|---|---|---|\n{stage_rows}\n\n"
        f"## Test-split metrics of the registered variant\n| metric | value |\n|---|---|\n{metric_rows}\n"
    )
