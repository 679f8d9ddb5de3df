"""The task registry: every task lmforge curates, trains, evaluates, rewards and serves, defined once.

A :class:`TaskSpec` says what a task's answer *is* (its output kind), how it is asked (the default
template), how long an answer may be, which JSON-RPC method serves it, and which metrics score it.
Everything else derives from the spec: the answer text a label is rendered to and parsed back from
(:mod:`tasks.parsing`), the metrics (:mod:`tasks.evaluate`), the rewards (:mod:`tasks.rewards`) and
the RPC methods (:mod:`serving.routes.rpc`). Adding a task is one entry in :data:`BUILTIN_TASKS`.

Output kinds:

``label``     one word out of ``labels`` (sentiment: positive | negative); metrics accuracy, macro_f1
``entities``  typed spans, one ``- text (type word)`` line each in order of appearance, ``none`` when
              there are none; ``labels`` are the types the API returns (PER, ...) and ``label_words``
              the words the model writes for them (person, ...); metrics precision, recall, f1
              (exact span and type). Chosen by measurement (docs/MODEL_QUALITY.md): span first, so
              the model has copied the span before it names the type, after ``- `` so the span
              tokenises as it does inside the sentence, and a plain word the base model already
              knows, not a code: entity F1 0.72 vs 0.38 for ``PER: text`` and 0.22 for a JSON list
              at the same budget
``text``      free text (a summary, a reply); metric rougeL; answers over ``max_words`` lose
              format score
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

OutputKind = Literal["label", "entities", "text"]

# Metrics each output kind reports, as <task>_<metric>; the first is the task's headline metric,
# used by quantisation selection and the promotion gate.
KIND_METRICS: dict[str, tuple[str, ...]] = {
    "label": ("accuracy", "macro_f1"),
    "entities": ("f1", "precision", "recall"),
    "text": ("rougeL",),
}
NO_ENTITIES = "none"
"""The answer of an ``entities`` task when the text names no entity."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)


class TemplateConfig(_Section):
    """How one task is put to the model; the paraphrase used is a stable function of the record id."""

    system: str
    """System message."""
    instructions: list[str] = Field(min_length=1)
    """Paraphrased user messages; each contains '{input}' where the input text goes. The first one is
    what the JSON-RPC method sends."""

    @field_validator("instructions")
    @classmethod
    def _has_input_slot(cls, value: list[str]) -> list[str]:
        for index, text in enumerate(value):
            if "{input}" not in text:
                raise ValueError(f"instruction {index} has no '{{input}}' placeholder: {text[:60]!r}")
        return value


class TaskSpec(_Section):
    """One task: what its answer is, how it is asked, how long it may be, how it is served."""

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,31}$")
    """Task name (lower case): record field ``task``, metric prefix, ``--tasks`` value."""
    output: OutputKind
    """Answer kind: 'label', 'entities' or 'text' (see the module docstring)."""
    labels: list[str] = []
    """label: the allowed answers; entities: the allowed entity types (as the API returns them)."""
    label_words: dict[str, str] = {}
    """entities: the word the model writes for each type (type -> word); types left out are written as is."""
    template: TemplateConfig
    """Default system message and instructions (``data.templates`` overrides them per task)."""
    max_new_tokens: int = Field(ge=1)
    """Longest answer generated when evaluating or serving the task (requests may ask for less)."""
    rpc_method: str = Field(pattern=r"^[a-z][a-z0-9_]*$")
    """JSON-RPC method that serves the task."""
    max_words: int | None = Field(None, ge=1)
    """text: answers longer than this lose format score in proportion (None = no limit)."""

    def word_of(self, label: str) -> str:
        """The word the model writes for an entity type."""
        return self.label_words.get(label, label)

    @property
    def metrics(self) -> tuple[str, ...]:
        """Metric names this task reports, ``<task>_<metric>``, headline first."""
        return tuple(f"{self.name}_{m}" for m in KIND_METRICS[self.output])

    @property
    def headline_metric(self) -> str:
        """The one metric that stands for the task (selection, gates, reports)."""
        return self.metrics[0]


def _spec(name: str, output: OutputKind, system: str, instructions: list[str], max_new_tokens: int,
          rpc_method: str, labels: list[str] | None = None, max_words: int | None = None,
          label_words: dict[str, str] | None = None) -> TaskSpec:
    return TaskSpec(name=name, output=output, labels=labels or [], label_words=label_words or {},
                    max_new_tokens=max_new_tokens, rpc_method=rpc_method, max_words=max_words,
                    template=TemplateConfig(system=system, instructions=instructions))


# Prompts are paid for on every training example and every request: they are short on purpose
# (measured in bench/bench_sft.py), with a few paraphrases so free-form requests still work.
BUILTIN_TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _spec("sentiment", "label", "Classify the sentiment as positive or negative.",
          ["{input}", "Review: {input}"],
          max_new_tokens=4, rpc_method="classify_sentiment", labels=["positive", "negative"]),
    _spec("ner", "entities", "List the named entities: person, organization, location or other.",
          ["{input}", "Text: {input}"],
          max_new_tokens=96, rpc_method="extract_entities", labels=["PER", "ORG", "LOC", "MISC"],
          label_words={"PER": "person", "ORG": "organization", "LOC": "location", "MISC": "other"}),
    _spec("summarization", "text", "Summarize the dialogue in one or two sentences.",
          ["{input}", "Dialogue:\n{input}"],
          max_new_tokens=80, rpc_method="summarize", max_words=60),
    _spec("generation", "text", "Write the next line of the conversation.",
          ["{input}", "Continue this dialogue with one short reply.\n{input}"],
          max_new_tokens=96, rpc_method="generate", max_words=150),
)}


def task_names() -> tuple[str, ...]:
    """Every known task, in registry order."""
    return tuple(BUILTIN_TASKS)


def get_task(name: str) -> TaskSpec:
    """The spec of task ``name``.

    Raises:
        KeyError: unknown task, with the known ones in the message.
    """
    try:
        return BUILTIN_TASKS[name]
    except KeyError:
        raise KeyError(f"unknown task {name!r}; tasks: {', '.join(BUILTIN_TASKS)}") from None


def tasks_of_kind(kind: OutputKind) -> tuple[str, ...]:
    """Tasks whose answers are of ``kind``."""
    return tuple(name for name, spec in BUILTIN_TASKS.items() if spec.output == kind)


def check_task_name(name: str) -> str:
    """Pydantic validator for fields naming a task: the name if known, else a ValueError listing the tasks."""
    if name not in BUILTIN_TASKS:
        raise ValueError(f"unknown task {name!r}; tasks: {', '.join(BUILTIN_TASKS)}")
    return name


def headline_metrics() -> tuple[str, ...]:
    """The headline metric of every task (selection and promotion compare these)."""
    return tuple(spec.headline_metric for spec in BUILTIN_TASKS.values())


def structured_tasks() -> tuple[str, ...]:
    """Tasks whose answers must parse (a label, an entity list): their format compliance is gated."""
    return tuple(name for name, spec in BUILTIN_TASKS.items() if spec.output != "text")


def gated_metrics() -> tuple[str, ...]:
    """Metrics the promotion gate compares with the champion: every headline metric, plus macro F1 for
    label tasks (accuracy alone hides a model that collapses onto the majority label). Entity precision
    and recall are left to their F1."""
    names: list[str] = []
    for spec in BUILTIN_TASKS.values():
        names += [spec.headline_metric] + ([f"{spec.name}_macro_f1"] if spec.output == "label" else [])
    return tuple(names)


def all_metric_names() -> tuple[str, ...]:
    """Every task metric name, plus the per-task format compliance ones."""
    names: list[str] = []
    for spec in BUILTIN_TASKS.values():
        names += [*spec.metrics, f"format_compliance_{spec.name}"]
    return tuple(names)
