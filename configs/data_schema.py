"""The ``data`` section: dataset curation (sources, cleaning rules, dedup, templates, splits)."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field


class DataConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    raw_dir: Path = Path("data/raw")
    """Folder holding the raw sources (relative paths are taken from the working directory)."""
    seed: int = 0
    """Seed for splitting and sampling; the same seed and inputs give the same data version."""
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    """Share of each task's examples held out for validation."""
