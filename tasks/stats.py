"""Paired comparisons of two models scored on the same examples, with bootstrap intervals (scipy).

Quantisation selection ("is INT8 within 1 point of fp32?"), the alignment check ("is the aligned
model no worse than SFT?") and the merge check all ask the same question of two evaluation tables
over the same examples. A difference of a few examples is noise; this module answers with an
interval, using :func:`scipy.stats.bootstrap` with paired resampling of examples:

* label tasks: accuracy difference (mean of per-example 0/1 correctness);
* entity tasks: micro-F1 difference, recomputed from the resampled examples' match counts (F1 is
  not a mean of per-example values, so the examples, not their scores, are resampled);
* text tasks: mean ROUGE-L difference.

Differences are ``candidate - reference`` in points (1 point = 0.01 of a 0..1 metric).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from configs.tasks import get_task

N_RESAMPLES = 4000
SEED = 0


@dataclasses.dataclass(frozen=True)
class PairedDifference:
    """``candidate - reference`` on one task's headline metric, in points, with a bootstrap interval."""

    task: str
    metric: str
    n: int
    reference: float
    candidate: float
    difference: float
    low: float
    high: float
    confidence: float
    alternative: str

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _f1(matched, n_pred, n_gold):
    precision = np.divide(matched, n_pred, out=np.zeros_like(matched, dtype=float), where=n_pred > 0)
    recall = np.divide(matched, n_gold, out=np.zeros_like(matched, dtype=float), where=n_gold > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(total), where=total > 0)
    return np.where((n_pred == 0) & (n_gold == 0), 1.0, f1)


def _f1_difference(rm, rp, rg, cm, cp, cg, axis=-1):
    """Entity tasks: candidate minus reference micro-F1 (points) from per-example counts."""
    return 100 * (_f1(cm.sum(axis), cp.sum(axis), cg.sum(axis)) - _f1(rm.sum(axis), rp.sum(axis), rg.sum(axis)))


def _mean_difference(r, c, axis=-1):
    """Other tasks: candidate minus reference mean per-example score (points)."""
    return 100 * (c.mean(axis) - r.mean(axis))


def _paired_columns(task: str, reference: Sequence[dict[str, Any]], candidate: Sequence[dict[str, Any]]):
    """Per-example arrays of both tables, aligned by example id, and the statistic over them."""
    kind = get_task(task).output
    ref = {r["id"]: r for r in reference if r["task"] == task}
    cand = {r["id"]: r for r in candidate if r["task"] == task}
    ids = sorted(ref.keys() & cand.keys())
    if kind == "entities":
        columns = tuple(np.array([float(table[i][key]) for i in ids]) for table in (ref, cand)
                        for key in ("matched", "n_pred", "n_gold"))
        statistic: Callable[..., Any] = _f1_difference
    else:
        columns = (np.array([float(ref[i]["score"]) for i in ids]), np.array([float(cand[i]["score"]) for i in ids]))
        statistic = _mean_difference
    return ids, columns, statistic


def paired_difference(task: str, reference: Sequence[dict[str, Any]], candidate: Sequence[dict[str, Any]],
                      confidence: float = 0.95, alternative: str = "two-sided") -> PairedDifference:
    """The candidate's headline-metric difference to the reference on ``task``, with an interval.

    Args:
        task: task name (its kind decides the statistic, see the module docstring).
        reference, candidate: evaluation tables (:class:`tasks.evaluate.EvalResult` ``.table`` rows);
            examples are paired by ``id``, and only ids both tables scored are used.
        confidence: interval level.
        alternative: ``two-sided``; ``less`` gives the one-sided upper bound ``high`` (``low`` = -inf);
            ``greater`` the one-sided lower bound ``low``.

    Raises:
        ValueError: the tables share no example of ``task``.
    """
    ids, columns, statistic = _paired_columns(task, reference, candidate)
    if not ids:
        raise ValueError(f"no {task} example was scored in both evaluations")
    point = float(statistic(*[c[None, :] for c in columns])[0])
    if all(np.array_equal(columns[i], columns[i + len(columns) // 2]) for i in range(len(columns) // 2)):
        low = high = 0.0  # identical answers: no spread to resample (scipy warns on degenerate data)
        low = -math.inf if alternative == "less" else low
        high = math.inf if alternative == "greater" else high
    else:
        from scipy.stats import bootstrap

        result = bootstrap(columns, statistic, paired=True, vectorized=True, n_resamples=N_RESAMPLES,
                           confidence_level=confidence, alternative=alternative, method="percentile",
                           random_state=SEED)
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
    spec = get_task(task)
    ref_value = _metric_value(task, columns[: len(columns) // 2])
    cand_value = _metric_value(task, columns[len(columns) // 2:])
    return PairedDifference(task, spec.headline_metric, len(ids), ref_value, cand_value, round(point, 3),
                            round(low, 3) if math.isfinite(low) else low,
                            round(high, 3) if math.isfinite(high) else high,
                            confidence, alternative)


def _metric_value(task: str, columns) -> float:
    if get_task(task).output == "entities":
        matched, n_pred, n_gold = (c.sum() for c in columns)
        return float(_f1(np.array(matched), np.array(n_pred), np.array(n_gold)))
    return float(columns[0].mean())


def compare_tables(reference: Sequence[dict[str, Any]], candidate: Sequence[dict[str, Any]],
                   confidence: float = 0.95, alternative: str = "two-sided") -> dict[str, PairedDifference]:
    """:func:`paired_difference` for every task both tables scored."""
    tasks = sorted({r["task"] for r in reference} & {r["task"] for r in candidate})
    return {t: paired_difference(t, reference, candidate, confidence, alternative) for t in tasks}
