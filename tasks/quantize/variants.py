"""Variant directories: staged in a temp dir, described by ``variant.json`` (written last), moved into place.

A variant directory under ``<home>/exports/<export_id>/`` is complete exactly when it holds a readable
``variant.json``; it only ever appears under its final name through one ``os.replace`` of a fully
written staging directory, so an interrupted export leaves at most a ``.tmp-*`` directory behind
(swept on the next run), never a half-written variant that looks complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tasks.files import atomic_write_text, swap_into_place

log = logging.getLogger(__name__)

VARIANT_FILE = "variant.json"
EXPORT_FILE = "export.json"
TMP_PREFIX = ".tmp-"

# What each variant is, for variant.json and the report.
DESCRIPTIONS = {
    "merged_hf": "base + adapter merged (PEFT merge_and_unload), HF safetensors for vLLM",
    "adapter": "the LoRA adapter alone (PEFT layout) for runtime LoRA in vLLM",
    "fp32_ir": "OpenVINO IR, fp32 weights (reference)",
    "int8": "OpenVINO IR, INT8 weight-only PTQ (asymmetric; per channel, the logits weight per group of 64)",
    "int4": "OpenVINO IR, INT4 group-wise weight-only PTQ (data-aware AWQ + scale estimation)",
    "int8_full": "OpenVINO IR, INT8 weights and activations (calibrated PTQ)",
    "qat_int4": "OpenVINO IR, INT4 weights after NNCF QAT with absorbable LoRA (FQ_LORA)",
    "qat_int8": "OpenVINO IR, INT8 weights after NNCF QAT with absorbable LoRA (FQ_LORA)",
    "base_ir": "OpenVINO IR of the un-merged base + adapter for openvino_genai.Adapter hot-swap",
}
IR_VARIANTS = ("fp32_ir", "int8", "int4", "int8_full", "qat_int4", "qat_int8")


def read_variant(path: Path) -> dict[str, Any] | None:
    """The ``variant.json`` of a complete variant directory, or None when it is absent or unreadable."""
    try:
        data = json.loads((Path(path) / VARIANT_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_complete(path: Path, inputs_sha256: str | None = None) -> bool:
    """True when ``path`` is a finished variant (and, if given, was built from the same inputs)."""
    meta = read_variant(path)
    if meta is None:
        return False
    return inputs_sha256 is None or meta.get("inputs_sha256") == inputs_sha256


@contextlib.contextmanager
def staged_variant(root: Path, name: str) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``root/name`` in one rename.

    The caller writes everything except ``variant.json`` (use :func:`finish_variant` as the last
    step inside the block). On any exception the staging directory is removed and ``root/name``
    is left as it was.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{name}-", dir=root))
    # mkdtemp makes 0700 dirs; a published variant must be readable by the serving user like any other dir.
    staging.chmod(0o755)
    try:
        yield staging
        if read_variant(staging) is None:
            raise RuntimeError(f"internal error: variant {name} staged without {VARIANT_FILE}")
        # The old variant is set aside under TMP_PREFIX, so an interrupted swap is swept like any staging dir.
        swap_into_place(staging, root / name, retired_prefix=f"{TMP_PREFIX}old-")
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def finish_variant(staging: Path, name: str, inputs_sha256: str, **facts: Any) -> dict[str, Any]:
    """Write ``variant.json`` into a staging dir: what it is, file sizes, input hash, extra facts."""
    files = {str(p.relative_to(staging)): p.stat().st_size for p in sorted(staging.rglob("*")) if p.is_file()}
    meta = {
        "variant": name,
        "description": DESCRIPTIONS.get(name, name),
        "inputs_sha256": inputs_sha256,
        "size_bytes": sum(files.values()),
        "files": files,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **facts,
    }
    write_json_atomic(staging / VARIANT_FILE, meta)
    return meta


def sweep_stale(root: Path) -> list[str]:
    """Remove staging leftovers of interrupted runs; returns their names."""
    removed = []
    for path in Path(root).glob(f"{TMP_PREFIX}*") if Path(root).is_dir() else []:
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path.name)
    if removed:
        log.info("removed %d leftover staging dir(s) of an interrupted export: %s", len(removed), ", ".join(removed))
    return removed


def ir_size_bytes(path: Path) -> int:
    """Bytes of the model IR itself (openvino_model.xml/.bin), the number the size targets refer to."""
    return sum((Path(path) / f).stat().st_size for f in ("openvino_model.xml", "openvino_model.bin"))


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temp file in the same directory, then rename over ``path``."""
    atomic_write_text(Path(path), json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


