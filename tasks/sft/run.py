"""Prefect tasks of the SFT stage (thin wrappers) and the run preparation they share.

A run lives in ``<home>/runs/sft/<name>/``; ``run.json`` there remembers the data version, the
selected record count and the MLflow run id, so ``--resume`` continues the same directory and the
same MLflow run. ``<home>/runs/sft/LATEST`` names the newest run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from prefect import task

from configs.schema import SFTConfig
from tasks.runs import StageRuns, read_run_file, update_run_file
from tasks.sft import tracking
from tasks.sft.data import SFTDataError, select_records
from tasks.sft.train import TrainSpec, run_training, write_records

log = logging.getLogger(__name__)

# Fields that may change between a run and its resume without changing what was trained so far.
RESUMABLE_CHANGES = {"max_steps", "evaluate", "eval_max_samples_per_task", "checkpoint_every_n_steps",
                     "keep_checkpoints", "num_workers", "cpu_threads"}


class SFTRunError(RuntimeError):
    """A run that cannot be started or resumed as asked."""


def prepare_run(home: Path, cfg: SFTConfig, data_version: str | None = None, resume: bool = False) -> dict[str, Any]:
    """Create a new run directory with its training records, or find the run to resume.

    Args:
        home: lmforge state directory.
        cfg: the ``sft`` section.
        data_version: curated version to train on; None = ``<home>/data/LATEST``.
        resume: continue the newest run (``<home>/runs/sft/LATEST``) instead of starting one.

    Returns:
        ``{"name", "run_dir", "data_version", "records_path", "n_records", "mlflow_run_id", "resume"}``.

    Raises:
        SFTRunError: nothing to resume, or the config changed in a way a resume cannot honour.
        SFTDataError: the selection leaves no training records.
        tasks.data.DataError: no curated data / unknown version.
    """
    if resume:
        return _resume_info(home, cfg, data_version)
    from tasks.data import load_curated, read_latest

    version = data_version or read_latest(home)
    dataset = load_curated(home, version)
    if "train" not in dataset:
        raise SFTDataError(f"curated data {version} has no 'train' split (splits: {', '.join(dataset)})")
    records = select_records(dataset["train"], cfg.tasks, cfg.max_train_samples_per_task, cfg.seed)
    if not records:
        wanted = f" for sft.tasks={cfg.tasks}" if cfg.tasks else ""
        raise SFTDataError(f"curated data {version} has no training records{wanted}; the training set is empty")
    runs = StageRuns(home, "sft")
    name = runs.new_name()
    records_path = runs.root / name / "train.jsonl"
    info = runs.create({"data_version": version, "records_path": str(records_path), "n_records": len(records),
                        "mlflow_run_id": None, "sft": cfg.model_dump(mode="json")}, name)
    write_records(records, records_path)
    runs.set_latest(name)  # only once the records exist: the newest *started* run is what --resume continues
    return {**info, "resume": False}


def _resume_info(home: Path, cfg: SFTConfig, data_version: str | None) -> dict[str, Any]:
    runs = StageRuns(home, "sft")
    run_dir = runs.latest_dir()
    info = read_run_file(run_dir) if run_dir else None
    if info is None:
        raise SFTRunError(f"--resume: no SFT run to resume under {runs.root}; start one without --resume")
    name = info["name"]
    if data_version and data_version != info["data_version"]:
        raise SFTRunError(f"--resume: run {name} trained on data {info['data_version']}, not {data_version}; "
                          f"drop --data-version or start a new run")
    saved, current = info["sft"], cfg.model_dump(mode="json")
    changed = sorted(k for k in current if saved.get(k) != current[k] and k not in RESUMABLE_CHANGES)
    if changed:
        detail = ", ".join(f"sft.{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
        raise SFTRunError(f"--resume: run {name} was started with a different config ({detail}); "
                          f"use the same settings or start a new run")
    return {**info, "sft": current, "resume": True}


# --------------------------------------------------------------------------- Prefect tasks
@task(name="sft-prepare-run")
def prepare_run_task(home: Path, cfg: SFTConfig, data_version: str | None = None, resume: bool = False) -> dict:
    """Prefect wrapper of :func:`prepare_run`."""
    return prepare_run(home, cfg, data_version, resume)


@task(name="sft-start-mlflow-run", retries=1)
def start_tracking_task(tracking_uri: str, experiment: str, run: dict, params: dict[str, str],
                        artifact_root: Path | None, home: Path) -> str:
    """Prefect wrapper: create (or reopen) the MLflow run and remember its id in run.json."""
    run_id = tracking.start_run(tracking_uri, experiment, run["name"], params, run["data_version"],
                                artifact_root, run.get("mlflow_run_id"), home)
    update_run_file(Path(run["run_dir"]), mlflow_run_id=run_id)  # a resume logs into the same MLflow run
    return run_id


@task(name="sft-train")
def train_task(spec: TrainSpec) -> dict[str, Any]:
    """Prefect wrapper: train in a ``python -m tasks.sft.train`` subprocess.

    Always a subprocess: Lightning's SIGTERM checkpointing then owns the signal (Prefect's engine
    installs its own handlers in the flow process), DDP can re-launch its script, and the training
    memory is returned to the system before evaluation loads the models again.
    """
    return run_training(spec, subprocess_mode=True)


@task(name="sft-learning-curve")
def curve_task(run_dir: str, model_dir: str, records: list[dict[str, Any]], eval_cfg, per_task: int,
               base_table: str | None, final_table: str | None, final_step: int, final_seconds: float,
               max_length: int, tracking_uri: str, run_id: str) -> list[dict[str, Any]]:
    """Score the learning curve, plot it, log it to MLflow and publish it as Prefect artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    from tasks.sft.curve import curve_markdown, headline, plot_curve, score_curve

    tables = [json.loads(Path(t).read_text()) if t else None for t in (base_table, final_table)]
    points = score_curve(Path(run_dir), Path(model_dir), records, eval_cfg, per_task, tables[0], tables[1],
                         final_step, final_seconds, max_length)
    if not points:
        return points
    png = plot_curve(points, Path(run_dir) / "curve" / "learning_curve.png")
    tracking.log_curve(tracking_uri, run_id, points, png)
    names = headline(points)
    create_table_artifact(key="sft-learning-curve", table=[
        {"step": p["step"], "train_seconds": p["train_seconds"], **{n: p["metrics"].get(n) for n in names}}
        for p in points], description=f"SFT validation metrics vs step ({per_task} examples per task)")
    create_markdown_artifact(key="sft-learning-curve-md", markdown=(
        f"## SFT learning curve ({per_task} validation examples per task)\n\n{curve_markdown(points)}\n\n"
        f"Plot: `{png}` (also the `sft/learning_curve.png` artifact of MLflow run `{run_id}`)."),
        description="SFT learning curve")
    print("learning curve (validation):\n" + curve_markdown(points))
    return points


@task(name="sft-log-results", retries=1)
def log_results_task(tracking_uri: str, run_id: str, summary: dict, run_dir: str,
                     evaluations: dict[str, dict[str, float]] | None) -> None:
    """Prefect wrapper of :func:`tasks.sft.tracking.log_results`."""
    tracking.log_results(tracking_uri, run_id, summary, Path(run_dir), evaluations)
