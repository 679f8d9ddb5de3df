"""A small MLflow registry client for the gateway: parse model URIs, follow aliases, fetch IR dirs.

``resolve_model_dir(uri)``: a local directory containing ``openvino_model.xml`` (or, for vLLM/HF,
``config.json``) is used as is; a ``models:/name@alias`` or ``models:/name/version`` URI is
downloaded (once per version, into a cache) with ``mlflow.artifacts.download_artifacts`` and the
artifact the backend serves is picked by the key it was registered under (``openvino`` for the
OpenVINO backend, ``merged_hf`` for vLLM and HF; see ``tasks.registry``), as the version's
``MLmodel`` file names it. Searching for a marker file instead would find an OpenVINO IR first
(every IR directory has a ``config.json`` too).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

from serving.imports import import_names

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
IR_MARKER = "openvino_model.xml"
HF_MARKER = "config.json"
# Backend -> the registered artifact it serves (the keys tasks.registry logs) and the file that marks
# a usable local directory.
BACKEND_ARTIFACTS = {"openvino": ("openvino", IR_MARKER), "vllm": ("merged_hf", HF_MARKER),
                     "hf": ("merged_hf", HF_MARKER)}


class ModelResolveError(ValueError):
    """A model URI that does not lead to a usable model directory."""


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """A registry reference: a name plus an alias or a version."""

    name: str
    alias: str | None = None
    version: str | None = None


def parse_model_uri(uri: str) -> ModelRef | None:
    """The registry reference in ``uri``, or None when it is not a ``models:/`` URI."""
    if not uri.startswith("models:/"):
        return None
    match = _MODELS_URI.match(uri)
    if not match:
        raise ModelResolveError(f"bad model URI {uri!r}: expected models:/<name>@<alias> or models:/<name>/<version>")
    return ModelRef(match["name"], match["alias"], match["version"])


def _client(tracking_uri: str | None):
    (MlflowClient,) = import_names("mlflow", "MlflowClient")  # noqa: N806 - loader threads call this at once

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def current_version(ref: ModelRef, tracking_uri: str | None) -> str:
    """The version an alias points at now (or the fixed version)."""
    if ref.version is not None:
        return ref.version
    try:
        return str(_client(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version)
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors: report which alias
        raise ModelResolveError(f"cannot resolve models:/{ref.name}@{ref.alias}: {_short(err)}") from err


def find_model_dir(root: Path, marker: str = IR_MARKER) -> Path | None:
    """``root`` or the first directory below it (sorted, breadth first) that contains ``marker``; for
    the HF marker, OpenVINO IR directories (which hold a ``config.json`` too) are skipped."""
    def usable(folder: Path) -> bool:
        return (folder / marker).is_file() and (marker == IR_MARKER or not (folder / IR_MARKER).is_file())

    root = Path(root)
    if usable(root):
        return root
    for path in sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p))):
        if usable(path.parent):
            return path.parent
    return None


def resolve_model_dir(uri: str, tracking_uri: str | None = None, cache_dir: Path | None = None,
                      backend: str = "openvino") -> tuple[Path, str | None]:
    """Local model directory for ``uri`` as ``backend`` serves it, and the registry version it came
    from (None when local).

    Raises:
        ModelResolveError: the URI is malformed, the alias/version is unknown, or the version has no
            artifact for this backend.
    """
    artifact, marker = BACKEND_ARTIFACTS.get(backend, BACKEND_ARTIFACTS["openvino"])
    ref = parse_model_uri(uri)
    if ref is None:
        path = Path(uri).expanduser()
        if not path.is_dir():
            raise ModelResolveError(f"model directory not found: {path}")
        found = find_model_dir(path, marker)
        if found is None:
            raise ModelResolveError(f"{path} contains no {marker}")
        return found, None
    version = current_version(ref, tracking_uri)
    cache = Path(cache_dir or tempfile.gettempdir()) / ref.name / version
    if not cache.is_dir():
        cache.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{version}-", dir=cache.parent))
        try:
            _download(ref.name, version, tracking_uri, staging)
            try:
                os.replace(staging, cache)
            except OSError:  # another replica/process won the race: use its copy
                shutil.rmtree(staging, ignore_errors=True)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return registered_artifact_dir(cache, artifact, f"models:/{ref.name}/{version}", backend), version


def registered_artifact_dir(root: Path, artifact: str, label: str, backend: str = "openvino") -> Path:
    """The directory a downloaded registry version keeps its ``artifact`` in, as its MLmodel names it."""
    import yaml

    mlmodel = next(iter(sorted(Path(root).rglob("MLmodel"), key=lambda p: len(p.parts))), None)
    if mlmodel is None:
        raise ModelResolveError(f"{label} has no MLmodel file: not a model registered by lmforge")
    spec = yaml.safe_load(mlmodel.read_text()) or {}
    artifacts = (spec.get("flavors", {}).get("python_function", {}).get("artifacts") or {})
    entry = artifacts.get(artifact) or {}
    if not entry.get("path"):
        present = ", ".join(sorted(artifacts)) or "none"
        raise ModelResolveError(f"{label} has no {artifact!r} artifact (it has: {present}); "
                                f"the {backend} backend serves {artifact!r}")
    path = mlmodel.parent / entry["path"]
    if not path.is_dir():
        raise ModelResolveError(f"{label}: artifact {artifact!r} is missing from the download ({path})")
    return path


def _download(name: str, version: str, tracking_uri: str | None, dst: Path) -> None:
    import_names("mlflow.artifacts")
    import mlflow.artifacts

    client = _client(tracking_uri)
    try:
        source = client.get_model_version_download_uri(name, version)
    except Exception as err:  # noqa: BLE001
        raise ModelResolveError(f"models:/{name}/{version}: {_short(err)}") from err
    log.info("downloading models:/%s/%s from %s", name, version, source)
    try:
        mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(dst), tracking_uri=tracking_uri)
    except Exception as err:  # noqa: BLE001
        raise ModelResolveError(f"could not download models:/{name}/{version} ({source}): {_short(err)}") from err


def _short(err: Exception) -> str:
    return str(err).splitlines()[0][:300] if str(err) else type(err).__name__
