"""Readers for the raw sources: SST-2 TSV, CoNLL-2003, DialogSum JSONL, generic JSONL/CSV.

Every reader returns ``(records, rejected)``. A malformed row never stops a run: it becomes a
:class:`Rejected` entry (source, line, reason, excerpt) that ends up in ``quarantine.jsonl`` and
is counted on the data card. A missing file or a source that cannot be read at all is a
:class:`DataError`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from configs.data_schema import SourceConfig
from configs.tasks import get_task
from tasks.data.records import (
    DataError,
    RawRecord,
    Rejected,
    bad_utf8,
    check_sources,
    excerpt,
    numbered_lines,
    resolve_raw_dir,
    source_path,
    stable_unit,
)

# Curation code and tests import the shared record types and source helpers from here as well.
__all__ = ["DataError", "RawRecord", "Rejected", "check_sources", "load_source", "resolve_raw_dir", "source_path",
           "stable_unit"]

_TURN = re.compile(r"^\s*(#[^#\n]{1,40}#)\s*:\s*(.*)$")


def load_source(source: SourceConfig, raw_dir: Path) -> tuple[list[RawRecord], list[Rejected]]:
    """Read one source into records plus quarantined rows.

    Raises:
        DataError: the file is missing or unreadable.
    """
    path = source_path(source, raw_dir)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"source {source.name!r}: cannot read {path}: {err.strerror or err}") from None
    # surrogateescape keeps undecodable bytes visible per row, so one bad row does not sink the file.
    text = data.decode("utf-8", errors="surrogateescape").lstrip("\ufeff")
    reader = {"sst2": _read_sst2, "conll": _read_conll, "dialogsum": _read_dialogsum,
              "jsonl": _read_jsonl, "csv": _read_csv}[source.format]
    return reader(source, text)


# --------------------------------------------------------------------------- helpers
def _class_label(source: SourceConfig, raw: Any) -> tuple[str | None, str | None]:
    """A label-task label: the raw value through ``label_map``, checked against the task's labels."""
    labels = get_task(source.task).labels
    value = str(raw).strip()
    mapped = source.label_map.get(value, value).strip().lower()
    if mapped in labels:
        return mapped, None
    hint = "" if source.label_map else " (set label_map on the source)"
    return None, f"label {value!r} is not {'/'.join(labels)}{hint}"


def _entity_types(source: SourceConfig) -> list[str]:
    return get_task(source.task).labels


def _record(source: SourceConfig, key: str, text: str, label: Any, line: int, group: str | None = None) -> RawRecord:
    rid = f"{source.name}-{key}"
    return RawRecord(id=rid, source=source.name, task=source.task, input=text, label=label,
                     group=group or rid, split_hint=source.split, line=line)


# --------------------------------------------------------------------------- SST-2
def _read_sst2(source: SourceConfig, text: str) -> tuple[list[RawRecord], list[Rejected]]:
    records, rejected = [], []
    mapped = source.model_copy(update={"label_map": source.label_map or {"1": "positive", "0": "negative"}})
    for number, line in numbered_lines(text):
        if not line.strip():
            continue  # blank lines (including the final newline) carry no row
        if number == 1 and line.lower().startswith("sentence\t"):
            continue  # GLUE-style header
        sentence, label, problem = _sst2_row(mapped, line)
        if problem:
            rejected.append(Rejected(source.name, number, "load", problem, excerpt(line)))
        else:
            records.append(_record(source, f"{number:06d}", sentence, label, number))
    return records, rejected


def _sst2_row(source: SourceConfig, line: str) -> tuple[str, str | None, str | None]:
    if bad := bad_utf8(line):
        return "", None, bad
    columns = line.split("\t")
    if len(columns) != 2:
        return "", None, f"expected 2 tab-separated columns (sentence, label), got {len(columns)}"
    sentence, raw_label = columns
    if not sentence.strip():
        return "", None, "empty text"
    label, problem = _class_label(source, raw_label)
    return sentence, label, problem


# --------------------------------------------------------------------------- CoNLL-2003
def _read_conll(source: SourceConfig, text: str) -> tuple[list[RawRecord], list[Rejected]]:
    records: list[RawRecord] = []
    rejected: list[Rejected] = []
    tokens: list[str] = []
    tags: list[str] = []
    start, problem, width = 0, None, None
    types = _entity_types(source)

    def finish() -> None:
        nonlocal tokens, tags, problem
        if tokens or problem:
            sentence = " ".join(tokens)
            if problem:
                rejected.append(Rejected(source.name, start, "load", problem, excerpt(sentence)))
            else:
                records.append(_record(source, f"{start:06d}", sentence, _spans(tokens, tags), start))
        tokens, tags, problem = [], [], None

    for number, line in numbered_lines(text):
        columns = line.split()
        if not columns or columns[0] == "-DOCSTART-":
            finish()
            continue
        if not tokens and problem is None:
            start = number
        if problem:
            continue  # the sentence is already rejected; skip to its end
        if bad := bad_utf8(line):
            problem = f"line {number}: {bad}"
            continue
        width = width or len(columns)
        if len(columns) != width:
            problem = f"line {number}: expected {width} columns like the rest of the file, got {len(columns)}"
            continue
        try:
            tag = columns[source.tag_column]
        except IndexError:
            problem = f"line {number}: no column {source.tag_column} for the tag"
            continue
        if problem := _tag_problem(tag, tags[-1] if tags else "O", number, types):
            continue
        tokens.append(columns[0])
        tags.append(tag)
    finish()
    return records, rejected


def _tag_problem(tag: str, previous: str, number: int, types: list[str]) -> str | None:
    if tag == "O":
        return None
    prefix, _, kind = tag.partition("-")
    if prefix not in ("B", "I") or kind not in types:
        return f"line {number}: unknown tag {tag!r} (expected O, B-/I- + {'/'.join(types)})"
    if prefix == "I" and previous[2:] != kind:
        return f"line {number}: bad tag sequence: {tag} after {previous} (IOB2 needs B-{kind} first)"
    return None


def _spans(tokens: list[str], tags: list[str]) -> list[dict[str, str]]:
    entities: list[dict[str, str]] = []
    current: list[str] = []
    kind = ""
    for token, tag in zip([*tokens, ""], [*tags, "O"]):
        if current and not (tag.startswith("I-") and tag[2:] == kind):
            entities.append({"text": " ".join(current), "type": kind})
            current = []
        if tag.startswith("B-"):
            current, kind = [token], tag[2:]
        elif tag.startswith("I-"):
            current.append(token)
    return entities


# --------------------------------------------------------------------------- DialogSum
def _read_dialogsum(source: SourceConfig, text: str) -> tuple[list[RawRecord], list[Rejected]]:
    records, rejected = [], []
    for number, row, problem, line in _json_rows(source, text):
        if problem:
            rejected.append(Rejected(source.name, number, "load", problem, excerpt(line)))
            continue
        dialogue, summary, fname = row.get("dialogue"), row.get("summary"), row.get("fname") or f"line{number}"
        if not isinstance(dialogue, str) or not dialogue.strip():
            problem = "empty text (field 'dialogue' missing or empty)"
        elif source.dialogue_target == "summary" and (not isinstance(summary, str) or not summary.strip()):
            problem = "empty target (field 'summary' missing or empty)"
        if problem:
            rejected.append(Rejected(source.name, number, "load", problem, excerpt(line)))
            continue
        group = f"{Path(source.path).as_posix()}#{fname}"
        if source.dialogue_target == "summary":
            records.append(_record(source, str(fname), dialogue, summary, number, group))
            continue
        turns = [t for t in dialogue.split("\n") if t.strip()]
        if len(turns) < 2:
            rejected.append(Rejected(source.name, number, "load", "dialogue has fewer than 2 turns", excerpt(line)))
            continue
        # Predict one turn after at least two of context when there are enough; which one is a
        # fixed function of the dialogue id so the data set is reproducible.
        low = min(2, len(turns) - 1)
        k = low + int(stable_unit("turn", fname) * (len(turns) - low))
        match = _TURN.match(turns[k])
        reply = match.group(2) if match else turns[k]
        records.append(_record(source, str(fname), "\n".join(turns[:k]), reply.strip(), number, group))
    return records, rejected


# --------------------------------------------------------------------------- generic JSONL / CSV
def _json_rows(source: SourceConfig, text: str):
    for number, line in numbered_lines(text):
        if not line.strip():
            continue
        if bad := bad_utf8(line):
            yield number, None, bad, line
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            yield number, None, f"invalid JSON: {err.msg} at column {err.colno}", line
            continue
        if not isinstance(row, dict):
            yield number, None, f"expected a JSON object, got {type(row).__name__}", line
            continue
        yield number, row, None, line


def _read_jsonl(source: SourceConfig, text: str) -> tuple[list[RawRecord], list[Rejected]]:
    return _read_mapped(source, ((n, row, p, line) for n, row, p, line in _json_rows(source, text)))


def _read_csv(source: SourceConfig, text: str) -> tuple[list[RawRecord], list[Rejected]]:
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=source.delimiter)
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return [], []
    header = [h.strip() for h in header]

    def rows():
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as err:
                yield reader.line_num, None, f"malformed CSV: {err}", ""
                continue
            line = source.delimiter.join(values)
            if not any(v.strip() for v in values):
                continue
            if len(values) != len(header):
                problem = f"expected {len(header)} columns ({', '.join(header)}), got {len(values)}"
                yield reader.line_num, None, problem, line
                continue
            if bad := bad_utf8(line):
                yield reader.line_num, None, bad, line
                continue
            yield reader.line_num, dict(zip(header, values)), None, line

    return _read_mapped(source, rows())


def _read_mapped(source: SourceConfig, rows) -> tuple[list[RawRecord], list[Rejected]]:
    records: list[RawRecord] = []
    rejected: list[Rejected] = []
    seen: set[str] = set()
    for number, row, problem, line in rows:
        if problem is None:
            record, problem = _mapped_record(source, row, number)
            if record is not None and record.id in seen:
                problem = f"duplicate id {record.id!r}"
                record = None
        if problem:
            rejected.append(Rejected(source.name, number, "load", problem, excerpt(line)))
            continue
        assert record is not None  # _mapped_record returns a record or a problem
        seen.add(record.id)
        records.append(record)
    return records, rejected


def _mapped_record(source: SourceConfig, row: dict, number: int) -> tuple[RawRecord | None, str | None]:
    text = row.get(source.text_field)
    if source.text_field not in row:
        return None, f"missing field {source.text_field!r} (data.sources[{source.name}].text_field)"
    if not isinstance(text, str) or not text.strip():
        return None, "empty text"
    if source.label_field not in row:
        return None, f"missing field {source.label_field!r} (data.sources[{source.name}].label_field)"
    label, problem = _mapped_label(source, row[source.label_field])
    if problem:
        return None, problem
    key = f"{number:06d}"
    if source.id_field:
        if row.get(source.id_field) in (None, ""):
            return None, f"missing id field {source.id_field!r}"
        key = str(row[source.id_field])
    group = f"{source.name}#{row[source.group_field]}" if source.group_field and row.get(source.group_field) else None
    return _record(source, key, text, label, number, group), None


def _mapped_label(source: SourceConfig, raw: Any) -> tuple[Any, str | None]:
    kind = get_task(source.task).output
    if kind == "label":
        return _class_label(source, raw)
    if kind == "entities":
        types = _entity_types(source)
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except json.JSONDecodeError as err:
                return None, f"NER label is invalid JSON: {err.msg}"
        if not isinstance(raw, list):
            return None, f"NER label must be a list of {{text, type}}, got {type(raw).__name__}"
        entities = []
        for item in raw:
            if not (isinstance(item, dict) and isinstance(item.get("text"), str) and item["text"].strip()
                    and item.get("type") in types):
                return None, f"bad entity {item!r}: needs non-empty 'text' and 'type' in {'/'.join(types)}"
            entities.append({"text": item["text"], "type": item["type"]})
        return entities, None
    if not isinstance(raw, str) or not raw.strip():
        return None, "empty target"
    mapped = source.label_map.get(raw, raw)
    return mapped, None
