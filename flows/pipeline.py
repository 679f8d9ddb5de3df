"""``lmforge run``: curate → finetune → align → quantize → evaluate → register → gate/promote.

Each stage is a subflow whose result is stored by content (``tasks.stage_cache``): re-running after
a failure reuses every finished stage whose inputs did not change and resumes at the one that
failed. The final markdown report links the MLflow runs and the registered version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact

from configs.schema import LmforgeConfig
from tasks.models import import_base_model
from tasks.registry import gate_version, register_task
from tasks.stage_cache import cached_stage, stage_key
from tasks.tracking import code_commit, use_mlflow

STAGES = ("curate", "finetune", "align", "quantize", "evaluate", "register")


@flow(name="pipeline")
def pipeline_flow(cfg: LmforgeConfig) -> dict[str, Any]:
    """Run every stage on ``cfg``; returns per-stage results, the registered version and its aliases."""
    from flows.align import align_flow
    from flows.curate import curate_flow
    from flows.finetune import finetune_flow
    from flows.quantize import quantize_flow

    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    reused: dict[str, bool] = {}

    data = curate_flow(cfg)
    reused["curate"] = bool(data.get("reused"))
    base_inputs = {"base_sha256": manifest["source_sha256"], "model": cfg.model.model_dump(mode="json"),
                   "data_version": data["version"]}

    sft_inputs = {**base_inputs, "sft": cfg.sft.model_dump(mode="json"), "evaluate": cfg.evaluate.model_dump(mode="json")}
    sft, reused["finetune"] = cached_stage(
        cfg.home, "finetune", sft_inputs,
        lambda: finetune_flow(cfg, data_version=data["version"], progress_bar=False), path_keys=("adapter_dir",))

    align_inputs = {"sft": stage_key("finetune", sft_inputs), "align": cfg.align.model_dump(mode="json")}
    aligned, reused["align"] = cached_stage(
        cfg.home, "align", align_inputs,
        lambda: align_flow(cfg, sft_adapter=Path(sft["adapter_dir"]), data_version=data["version"]),
        path_keys=("adapter_dir",))

    quantize_inputs = {"align": stage_key("align", align_inputs), "quantize": cfg.quantize.model_dump(mode="json")}
    exported, reused["quantize"] = cached_stage(
        cfg.home, "quantize", quantize_inputs,
        lambda: quantize_flow(cfg, adapter_dir=Path(aligned["adapter_dir"]), data_version=data["version"]),
        path_keys=("selected_path",))

    eval_inputs = {"quantize": stage_key("quantize", quantize_inputs), "evaluate": cfg.evaluate.model_dump(mode="json")}
    evaluated, reused["evaluate"] = cached_stage(
        cfg.home, "evaluate", eval_inputs,
        lambda: evaluate_selected(cfg, Path(exported["selected_path"]), data["version"]))

    lineage = {
        "data_version": data["version"], "config_hash": cfg.fingerprint(), "code_commit": code_commit(),
        "base_model": cfg.model.base, "base_sha256": manifest["source_sha256"],
        "quant_format": exported["selected"], "sft_method": cfg.sft.method,
        "curate_run_id": data.get("mlflow_run_id") or "", "sft_run_id": sft.get("mlflow_run_id") or "",
        "align_run_id": aligned.get("mlflow_run_id") or "", "quantize_run_id": exported.get("mlflow_run_id") or "",
    }
    artifacts = {"openvino": Path(exported["selected_path"]), "adapter": Path(aligned["adapter_dir"])}
    merged = Path(exported["root"]) / "merged_hf"
    if merged.is_dir():
        artifacts["merged_hf"] = merged
    register_inputs = {"evaluate": stage_key("evaluate", eval_inputs)}
    registered, reused["register"] = cached_stage(
        cfg.home, "register", register_inputs,
        lambda: _register_and_gate(cfg, artifacts, evaluated["metrics"], lineage, exported))

    report = _report(cfg, data, sft, aligned, exported, evaluated, registered, reused)
    create_markdown_artifact(markdown=report, key="lmforge-pipeline", description="lmforge pipeline run")
    return {"data": data, "finetune": sft, "align": aligned, "quantize": exported, "evaluate": evaluated,
            "register": registered, "reused": reused, "report": report}


@task(name="evaluate-selected")
def evaluate_selected(cfg: LmforgeConfig, ir_dir: Path, data_version: str) -> dict[str, Any]:
    """Score the chosen variant on the held-out test split (never used for selection or training)."""
    from tasks.data import load_curated
    from tasks.evaluate import evaluate_records
    from tasks.generators import OpenVINOGenerator

    test = list(load_curated(cfg.home, data_version)["test"])
    generate = OpenVINOGenerator(ir_dir, batch_size=cfg.evaluate.batch_size, cache_gb=cfg.evaluate.cache_gb)
    result = evaluate_records(test, generate, cfg.evaluate)
    return {"metrics": result.metrics, "ir_dir": str(ir_dir), "split": "test"}


def _register_and_gate(cfg: LmforgeConfig, artifacts: dict[str, Path], metrics: dict[str, float],
                       lineage: dict[str, str], exported: dict[str, Any]) -> dict[str, Any]:
    row = next((r for r in exported.get("rows", []) if r.get("variant") == exported["selected"]), {})
    version = register_task(cfg.registry, artifacts, metrics, lineage, run_name=f"register-{lineage['data_version'][:8]}")
    gated = gate_version(cfg.registry, version.version, size_mb=row.get("size_mb"), latency_ms=row.get("latency_ms"))
    return {"name": version.name, "version": version.version, "run_id": version.run_id,
            "model_uri": version.model_uri, "aliases": gated.aliases, "gate_reasons": gated.gate_reasons}


def _report(cfg, data, sft, aligned, exported, evaluated, registered, reused) -> str:
    seconds = {"finetune": sft.get("stage_seconds"), "align": aligned.get("stage_seconds"),
               "quantize": exported.get("stage_seconds"), "evaluate": evaluated.get("stage_seconds"),
               "register": registered.get("stage_seconds"), "curate": data.get("seconds")}
    stage_rows = "\n".join(
        f"| {s} | {'reused' if reused.get(s) else 'ran'} | {seconds.get(s) if seconds.get(s) is not None else '-'} |"
        for s in STAGES)
    metric_rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(evaluated["metrics"].items()))
    gate = "passed" if not registered["gate_reasons"] else "failed: " + "; ".join(registered["gate_reasons"])
    return (
        f"# lmforge pipeline: {cfg.name}\n\n"
        f"- tracking: `{cfg.tracking_uri()}` experiment `{cfg.registry.experiment}`\n"
        f"- data version `{data['version']}`; base `{cfg.model.base}`; selected variant `{exported['selected']}`\n"
        f"- registered **{registered['name']} v{registered['version']}** (`{registered['model_uri']}`), "
        f"aliases: {', '.join(registered['aliases']) or 'none'}; gates {gate}\n"
        f"- MLflow runs: curate `{data.get('mlflow_run_id')}`, finetune `{sft.get('mlflow_run_id')}`, "
        f"align `{aligned.get('mlflow_run_id')}`, quantize `{exported.get('mlflow_run_id')}`, "
        f"register `{registered['run_id']}`\n\n"
        f"## Stages\n| stage | status | seconds |\n|---|---|---|\n{stage_rows}\n\n"
        f"## Test-split metrics of the registered variant\n| metric | value |\n|---|---|\n{metric_rows}\n"
    )
