"""Loaders: well-formed rows become records, malformed rows land in quarantine with their reasons."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.data_schema import SourceConfig
from configs.schema import ConfigError, load
from tasks.data.loaders import DataError, check_sources, load_source


def _src(tmp_path: Path, name: str, content: bytes | str, **kw) -> SourceConfig:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return SourceConfig(name=kw.pop("source_name", "src"), path=path, **kw)


def _reasons(rejected):
    return {(r.line, r.kind) for r in rejected}


def test_sst2_rows_and_quarantine(tmp_path):
    content = (
        b"a fine film\t1\n"
        b"too many\tcolumns\t1\n"
        b"\t0\n"
        b"weird label\t7\n"
        b"bad \xff\xfe bytes\t1\n"
        b"\n"
        b"a dull film\t0\n"
    )
    source = _src(tmp_path, "s.tsv", content, task="sentiment", format="sst2", split="train")
    records, rejected = load_source(source, tmp_path)
    assert [(r.input, r.label, r.line) for r in records] == [
        ("a fine film", "positive", 1), ("a dull film", "negative", 7)]
    assert _reasons(rejected) == {(2, "wrong_columns"), (3, "empty_text"), (4, "bad_label"), (5, "invalid_utf8")}
    utf8 = next(r for r in rejected if r.kind == "invalid_utf8")
    assert "byte 0xff at column 5" in utf8.reason and "\ufffd" in utf8.excerpt
    assert all(r.stage == "load" and r.source == "src" for r in rejected)
    assert records[0].id == "src-000001" and records[0].split_hint == "train"


CONLL = """EU B-ORG 0
rejects O 0
German B-MISC 0
call O 0
. O 0

Peter B-PER 0
Blackburn I-PER 0
of O 0
New B-LOC 0
York I-LOC 0

bad I-PER 0
start O 0

-DOCSTART- O 0

Mixed B-PER 0
up I-LOC 0

odd B-XYZ 0
tag O 0

short row
here O 0

no O 0
entities O 0
"""


def test_conll_spans_and_bad_sentences(tmp_path):
    source = _src(tmp_path, "c.txt", CONLL, task="ner", format="conll", tag_column=1)
    records, rejected = load_source(source, tmp_path)
    assert [(r.input, r.label) for r in records] == [
        ("EU rejects German call .", [{"text": "EU", "type": "ORG"}, {"text": "German", "type": "MISC"}]),
        ("Peter Blackburn of New York",
         [{"text": "Peter Blackburn", "type": "PER"}, {"text": "New York", "type": "LOC"}]),
        ("no entities", []),
    ]
    reasons = {r.line: r.reason for r in rejected}
    assert set(reasons) == {13, 18, 21, 24}
    assert "bad tag sequence: I-PER after O" in reasons[13]
    assert "I-LOC after B-PER" in reasons[18]
    assert "unknown tag 'B-XYZ'" in reasons[21]
    assert "expected 3 columns" in reasons[24] and "got 2" in reasons[24]


def test_conll_invalid_utf8_rejects_the_sentence(tmp_path):
    source = _src(tmp_path, "c.txt", b"Caf\xe9 B-ORG 0\nopens O 0\n\nGood O 0\nline O 0\n", task="ner",
                  format="conll", tag_column=1)
    records, rejected = load_source(source, tmp_path)
    assert [r.input for r in records] == ["Good line"]
    assert [(r.line, r.kind) for r in rejected] == [(1, "invalid_utf8")]


def test_dialogsum_summary_and_reply(tmp_path):
    rows = [
        {"fname": "d1",
         "dialogue": "#Person1#: Hi there.\n#Person2#: Hello!\n#Person1#: How are you?\n#Person2#: Fine, thanks.",
         "summary": "Two people greet.", "topic": "greeting"},
        {"fname": "d2", "dialogue": "", "summary": "nothing"},
        {"fname": "d3", "dialogue": "#Person1#: Only one turn.", "summary": ""},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    summ = _src(tmp_path, "d.jsonl", text, task="summarization", format="dialogsum")
    records, rejected = load_source(summ, tmp_path)
    assert [(r.id, r.label) for r in records] == [("src-d1", "Two people greet.")]
    assert _reasons(rejected) == {(2, "empty_text"), (3, "empty_text"), (4, "invalid_json")}

    reply = summ.model_copy(update={"name": "reply", "task": "generation", "dialogue_target": "next_turn"})
    records, rejected = load_source(reply, tmp_path)
    (record,) = records
    turns = rows[0]["dialogue"].split("\n")
    k = len(record.input.split("\n"))
    assert 2 <= k < len(turns) and record.input == "\n".join(turns[:k])
    assert record.label == turns[k].split(": ", 1)[1]  # the next turn's words, without the speaker tag
    assert "too_few_turns" in {r.kind for r in rejected}
    # Both tasks from one dialogue share a split group, so they can never straddle splits.
    assert record.group == load_source(summ, tmp_path)[0][0].group


def test_generic_jsonl_with_field_mapping(tmp_path):
    rows = [
        {"ticket": "T1", "body": "Printer is on fire", "mood": "angry"},
        {"ticket": "T2", "body": "Thanks, all good now", "mood": "happy"},
        {"ticket": "T3", "body": "Meh", "mood": "confused"},
        {"ticket": "T1", "body": "Duplicate id here", "mood": "happy"},
        {"ticket": "T5", "mood": "happy"},
    ]
    source = _src(tmp_path, "t.jsonl", "\n".join(json.dumps(r) for r in rows), task="sentiment", format="jsonl",
                  text_field="body", label_field="mood", id_field="ticket",
                  label_map={"angry": "negative", "happy": "positive"})
    records, rejected = load_source(source, tmp_path)
    assert [(r.id, r.label) for r in records] == [("src-T1", "negative"), ("src-T2", "positive")]
    assert _reasons(rejected) == {(3, "bad_label"), (4, "duplicate_id"), (5, "missing_field")}
    assert "set label_map" not in next(r.reason for r in rejected if r.kind == "bad_label")


def test_generic_ner_jsonl_validates_entities(tmp_path):
    rows = [
        {"text": "Ada works at ACME", "entities": [{"text": "Ada", "type": "PER"}, {"text": "ACME", "type": "ORG"}]},
        {"text": "Bob", "entities": [{"text": "Bob", "type": "PERSON"}]},
        {"text": "Carl", "entities": "[not json"},
    ]
    source = _src(tmp_path, "n.jsonl", "\n".join(json.dumps(r) for r in rows), task="ner", format="jsonl",
                  label_field="entities")
    records, rejected = load_source(source, tmp_path)
    assert records[0].label == rows[0]["entities"]
    assert _reasons(rejected) == {(2, "bad_label"), (3, "invalid_json")}


def test_generic_csv_wrong_column_count(tmp_path):
    content = ('id,text,summary\n1,"A long, quoted\nmulti-line text",Short\n2,only two\n'
               "3,fine text,ok,extra\n4,last one,fine\n")
    source = _src(tmp_path, "c.csv", content, task="summarization", format="csv", label_field="summary")
    records, rejected = load_source(source, tmp_path)
    assert [r.input for r in records] == ["A long, quoted\nmulti-line text", "last one"]
    assert [r.kind for r in rejected] == ["wrong_columns", "wrong_columns"]
    assert "expected 3 columns (id, text, summary), got 2" in rejected[0].reason


def test_missing_file_is_a_data_error(tmp_path):
    source = SourceConfig(name="gone", task="sentiment", format="sst2", path=Path("nope.tsv"))
    with pytest.raises(DataError, match="gone: .*nope.tsv"):
        check_sources([source], tmp_path)
    with pytest.raises(DataError, match="cannot read"):
        load_source(source, tmp_path)


def test_source_config_errors():
    with pytest.raises(ConfigError, match="format 'sst2' produces sentiment, not 'ner'"):
        load(None, ["data.sources=[{name: x, task: ner, format: sst2, path: a.tsv}]"])
    with pytest.raises(ConfigError, match="source names must be unique; repeated: x"):
        load(None, ["data.sources=[{name: x, task: ner, format: conll, path: a},"
                    " {name: x, task: ner, format: conll, path: b}]"])
    with pytest.raises(ConfigError, match="validation_fraction \\+ test_fraction"):
        load(None, ["data.validation_fraction=0.5", "data.test_fraction=0.5"])
