"""Typed results of the pipeline's stages: what each stage flow returns, what the stage cache stores and
reloads (:func:`tasks.stage_cache.cached_stage`), and what ``flows/pipeline.py`` reads.

Each model names the fields other stages and the pipeline rely on; stage-specific details (per-variant
rows, evaluation tables, timings) ride along as extra fields, kept when stored and reloaded, and
:meth:`StageResult.as_json` gives the whole result for ``--json`` output and MLflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, model_validator


class StageResult(BaseModel):
    """Fields every stage result has (set by the stage cache when it runs the stage)."""

    model_config = ConfigDict(extra="allow")

    mlflow_run_id: str | None = None
    code_commit: str | None = None
    """The git commit whose code computed this result (not the one checked out when it was reused)."""
    code_hash: str | None = None
    """Hash of the source files that compute the stage (tasks.code_hash)."""
    stage_seconds: float | None = None

    def as_json(self) -> dict[str, Any]:
        """Every field, extras included, as JSON-ready values."""
        return self.model_dump(mode="json")


class CurateResult(StageResult):
    version: str
    """Content-hashed data version."""
    path: Path
    card_md: Path
    reused: bool = False
    counts: dict[str, Any] = {}
    total: int = 0

    @model_validator(mode="before")
    @classmethod
    def _seconds(cls, value: Any) -> Any:
        # The curated build's summary calls its wall time "seconds", like its data card.
        if isinstance(value, dict) and "stage_seconds" not in value and "seconds" in value:
            value = {**value, "stage_seconds": value["seconds"]}
        return value


class FinetuneResult(StageResult):
    adapter_dir: Path
    run_dir: Path
    run_name: str
    data_version: str
    train: dict[str, Any] = {}
    """The training summary (steps, loss curve, throughput, what was resumed)."""
    base: dict[str, float] = {}
    """Validation metrics of the base model."""
    tuned: dict[str, float] = {}
    """Validation metrics of the tuned model."""


class AlignResult(StageResult):
    adapter_dir: Path
    run_dir: Path
    run_name: str
    data_version: str
    sft_adapter: Path
    method: str
    stages: list[dict[str, Any]] = []
    before: dict[str, float] = {}
    after: dict[str, float] = {}
    compare: dict[str, Any] | None = None
    judge_stats: dict[str, Any] | None = None


class ExportResult(StageResult):
    export_id: str
    root: Path
    selected: str
    """The variant the selection policy chose."""
    selected_path: Path
    rows: list[dict[str, Any]] = []
    """One row per variant: size, speed, memory, metrics (tasks.quantize.report)."""
    selection: dict[str, Any] = {}
    markdown: str = ""

    def selected_row(self) -> dict[str, Any]:
        """The selected variant's row (empty when the export has none for it)."""
        return next((r for r in self.rows if r.get("variant") == self.selected), {})

    def quality_vs_fp32(self) -> dict[str, Any]:
        """Per task, the selected variant's paired 95% interval against the fp32 IR (empty when fp32 won)."""
        return self.selection.get("compare", {}).get(self.selected, {})

    @property
    def merged_hf(self) -> Path | None:
        """The merged Hugging Face weights (what vLLM serves), when the export wrote them."""
        merged = self.root / "merged_hf"
        return merged if merged.is_dir() else None


class EvaluationResult(StageResult):
    metrics: dict[str, float]
    ir_dir: Path
    split: str = "test"


class RegistrationResult(StageResult):
    name: str
    version: str
    run_id: str | None = None
    model_uri: str
    aliases: list[str] = []
    gate_reasons: list[str] = []
    gate_inputs: dict[str, Any] = {}
    """What the size and latency gates compared (tasks.registry.gate_inputs)."""


class PipelineResult(BaseModel):
    """What ``lmforge run`` produced: every stage's result, which were reused, and the report."""

    data: CurateResult
    finetune: FinetuneResult
    align: AlignResult
    quantize: ExportResult
    evaluate: EvaluationResult
    register: RegistrationResult
    reused: dict[str, bool]
    report: str
