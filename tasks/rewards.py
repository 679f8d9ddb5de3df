"""Reward functions for GRPO alignment (TRL 1.16 calling convention), their weighting and schedule.

Every reward function has the TRL signature ``f(prompts, completions, **kwargs) -> list[float | None]``;
``kwargs`` carry the dataset columns, of which these use ``task`` and ``label`` (the label as the
structured object or JSON-encoded: both work). Completions may be plain strings or conversational
(``[{"role": "assistant", "content": ...}]``).

**Not applicable -> None.** A reward scores the tasks of its output kind (:mod:`configs.tasks`) and
returns ``None`` for the others. TRL 1.16 ``GRPOTrainer._calculate_rewards`` turns ``None`` into NaN
and aggregates with ``nansum`` over ``reward_weights``, so a row is scored by the rewards that apply,
and a row no reward applies to gets zero advantage (with a warning). :func:`combine` mirrors that.

Each reward separates good from bad completions of the tasks it scores (a group whose completions
all score alike has no advantage, so no gradient). Per-sample definitions, before clipping:

================ ======== ==================================================================
name             range    value
================ ======== ==================================================================
label_match      -1 .. 1  +1 parsed label == gold; -1 wrong label or unparseable. The batch
                          mean is ``2*accuracy - 1``.
entity_f1        0 .. 1   entity F1 of this sample (exact (text, type) multiset match). Gold
                          empty: 1 for a well-formed ``none``, 0 for anything else.
entity_recall    0 .. 1   matched / gold entities (gold empty: as for entity_f1).
entity_precision 0 .. 1   matched / predicted entities (nothing predicted: as for entity_f1).
rouge_l          0 .. 1   ROUGE-L F against the reference text (text tasks).
format           0 .. 1   rule-based format score, every task: see :func:`format_score`. It only
                          separates malformed from well-formed answers, so it is a small term
                          beside a quality reward, not a stage of its own.
judge            0 .. 1   instruction quality from an LLM judge (:mod:`tasks.judge`); only when
                          ``align.judge.url`` is configured, falling back to ``format`` while the
                          endpoint is down.
================ ======== ==================================================================
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeGuard, cast

from configs.schema import AlignConfig, AlignStageConfig
from configs.tasks import OutputKind, get_task
from tasks import metrics as M
from tasks.parsing import coerce_label, first_json_list, parse_completion

RewardFunc = Callable[..., list[float | None]]

REWARD_RANGES: dict[str, tuple[float, float]] = {
    "label_match": (-1.0, 1.0),
    "entity_f1": (0.0, 1.0),
    "entity_recall": (0.0, 1.0),
    "entity_precision": (0.0, 1.0),
    "rouge_l": (0.0, 1.0),
    "format": (0.0, 1.0),
    "judge": (0.0, 1.0),
}
"""Natural range of each reward before clipping (used to measure saturation)."""

REWARD_KINDS: dict[str, tuple[OutputKind, ...]] = {
    "label_match": ("label",),
    "entity_f1": ("entities",),
    "entity_recall": ("entities",),
    "entity_precision": ("entities",),
    "rouge_l": ("text",),
}
"""Output kinds each task-specific reward scores; format and judge score every task."""


# --------------------------------------------------------------------------- per-sample scores
def completion_text(completion: Any) -> str:
    """The assistant text of a TRL completion (plain string or list of messages)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion:
        last = completion[-1]
        content = last.get("content", "") if isinstance(last, dict) else last
        if isinstance(content, list):  # content blocks: [{"type": "text", "text": ...}]
            return "".join(b.get("text", "") for b in content if isinstance(b, dict))
        return str(content)
    return "" if completion is None else str(completion)


def label_score(task: str, text: str, label: str) -> float:
    """+1 when the parsed label equals ``label``, else -1 (wrong or unparseable)."""
    parsed, _ = parse_completion(task, text)
    return 1.0 if parsed is not None and parsed == label else -1.0


def entity_score(task: str, text: str, label: list[dict[str, Any]], kind: str = "f1") -> float:
    """Per-sample entity ``f1`` | ``recall`` | ``precision`` against the structured ``label``."""
    parsed, format_ok = parse_completion(task, text)
    if not label and not parsed:
        return 1.0 if format_ok else 0.0
    return M.prf(*M.entity_counts(label, parsed))[kind]


def rouge_score(task: str, text: str, reference: str) -> float:
    """ROUGE-L F of the parsed output against the reference."""
    parsed, _ = parse_completion(task, text)
    return M.rouge_l(reference, parsed)


def format_score(task: str | None, text: str) -> float:
    """Rule-based format score in 0..1 (no model, no network), by the task's output kind.

    * label: 1 for exactly an allowed label; 0.5 for a recoverable near miss (``"Sentiment: positive."``);
      0 otherwise.
    * entities: 1 for well-formed ``TYPE: text`` lines (or ``none``); 0.5 when some entity could be
      read (a malformed line beside good ones, a JSON list); 0 otherwise.
    * text (and unknown tasks): 0 when empty; 1 within the task's ``max_words``; beyond it
      ``limit / words`` (longer is worse).
    """
    spec = get_task(task) if task else None
    if spec is not None and spec.output == "label":
        parsed, ok = parse_completion(spec, text)
        return 1.0 if ok else 0.5 if parsed is not None else 0.0
    if spec is not None and spec.output == "entities":
        parsed, ok = parse_completion(spec, text)
        if ok:
            return 1.0
        return 0.5 if parsed or first_json_list(text) is not None else 0.0
    cleaned = text.strip()
    if not cleaned:
        return 0.0
    limit = spec.max_words if spec is not None else None
    words = len(cleaned.split())
    return 1.0 if limit is None or words <= limit else limit / words


# --------------------------------------------------------------------------- TRL reward functions
def _rows(completions: Sequence[Any], kwargs: dict[str, Any]) -> list[tuple[str, str | None, Any]]:
    n = len(completions)
    tasks = kwargs.get("task") or [None] * n
    labels = kwargs.get("label") or [None] * n
    if len(tasks) != n or len(labels) != n:
        raise ValueError(f"reward got {n} completions but {len(tasks)} task and {len(labels)} label values")
    return [(completion_text(c), t, lab) for c, t, lab in zip(completions, tasks, labels, strict=True)]


def _applies(task: str | None, name: str) -> TypeGuard[str]:
    return task is not None and get_task(task).output in REWARD_KINDS[name]


def label_match_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """+1 / -1 per label-task row (see module docstring); None for other tasks."""
    return [label_score(task, text, coerce_label(task, label)) if _applies(task, "label_match") else None
            for text, task, label in _rows(completions, kwargs)]


def _entity_reward(kind: str) -> RewardFunc:
    name = f"entity_{kind}"

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        return [entity_score(task, text, coerce_label(task, label), kind) if _applies(task, name) else None
                for text, task, label in _rows(completions, kwargs)]

    reward.__name__ = name
    reward.__doc__ = f"Per-sample entity {kind} for entity-task rows; None for other tasks."
    return reward


entity_f1_reward = _entity_reward("f1")
entity_recall_reward = _entity_reward("recall")
entity_precision_reward = _entity_reward("precision")


def rouge_l_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """ROUGE-L F for text-task rows; None for other tasks."""
    return [rouge_score(task, text, coerce_label(task, label)) if _applies(task, "rouge_l") else None
            for text, task, label in _rows(completions, kwargs)]


def format_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
    """The rule-based format score (applies to every row)."""
    return [format_score(task, text) for text, task, _ in _rows(completions, kwargs)]


def make_judge_reward(judge) -> RewardFunc:
    """Wrap a judge (anything with ``score(prompts, completions, tasks) -> list[float]``)."""

    def judge_reward(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        rows = _rows(completions, kwargs)
        return list(judge.score([completion_text(p) for p in prompts], [r[0] for r in rows], [r[1] for r in rows]))

    judge_reward.__name__ = "judge"
    return judge_reward


def clipped(func: RewardFunc, low: float, high: float, name: str | None = None,
            observer: Callable[[str, list[float | None]], None] | None = None) -> RewardFunc:
    """``func`` with every non-None reward clipped into [low, high] (and NaN treated as None).

    ``name`` becomes ``__name__`` (TRL logs rewards under it); ``observer(name, rewards)`` sees
    each clipped batch, e.g. :meth:`WeightSchedule.observe`.
    """
    label = name or func.__name__

    @functools.wraps(func)
    def wrapper(prompts: list, completions: list, **kwargs: Any) -> list[float | None]:
        out = [
            None if r is None or (isinstance(r, float) and math.isnan(r)) else min(high, max(low, float(r)))
            for r in func(prompts, completions, **kwargs)
        ]
        if observer is not None:
            observer(label, out)
        return out

    wrapper.__name__ = label
    return wrapper


def build_reward_funcs(
    names: Sequence[str],
    cfg: AlignConfig,
    judge=None,
    schedule: WeightSchedule | None = None,
) -> list[RewardFunc]:
    """Clipped TRL reward functions, in the order of ``names``.

    Args:
        names: reward names (keys of a stage's ``reward_weights``).
        cfg: the ``align`` section (clip range).
        judge: the judge for ``judge`` (required when ``judge`` is named).
        schedule: when given, it observes every batch of rewards (for the saturation schedule).

    Raises:
        ValueError: an unknown reward, or ``judge`` without a judge.
    """
    table: dict[str, RewardFunc] = {
        "label_match": label_match_reward,
        "entity_f1": entity_f1_reward,
        "entity_recall": entity_recall_reward,
        "entity_precision": entity_precision_reward,
        "rouge_l": rouge_l_reward,
        "format": format_reward,
    }
    if judge is not None:
        table["judge"] = make_judge_reward(judge)
    elif "judge" in names:
        raise ValueError("the 'judge' reward needs a judge endpoint: set align.judge.url (or drop the reward)")
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown reward(s) {', '.join(unknown)}; known: {', '.join(table)}")
    low, high = cfg.reward_clip
    observer = schedule.observe if schedule is not None else None
    return [clipped(table[n], low, high, name=n, observer=observer) for n in names]


# --------------------------------------------------------------------------- weighting
def combine(rewards: dict[str, Sequence[float | None]], weights: dict[str, float]) -> list[float | None]:
    """Weighted sum per row over the rewards that apply (None skipped), as TRL aggregates them.

    A row where every reward is None stays None (TRL gives it zero advantage).
    """
    lengths = {len(v) for v in rewards.values()}
    if len(lengths) > 1:
        raise ValueError(f"reward lists differ in length: { {k: len(v) for k, v in rewards.items()} }")
    missing = [k for k in rewards if k not in weights]
    if missing:
        raise ValueError(f"no weight for reward(s) {', '.join(missing)}")
    n = lengths.pop() if lengths else 0
    out: list[float | None] = []
    for i in range(n):
        applicable = [(weights[k], r) for k, v in rewards.items() if (r := v[i]) is not None]
        out.append(sum(w * r for w, r in applicable) if applicable else None)
    return out


class WeightSchedule:
    """Reward weights for one stage: fixed, or shifted away from saturated rewards.

    ``saturation`` mode keeps an exponential moving average (``momentum``) of each reward's batch
    mean. Its saturation ``s`` is where that average sits in the reward's range (natural range
    intersected with the clip range), 0 at the bottom and 1 at the top. Once ``s`` passes
    ``threshold`` the weight is scaled by ``(1 - s) / (1 - threshold)``, never below
    ``min_fraction`` of its configured value; then all weights are rescaled so their total stays
    the configured total, i.e. the weight moves to the rewards that still have room to improve.
    """

    def __init__(
        self,
        weights: dict[str, float],
        mode: str = "fixed",
        clip: tuple[float, float] = (-1.0, 1.0),
        momentum: float = 0.9,
        threshold: float = 0.9,
        min_fraction: float = 0.1,
    ):
        if mode not in ("fixed", "saturation"):
            raise ValueError(f"weight schedule must be 'fixed' or 'saturation', got {mode!r}")
        self.base = dict(weights)
        self.mode = mode
        self.momentum = momentum
        self.threshold = threshold
        self.min_fraction = min_fraction
        self.ranges = {
            k: (max(REWARD_RANGES.get(k, clip)[0], clip[0]), min(REWARD_RANGES.get(k, clip)[1], clip[1]))
            for k in weights
        }
        self.running: dict[str, float] = {}

    @classmethod
    def from_config(cls, stage: AlignStageConfig, cfg: AlignConfig) -> WeightSchedule:
        """The schedule of ``stage`` with the ``align`` section's schedule settings."""
        return cls(
            cast(dict[str, float], stage.reward_weights), cfg.weight_schedule, cfg.reward_clip,
            cfg.saturation_momentum, cfg.saturation_threshold, cfg.saturation_min_fraction,
        )

    def observe(self, name: str, rewards: Sequence[float | None]) -> None:
        """Fold one batch of ``name``'s rewards (None ignored) into its running mean."""
        values = [r for r in rewards if r is not None and not math.isnan(r)]
        if name not in self.base or not values:
            return
        mean = sum(values) / len(values)
        prev = self.running.get(name)
        self.running[name] = mean if prev is None else self.momentum * prev + (1 - self.momentum) * mean

    def saturation(self) -> dict[str, float]:
        """Where each observed reward's running mean sits in its range (0..1)."""
        out = {}
        for name, mean in self.running.items():
            low, high = self.ranges[name]
            out[name] = min(1.0, max(0.0, (mean - low) / (high - low))) if high > low else 1.0
        return out

    def weights(self) -> dict[str, float]:
        """Current weights (the configured ones in ``fixed`` mode)."""
        if self.mode == "fixed":
            return dict(self.base)
        sat = self.saturation()
        scaled = {}
        for name, w in self.base.items():
            s = sat.get(name, 0.0)
            factor = 1.0 if s <= self.threshold else max(self.min_fraction, (1 - s) / (1 - self.threshold))
            scaled[name] = w * factor
        total, new_total = sum(self.base.values()), sum(scaled.values())
        return {k: v * total / new_total for k, v in scaled.items()} if new_total > 0 else dict(self.base)

    def apply_to(self, trainer) -> None:
        """Write the current weights into a TRL ``GRPOTrainer`` (``reward_weights`` tensor).

        Call it from a ``TrainerCallback.on_step_end``; weights follow ``trainer.reward_func_names``.
        """
        import torch

        current = self.weights()
        values = [current.get(name, 0.0) for name in trainer.reward_func_names]
        trainer.reward_weights = torch.tensor(values, dtype=torch.float32, device=trainer.reward_weights.device)
