"""The ``data`` section: dataset curation (sources, cleaning rules, dedup, templates, splits).

Cleaning rules are data: a list of named regex substitutions compiled once per run. A rule whose
pattern or replacement does not compile is a configuration error naming the rule, raised here so
``lmforge curate -c x.yaml`` exits 2 before any work starts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from configs.tasks import BUILTIN_TASKS, OutputKind, TemplateConfig, check_task_name, task_names, tasks_of_kind

Task = Annotated[str, AfterValidator(check_task_name)]
"""A task name from the registry (configs/tasks.py)."""
TASKS: tuple[str, ...] = task_names()
RegexFlag = Literal["IGNORECASE", "MULTILINE", "DOTALL", "ASCII", "VERBOSE"]
# Replacements that need more than a regex template; the cleaning module implements them.
REPLACEMENT_FUNCTIONS: tuple[str, ...] = ("@html_unescape", "@fix_mojibake", "@lower", "@nfkc", "@luhn_id")
# Which kind of task each built-in loader can produce; jsonl/csv can feed any task.
FORMAT_KINDS: dict[str, tuple[OutputKind, ...]] = {
    "sst2": ("label",),
    "conll": ("entities",),
    "dialogsum": ("text",),
    "jsonl": ("label", "entities", "text"),
    "csv": ("label", "entities", "text"),
}


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


# --------------------------------------------------------------------------- sources
class SourceConfig(_Section):
    """One raw input file and how to read it."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    """Unique source name (lower case); it prefixes record ids and fills the record's `source`."""
    task: Task
    """Task the records of this source are for."""
    format: Literal["sst2", "conll", "dialogsum", "jsonl", "csv"]
    """Reader: 'sst2' (sentence<TAB>0|1), 'conll' (token ... TAG lines, blank line between sentences,
    IOB2), 'dialogsum' (JSONL with dialogue/summary; see dialogue_target), or generic
    'jsonl'/'csv' with the field mapping below."""
    path: Path
    """File path, relative to `data.raw_dir` unless absolute."""
    split: Literal["train", "eval", "all"] = "all"
    """Which splits it feeds: 'train' only, 'eval' (halved into validation and test), or 'all'
    (carved by `validation_fraction` / `test_fraction`)."""
    validation_fraction: float | None = Field(None, ge=0, lt=1)
    """split='all': share of this source's groups held out for validation; None = data.validation_fraction."""
    test_fraction: float | None = Field(None, ge=0, lt=1)
    """split='all': share of this source's groups held out for test; None = data.test_fraction."""
    weight: float = Field(1.0, ge=0)
    """Relative share of `train_examples` this source gets; share a short source cannot fill goes to the others."""
    cap: int | None = Field(None, ge=0)
    """Most training examples taken from this source (None = no cap beyond the weight share)."""
    text_field: str = "text"
    """jsonl/csv: field holding the input text."""
    label_field: str = "label"
    """jsonl/csv: field holding the target (sentiment label, summary, reference text, or NER entity list)."""
    id_field: str | None = None
    """jsonl/csv: field with a stable row id (None = the line number)."""
    group_field: str | None = None
    """jsonl/csv: rows sharing this field's value always land in the same split (None = each row alone)."""
    label_map: dict[str, str] = {}
    """Raw label -> record label, e.g. {'1': 'positive', '0': 'negative'}; sentiment labels must map to
    'positive' or 'negative'. Empty = use raw labels as they are (sst2 always maps 1/0)."""
    dialogue_target: Literal["summary", "next_turn"] = "summary"
    """dialogsum: what a record asks for: the dialogue's summary, or the next turn after a prefix of it."""
    tag_column: int = -1
    """conll: column (0-based, negative from the end) holding the IOB2 entity tag."""
    delimiter: str = Field(",", min_length=1, max_length=1)
    """csv: field delimiter."""

    @model_validator(mode="after")
    def _format_fits_task(self) -> SourceConfig:
        kinds = FORMAT_KINDS[self.format]
        if BUILTIN_TASKS[self.task].output not in kinds:
            allowed = ", ".join(t for kind in kinds for t in tasks_of_kind(kind))
            raise ValueError(f"source {self.name!r}: format {self.format!r} produces {allowed}, not {self.task!r}")
        return self


# --------------------------------------------------------------------------- cleaning
class CleaningRule(_Section):
    """A named regex substitution applied to every text field of a record, in list order."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_-]*$")
    """Unique rule name; the data card counts hits under it."""
    pattern: str
    """Python regular expression (re module syntax)."""
    replacement: str = ""
    """Replacement template (\\1, \\g<name>) or a built-in function applied to each match:
    '@html_unescape', '@fix_mojibake' (re-decode cp1252-read UTF-8; left alone if that fails),
    '@lower', '@nfkc' (Unicode NFKC normalisation), '@luhn_id' ('<ID>' when the
    match's digits pass the Luhn checksum, else unchanged)."""
    flags: list[RegexFlag] = []
    """Regex flags by name."""
    enabled: bool = True
    """Off = skipped (also see `data.disabled_rules`)."""
    sources: list[str] = []
    """Only apply to these source names (empty = all sources)."""

    @field_validator("pattern")
    @classmethod
    def _pattern_compiles(cls, value: str, info: ValidationInfo) -> str:
        name = info.data.get("name", "?")
        try:
            re.compile(value)
        except re.error as err:
            raise ValueError(f"cleaning rule {name!r}: pattern does not compile: {err}") from None
        return value

    @model_validator(mode="after")
    def _replacement_compiles(self) -> CleaningRule:
        if self.replacement.startswith("@"):
            if self.replacement not in REPLACEMENT_FUNCTIONS:
                known = ", ".join(REPLACEMENT_FUNCTIONS)
                raise ValueError(f"cleaning rule {self.name!r}: unknown replacement function "
                                 f"{self.replacement!r} (known: {known})")
            return self
        try:  # re validates the template (group references, escapes) even when nothing matches
            re.compile(self.pattern, compile_flags(self.flags)).sub(self.replacement, "")
        except (re.error, IndexError) as err:
            raise ValueError(
                f"cleaning rule {self.name!r}: replacement {self.replacement!r} is invalid: {err}"
            ) from None
        return self


def compile_flags(names: Iterable[str]) -> int:
    """OR the named ``re`` flags together."""
    value = 0
    for name in names:
        value |= getattr(re, name)
    return value


def _rule(name: str, pattern: str, replacement: str = "", flags: list[str] | None = None) -> CleaningRule:
    return CleaningRule(name=name, pattern=pattern, replacement=replacement, flags=flags or [])


# Characters cp1252 maps bytes 0x80-0xBF to (plus raw C1 controls): the tail of a UTF-8 sequence
# that was decoded as cp1252/latin-1.
_MOJIBAKE_TAIL = (
    r"[\u0080-\u00bf\u0152\u0153\u0160\u0161\u0178\u017d\u017e\u0192\u02c6\u02dc\u2013\u2014"
    r"\u2018-\u201a\u201c-\u201e\u2020-\u2022\u2026\u2030\u2039\u203a\u20ac\u2122]"
)

DEFAULT_RULES: list[CleaningRule] = [
    _rule("control_chars", r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b-\u200f\u2060\ufeff]"),
    # Only the two shapes that are near-certainly mojibake: a Latin-1 letter read as Ã/Â + tail
    # (Ã© -> é) and general punctuation read as â€ + tail (â€™ -> ’). Anything else is left alone.
    _rule("mojibake", rf"[\u00c2\u00c3]{_MOJIBAKE_TAIL}|\u00e2\u20ac{_MOJIBAKE_TAIL}|\u00e2\u201a\u00ac",
          "@fix_mojibake"),
    _rule("html_entities", r"&(?:#[0-9]{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});", "@html_unescape"),
    _rule("html_breaks", r"<\s*(?:br|/p|/div|/li|/h[1-6])\s*/?\s*>", "\n", ["IGNORECASE"]),
    _rule("html_tags", r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>", " "),
    # Runs of blanks, and any single blank that is not a plain space (only real changes match).
    _rule("whitespace", r"[ \t\u00a0\u2000-\u200a\u202f\u205f\u3000]{2,}|[\t\u00a0\u2000-\u200a\u202f\u205f\u3000]",
          " "),
    # SST/PTB detokenisation: `` '' quotes, split contractions, spaced punctuation. It runs before
    # PII masking so that tokenised numbers ("( 212 ) 859-1610") are masked in their usual shape.
    _rule("detok_quotes", r"``\s*|\s*''", '"'),
    _rule("detok_contractions", r"[ \t]+(n't|'s|'re|'ve|'ll|'d|'m)\b", r"\1", ["IGNORECASE"]),
    _rule("detok_spaced_apostrophe", r"(?<=[A-Za-z]) ' (?=(?:t|s|re|ve|ll|d|m)\b)", "'", ["IGNORECASE"]),
    _rule("detok_contraction_case", r"(?<=[A-Za-z]')(?:Ve|Ll|Re)\b|(?<=[a-z]')[STDM]\b", "@lower"),
    _rule("detok_punct_before", r"[ \t]+(?=[,.!?;:%)\]}])"),
    _rule("detok_punct_after", r"(?<=[(\[{$])[ \t]+"),
    # PII: URLs first (they may embed user@host), then e-mail, IP, ID numbers, phones.
    _rule("url", r"\b(?:https?|ftp)://[^\s<>\"']+|\bwww\.[^\s<>\"']+", "<URL>", ["IGNORECASE"]),
    _rule("email", r"[A-Za-z0-9.!#$%&'*+/=?^_`{|}~-]+@[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)+", "<EMAIL>"),
    _rule("ip_address", r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
                        r"(?!\w|\.\w)", "<IP>"),  # a sentence's full stop may follow; a 5th octet may not
    # US SSN and unspaced IBAN.
    _rule("id_number", r"(?<![\w-])(?:\d{3}-\d{2}-\d{4}|[A-Z]{2}\d{2}[A-Z0-9]{11,30})(?![\w-])", "<ID>"),
    # 16-digit card numbers, masked only when the Luhn checksum holds (so 9 in 10 runs of numbers are spared).
    _rule("card_number", r"(?<![\w-])\d{4}([ -]?)\d{4}\1\d{4}\1\d{4}(?![\w-])", "@luhn_id"),
    # Phones: '+' and at least 7 digits in one run of digits, spaces, dashes and parentheses.
    _rule("phone_international", r"(?<![\d+])\+{1,2}(?=(?:[ ()-]*\d){7})[1-9]\d*(?:[ ()-]{1,3}\d+)*", "<PHONE>"),
    # Phones: a parenthesised (area) code and at least 7 digits in all: (212) 859-1610, (852) 2847 4039.
    _rule("phone_area_code", r"(?<![\w)])(?=\((?:[ ()+-]*\d){7})\(\+{0,2}\d[\d -]*\)(?: ?\d+(?:[ -]\d+){0,3})?",
          "<PHONE>"),
    # Phones: national digit groups. Shapes are explicit so that scores, years, dates and tables
    # in news text ("68 71 72 211", "1996-08-22", "1996-1997") stay untouched.
    _rule("phone_national",
          r"(?<![\w.+/-])(?:\d{2,4}-\d{1,4}-\d{3,8}(?:-\d{1,4})?"  # 212-859-1736, 42-2-2423-0003
          r"|\d{3}\.\d{3}\.\d{4}"  # 415.555.0123
          r"|\d{3,4}[ -]\d{3}[ -]\d{4}"  # 212 859 1646, 5511 232 4411
          r"|(?:\d{3} )?\d{3}-\d{4}"  # 416 941-8100, 555-0123
          r"|\d{3,4}-\d{6,7}"  # 9221-5685192, 941-434319
          r"|\d{2,3}[ -]\d{1,2} \d{3,4}[ -]?\d{3,4}"  # 61-2 9373-1800, 64 4 473-4746
          r")(?!\w|-\d|\.\d)", "<PHONE>"),
    _rule("line_edges", r"^[ ]+|[ ]+$", "", ["MULTILINE"]),
    _rule("blank_lines", r"\n{3,}", "\n\n"),
]


# --------------------------------------------------------------------------- lengths, dedup, templates
class LengthBounds(_Section):
    """Examples outside these bounds are dropped (and listed in quarantine.jsonl with the reason)."""

    min_input_chars: int = Field(12, ge=1)
    """Shortest input text kept, after cleaning."""
    max_input_chars: int = Field(1800, ge=1)
    """Longest input text kept, after cleaning."""
    min_target_chars: int = Field(2, ge=1)
    """Shortest summary/reference kept (sentiment and NER targets are exempt)."""
    max_target_chars: int = Field(600, ge=1)
    """Longest summary/reference kept."""
    max_tokens: int | None = Field(480, ge=8)
    """Longest rendered example (prompt + completion) in tokens of the model's tokenizer; None = no limit."""


class DedupConfig(_Section):
    """Duplicate removal on the normalised input text; evaluation examples win over training ones."""

    exact: bool = True
    """Drop exact duplicates (hash of the lower-cased, punctuation-free, whitespace-collapsed input)."""
    near: bool = True
    """Drop near duplicates (MinHash LSH candidates, confirmed by exact Jaccard similarity)."""
    threshold: float = Field(0.8, gt=0, le=1)
    """Jaccard similarity of character-shingle sets at or above which two inputs are near duplicates."""
    shingle_size: int = Field(5, ge=1)
    """Characters per shingle."""
    num_perm: int = Field(128, ge=16)
    """MinHash permutations (more = fewer missed candidates, slower)."""


DEFAULT_TEMPLATES: dict[str, TemplateConfig] = {name: spec.template for name, spec in BUILTIN_TASKS.items()}
"""Each task's default template, from the task registry."""

DEFAULT_SOURCES: list[SourceConfig] = [
    SourceConfig(name="sst2", task="sentiment", format="sst2", path=Path("sst2/train.tsv"), split="train", weight=0.4),
    SourceConfig(name="sst2-dev", task="sentiment", format="sst2", path=Path("sst2/dev.tsv"), split="eval"),
    SourceConfig(name="conll", task="ner", format="conll", path=Path("conll2003/train.txt"), split="train",
                 weight=0.35, tag_column=1),
    SourceConfig(name="conll-valid", task="ner", format="conll", path=Path("conll2003/valid.txt"), split="eval",
                 tag_column=1),
    # DialogSum ships 500 dialogues: 45% go to validation so it holds >= 150 summaries after cleaning and
    # dedup (~190; a third gave 145), 20% to test; the ~175 left are more than the preset trains on (80).
    SourceConfig(name="dialogsum", task="summarization", format="dialogsum", path=Path("dialogsum/dev.jsonl"),
                 weight=0.15, validation_fraction=0.45, test_fraction=0.2),
    SourceConfig(name="dialogsum-reply", task="generation", format="dialogsum", path=Path("dialogsum/dev.jsonl"),
                 dialogue_target="next_turn", weight=0.1, cap=300, validation_fraction=0.45, test_fraction=0.2),
]


# --------------------------------------------------------------------------- section
class DataConfig(_Section):
    """Dataset curation: which raw sources, how they are cleaned, deduplicated, rendered and split."""

    raw_dir: Path = Path("data/raw")
    """Folder holding the raw sources (relative: from the working directory, else from the project root)."""
    seed: int = 0
    """Seed for splitting, sampling and template choice; the same seed and inputs give the same data version."""
    sources: list[SourceConfig] = Field(default_factory=lambda: [s.model_copy() for s in DEFAULT_SOURCES])
    """Raw inputs (format, path, task, field mapping, split role, weight, cap)."""
    rules: list[CleaningRule] = Field(default_factory=lambda: [r.model_copy() for r in DEFAULT_RULES])
    """Cleaning rules, applied in order to every text field (input, summary, reference, entity texts)."""
    disabled_rules: list[str] = []
    """Rule names to skip without restating the whole list, e.g. data.disabled_rules=[phone]."""
    lengths: LengthBounds = LengthBounds()
    """Length bounds applied after cleaning and after rendering."""
    dedup: DedupConfig = DedupConfig()
    """Exact and near-duplicate removal, within and across splits."""
    templates: dict[Task, TemplateConfig] = Field(default_factory=lambda: dict(DEFAULT_TEMPLATES))
    """Per-task system message and paraphrased instructions; tasks left out keep the defaults."""
    train_examples: int = Field(3000, ge=1)
    """Training examples across all tasks, shared out by source weight (subject to caps and supply)."""
    eval_examples_per_task: int = Field(150, ge=1)
    """Most validation examples and most test examples per task (each)."""
    validation_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of a split='all' source's groups held out for validation."""
    test_fraction: float = Field(0.2, ge=0, lt=1)
    """Share of a split='all' source's groups held out for test."""

    @field_validator("templates")
    @classmethod
    def _fill_templates(cls, value: dict[str, TemplateConfig]) -> dict[str, TemplateConfig]:
        return {task: value.get(task, DEFAULT_TEMPLATES[task]) for task in TASKS}

    @model_validator(mode="after")
    def _consistent(self) -> DataConfig:
        names = [s.name for s in self.sources]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        rule_names = [r.name for r in self.rules]
        if dupes := sorted({n for n in rule_names if rule_names.count(n) > 1}):
            raise ValueError(f"cleaning rule names must be unique; repeated: {', '.join(dupes)}")
        if unknown := sorted(set(self.disabled_rules) - set(rule_names)):
            raise ValueError(f"disabled_rules names unknown rules: {', '.join(unknown)} "
                             f"(rules: {', '.join(rule_names)})")
        for rule in self.rules:
            if unknown := sorted(set(rule.sources) - set(names)):
                raise ValueError(f"cleaning rule {rule.name!r} names unknown sources: {', '.join(unknown)}")
        if self.validation_fraction + self.test_fraction >= 1:
            raise ValueError("validation_fraction + test_fraction must leave room for training (sum < 1)")
        fractions: dict[str, tuple[float, float]] = {}
        for source in self.sources:
            pair = (self.validation_fraction if source.validation_fraction is None else source.validation_fraction,
                    self.test_fraction if source.test_fraction is None else source.test_fraction)
            if sum(pair) >= 1:
                raise ValueError(f"source {source.name!r}: validation_fraction + test_fraction must be < 1")
            # Sources reading one file share its groups (a dialogue feeds two tasks): they must split alike.
            if fractions.setdefault(str(source.path), pair) != pair:
                raise ValueError(f"sources reading {source.path} must use the same validation/test fractions, "
                                 f"or one group could be validation for one task and training for another")
        return self

    def active_rules(self) -> list[CleaningRule]:
        """Rules that are enabled and not listed in ``disabled_rules``, in order."""
        return [r for r in self.rules if r.enabled and r.name not in self.disabled_rules]
