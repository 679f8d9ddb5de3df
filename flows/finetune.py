"""The ``finetune`` flow: curated data + base model -> (Q)LoRA adapter, evaluated and tracked.

    lmforge finetune --config configs/pipeline.yaml            # new run on the LATEST data version
    lmforge finetune --config configs/pipeline.yaml --resume   # continue the newest run

Steps: import (or reuse) the base model -> prepare the run (select records, run dir) -> open the
MLflow run (params, data version) -> train (Lightning, subprocess; per-step metrics to MLflow, adapter
snapshots for the learning curve) -> evaluate base and tuned on the validation split -> score the
learning curve -> log results and the adapter.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from configs.schema import LmforgeConfig
from tasks.evaluate import evaluate_task
from tasks.models import import_base_model
from tasks.results import FinetuneResult
from tasks.runtime import torch_threads
from tasks.sft import tracking
from tasks.sft.data import validation_records
from tasks.sft.run import curve_task, log_results_task, prepare_run_task, start_tracking_task, train_task
from tasks.sft.train import SFTInterrupted, TrainSpec, cpu_threads
from tasks.tracking import mark_failed


@flow(name="finetune", log_prints=True)
def finetune_flow(cfg: LmforgeConfig, resume: bool = False, data_version: str | None = None,
                  progress_bar: bool = True) -> FinetuneResult:
    """Fine-tune ``cfg.model.base`` on curated data with the ``sft`` section.

    Args:
        cfg: the full config (sections used: model, sft, evaluate, registry).
        resume: continue the newest SFT run from its last valid checkpoint.
        data_version: curated version; None = ``<home>/data/LATEST`` (or the resumed run's version).
        progress_bar: show Lightning's progress bar (loss, tokens/s).

    Returns:
        ``adapter_dir``, ``run_dir``, ``run_name``, ``mlflow_run_id``, ``data_version``, the training
        summary under ``train`` and the metric sets under ``base`` / ``tuned`` (empty when
        ``sft.evaluate`` is off).
    """
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    model_dir = manifest["path"]
    run = prepare_run_task(cfg.home, cfg.sft, data_version, resume)
    params = tracking.flat_params(cfg.sft, {
        "base_model": cfg.model.base, "base_model_sha256": manifest["source_sha256"],
        "max_seq_len": cfg.model.max_seq_len, "data_version": run["data_version"],
        "train_records": run["n_records"], "config_fingerprint": cfg.fingerprint(),
    })
    run_id = start_tracking_task(cfg.tracking_uri(), cfg.registry.experiment, run, params, cfg.artifact_root(),
                                 cfg.home)
    spec = TrainSpec(
        run_dir=run["run_dir"], model_dir=model_dir, sft=cfg.sft.model_dump(mode="json"),
        max_seq_len=cfg.model.max_seq_len, records_path=run["records_path"], resume=run["resume"],
        tracking_uri=cfg.tracking_uri(), mlflow_run_id=run_id, progress_bar=progress_bar,
    )
    try:
        summary = train_task(spec)
    except SFTInterrupted:
        mark_failed(cfg.tracking_uri(), run_id, status="KILLED")  # resumable, not broken
        raise
    except BaseException:
        mark_failed(cfg.tracking_uri(), run_id)
        raise

    evaluations: dict[str, dict[str, float]] = {}
    tables: dict[str, str] = {}
    if cfg.sft.evaluate:
        records = validation_records(cfg.home, run["data_version"], cfg.sft.tasks)
        eval_cfg = cfg.evaluate
        if cfg.sft.eval_max_samples_per_task:
            eval_cfg = eval_cfg.model_copy(update={"max_samples_per_task": cfg.sft.eval_max_samples_per_task})
        out = Path(run["run_dir"]) / "eval"
        # Same thread count as training: on a shared CPU, oversubscribed OpenMP threads crawl.
        with torch_threads(cpu_threads(cfg.sft)):
            for prefix, adapter in (("base", None), ("tuned", summary["adapter_dir"])):
                result = evaluate_task(model_dir, eval_cfg, out / prefix, records=records, adapter_dir=adapter,
                                       max_length=cfg.model.max_seq_len, artifact_key=f"sft-{prefix}",
                                       cache_dir=cfg.home / "cache" / "eval")
                evaluations[prefix], tables[prefix] = result["metrics"], result["table_json"]
            if cfg.sft.curve_points:
                curve_task(run["run_dir"], model_dir, records, eval_cfg, cfg.sft.curve_samples_per_task,
                           tables.get("base"), tables.get("tuned"), summary["steps"], summary["train_seconds"],
                           cfg.model.max_seq_len, cfg.tracking_uri(), run_id)
    log_results_task(cfg.tracking_uri(), run_id, summary, run["run_dir"], evaluations)
    return FinetuneResult(
        adapter_dir=summary["adapter_dir"], run_dir=run["run_dir"], run_name=run["name"], mlflow_run_id=run_id,
        data_version=run["data_version"], train=summary, base=evaluations.get("base", {}),
        tuned=evaluations.get("tuned", {}),
    )
