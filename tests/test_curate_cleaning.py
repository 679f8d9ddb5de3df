"""Cleaning rules: each rule on crafted messy strings, PII never survives, bad rules fail as config errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.provisional import urls

from configs.data_schema import DEFAULT_RULES, DataConfig, LengthBounds
from configs.schema import ConfigError, load
from tasks.data.cleaning import Cleaner, fix_mojibake, luhn_ok
from tasks.data.loaders import RawRecord, Rejected

REPO = Path(__file__).resolve().parents[1]
RULES = {rule.name: rule for rule in DEFAULT_RULES}

# (rule, before, after): each rule alone on a string that needs it.
CASES = [
    ("control_chars", "a\x00b\x07c\u200bd\ufeffe\tf\ng", "abcde\tf\ng"),
    ("mojibake", "caf\u00c3\u00a9 \u00e2\u20ac\u0153hi\u00e2\u20ac\u009d it\u00e2\u20ac\u2122s \u00e2\u201a\u00ac5",
     "caf\u00e9 \u201chi\u201d it\u2019s \u20ac5"),
    ("mojibake", "S\u00c3O PAULO, na\u00efve caf\u00e9\u2026", "S\u00c3O PAULO, na\u00efve caf\u00e9\u2026"),
    ("html_entities", "Tom &amp; Jerry &lt;3 &#169; &#x263A; &bogus", "Tom & Jerry <3 \u00a9 \u263a &bogus"),
    ("html_breaks", "line one<br>line two<BR />three</p>", "line one\nline two\nthree\n"),
    ("html_tags", '<p class="x">Hello <b>world</b></p> 3 < 4 and 5 > 2', "Hello  world   3 < 4 and 5 > 2"),
    ("whitespace", "a  b\t\tc\u00a0d\u2003e f", "a b c d e f"),
    ("detok_quotes", "a `` horror '' movie", 'a "horror" movie'),
    ("detok_contractions", "they wo n't , it 's , i 've , you 're , ca n't",
     "they won't , it's , i've , you're , can't"),
    ("detok_spaced_apostrophe", "I ' m sure I don ' t , the boys ' toys", "I'm sure I don't , the boys ' toys"),
    ("detok_contraction_case", "I'Ve seen it, we'Ll go, that'S all, IT'S", "I've seen it, we'll go, that's all, IT'S"),
    ("detok_punct_before", "well , fine . ok ! ( a ) 50 %", "well, fine. ok! ( a) 50%"),
    ("detok_punct_after", "( a ) costs $ 5", "(a ) costs $5"),
    ("url", "see https://ex.com/a?b=1 or www.example.org/x, not example.com", "see <URL> or <URL> not example.com"),
    ("email", "mail john.doe+tag@mail.example.co.uk now, not @handle", "mail <EMAIL> now, not @handle"),
    ("ip_address", "from 192.168.0.1 not 1.2.3 or 999.1.1.1 or v1.2.3.4.5 or 1.2.3.4.5, ends 0.0.0.0.",
     "from <IP> not 1.2.3 or 999.1.1.1 or v1.2.3.4.5 or 1.2.3.4.5, ends <IP>."),
    ("id_number", "SSN 123-45-6789, IBAN GB29NWBK60161331926819, date 1996-08-22",
     "SSN <ID>, IBAN <ID>, date 1996-08-22"),
    ("card_number", "card 4111 1111 1111 1111 or 4111-1111-1111-1111; years 1995 1996 1997 1998",
     "card <ID> or <ID>; years 1995 1996 1997 1998"),
    ("phone_international", "London +44 171 542 7658, Tel+44 161 542 7706, +1 (415) 555-0123; change +0.578",
     "London <PHONE>, Tel<PHONE>, <PHONE>; change +0.578"),
    ("phone_area_code", "(212) 859-1610 and (852) 2847 4039; (1996) and (3-1)",
     "<PHONE> and <PHONE>; (1996) and (3-1)"),
    ("phone_national", "212-859-1736, 415.555.0123, 212 859 1646, 416 941-8100, 555-0123, 61-2 9373-1800",
     "<PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>, <PHONE>"),
    ("phone_national", "scores 68 71 72 211, 6-3 6-4, 1996-08-22, 1996-1997, 3/1/90, 1.2345", None),
    ("line_edges", "x  a  \n b \ny", "x  a\nb\ny"),
    ("blank_lines", "a\n\n\n\nb", "a\n\nb"),
]


@pytest.mark.parametrize(("rule", "before", "after"), CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_on_messy_strings(rule, before, after):
    cleaner = Cleaner([RULES[rule]])
    expected = before if after is None else after
    assert cleaner.clean(before) == expected.strip()
    assert (cleaner.hits[rule] > 0) == (expected.strip() != before.strip())


def test_full_chain_on_a_tokenised_news_line():
    cleaner = Cleaner(DataConfig().active_rules())
    raw = "-- New York newsroom , ( 212 ) 859-1610 , e-mail : jeffrey.hodgson@reuters.com"
    assert cleaner.clean(raw) == "-- New York newsroom, <PHONE>, e-mail: <EMAIL>"
    sst = "it 's a `` horror '' movie that wo n't scare you , honestly ."
    assert cleaner.clean(sst) == 'it\'s a "horror" movie that won\'t scare you, honestly.'
    html = "<p>Caf\u00c3\u00a9&nbsp;owner:&nbsp;<a href='x'>mail</a> bob@x.org</p>"
    assert cleaner.clean(html) == "Caf\u00e9 owner: mail <EMAIL>"


def test_disabled_rules_are_skipped_and_counted_nowhere():
    cfg = DataConfig(disabled_rules=["email"])
    cleaner = Cleaner(cfg.active_rules())
    assert cleaner.clean("write to a@b.com") == "write to a@b.com"
    assert "email" not in cleaner.hits


def test_rule_limited_to_sources():
    rule = RULES["detok_punct_before"].model_copy(update={"sources": ["sst2"]})
    cleaner = Cleaner([rule])
    assert cleaner.clean("a , b", source="sst2") == "a, b"
    assert cleaner.clean("a , b", source="tickets") == "a , b"


def test_mojibake_repair_is_safe():
    assert fix_mojibake("\u00c3\u00a9") == "\u00e9"
    assert fix_mojibake("\u00c3(") == "\u00c3("  # not valid UTF-8 once re-encoded: left alone


def test_luhn():
    assert luhn_ok("4111 1111 1111 1111")
    assert not luhn_ok("1995 1996 1997 1998")


# --------------------------------------------------------------------------- records
def _record(task, text, label, source="s"):
    return RawRecord(id="s-1", source=source, task=task, input=text, label=label, group="g", split_hint="all", line=1)


def test_ner_labels_are_cleaned_with_the_input_and_must_still_fit():
    cleaner = Cleaner(DataConfig().active_rules())
    ok = cleaner.clean_record(_record("ner", "EU rejects German call , says Peter .", [
        {"text": "EU", "type": "ORG"}, {"text": "German", "type": "MISC"}, {"text": "Peter", "type": "PER"}]),
        LengthBounds())
    assert isinstance(ok, RawRecord)
    assert ok.input == "EU rejects German call, says Peter."
    # Cleaning in context can change what the entity alone keeps (here the phone mask swallows part
    # of it): the label no longer fits the input, so the example is rejected, not kept wrong.
    broken = cleaner.clean_record(_record("ner", "Call Acme 555-0123 now , please", [
        {"text": "Acme 555", "type": "ORG"}]), LengthBounds())
    assert isinstance(broken, Rejected) and broken.kind == "entity_lost"


def test_length_bounds_reject_with_reasons():
    cleaner = Cleaner(DataConfig().active_rules())
    bounds = LengthBounds(min_input_chars=10, max_input_chars=40, min_target_chars=3, max_target_chars=10)
    short = cleaner.clean_record(_record("sentiment", "too  short", "positive"), bounds)
    long = cleaner.clean_record(_record("sentiment", "x" * 41, "negative"), bounds)
    empty = cleaner.clean_record(_record("sentiment", "<b></b>\x00", "negative"), bounds)
    target = cleaner.clean_record(_record("summarization", "a long enough dialogue", "summary too long"), bounds)
    assert isinstance(short, Rejected) and short.kind == "too_short" and "9 < 10" in short.reason
    assert isinstance(long, Rejected) and long.kind == "too_long"
    assert isinstance(empty, Rejected) and empty.kind == "empty_text"
    assert isinstance(target, Rejected) and "target too long" in target.reason


# --------------------------------------------------------------------------- PII property
def _phones():
    d = lambda n: st.text("0123456789", min_size=n, max_size=n)  # noqa: E731
    international = st.tuples(st.sampled_from(["+1", "+44", "+49", "+358", "+90"]), d(3), d(3), d(4),
                              st.sampled_from([" ", "-"])).map(lambda p: f"{p[0]} {p[1]}{p[4]}{p[2]}{p[4]}{p[3]}")
    area = st.tuples(d(3), d(3), d(4)).map(lambda p: f"({p[0]}) {p[1]}-{p[2]}")
    dashed = st.tuples(d(3), d(3), d(4), st.sampled_from(["-", "."])).map(lambda p: p[3].join(p[:3]))
    local = st.tuples(d(3), d(4)).map(lambda p: f"{p[0]}-{p[1]}")
    return st.one_of(international, area, dashed, local)


def _cards():
    def complete(digits: list[int]) -> str:
        for check in range(10):
            number = "".join(map(str, digits)) + str(check)
            if luhn_ok(number):
                return " ".join(number[i : i + 4] for i in range(0, 16, 4))
        raise AssertionError("unreachable")

    return st.lists(st.integers(0, 9), min_size=15, max_size=15).map(complete)


def _ssns():
    return st.tuples(st.integers(100, 999), st.integers(10, 99), st.integers(1000, 9999)).map(
        lambda p: f"{p[0]}-{p[1]}-{p[2]}")


def _ips():
    return st.tuples(*[st.integers(0, 255)] * 4).map(lambda p: ".".join(map(str, p)))


PII = st.one_of(st.emails(), urls(), _phones(), _cards(), _ssns(), _ips())
FILLER = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Nd")), max_size=40)
_CLEANER = Cleaner(DataConfig().active_rules())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(prefix=FILLER, pii=PII, suffix=FILLER)
def test_pii_never_survives(prefix, pii, suffix):
    cleaned = _CLEANER.clean(f"{prefix} {pii} {suffix}")
    assert pii not in cleaned
    # Nothing longer than a few digits of a phone/card/ID may remain either.
    digits = re.sub(r"\D", "", pii)
    if len(digits) >= 7 and not pii.startswith("http"):
        assert digits not in re.sub(r"\D", "", cleaned.replace(prefix.strip(), "").replace(suffix.strip(), ""))


# --------------------------------------------------------------------------- config errors
def test_invalid_regex_is_a_config_error_naming_the_rule(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("data:\n  rules:\n    - {name: ok_rule, pattern: 'a+'}\n"
                      "    - {name: broken_rule, pattern: '(unclosed'}\n")
    with pytest.raises(ConfigError) as err:
        load(preset)
    message = str(err.value)
    assert "broken_rule" in message and "does not compile" in message
    assert f"{preset}:4" in message  # the line of the offending rule


def test_bad_replacement_and_unknown_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="rule 'r1': replacement"):
        load(None, ["data.rules=[{name: r1, pattern: 'a', replacement: '\\3'}]"])
    with pytest.raises(ConfigError, match="unknown replacement function"):
        load(None, ["data.rules=[{name: r1, pattern: 'a', replacement: '@nope'}]"])
    with pytest.raises(ConfigError, match="disabled_rules names unknown rules: nope"):
        load(None, ["data.disabled_rules=[nope]"])


@pytest.mark.integration  # the CLI in a subprocess
def test_cli_exits_2_on_invalid_regex(tmp_path):
    preset = tmp_path / "bad.yaml"
    preset.write_text("data:\n  rules:\n    - {name: broken_rule, pattern: '[z-a]'}\n")
    result = subprocess.run([sys.executable, "-m", "flows.cli", "curate", "-c", str(preset)],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "broken_rule" in result.stderr and "does not compile" in result.stderr
