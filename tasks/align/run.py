"""Alignment run bookkeeping and the stage's Prefect tasks (thin wrappers over plain functions).

A run lives in ``<home>/runs/align/<name>/`` (layout in :mod:`tasks.align.trainer`) with
``run.json`` naming the SFT adapter it started from, the data version, the base-model load method
and the MLflow run id. ``<home>/runs/align/LATEST`` names the newest *finished* run.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from prefect import task

from configs.schema import AlignConfig
from tasks.align import tracking
from tasks.align.trainer import train_stages
from tasks.runs import StageRuns, read_run_file, update_run_file
from tasks.runtime import torch_threads

log = logging.getLogger(__name__)


class AlignRunError(RuntimeError):
    """No SFT adapter to continue from, or a run that cannot be started as asked."""


def resolve_sft(home: Path, sft_adapter: Path | None = None, sft_run: str | None = None) -> dict[str, Any]:
    """Find the SFT adapter to align and what its run recorded.

    Args:
        home: lmforge state directory.
        sft_adapter: an adapter directory (wins over ``sft_run``).
        sft_run: an SFT run name under ``<home>/runs/sft``; None with no adapter = ``LATEST``.

    Returns:
        ``{"adapter_dir", "sft_run", "sft_run_dir", "data_version", "method", "mlflow_run_id"}``; the
        last four are None when the adapter does not sit in an SFT run directory.

    Raises:
        AlignRunError: nothing found, naming where it looked and how to fix it.
    """
    sft_runs = StageRuns(home, "sft")
    if sft_adapter is None:
        if sft_run is None:
            sft_run = sft_runs.latest()
            if sft_run is None:
                raise AlignRunError(f"no SFT run under {sft_runs.root} (no LATEST): run `lmforge finetune` first, "
                                    f"or pass --sft-run / --adapter")
        run_dir = sft_runs.root / sft_run
        if not run_dir.is_dir():
            known = ", ".join(sft_runs.names()) or "none"
            raise AlignRunError(f"SFT run {sft_run!r} not found under {sft_runs.root} (runs: {known})")
        sft_adapter = run_dir / "adapter"
    sft_adapter = Path(sft_adapter).resolve()
    if not (sft_adapter / "adapter_config.json").is_file():
        raise AlignRunError(f"{sft_adapter}: not a PEFT adapter directory (no adapter_config.json); "
                            f"did the SFT run finish?")
    run_dir = sft_adapter.parent
    info = read_run_file(run_dir) or {}
    return {
        "adapter_dir": str(sft_adapter),
        "sft_run": info.get("name"),
        "sft_run_dir": str(run_dir) if info else None,
        "data_version": info.get("data_version"),
        "method": (info.get("sft") or {}).get("method"),
        "mlflow_run_id": info.get("mlflow_run_id"),
    }


def prepare_run(home: Path, sft: dict[str, Any], data_version: str, method: str, cfg: AlignConfig) -> dict[str, Any]:
    """Create ``<home>/runs/align/<name>/`` with its ``run.json``; returns the run info."""
    return StageRuns(home, "align").create({
        "sft_adapter": sft["adapter_dir"], "sft_run": sft["sft_run"], "data_version": data_version,
        "method": method, "mlflow_run_id": None, "align": cfg.model_dump(mode="json")})


def make_judge(cfg: AlignConfig, home: Path):
    """The judge for stages that weight ``judge``; None (rule-based score) without a judge URL."""
    if cfg.judge.url is None or not any("judge" in s.reward_weights for s in cfg.stages):
        return None
    from tasks.judge import Judge, judge_cache_path

    return Judge(cfg.judge, judge_cache_path(home))


def align(home: Path, model_dir: Path, run: dict[str, Any], cfg: AlignConfig, tracking_uri: str | None = None,
          mlflow_run_id: str | None = None) -> dict[str, Any]:
    """Train every stage for ``run`` on the curated train split; per-step metrics to MLflow when given.

    Returns:
        :func:`tasks.align.trainer.train_stages`'s result plus ``judge_stats`` when a judge was used.
    """
    from tasks.data import load_curated

    dataset = load_curated(Path(home), run["data_version"])
    if "train" not in dataset:
        raise AlignRunError(f"curated data {run['data_version']} has no 'train' split (splits: {', '.join(dataset)})")
    sink = tracking.MlflowSink(tracking_uri, mlflow_run_id) if tracking_uri and mlflow_run_id else None
    judge = make_judge(cfg, home)
    with torch_threads(cfg.num_threads):  # also here: Prefect may run this task on another thread
        result = train_stages(Path(model_dir), Path(run["sft_adapter"]), dataset["train"], cfg,
                              Path(run["run_dir"]), run["method"], judge=judge, sink=sink)
    if judge is not None:
        result["judge_stats"] = dict(judge.stats)
        log.info("judge: %s", judge.stats)
    return result


# --------------------------------------------------------------------------- Prefect tasks
@task(name="align-resolve-sft")
def resolve_sft_task(home: Path, sft_adapter: Path | None, sft_run: str | None) -> dict[str, Any]:
    """Prefect wrapper of :func:`resolve_sft`."""
    return resolve_sft(home, sft_adapter, sft_run)


@task(name="align-prepare-run")
def prepare_run_task(home: Path, sft: dict[str, Any], data_version: str, method: str, cfg: AlignConfig) -> dict:
    """Prefect wrapper of :func:`prepare_run`."""
    return prepare_run(home, sft, data_version, method, cfg)


@task(name="align-start-mlflow-run", retries=1)
def start_tracking_task(tracking_uri: str, experiment: str, run: dict[str, Any], params: dict[str, str],
                        tags: dict[str, str], artifact_root: Path | None) -> str:
    """Prefect wrapper: create the MLflow run and remember its id in run.json."""
    run_id = tracking.start_run(tracking_uri, experiment, run["name"], params, tags, artifact_root)
    update_run_file(Path(run["run_dir"]), mlflow_run_id=run_id)
    return run_id


# log_prints off: TRL maps its datasets, and datasets fingerprints the mapped function with dill, which
# disassembles it into a captured stdout; Prefect's print logging turns that into pages of bytecode.
@task(name="align-train", log_prints=False)
def train_task(home: Path, model_dir: str, run: dict[str, Any], cfg: AlignConfig, tracking_uri: str,
               mlflow_run_id: str) -> dict[str, Any]:
    """Prefect wrapper of :func:`align` (per-step metrics go to the MLflow run as they happen)."""
    result = align(home, Path(model_dir), run, cfg, tracking_uri, mlflow_run_id)
    # The per-step history is on disk (stages/*/history.json) and in MLflow; keep the result small.
    for stage in result["stages"]:
        stage.pop("history", None)
        stage.pop("weight_history", None)
    return result


@task(name="align-log-results", retries=1)
def log_results_task(tracking_uri: str, run_id: str, result: dict, run_dir: str,
                     evaluations: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """Prefect wrapper of :func:`tasks.align.tracking.log_results`."""
    return tracking.log_results(tracking_uri, run_id, result, Path(run_dir), evaluations)


@task(name="align-publish-run")
def publish_run_task(home: Path, name: str) -> None:
    """Point ``<home>/runs/align/LATEST`` at a finished run: from now on quantize exports its adapter."""
    StageRuns(home, "align").set_latest(name)
