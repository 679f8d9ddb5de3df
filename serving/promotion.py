"""Which registry versions the gateway may serve: a version that passed the promotion gates, or one a
person promoted past them on purpose (``lmforge promote --force`` tags it ``lmforge.force_promote=true``).

Why the gateway checks and not only ``lmforge promote``: reviewers also move aliases in the MLflow
UI, which checks nothing, and the watcher serves whatever an alias names. A version without a gate
result (registered by hand, or by a run that stopped before its gates) is refused like a failed one:
the check fails closed.
"""

from __future__ import annotations

import json

from configs.schema import FORCE_PROMOTE_TAG, GATE_STATUS_TAG


class PromotionRefused(RuntimeError):
    """The registry version may not serve; ``version`` and the message say which and why."""

    def __init__(self, name: str, version: str, reason: str):
        super().__init__(f"refused models:/{name}/{version}: {reason}; to serve it anyway: "
                         f"lmforge promote {version} --force (sets {FORCE_PROMOTE_TAG}=true)")
        self.name, self.version, self.reason = name, version, reason


def check_promotable(name: str, version: str, tracking_uri: str | None) -> None:
    """Raise :class:`PromotionRefused` unless ``name`` version ``version`` passed its gates or is force-tagged."""
    from mlflow import MlflowClient

    tags = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_model_version(name, version).tags
    if tags.get(FORCE_PROMOTE_TAG, "").strip().lower() == "true":
        return
    status = tags.get(GATE_STATUS_TAG)
    if status == "passed":
        return
    if status is None:
        raise PromotionRefused(name, version, f"it was never gated (no {GATE_STATUS_TAG} tag)")
    raise PromotionRefused(name, version, f"{GATE_STATUS_TAG}={status} ({_reasons(tags.get('gate_reasons'))})")


def _reasons(raw: str | None) -> str:
    try:
        reasons = json.loads(raw or "[]")
    except ValueError:
        return raw or "no reasons recorded"
    return "; ".join(map(str, reasons)) if reasons else "no reasons recorded"
