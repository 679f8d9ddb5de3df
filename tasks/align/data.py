"""Prompts for the alignment stages: curated records -> the rows GRPO samples completions for.

GRPO needs only prompts: the model writes the completions and the rewards score them against the
record's ``task`` and ``label``, which travel with the prompt as dataset columns (TRL passes every
column to the reward functions). The label is stored JSON-encoded so one Arrow column holds the
labels of every task; :func:`tasks.parsing.coerce_label` decodes it inside the rewards.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from typing import Any

from configs.schema import AlignStageConfig
from configs.tasks import task_names, tasks_of_kind
from tasks.rewards import REWARD_KINDS


class AlignDataError(ValueError):
    """The curated data cannot feed a stage (no prompts for its tasks, malformed records)."""


def stage_tasks(stage: AlignStageConfig) -> list[str]:
    """The curated tasks whose prompts ``stage`` trains on.

    ``stage.tasks`` when set; otherwise the tasks of the kinds its task-specific rewards score (with a
    positive weight); a stage with only task-agnostic rewards (format, judge) trains on every task.
    """
    if stage.tasks:
        return [t for t in task_names() if t in stage.tasks]
    wanted = {t for name, w in stage.reward_weights.items() if w > 0
              for kind in REWARD_KINDS.get(name, ()) for t in tasks_of_kind(kind)}
    return [t for t in task_names() if t in wanted] if wanted else list(task_names())


def prompt_rows(records: Iterable[dict[str, Any]], tasks: Sequence[str], limit: int | None = None,
                seed: int = 0) -> list[dict[str, str]]:
    """GRPO rows ``{"id", "prompt", "task", "label"}`` for the records of ``tasks``.

    Args:
        records: curated records (``datasets.Dataset`` rows work too).
        tasks: tasks to keep.
        limit: keep at most this many rows; the tasks take turns (round robin over a seeded
            shuffle of each task), so a small budget still covers every task.
        seed: shuffle seed.

    Raises:
        AlignDataError: a record lacks ``prompt``/``task``/``label``, or no record matches ``tasks``.
    """
    by_task: dict[str, list[dict[str, str]]] = {t: [] for t in tasks}
    for index, record in enumerate(records):
        missing = [k for k in ("id", "task", "prompt", "label") if k not in record]
        if missing:
            raise AlignDataError(f"curated record #{index}: missing key(s) {', '.join(missing)}")
        if record["task"] in by_task:
            by_task[record["task"]].append({
                "id": str(record["id"]), "prompt": record["prompt"], "task": record["task"],
                "label": json.dumps(record["label"], ensure_ascii=False),
            })
    if not any(by_task.values()):
        raise AlignDataError(f"no training prompts for task(s) {', '.join(tasks)} in the curated train split")
    rng = random.Random(seed)
    for rows in by_task.values():
        rng.shuffle(rows)
    out: list[dict[str, str]] = []
    queues = [rows for rows in by_task.values() if rows]
    depth = 0
    while queues and (limit is None or len(out) < limit):
        for rows in queues:
            if depth < len(rows) and (limit is None or len(out) < limit):
                out.append(rows[depth])
        depth += 1
        queues = [rows for rows in queues if depth < len(rows)]
    return out


def rows_needed(stage: AlignStageConfig, batch_size: int) -> int:
    """Prompts one pass of ``stage`` consumes: ``max_steps * batch_size`` (each sampled once)."""
    return stage.max_steps * batch_size
