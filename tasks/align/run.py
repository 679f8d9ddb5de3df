"""Alignment run bookkeeping and the stage's Prefect tasks (thin wrappers over plain functions).

A run lives in ``<home>/runs/align/<name>/`` (layout in :mod:`tasks.align.trainer`) with
``run.json`` naming the SFT adapter it started from, the data version, the base-model load method
and the MLflow run id. ``<home>/runs/align/LATEST`` names the newest *finished* run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from prefect import task

from configs.schema import AlignConfig
from tasks.align import tracking
from tasks.align.trainer import train_stages
from tasks.files import atomic_write_text, read_pointer, write_pointer
from tasks.runtime import torch_threads

log = logging.getLogger(__name__)

LATEST = "LATEST"
RUN_FILE = "run.json"


class AlignRunError(RuntimeError):
    """No SFT adapter to continue from, or a run that cannot be started as asked."""


def align_root(home: Path) -> Path:
    """``<home>/runs/align``."""
    return Path(home) / "runs" / "align"


def read_latest_run(home: Path) -> str | None:
    """Name of the newest finished alignment run, or None."""
    return read_pointer(align_root(home) / LATEST)


def write_latest_run(home: Path, name: str) -> None:
    """Point ``<home>/runs/align/LATEST`` at ``name`` (atomically)."""
    write_pointer(align_root(home) / LATEST, name)


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
    sft_root = Path(home) / "runs" / "sft"
    if sft_adapter is None:
        if sft_run is None:
            sft_run = read_pointer(sft_root / LATEST)
            if sft_run is None:
                raise AlignRunError(f"no SFT run under {sft_root} (no LATEST): run `lmforge finetune` first, "
                                    f"or pass --sft-run / --adapter")
        run_dir = sft_root / sft_run
        if not run_dir.is_dir():
            known = ", ".join(sorted(p.name for p in sft_root.glob("sft-*"))) or "none"
            raise AlignRunError(f"SFT run {sft_run!r} not found under {sft_root} (runs: {known})")
        sft_adapter = run_dir / "adapter"
    sft_adapter = Path(sft_adapter).resolve()
    if not (sft_adapter / "adapter_config.json").is_file():
        raise AlignRunError(f"{sft_adapter}: not a PEFT adapter directory (no adapter_config.json); "
                            f"did the SFT run finish?")
    run_dir = sft_adapter.parent
    info: dict[str, Any] = {}
    if (run_dir / RUN_FILE).is_file():
        info = json.loads((run_dir / RUN_FILE).read_text())
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
    name = f"align-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = align_root(home) / name
    run_dir.mkdir(parents=True, exist_ok=False)
    info = {"name": name, "run_dir": str(run_dir), "sft_adapter": sft["adapter_dir"], "sft_run": sft["sft_run"],
            "data_version": data_version, "method": method, "mlflow_run_id": None,
            "align": cfg.model_dump(mode="json")}
    atomic_write_text(run_dir / RUN_FILE, json.dumps(info, indent=2))
    return info


def remember(run_dir: Path, **values: Any) -> None:
    """Update fields of ``run.json``."""
    path = Path(run_dir) / RUN_FILE
    info = json.loads(path.read_text())
    info.update(values)
    atomic_write_text(path, json.dumps(info, indent=2, default=str))


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
    remember(Path(run["run_dir"]), mlflow_run_id=run_id)
    return run_id


@task(name="align-train")
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
