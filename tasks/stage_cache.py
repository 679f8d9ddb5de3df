"""Content-addressed results of pipeline stages, so a re-run resumes at the stage that failed.

Each stage's result is stored under ``<home>/pipeline/cache/<stage>-<key>.json`` where ``key``
hashes everything the stage's output depends on: its config sections, the keys of the stages it
builds on, and the hash of the source files that compute it (:mod:`tasks.code_hash`). A stored
result is reused only while every path it names still exists (and ``still_valid`` agrees). Each
result records the git commit and code hash it was computed with, so lineage names the code that
made an artefact, not the code that happened to be checked out when it was reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from tasks.files import atomic_write_text
from tasks.results import StageResult
from tasks.tracking import code_commit

R = TypeVar("R", bound=StageResult)

log = logging.getLogger(__name__)


def stage_key(stage: str, inputs: dict[str, Any]) -> str:
    """Short content hash of a stage's inputs."""
    payload = json.dumps({"stage": stage, **inputs}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def cached_stage(home: Path, stage: str, inputs: dict[str, Any], run: Callable[[], R | dict[str, Any]],
                 result_type: type[R], path_keys: tuple[str, ...] = (),
                 still_valid: Callable[[R], bool] | None = None) -> tuple[R, bool]:
    """Return the stored result for these inputs, or run the stage and store its result.

    Args:
        home: state directory.
        stage: stage name.
        inputs: everything the result depends on (JSON-serialisable, ``str()`` used otherwise).
        run: computes the result (a ``result_type``, or a dict of its fields).
        result_type: the stage's typed result (:mod:`tasks.results`); a stored result that no longer
            validates against it (written by older code) is computed again.
        path_keys: result fields holding paths that must still exist for the result to be reused.
        still_valid: a further check of a stored result (e.g. that a registered version still
            exists in the registry); False means run the stage again.

    Returns:
        (result, reused); the result carries ``code_commit`` and ``code_hash`` (``inputs["code"]``)
        of the run that computed it.
    """
    key = stage_key(stage, inputs)
    file = Path(home) / "pipeline" / "cache" / f"{stage}-{key}.json"
    stored = _load(file, result_type)
    if stored is not None and all(getattr(stored, k, None) and Path(getattr(stored, k)).exists() for k in path_keys):
        if still_valid is None or still_valid(stored):
            log.info("stage %s: reusing result %s (inputs unchanged)", stage, key)
            _progress(home, stage, "reused", key)
            return stored, True
        log.info("stage %s: stored result %s is no longer valid; running again", stage, key)
    _progress(home, stage, "running", key)
    started = time.perf_counter()
    commit = code_commit()  # before running: the code this process loads for the stage
    produced = run()
    payload = (produced.as_json() if isinstance(produced, StageResult)
               else json.loads(json.dumps(produced, default=str)))
    payload.update(code_commit=commit, code_hash=inputs.get("code"),
                   stage_seconds=round(time.perf_counter() - started, 1))
    result = result_type.model_validate(payload)
    _write_atomic(file, result.as_json())
    _progress(home, stage, "done", key)
    return result, False


def _load(file: Path, result_type: type[R]) -> R | None:
    stored = _read(file)
    if stored is None:
        return None
    try:
        return result_type.model_validate(stored)
    except ValidationError as err:
        log.info("stored result %s does not fit %s (%s); computing it again", file.name, result_type.__name__,
                 err.errors()[0].get("msg"))
        return None


def read_progress(home: Path) -> dict[str, Any]:
    """The pipeline's progress file: stage -> {status, key, at}."""
    return _read(Path(home) / "pipeline" / "progress.json") or {}


def _progress(home: Path, stage: str, status: str, key: str) -> None:
    file = Path(home) / "pipeline" / "progress.json"
    progress = _read(file) or {}
    progress[stage] = {"status": status, "key": key, "at": time.time()}
    _write_atomic(file, progress)


def _read(file: Path) -> dict[str, Any] | None:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(file: Path, payload: dict[str, Any]) -> None:
    atomic_write_text(file, json.dumps(payload, indent=2, sort_keys=True))
