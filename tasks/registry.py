"""MLflow model registry: register a pipeline's deployable variant, gate it, promote and roll back.

Aliases are what serves: the gateway watches ``champion`` and ``challenger``. A version passing
the promotion gates gets ``challenger`` (and ``champion`` when there is none yet); a failing one
is tagged with its reasons and gets no alias. Promotion keeps the replaced champion as
``previous-champion`` so ``lmforge rollback`` is one command.

Registration is idempotent: a version is created with its register key as a tag (in the same
request that creates it), and registering the same key again returns that version instead of
adding a duplicate, so a run that failed after registering can simply be re-run.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prefect import task

from configs.schema import FORCE_PROMOTE_TAG, GATE_STATUS_TAG, PromotionGates, RegistryConfig
from configs.tasks import gated_metrics, structured_tasks

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
# Task-quality metrics (fractions in 0..1, higher is better) compared against the champion.
TASK_METRICS = gated_metrics()
# Tasks whose answers must parse (a label, an entity list): each one's format compliance is gated.
STRUCTURED_TASKS = structured_tasks()
METRIC_TAG = "metric."
REGISTER_KEY_TAG = "lmforge.register_key"  # what was registered, where: set when the version is created
REGISTER_RUN_TAG = "lmforge.register_run_id"  # the MLflow run that logged the version's model


class RegistryError(Exception):
    """A registry operation that cannot proceed (missing version, missing artifacts, failed gates)."""


@dataclass
class RegisteredVersion:
    """What registration produced."""

    name: str
    version: str
    run_id: str
    model_uri: str
    aliases: list[str] = field(default_factory=list)
    gate_reasons: list[str] = field(default_factory=list)


def register_version(
    registry_cfg: RegistryConfig,
    artifacts: dict[str, Path],
    metrics: dict[str, float],
    lineage: dict[str, str],
    run_name: str = "register",
    register_key: str | None = None,
) -> RegisteredVersion:
    """Log a pyfunc model holding ``artifacts`` and register it as a new version, or, when a version
    carrying ``register_key`` already exists, return that one (nothing is logged again).

    Args:
        registry_cfg: the ``registry`` config section (MLflow must already point at the store).
        artifacts: name -> directory; ``openvino`` (the IR the pyfunc serves) is required, others
            such as ``merged_hf`` and ``adapter`` are carried along for vLLM and runtime LoRA.
        metrics: evaluation metrics of the variant (fractions), logged on the run and as tags.
        lineage: data version, config hash, code commit, base model + sha256, quantisation format,
            parent run ids of each stage; becomes run params and version tags.
        run_name: MLflow run name.
        register_key: identity of this registration (e.g. the pipeline's register stage key).
    """
    import mlflow

    from tasks.pyfunc_model import OPENVINO_ARTIFACT, LmforgeChatModel

    if OPENVINO_ARTIFACT not in artifacts:
        raise RegistryError(f"artifacts must include {OPENVINO_ARTIFACT!r} (the IR the model serves)")
    for key, path in artifacts.items():
        if not Path(path).is_dir() or not any(Path(path).iterdir()):
            raise RegistryError(f"artifact {key!r} at {path} is missing or empty")
    client = mlflow.MlflowClient()
    name = registry_cfg.model_name
    existing = version_with_key(name, register_key) if register_key else None
    if existing is not None:
        log.info("%s version %s already holds this registration (key %s); not registering it again",
                 name, existing.version, register_key)
        run_id = existing.tags.get(REGISTER_RUN_TAG, existing.run_id or "")
        return RegisteredVersion(name, str(existing.version), run_id, f"models:/{name}/{existing.version}")
    tags = {k: str(v) for k, v in lineage.items()}
    with mlflow.start_run(run_name=run_name, nested=mlflow.active_run() is not None) as run:
        mlflow.log_params(tags)
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=LmforgeChatModel(),
            artifacts={key: str(path) for key, path in artifacts.items()},
            # Pinned explicitly: inferring requirements would load the model in a subprocess.
            pip_requirements=["mlflow==3.17.2", "openvino-genai==2026.4.1.0", "openvino-tokenizers==2026.4.1.0"],
            tags=tags,
            # A signature with params, or MLflow drops `params={"max_new_tokens": ...}` at predict time.
            signature=mlflow.models.infer_signature(["user message"], ["completion"], params={"max_new_tokens": 64}),
        )
    # Every tag, the register key included, goes into the request that creates the version: there is
    # no moment at which a version exists that a re-run would not recognise.
    version_tags = {**tags, **{METRIC_TAG + k: f"{v:.6g}" for k, v in metrics.items()},
                    REGISTER_RUN_TAG: run.info.run_id, **({REGISTER_KEY_TAG: register_key} if register_key else {})}
    created = mlflow.register_model(info.model_uri, name, tags=version_tags)
    version = str(created.version)
    client.update_model_version(name, version, description=_describe(metrics, tags))
    log.info("registered %s version %s (run %s)", name, version, run.info.run_id)
    return RegisteredVersion(name, version, run.info.run_id, f"models:/{name}/{version}")


def version_with_key(name: str, register_key: str) -> Any | None:
    """The version of ``name`` created with ``register_key``, or None."""
    import mlflow

    try:
        found = mlflow.MlflowClient().search_model_versions(
            f"name='{name}' and tags.`{REGISTER_KEY_TAG}`='{register_key}'")
    except mlflow.exceptions.MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def holds_registration(name: str, version: str, register_key: str) -> bool:
    """Whether the registry MLflow points at has ``version`` of ``name``, created with ``register_key``
    (a stored result from another registry, or from a version deleted since, fails this)."""
    import mlflow

    try:
        details = mlflow.MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        return False
    return details.tags.get(REGISTER_KEY_TAG) == register_key


def register_and_gate(registry_cfg: RegistryConfig, artifacts: dict[str, Path], metrics: dict[str, float],
                      lineage: dict[str, str], register_key: str, size_mb: float | None = None,
                      latency_ms: float | None = None, run_name: str = "register") -> RegisteredVersion:
    """Register (or find the version already registered under ``register_key``) and apply the gates."""
    version = register_version(registry_cfg, artifacts, metrics, lineage, run_name, register_key)
    gated = gate_version(registry_cfg, version.version, size_mb, latency_ms)
    return replace(version, aliases=gated.aliases, gate_reasons=gated.gate_reasons)


@task(name="register-model")
def register_task(registry_cfg: RegistryConfig, artifacts: dict[str, Path], metrics: dict[str, float],
                  lineage: dict[str, str], register_key: str, size_mb: float | None = None,
                  latency_ms: float | None = None, run_name: str = "register") -> RegisteredVersion:
    """Prefect wrapper of :func:`register_and_gate`."""
    return register_and_gate(registry_cfg, artifacts, metrics, lineage, register_key, size_mb, latency_ms, run_name)


def check_gates(
    metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    gates: PromotionGates,
    size_mb: float | None = None,
    latency_ms: float | None = None,
) -> list[str]:
    """Reasons a candidate fails the promotion gates (empty list = passes). Fails closed: a metric one
    side of the champion comparison lacks, a structured task's format compliance that was not
    measured, and a configured size/latency gate without a measurement are reasons, never skipped.

    Metric drops are compared in points (1 point = 0.01 of a 0..1 metric).
    """
    reasons = []
    if champion_metrics:
        for name in TASK_METRICS:
            ours, theirs = metrics.get(name), champion_metrics.get(name)
            if ours is None and theirs is None:
                continue  # neither side evaluated this task: nothing to compare
            if ours is None or theirs is None:
                missing, other = ("this version", "the champion") if ours is None else ("the champion", "this version")
                present = ours if theirs is None else theirs
                reasons.append(f"{name} is missing on {missing} ({other} has {present:.4f}): "
                               "cannot compare against the champion")
                continue
            drop = 100 * (theirs - ours)
            if drop > gates.max_metric_drop:
                reasons.append(f"{name} {ours:.4f} is {drop:.1f} points below champion {theirs:.4f} "
                               f"(allowed {gates.max_metric_drop})")
    reasons += _compliance_reasons(metrics, gates.min_format_compliance)
    if gates.max_size_mb is not None:
        if size_mb is None:
            reasons.append(f"max_size_mb is {gates.max_size_mb} but the size was not measured")
        elif size_mb > gates.max_size_mb:
            reasons.append(f"size {size_mb:.1f} MB (measured IR) > {gates.max_size_mb} MB")
    if gates.max_latency_ms is not None:
        if latency_ms is None:
            reasons.append(f"max_latency_ms is {gates.max_latency_ms} but the latency was not measured")
        elif latency_ms > gates.max_latency_ms:
            reasons.append(f"P95 latency {latency_ms:.0f} ms (measured) > {gates.max_latency_ms} ms")
    return reasons


def _compliance_reasons(metrics: dict[str, float], minimum: float) -> list[str]:
    """Each structured task's own format compliance: an average over all tasks would let free-text
    tasks (always well-formed) hide a sentiment or NER format that does not parse."""
    reasons, measured = [], 0
    for task_name in STRUCTURED_TASKS:
        name = f"format_compliance_{task_name}"
        value = metrics.get(name)
        if value is None:
            if metrics.get(f"n_{task_name}") == 0:
                continue  # the evaluation set has no examples of this task
            reasons.append(f"{name} was not measured")
        elif value < minimum:
            reasons.append(f"{name} {value:.3f} < {minimum}")
        measured += value is not None
    if not measured and not reasons:
        reasons.append(f"no structured task ({', '.join(STRUCTURED_TASKS)}) was evaluated: format compliance "
                       "was not measured")
    return reasons


def gate_inputs(row: dict[str, Any]) -> dict[str, Any]:
    """What the size and latency gates compare, from the selected variant's quantize report row: the
    measured IR size (``ir_bytes``) and the probe's P95 single-request latency; None when not measured."""
    ir_bytes = row.get("ir_bytes")
    return {"size_mb": ir_bytes / 1e6 if isinstance(ir_bytes, (int, float)) else None,
            "latency_ms": row.get("latency_p95_ms"),
            "measured": {"variant": row.get("variant"), "size": "ir_bytes: openvino_model.xml + .bin",
                         "latency": row.get("latency_measured")}}


def gate_version(registry_cfg: RegistryConfig, version: str, size_mb: float | None = None,
                 latency_ms: float | None = None) -> RegisteredVersion:
    """Apply the gates to a registered version: alias it ``challenger`` (and ``champion`` if none)
    when it passes, otherwise tag it with the reasons and leave it without an alias."""
    import mlflow

    client = mlflow.MlflowClient()
    name = registry_cfg.model_name
    candidate = version_metrics(name, version)
    champion = _alias_version(name, CHAMPION)
    champion_metrics = version_metrics(name, champion) if champion and champion != version else None
    reasons = check_gates(candidate, champion_metrics, registry_cfg.gates, size_mb, latency_ms)
    client.set_model_version_tag(name, version, "gate_status", "failed" if reasons else "passed")
    client.set_model_version_tag(name, version, "gate_reasons", json.dumps(reasons))
    client.set_model_version_tag(name, version, "gate_inputs",
                                 json.dumps({"size_mb": size_mb, "latency_ms": latency_ms}))
    result = RegisteredVersion(name, version, "", f"models:/{name}/{version}", gate_reasons=reasons)
    if reasons:
        log.warning("version %s failed the promotion gates: %s", version, "; ".join(reasons))
        return result
    client.set_registered_model_alias(name, CHALLENGER, version)
    result.aliases.append(CHALLENGER)
    if champion is None:
        client.set_registered_model_alias(name, CHAMPION, version)
        result.aliases.append(CHAMPION)
    log.info("version %s passed the gates; aliases: %s", version, ", ".join(result.aliases))
    return result


def promote(registry_cfg: RegistryConfig, version: str, alias: str = CHAMPION, force: bool = False) -> dict[str, str]:
    """Point ``alias`` at ``version``; the replaced champion becomes ``previous-champion``.

    With ``force``, a version that failed (or never had) its gates, or whose artifacts are missing, is
    tagged ``lmforge.force_promote=true`` first: the gateway serves a version past its gates only with
    that tag (serving/promotion.py), so the override is recorded on the version, not only in a log.

    Raises:
        RegistryError: unknown version, missing artifacts, or failed gates (unless ``force``).
    """
    import mlflow

    client = mlflow.MlflowClient()
    name = registry_cfg.model_name
    details = _get_version(name, version)
    missing = missing_artifacts(name, version)
    if missing and not force:
        raise RegistryError(f"version {version} cannot be promoted: {missing} (use --force to override)")
    if details.tags.get("gate_status") != "passed" and not force:
        reasons = details.tags.get("gate_reasons", "[]")
        raise RegistryError(
            f"version {version} did not pass the promotion gates (status "
            f"{details.tags.get('gate_status', 'not gated')}; reasons {reasons}); use --force to override"
        )
    if force and (missing or details.tags.get(GATE_STATUS_TAG) != "passed"):
        client.set_model_version_tag(name, version, FORCE_PROMOTE_TAG, "true")
    before = aliases(name)
    if alias == CHAMPION and before.get(CHAMPION) and before[CHAMPION] != version:
        # Set the fallback first: a reader of `champion` sees the old or the new version, never none.
        client.set_registered_model_alias(name, PREVIOUS, before[CHAMPION])
    client.set_registered_model_alias(name, alias, version)
    log.info("%s@%s -> version %s (was %s)", name, alias, version, before.get(alias))
    return aliases(name)


def rollback(registry_cfg: RegistryConfig) -> dict[str, str]:
    """Swap ``champion`` and ``previous-champion``; rolling back twice restores the original."""
    import mlflow

    client = mlflow.MlflowClient()
    name = registry_cfg.model_name
    current = aliases(name)
    if PREVIOUS not in current:
        raise RegistryError(f"{name} has no '{PREVIOUS}' alias: nothing to roll back to")
    previous, champion = current[PREVIOUS], current.get(CHAMPION)
    client.set_registered_model_alias(name, CHAMPION, previous)
    if champion:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    log.info("rolled back %s@champion: %s -> %s", name, champion, previous)
    return aliases(name)


def aliases(name: str) -> dict[str, str]:
    """alias -> version of a registered model ({} when it does not exist yet)."""
    import mlflow

    try:
        return {alias: str(v) for alias, v in mlflow.MlflowClient().get_registered_model(name).aliases.items()}
    except mlflow.exceptions.MlflowException:
        return {}


def version_aliases(name: str, version: str) -> list[str]:
    """The aliases pointing at ``version`` now, sorted."""
    return sorted(alias for alias, v in aliases(name).items() if v == str(version))


def version_metrics(name: str, version: str) -> dict[str, float]:
    """The evaluation metrics stored as ``metric.*`` tags on a version."""
    tags = _get_version(name, version).tags
    return {k[len(METRIC_TAG):]: float(v) for k, v in tags.items() if k.startswith(METRIC_TAG)}


def missing_artifacts(name: str, version: str) -> str | None:
    """Why a version's artifacts are unusable, or None when MLmodel and the IR are present."""
    import mlflow

    try:
        root = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}/MLmodel")
    except Exception as err:  # noqa: BLE001 - any failure means the artifacts cannot be fetched
        return f"artifacts cannot be read ({type(err).__name__}: {err})"
    if not Path(root).is_file():
        return "MLmodel file is missing"
    import yaml

    # MLflow stores each artifact under artifacts/<source dir name>; MLmodel maps key -> path.
    spec = yaml.safe_load(Path(root).read_text())
    entry = spec.get("flavors", {}).get("python_function", {}).get("artifacts", {}).get("openvino", {})
    if not entry.get("path"):
        return "MLmodel names no 'openvino' artifact"
    listing = mlflow.artifacts.list_artifacts(artifact_uri=f"models:/{name}/{version}/{entry['path']}")
    if not any(Path(item.path).name == "openvino_model.xml" for item in listing):
        return f"the OpenVINO IR ({entry['path']}/openvino_model.xml) is missing"
    return None


def _alias_version(name: str, alias: str) -> str | None:
    return aliases(name).get(alias)


def _get_version(name: str, version: str) -> Any:
    import mlflow

    try:
        return mlflow.MlflowClient().get_model_version(name, str(version))
    except mlflow.exceptions.MlflowException:
        raise RegistryError(f"{name} has no version {version}") from None


def _describe(metrics: dict[str, float], tags: dict[str, str]) -> str:
    rows = "\n".join(f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items()))
    lineage = "\n".join(f"| {k} | `{v}` |" for k, v in sorted(tags.items()))
    return f"### Metrics\n| metric | value |\n|---|---|\n{rows}\n\n### Lineage\n| key | value |\n|---|---|\n{lineage}\n"
