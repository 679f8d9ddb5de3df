"""Pure metric functions on parsed predictions. All scores are fractions in 0..1.

Conventions (hand-checkable, and the same ones the rewards use per sample):

* label tasks: an unparseable prediction (``None``) is simply wrong; it counts as a miss for the
  gold class in macro-F1 (it is never a predicted class of its own).
* entity tasks: entities are matched exactly on (text, type) as multisets, micro-averaged over the whole
  set (sum of matches over sum of predictions / gold). With nothing predicted precision is 0
  unless there was also nothing to find, in which case P = R = F1 = 1 (nothing asked, nothing wrong).
* ROUGE-L: ``rouge_score`` F-measure with the Porter stemmer, averaged per example.
* perplexity: exp of the token-weighted mean negative log-likelihood (corpus perplexity).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from functools import lru_cache
from typing import Any

from tasks.parsing import entity_key

_INVALID = "<invalid>"


def label_scores(gold: Sequence[str], pred: Sequence[str | None], labels: Sequence[str]) -> dict[str, float]:
    """Accuracy and macro-F1 over ``labels`` (scikit-learn).

    Args:
        gold: gold labels, each one of ``labels``.
        pred: parsed predictions; ``None`` (unparseable) counts as wrong.
        labels: the task's label set (the classes macro-F1 averages over).

    Returns:
        ``{"accuracy": ..., "macro_f1": ...}``; both 0.0 for empty input.
    """
    from sklearn.metrics import accuracy_score, f1_score

    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold labels but {len(pred)} predictions")
    if not gold:
        return {"accuracy": 0.0, "macro_f1": 0.0}
    y_pred = [p if p is not None else _INVALID for p in pred]
    return {
        "accuracy": float(accuracy_score(gold, y_pred)),
        # labels= fixes the averaged classes to the real ones: <invalid> only costs recall.
        "macro_f1": float(f1_score(gold, y_pred, labels=list(labels), average="macro", zero_division=0)),
    }


def entity_counts(gold: Iterable[dict[str, Any]], pred: Iterable[dict[str, Any]]) -> tuple[int, int, int]:
    """(matched, predicted, gold) counts for one example, exact (text, type) multiset matching."""
    gold_c = Counter(entity_key(e) for e in gold)
    pred_c = Counter(entity_key(e) for e in pred)
    return sum((gold_c & pred_c).values()), sum(pred_c.values()), sum(gold_c.values())


def prf(matched: int, n_pred: int, n_gold: int) -> dict[str, float]:
    """Precision, recall and F1 from counts (see the module docstring for the empty cases)."""
    if n_pred == 0 and n_gold == 0:
        return {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    precision = matched / n_pred if n_pred else 0.0
    recall = matched / n_gold if n_gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1}


def entity_scores(gold: Sequence[list[dict[str, Any]]], pred: Sequence[list[dict[str, Any]]]) -> dict[str, float]:
    """Micro precision/recall/F1 over all examples' entities (exact span and type).

    Args:
        gold: per example, the gold entity list.
        pred: per example, the parsed predicted entity list (``[]`` for invalid JSON).
    """
    if len(gold) != len(pred):
        raise ValueError(f"{len(gold)} gold entity lists but {len(pred)} predictions")
    if not gold:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    totals = [0, 0, 0]
    for g, p in zip(gold, pred, strict=True):
        for i, n in enumerate(entity_counts(g, p)):
            totals[i] += n
    return prf(*totals)


@lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(reference: str, prediction: str) -> float:
    """ROUGE-L F-measure of one prediction against one reference (0.0 when either is empty)."""
    if not reference.strip() or not prediction.strip():
        return 0.0
    return float(_rouge_scorer().score(reference, prediction)["rougeL"].fmeasure)


def mean_rouge_l(references: Sequence[str], predictions: Sequence[str]) -> float:
    """Mean per-example ROUGE-L F (0.0 for empty input)."""
    if len(references) != len(predictions):
        raise ValueError(f"rouge: {len(references)} references but {len(predictions)} predictions")
    if not references:
        return 0.0
    return sum(rouge_l(r, p) for r, p in zip(references, predictions, strict=True)) / len(references)


def compliance_rate(flags: Sequence[bool]) -> float:
    """Share of outputs that followed the instruction format (0.0 for empty input)."""
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0


def perplexity(nll_and_counts: Iterable[tuple[float, int]]) -> float:
    """Corpus perplexity from per-example (summed NLL in nats, token count) pairs.

    Returns ``nan`` when there are no tokens.
    """
    total_nll = 0.0
    total_tokens = 0
    for nll, n in nll_and_counts:
        total_nll += nll
        total_tokens += n
    return math.exp(total_nll / total_tokens) if total_tokens else float("nan")
