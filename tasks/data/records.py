"""What every raw-source reader and later curation step share: records, quarantined rows, source paths.

A :class:`RawRecord` is one example as a reader produced it; a :class:`Rejected` is a row set aside
(by a reader or a later stage) with the reason, bound for ``quarantine.jsonl``; a
:class:`DataError` stops curation. The readers themselves live in :mod:`tasks.data.loaders`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

from configs.data_schema import SourceConfig

PROJECT_ROOT = Path(__file__).resolve().parents[2]
_BAD_BYTE = re.compile("[\udc80-\udcff]")


class DataError(Exception):
    """A data problem that stops curation (missing file, unreadable source), worded for the user."""


@dataclasses.dataclass
class RawRecord:
    """One example before cleaning and rendering; ``label`` is already in its structured form."""

    id: str
    source: str
    task: str
    input: str
    label: Any
    group: str
    split_hint: str
    line: int


@dataclasses.dataclass
class Rejected:
    """A row that was set aside, and why."""

    source: str
    line: int
    stage: str
    reason: str
    excerpt: str

    @property
    def kind(self) -> str:
        """Short category of the reason, for counting on the data card."""
        return next((kind for pattern, kind in _REASON_KINDS if pattern.search(self.reason)), "other")

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "kind": self.kind}


_REASON_KINDS = [(re.compile(p, re.IGNORECASE), k) for p, k in [
    (r"invalid UTF-8", "invalid_utf8"),
    (r"columns|no column|malformed CSV", "wrong_columns"),
    (r"tag", "bad_tags"),
    (r"invalid JSON|expected a JSON object", "invalid_json"),
    (r"^empty|became empty|empty after", "empty_text"),
    (r"missing (id )?field", "missing_field"),
    (r"label|bad entity", "bad_label"),
    (r"duplicate id", "duplicate_id"),
    (r"fewer than 2 turns", "too_few_turns"),
    (r"not found in order", "entity_lost"),
    (r"tokens", "too_many_tokens"),
    (r"too short", "too_short"),
    (r"too long", "too_long"),
]]


def resolve_raw_dir(raw_dir: Path) -> Path:
    """``raw_dir`` as given if it exists (absolute or from the working directory), else from the project root."""
    raw_dir = Path(raw_dir).expanduser()
    if raw_dir.is_absolute() or raw_dir.exists():
        return raw_dir.resolve()
    return (PROJECT_ROOT / raw_dir).resolve()


def source_path(source: SourceConfig, raw_dir: Path) -> Path:
    """Absolute path of a source's file."""
    path = Path(source.path).expanduser()
    return path if path.is_absolute() else resolve_raw_dir(raw_dir) / path


def check_sources(sources: list[SourceConfig], raw_dir: Path) -> None:
    """Fail early, naming every source whose file is missing.

    Raises:
        DataError: one or more source files do not exist.
    """
    missing = [f"{s.name}: {source_path(s, raw_dir)}" for s in sources if not source_path(s, raw_dir).is_file()]
    if missing:
        raise DataError("source file(s) not found (data.sources[].path is relative to data.raw_dir):\n  "
                        + "\n  ".join(missing))


# --------------------------------------------------------------------------- helpers
def stable_unit(*parts: object) -> float:
    """A deterministic number in [0, 1) from the parts (independent of PYTHONHASHSEED)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def bad_utf8(value: str) -> str | None:
    """The reject reason for text holding a byte that was not UTF-8 (decoded with surrogateescape), or None."""
    match = _BAD_BYTE.search(value)
    if match is None:
        return None
    return f"invalid UTF-8 (byte 0x{ord(match.group()) - 0xDC00:02x} at column {match.start() + 1})"


def excerpt(value: str, limit: int = 160) -> str:
    """A row shortened for the quarantine file, undecodable bytes shown as U+FFFD."""
    value = _BAD_BYTE.sub("\ufffd", value)
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def numbered_lines(text: str):
    """``(line number, line)`` of a text, 1-based, without line endings."""
    for number, line in enumerate(text.split("\n"), start=1):
        yield number, line.rstrip("\r")
