"""parse_completion: the contract every stage relies on to turn outputs back into labels."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tasks.parsing import NER_TYPES, UnknownTaskError, coerce_label, parse_completion


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("positive", ("positive", True)),
        ("  Negative \n", ("negative", True)),
        ("POSITIVE", ("positive", True)),
        ("Sentiment: positive", ("positive", False)),
        ("positive.", ("positive", False)),
        ('"negative"', ("negative", False)),
        ("label = Negative!", ("negative", False)),
        ("positive<|im_end|>", ("positive", False)),
        ("positive or negative", (None, False)),
        ("The review is positive", (None, False)),
        ("neutral", (None, False)),
        ("", (None, False)),
    ],
)
def test_sentiment(text, expected):
    assert parse_completion("sentiment", text) == expected


PER = {"text": "John Smith", "type": "PER"}
LOC = {"text": "Paris", "type": "LOC"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (json.dumps([PER, LOC]), ([PER, LOC], True)),
        ("  []  ", ([], True)),
        # extra keys are tolerated but not carried into the label
        ('[{"text": "Paris", "type": "LOC", "start": 3}]', ([LOC], True)),
        # a chatty preamble or code fence: the list is recovered, the format is not OK
        ('Entities: [{"text": "Paris", "type": "LOC"}] done', ([LOC], False)),
        ('```json\n[{"text": "John Smith", "type": "PER"}]\n```', ([PER], False)),
        # partially valid: valid items kept, format not OK
        ('[{"text": "Paris", "type": "LOC"}, {"text": "x", "type": "DATE"}, {"name": "y"}, "z"]', ([LOC], False)),
        ('[{"text": "Paris", "type": "loc"}]', ([], False)),
        ('[{"text": "", "type": "PER"}]', ([], False)),
        # invalid JSON -> no entities
        ('[{"text": "Paris", "type": "LOC"', ([], False)),
        ("Paris (LOC)", ([], False)),
        ('{"text": "Paris", "type": "LOC"}', ([], False)),
        ("", ([], False)),
        # the first *list* wins, even after a bracket that is not JSON
        ('[see below] [{"text": "Paris", "type": "LOC"}]', ([LOC], False)),
    ],
)
def test_ner(text, expected):
    assert parse_completion("ner", text) == expected


def test_free_text_tasks():
    assert parse_completion("summarization", "  A short summary.\n") == ("A short summary.", True)
    assert parse_completion("generation", "Once upon a time<|im_end|>") == ("Once upon a time", True)
    assert parse_completion("summarization", "   ") == ("", False)


def test_unknown_task_is_named():
    with pytest.raises(UnknownTaskError, match="'translation'"):
        parse_completion("translation", "x")


def test_coerce_label_accepts_structured_or_json_encoded():
    assert coerce_label("ner", json.dumps([PER])) == [PER]
    assert coerce_label("ner", [PER]) == [PER]
    assert coerce_label("ner", "") == []
    assert coerce_label("sentiment", '"positive"') == "positive"
    assert coerce_label("sentiment", "positive") == "positive"
    assert coerce_label("summarization", "He said hi.") == "He said hi."
    with pytest.raises(ValueError, match="not valid JSON"):
        coerce_label("ner", "[{oops")


entities = st.lists(
    st.fixed_dictionaries({"text": st.text(min_size=1).filter(str.strip), "type": st.sampled_from(NER_TYPES)}),
    max_size=5,
)


@given(entities)
def test_ner_round_trip(label):
    """What the curation writes as the assistant content parses back to the same label."""
    assert parse_completion("ner", json.dumps(label, ensure_ascii=False)) == (label, True)
    assert parse_completion("ner", json.dumps(label)) == (label, True)


@given(st.sampled_from(["positive", "negative"]), st.sampled_from(["", " ", "\n", "\t "]))
def test_sentiment_round_trip(label, pad):
    assert parse_completion("sentiment", pad + label.upper() + pad) == (label, True)
