"""parse_completion: the contract every stage relies on to turn outputs back into labels."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from configs.tasks import get_task
from tasks.parsing import UnknownTaskError, coerce_label, format_target, parse_completion

NER_TYPES = tuple(get_task("ner").labels)


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
        ("- John Smith (person)\n- Paris (location)", ([PER, LOC], True)),
        ("  none  ", ([], True)),
        ("None", ([], True)),
        # spaces around the parts are tolerated
        ("-  Paris  ( location )\n", ([LOC], True)),
        # an entity whose text has parentheses keeps them
        ("- Paris (France) (location)", ([{"text": "Paris (France)", "type": "LOC"}], True)),
        # a type code instead of its word: read, but the format was not followed
        ("- Paris (LOC)", ([LOC], False)),
        # a malformed line beside a good one: the good one is kept, the format is not OK
        ("- Paris (location)\nand then some", ([LOC], False)),
        ("- Paris (location)\n- x (date)", ([LOC], False)),
        # no parsable line, but a JSON list (chat users, older models): read from the list, not OK
        (json.dumps([PER, LOC]), ([PER, LOC], False)),
        ('Entities: [{"text": "Paris", "type": "LOC"}] done', ([LOC], False)),
        ('[{"text": "Paris", "type": "loc"}]', ([], False)),
        ("Paris is a city", ([], False)),
        ("", ([], False)),
    ],
)
def test_ner(text, expected):
    assert parse_completion("ner", text) == expected


def test_ner_target_is_one_line_per_entity_span_first():
    assert format_target("ner", [PER, LOC]) == "- John Smith (person)\n- Paris (location)"
    assert format_target("ner", []) == "none"
    assert format_target("ner", json.dumps([LOC])) == "- Paris (location)"  # JSON-encoded labels as stored


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


# Entity texts as curation leaves them: one line, no edge whitespace (cleaning collapses whitespace).
entity_text = st.text(alphabet=st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1).map(
    lambda t: " ".join(t.split())).filter(bool)
entities = st.lists(st.fixed_dictionaries({"text": entity_text, "type": st.sampled_from(NER_TYPES)}), max_size=5)


@given(entities)
def test_ner_round_trip(label):
    """What the curation writes as the assistant content parses back to the same label."""
    assert parse_completion("ner", format_target("ner", label)) == (label, True)


@given(st.sampled_from(["positive", "negative"]), st.sampled_from(["", " ", "\n", "\t "]))
def test_sentiment_round_trip(label, pad):
    assert parse_completion("sentiment", pad + label.upper() + pad) == (label, True)
