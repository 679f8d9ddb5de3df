"""A small MLflow registry client for the gateway: parse model URIs, follow aliases, fetch IR dirs.

``resolve_model_dir(uri)``: a local directory containing ``openvino_model.xml`` is used as is; a
``models:/name@alias`` or ``models:/name/version`` URI is downloaded (once per version, into a
cache) with ``mlflow.artifacts.download_artifacts`` and the first directory inside that holds
``openvino_model.xml`` (or, for vLLM/HF, ``config.json``) is returned.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/@]+)|/(?P<version>\d+))$")
IR_MARKER = "openvino_model.xml"


class ModelResolveError(ValueError):
    """A model URI that does not lead to a usable model directory."""


class AliasNotFound(ModelResolveError):
    """The registry answered: this alias (or the registered model) does not exist."""


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
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def current_version(ref: ModelRef, tracking_uri: str | None) -> str:
    """The version an alias points at now (or the fixed version)."""
    if ref.version is not None:
        return ref.version
    try:
        return str(_client(tracking_uri).get_model_version_by_alias(ref.name, ref.alias).version)
    except Exception as err:  # noqa: BLE001 - MlflowException, connection errors: report which alias
        if _absent(err):
            raise AliasNotFound(f"models:/{ref.name}@{ref.alias} does not exist: {_short(err)}") from err
        raise ModelResolveError(f"cannot resolve models:/{ref.name}@{ref.alias}: {_short(err)}") from err


def _absent(err: Exception) -> bool:
    """The registry's own answer that the alias or model does not exist (not a connection failure)."""
    code = getattr(err, "error_code", None)
    # MLflow answers a missing alias with INVALID_PARAMETER_VALUE "... alias X not found", a missing
    # model with RESOURCE_DOES_NOT_EXIST (the SQL store and the REST server alike).
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(err))


def find_model_dir(root: Path, marker: str = IR_MARKER) -> Path | None:
    """``root`` or the first directory below it (sorted, breadth first) that contains ``marker``."""
    root = Path(root)
    if (root / marker).is_file():
        return root
    for path in sorted(root.rglob(marker), key=lambda p: (len(p.parts), str(p))):
        return path.parent
    return None


def resolve_model_dir(uri: str, tracking_uri: str | None = None, cache_dir: Path | None = None,
                      marker: str = IR_MARKER) -> tuple[Path, str | None]:
    """Local model directory for ``uri`` and the registry version it came from (None when local).

    Raises:
        ModelResolveError: the URI is malformed, the alias/version is unknown, or no model directory is inside.
    """
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
    found = find_model_dir(cache, marker)
    if found is None:
        raise ModelResolveError(f"models:/{ref.name}/{version} has no {marker} in its artifacts")
    return found, version


def _download(name: str, version: str, tracking_uri: str | None, dst: Path) -> None:
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
