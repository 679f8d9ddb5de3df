"""The ``curate`` flow: raw sources -> versioned instruction data set, data card, MLflow dataset.

    lmforge curate --config configs/pipeline.yaml

Re-running with the same inputs reuses the version: the build task is cached on the content hash
(raw bytes + data config + chat template) and the state directory.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from configs.schema import LmforgeConfig
from tasks.data.build import build_dataset_task
from tasks.data.card import publish_card_task
from tasks.data.store import data_version_task, is_complete, mark_latest_task
from tasks.data.tracking import log_curated_task
from tasks.models import import_base_model
from tasks.results import CurateResult


# log_prints off, also when run inside a flow that turns it on: datasets fingerprints functions with
# dill, which disassembles them with print(); captured as logs that is pages of bytecode.
@flow(name="curate", log_prints=False)
def curate_flow(cfg: LmforgeConfig, force: bool = False) -> CurateResult:
    """Curate ``cfg.data`` into ``<home>/data/<version>/`` and record it.

    Args:
        cfg: the full config (the data section drives the work; model gives the chat template).
        force: rebuild even when this version exists (bypasses the cache).

    Returns:
        Summary: version, path, reused, counts, total, quarantined, seconds, card_md, mlflow_run_id.
    """
    manifest = import_base_model(cfg.model.base, cfg.home, cfg.model)
    model_dir = Path(manifest["path"])
    version = data_version_task(cfg.data, model_dir)
    build = build_dataset_task.with_options(refresh_cache=True) if force else build_dataset_task
    state = build(cfg.data, cfg.home, model_dir, version, force=force, return_state=True)
    summary = state.result()
    summary = {**summary, "reused": summary["reused"] or state.name == "Cached"}
    if not is_complete(Path(summary["path"])):
        # Cached result, but its output was deleted since: rebuild instead of pointing at nothing.
        summary = build_dataset_task.with_options(refresh_cache=True)(cfg.data, cfg.home, model_dir, version)
    mark_latest_task(cfg.home, version)
    card_md = Path(summary["card_md"]).read_text(encoding="utf-8")
    publish_card_task(version, card_md)
    run_id = log_curated_task(cfg.home, version, cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    return CurateResult.model_validate({**summary, "mlflow_run_id": run_id})
