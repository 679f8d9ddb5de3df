"""Run directories of the training stages, one helper for all of them.

``<home>/runs/<stage>/<name>/run.json`` records what a run started from (data version, config, the
MLflow run id, ...); ``<home>/runs/<stage>/LATEST`` names the newest run (SFT: the newest started,
so ``--resume`` finds it; align: the newest finished, so quantize never exports a half-trained one).
Every write is atomic, so an interrupted process leaves the previous file, never half of one.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from tasks.files import atomic_write_text, read_pointer, write_pointer

RUN_FILE = "run.json"
LATEST = "LATEST"


class StageRuns:
    """The runs of one stage (``sft``, ``align``) under an lmforge home."""

    def __init__(self, home: Path, stage: str):
        self.stage = stage
        self.root = Path(home) / "runs" / stage

    def new_name(self) -> str:
        """A sortable, unique run name: ``<stage>-20260101-120000-<pid>``."""
        return f"{self.stage}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"

    def create(self, info: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """Make a new run directory and write its ``run.json``: ``info`` plus ``name`` and ``run_dir``
        (``name`` from :meth:`new_name` when not given, e.g. to name files inside the run beforehand)."""
        name = name or self.new_name()
        run_dir = self.root / name
        run_dir.mkdir(parents=True, exist_ok=False)
        info = {"name": name, "run_dir": str(run_dir), **info}
        write_run_file(run_dir, info)
        return info

    def latest(self) -> str | None:
        """Name in ``LATEST``, or None when no run was recorded."""
        return read_pointer(self.root / LATEST)

    def set_latest(self, name: str) -> None:
        """Point ``LATEST`` at ``name`` (atomically)."""
        write_pointer(self.root / LATEST, name)

    def latest_dir(self) -> Path | None:
        """Directory of the run ``LATEST`` names, or None when there is none or it is gone."""
        name = self.latest()
        return self.root / name if name and (self.root / name).is_dir() else None

    def names(self) -> list[str]:
        """Names of the runs on disk, sorted (oldest first: names start with a timestamp)."""
        return sorted(p.name for p in self.root.glob(f"{self.stage}-*") if p.is_dir())


def read_run_file(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``run.json``, or None when the directory has none (e.g. an adapter copied elsewhere)."""
    path = Path(run_dir) / RUN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_run_file(run_dir: Path, info: dict[str, Any]) -> None:
    """Replace a run's ``run.json`` atomically."""
    atomic_write_text(Path(run_dir) / RUN_FILE, json.dumps(info, indent=2, default=str))


def update_run_file(run_dir: Path, **values: Any) -> dict[str, Any]:
    """Set fields of a run's ``run.json`` (e.g. ``mlflow_run_id``); returns the updated record."""
    info = read_run_file(run_dir)
    if info is None:
        raise FileNotFoundError(f"{Path(run_dir) / RUN_FILE}: no run record to update")
    info.update(values)
    write_run_file(run_dir, info)
    return info
