"""MLflow wiring shared by every stage: one tracking store, one experiment, artifacts under home."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)


def use_mlflow(tracking_uri: str, experiment: str, artifact_root: Path | None = None) -> str:
    """Point MLflow (tracking and registry) at ``tracking_uri`` and select ``experiment``.

    With a file-backed store the experiment's artifacts go to ``artifact_root`` rather than
    ``./mlruns`` of whatever directory the process was started in.

    Returns:
        The experiment id.
    """
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient()
    existing = client.get_experiment_by_name(experiment)
    if existing is None:
        location = None
        if artifact_root is not None and tracking_uri.startswith(("sqlite:", "file:")):
            Path(artifact_root).mkdir(parents=True, exist_ok=True)
            location = Path(artifact_root).resolve().as_uri()
        experiment_id = client.create_experiment(experiment, artifact_location=location)
    else:
        experiment_id = existing.experiment_id
    mlflow.set_experiment(experiment_id=experiment_id)
    return experiment_id


def code_commit() -> str:
    """The git commit of the running code (with a '+dirty' mark), or 'unknown' outside a checkout."""
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=10)
        if sha.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
