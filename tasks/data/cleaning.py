"""Regex cleaning: named rules from the config, compiled once, applied in order and counted.

A rule's hit count is the number of matches whose replacement actually changed the text, so a
whitespace rule that rewrites " " to " " counts nothing. Labels are cleaned with the same rules
as the inputs (summaries, references, NER entity texts), then NER entities are checked to still
appear in the cleaned input; an example that the cleaning broke is rejected, never silently kept.
"""

from __future__ import annotations

import collections
import dataclasses
import html
import re
import unicodedata
from collections.abc import Callable

from configs.data_schema import CleaningRule, LengthBounds, compile_flags
from configs.tasks import get_task
from tasks.data.records import RawRecord, Rejected, excerpt


def fix_mojibake(text: str) -> str:
    """Undo UTF-8 that was decoded as cp1252/latin-1 (``Ã©`` -> ``é``); unchanged when that fails."""
    try:
        raw = b"".join(_cp1252_byte(ch) for ch in text)
        return raw.decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _cp1252_byte(ch: str) -> bytes:
    try:
        return ch.encode("cp1252")
    except UnicodeEncodeError:
        return ch.encode("latin-1")  # C1 controls cp1252 leaves undefined (0x81, 0x8d, 0x8f, 0x90, 0x9d)


def luhn_ok(text: str) -> bool:
    """Whether the digits in ``text`` pass the Luhn checksum (payment card numbers do)."""
    digits = [int(c) for c in text if c.isdigit()]
    if len(digits) < 12:
        return False
    total = sum(d if i % 2 == 0 else (d * 2 - 9 if d > 4 else d * 2) for i, d in enumerate(reversed(digits)))
    return total % 10 == 0


_FUNCTIONS: dict[str, Callable[[str], str]] = {
    "@html_unescape": html.unescape,
    "@fix_mojibake": fix_mojibake,
    "@lower": str.lower,
    "@nfkc": lambda s: unicodedata.normalize("NFKC", s),
    "@luhn_id": lambda s: "<ID>" if luhn_ok(s) else s,
}


@dataclasses.dataclass
class _Compiled:
    name: str
    pattern: re.Pattern
    replace: Callable[[re.Match], str]
    sources: frozenset[str]


class Cleaner:
    """Applies the configured rules in order and counts what each one changed.

    Attributes:
        hits: rule name -> number of changing substitutions.
        records: rule name -> number of records the rule changed at least once.
    """

    def __init__(self, rules: list[CleaningRule]):
        self.rules = [self._compile(rule) for rule in rules]
        self.hits: collections.Counter[str] = collections.Counter({r.name: 0 for r in self.rules})
        self.records: collections.Counter[str] = collections.Counter({r.name: 0 for r in self.rules})

    @staticmethod
    def _compile(rule: CleaningRule) -> _Compiled:
        pattern = re.compile(rule.pattern, compile_flags(rule.flags))
        if rule.replacement.startswith("@"):
            function = _FUNCTIONS[rule.replacement]
            replace = lambda m, f=function: f(m.group(0))  # noqa: E731
        else:
            replace = lambda m, t=rule.replacement: m.expand(t)  # noqa: E731
        return _Compiled(rule.name, pattern, replace, frozenset(rule.sources))

    def clean(self, text: str, source: str | None = None, touched: set[str] | None = None) -> str:
        """Run every applicable rule over ``text`` and return the cleaned, stripped text.

        Args:
            text: raw text.
            source: source name, for rules restricted to some sources.
            touched: if given, receives the names of the rules that changed something.
        """
        for rule in self.rules:
            if rule.sources and source not in rule.sources:
                continue
            changed = 0

            def substitute(match: re.Match, rule: _Compiled = rule) -> str:
                nonlocal changed
                new = rule.replace(match)
                if new != match.group(0):
                    changed += 1
                return new

            text = rule.pattern.sub(substitute, text)
            if changed:
                self.hits[rule.name] += changed
                if touched is not None:
                    touched.add(rule.name)
        return text.strip()

    def clean_record(self, record: RawRecord, bounds: LengthBounds) -> RawRecord | Rejected:
        """Clean a record's input and label; reject it when cleaning leaves it unusable."""
        touched: set[str] = set()
        original = record.input
        text = self.clean(record.input, record.source, touched)
        label = record.label
        problem = None
        kind = get_task(record.task).output
        if kind == "entities":
            label = [{"text": self.clean(e["text"], record.source, touched), "type": e["type"]} for e in label]
            problem = _entities_problem(text, label)
        elif kind == "text":
            label = self.clean(label, record.source, touched)
            if len(label) < bounds.min_target_chars:
                problem = f"target too short after cleaning ({len(label)} < {bounds.min_target_chars} chars)"
            elif len(label) > bounds.max_target_chars:
                problem = f"target too long ({len(label)} > {bounds.max_target_chars} chars)"
        for name in touched:
            self.records[name] += 1
        if not text:
            problem = "empty text after cleaning"
        elif len(text) < bounds.min_input_chars:
            problem = f"input too short after cleaning ({len(text)} < {bounds.min_input_chars} chars)"
        elif len(text) > bounds.max_input_chars:
            problem = f"input too long ({len(text)} > {bounds.max_input_chars} chars)"
        if problem:
            return Rejected(record.source, record.line, "clean", problem, excerpt(original))
        return dataclasses.replace(record, input=text, label=label)


def _entities_problem(text: str, entities: list[dict[str, str]]) -> str | None:
    """Each entity must still occur in the cleaned text, in order, or the label no longer fits the input."""
    position = 0
    for entity in entities:
        if not entity["text"]:
            return f"entity of type {entity['type']} became empty after cleaning"
        found = text.find(entity["text"], position)
        if found < 0:
            return f"entity {entity['text']!r} ({entity['type']}) not found in order in the cleaned text"
        position = found + len(entity["text"])
    return None
