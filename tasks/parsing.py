"""Turn model outputs back into structured labels, and say whether the output followed the format.

The contract (shared by evaluation, rewards and serving checks)::

    parse_completion(task, text) -> (label, format_ok)

``label`` has the structured form of the curated record schema (sentiment: ``"positive"`` |
``"negative"`` | None; ner: list of ``{"text", "type"}``; summarization/generation: str) and
``format_ok`` says whether the output is *exactly* what the instruction asked for.

Decisions (why: accuracy should measure understanding, ``format_ok`` should measure obedience,
and neither should hide the other):

* **sentiment**: the label word alone, case- and whitespace-insensitive -> ``(label, True)``.
  A recoverable near miss -> ``(label, False)``: one leading ``Sentiment:``/``Label:``/``Answer:``
  prefix, surrounding quotes, or trailing punctuation (``"Sentiment: Positive."``). Anything else,
  including text that names both labels -> ``(None, False)``.
* **ner**: the output must be a JSON list of ``{"text": non-empty str, "type": PER|ORG|LOC|MISC}``
  and nothing else -> ``(items, True)``. Otherwise the first JSON list found anywhere in the text
  is used (e.g. after a chatty preamble or inside a code fence); invalid items are dropped and
  ``format_ok`` is False. No list at all (invalid JSON) -> ``([], False)``. Types are matched
  exactly (upper case): a lower-case ``"per"`` is an invalid item, not a PER.
* **summarization / generation**: the stripped text is the label; ``format_ok`` is False only
  when it is empty.
"""

from __future__ import annotations

import json
import re
from typing import Any

TASKS = ("sentiment", "ner", "summarization", "generation")
SENTIMENT_LABELS = ("positive", "negative")
NER_TYPES = ("PER", "ORG", "LOC", "MISC")

_SENTIMENT_PREFIX = re.compile(r"^\s*(?:sentiment|label|answer)\s*[:=\-]\s*", re.IGNORECASE)
_EDGE_NOISE = "\"'`*.!,;:()[]{} \t\r\n"
# Chat-template leftovers a generator may emit when it does not strip special tokens.
_TEMPLATE_TOKENS = re.compile(r"<\|im_(?:start|end)\|>|<\|endoftext\|>|</s>")


class UnknownTaskError(ValueError):
    """A record names a task this module has no parser for."""


def parse_completion(task: str, text: str) -> tuple[Any, bool]:
    """Parse one model output into ``(label, format_ok)`` for ``task``.

    Args:
        task: one of ``sentiment``, ``ner``, ``summarization``, ``generation``.
        text: the raw completion (assistant content, without the prompt).

    Returns:
        The structured label (see module docstring) and whether the output followed the format.

    Raises:
        UnknownTaskError: ``task`` is not one of :data:`TASKS`.
    """
    text = "" if text is None else str(text)
    if task == "sentiment":
        return _parse_sentiment(text)
    if task == "ner":
        return _parse_ner(text)
    if task in ("summarization", "generation"):
        cleaned = _TEMPLATE_TOKENS.sub("", text).strip()
        return cleaned, bool(cleaned)
    raise UnknownTaskError(f"unknown task {task!r}: expected one of {', '.join(TASKS)}")


def coerce_label(task: str, label: Any) -> Any:
    """Bring a record's ``label`` into its structured form.

    Datasets store one column for all tasks, so curated data may carry the label JSON-encoded
    (``'[{"text": ...}]'``, ``'"positive"'``); TRL passes such columns through unchanged.
    Structured values pass through as they are.

    Raises:
        ValueError: an NER label that is neither a list nor a JSON list.
    """
    if task == "ner":
        if isinstance(label, str):
            try:
                label = json.loads(label) if label.strip() else []
            except json.JSONDecodeError as err:
                raise ValueError(f"ner label is not valid JSON: {label[:80]!r} ({err.msg})") from None
        if not isinstance(label, list):
            raise ValueError(f"ner label must be a list of entities, got {type(label).__name__}")
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


# --------------------------------------------------------------------------- sentiment
def _parse_sentiment(text: str) -> tuple[str | None, bool]:
    stripped = text.strip().lower()
    if stripped in SENTIMENT_LABELS:
        return stripped, True
    candidate = _TEMPLATE_TOKENS.sub("", text)
    candidate = _SENTIMENT_PREFIX.sub("", candidate, count=1).strip(_EDGE_NOISE).lower()
    if candidate in SENTIMENT_LABELS:
        return candidate, False
    return None, False


# --------------------------------------------------------------------------- ner
def _parse_ner(text: str) -> tuple[list[dict[str, str]], bool]:
    stripped = text.strip()
    whole = _load_list(stripped)
    if whole is not None:
        items, all_valid = _valid_entities(whole)
        return items, all_valid
    found = first_json_list(stripped)
    if found is None:
        return [], False
    items, _ = _valid_entities(found)
    return items, False


def _load_list(text: str) -> list | None:
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError):
        return None
    return value if isinstance(value, list) else None


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


def _valid_entities(items: list) -> tuple[list[dict[str, str]], bool]:
    valid = []
    for item in items:
        if (
            isinstance(item, dict)
            and isinstance(item.get("text"), str)
            and item["text"].strip()
            and item.get("type") in NER_TYPES
        ):
            valid.append({"text": item["text"], "type": item["type"]})
    return valid, len(valid) == len(items)
