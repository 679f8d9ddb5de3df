"""Answers <-> structured labels, by the task's output kind (:mod:`configs.tasks`).

Two directions, shared by curation, training, evaluation, rewards and serving::

    format_target(task, label) -> str              # what the model is trained to answer
    parse_completion(task, text) -> (label, ok)    # what an answer means, and whether it obeyed

``label`` has the structured form of the curated record (label: one of the task's labels or None;
entities: a list of ``{"text", "type"}``; text: str) and ``ok`` says whether the output is *exactly*
what the instruction asked for. Accuracy should measure understanding and ``ok`` obedience, and
neither should hide the other:

* **label**: the label word alone, case- and whitespace-insensitive -> ``(label, True)``. A
  recoverable near miss -> ``(label, False)``: one leading ``Label:``/``Answer:``/``<task>:`` prefix,
  surrounding quotes, or trailing punctuation (``"Sentiment: Positive."``). Anything else, including
  text naming two labels -> ``(None, False)``.
* **entities**: ``none``, or one ``- text (word)`` line per entity, the word being the one the task
  writes for a type (``person`` for PER) -> ``(items, True)``. Lines that do not parse are dropped and
  make ``ok`` False; so does a type code in place of its word (``(PER)``). An answer with no such
  line but a JSON list of ``{"text", "type"}`` objects (what chat users and older models write) is
  read from the list, ``ok`` False.
* **text**: the stripped text; ``ok`` is False only when it is empty.
"""

from __future__ import annotations

import json
import re
from typing import Any

from configs.tasks import NO_ENTITIES, TaskSpec, get_task

_EDGE_NOISE = "\"'`*.!,;:()[]{} \t\r\n"
# Chat-template leftovers a generator may emit when it does not strip special tokens.
_TEMPLATE_TOKENS = re.compile(r"<\|im_(?:start|end)\|>|<\|endoftext\|>|</s>")
_ENTITY_LINE = re.compile(r"^\s*-\s*(.+?)\s*\(\s*([A-Za-z]+)\s*\)\s*$")


class UnknownTaskError(ValueError):
    """A record names a task the registry does not know."""


def spec_of(task: str | TaskSpec) -> TaskSpec:
    """The spec for a task name (or the spec itself)."""
    if isinstance(task, TaskSpec):
        return task
    try:
        return get_task(task)
    except KeyError as err:
        raise UnknownTaskError(str(err.args[0])) from None


def format_target(task: str | TaskSpec, label: Any) -> str:
    """The answer text for a structured label (the assistant turn the model is trained on)."""
    spec = spec_of(task)
    if spec.output == "entities":
        items = coerce_label(spec, label)
        return "\n".join(f"- {e['text']} ({spec.word_of(e['type'])})" for e in items) if items else NO_ENTITIES
    return str(label)


def answer_pattern(task: str | TaskSpec) -> str | None:
    """A regex every well-formed answer of ``task`` matches (what :func:`format_target` writes), for
    constrained decoding; None for free-text tasks. Only regex metacharacters are escaped, so engines'
    regex dialects (XGrammar, vLLM's) read it as Python does."""
    spec = spec_of(task)
    if spec.output == "label":
        return "(" + "|".join(map(regex_literal, spec.labels)) + ")"
    if spec.output == "entities":
        words = "|".join(regex_literal(spec.word_of(t)) for t in spec.labels)
        line = rf"- [^\n()]+ \(({words})\)"
        return rf"({regex_literal(NO_ENTITIES)}|{line}(\n{line})*)"
    return None


def regex_literal(text: str) -> str:
    """``text`` as a regex matching itself. Only the metacharacters are escaped: re.escape also escapes
    ' ', '#' and '~', which not every engine's regex dialect accepts."""
    return "".join("\\" + ch if ch in "\\.^$*+?()[]{}|" else ch for ch in text)


def parse_completion(task: str | TaskSpec, text: str | None) -> tuple[Any, bool]:
    """Parse one model output into ``(label, format_ok)`` (see the module docstring).

    Raises:
        UnknownTaskError: ``task`` is not in the registry.
    """
    spec = spec_of(task)
    text = "" if text is None else str(text)
    if spec.output == "label":
        return _parse_label(spec, text)
    if spec.output == "entities":
        return _parse_entities(spec, text)
    cleaned = _TEMPLATE_TOKENS.sub("", text).strip()
    return cleaned, bool(cleaned)


def coerce_label(task: str | TaskSpec, label: Any) -> Any:
    """Bring a record's ``label`` into its structured form.

    Datasets store one column for all tasks, so curated data may carry the label JSON-encoded
    (``'[{"text": ...}]'``, ``'"positive"'``); TRL passes such columns through unchanged.

    Raises:
        ValueError: an entities label that is neither a list nor a JSON list.
    """
    spec = spec_of(task)
    if spec.output == "entities":
        if isinstance(label, str):
            try:
                label = json.loads(label) if label.strip() else []
            except json.JSONDecodeError as err:
                raise ValueError(f"{spec.name} label is not valid JSON: {label[:80]!r} ({err.msg})") from None
        if not isinstance(label, list):
            raise ValueError(f"{spec.name} label must be a list of entities, got {type(label).__name__}")
        return [{"text": str(e["text"]), "type": str(e["type"])} for e in label if isinstance(e, dict)]
    if isinstance(label, str) and label.startswith('"') and label.endswith('"') and len(label) >= 2:
        try:
            decoded = json.loads(label)
        except json.JSONDecodeError:
            return label
        return decoded if isinstance(decoded, str) else label
    return label


def entity_key(entity: dict[str, Any]) -> tuple[str, str]:
    """The identity of an entity for exact matching: (text, type)."""
    return (str(entity.get("text", "")), str(entity.get("type", "")))


# --------------------------------------------------------------------------- label
def _parse_label(spec: TaskSpec, text: str) -> tuple[str | None, bool]:
    labels = {label.lower(): label for label in spec.labels}
    stripped = text.strip().lower()
    if stripped in labels:
        return labels[stripped], True
    prefix = re.compile(rf"^\s*(?:{re.escape(spec.name)}|label|answer)\s*[:=\-]\s*", re.IGNORECASE)
    candidate = prefix.sub("", _TEMPLATE_TOKENS.sub("", text), count=1).strip(_EDGE_NOISE).lower()
    if candidate in labels:
        return labels[candidate], False
    return None, False


# --------------------------------------------------------------------------- entities
def _parse_entities(spec: TaskSpec, text: str) -> tuple[list[dict[str, str]], bool]:
    stripped = text.strip()
    if stripped.lower() == NO_ENTITIES:
        return [], True
    types = {spec.word_of(t).lower(): t for t in spec.labels}
    items: list[dict[str, str]] = []
    all_ok = bool(stripped)
    for line in stripped.splitlines():
        if not line.strip():
            continue
        match = _ENTITY_LINE.match(line)
        word = match[2] if match else ""
        if match and word.lower() in types:
            items.append({"text": match[1], "type": types[word.lower()]})
            all_ok = all_ok and word == spec.word_of(types[word.lower()])
        elif match and word in spec.labels:  # the code instead of its word: readable, not obedient
            items.append({"text": match[1], "type": word})
            all_ok = False
        else:
            all_ok = False
    if items:
        return items, all_ok
    found = first_json_list(stripped)
    if found is None:
        return [], False
    valid = [{"text": e["text"], "type": e["type"]} for e in found
             if isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip()
             and e.get("type") in spec.labels]
    return valid, False


def first_json_list(text: str) -> list | None:
    """The first ``[...]`` in ``text`` that decodes as a JSON list, scanning left to right."""
    decoder = json.JSONDecoder()
    start = text.find("[")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list):
            return value
        start = text.find("[", start + 1)
    return None
