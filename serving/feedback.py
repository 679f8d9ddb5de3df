"""Durable request log and feedback (the state database, serving/db.py), and the per-variant A/B report.

Every served response is logged (id, variant, model version, user, key, how the variant was chosen)
so ``POST /v1/feedback`` can attach one score to it later, from the key that made it, and the report
can group outcomes by variant. Request rows are
buffered and written in batches from a worker thread, so the hot path never waits on disk;
feedback for a still-buffered request flushes first.

Significance: outcomes are binary (score > 0 is a success), so each challenger is compared with
the reference variant by a **two-proportion z-test** (pooled variance, two-sided), the textbook
test for a difference in conversion rates; with fewer than 5 successes or failures in a group the
normal approximation is poor and **Fisher's exact test** is used instead. A Mann-Whitney U test
on the raw scores is reported beside it for graded feedback.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from serving import db

CHOSEN_BY = ("hash", "pin", "route", "fallback")
"""How a request's variant was chosen: the A/B hash of its user or caller, a pin (X-Lmforge-Variant or
a model naming a variant), a task route (serve.task_routes), or the fallback for a variant that was down."""


class UnknownRequestError(KeyError):
    """Feedback names a request id this gateway never served."""


class ForeignRequestError(PermissionError):
    """Feedback for a request made with another API key."""


class DuplicateFeedbackError(ValueError):
    """The request already has its feedback."""


def _insert_ignoring_duplicates(engine: sa.Engine):
    """INSERT that skips a request id already logged (a replayed or retried request keeps its first row,
    so nobody can take over a request's key by replaying its id)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(db.requests_log).on_conflict_do_nothing(index_elements=["request_id"])
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(db.requests_log).on_conflict_do_nothing(index_elements=["request_id"])


class FeedbackStore:
    """Request log + feedback in the state database (shared by every replica on PostgreSQL)."""

    _FIELDS = ("request_id", "variant", "version", "user", "key_id", "route", "status", "latency_s", "created_at",
               "chosen_by")

    def __init__(self, location: str | Path):
        """Args: location: a database URL, or the path of a SQLite file."""
        self.engine = db.engine(location)
        self._insert = _insert_ignoring_duplicates(self.engine)
        self._lock = threading.Lock()
        # A deque, drained by popleft: appends from the event loop never race the flush thread
        # (swapping a list could drop a row appended to the old list after it was written).
        self._buffer: deque[tuple] = deque()

    def log_request(self, request_id: str, variant: str, version: str | None, user: str | None,
                    key_id: str | None, route: str, status: int, latency_s: float,
                    chosen_by: str | None = None) -> None:
        """Buffer one served request (cheap; call :meth:`flush` to persist). ``chosen_by``: see CHOSEN_BY."""
        self._buffer.append((request_id, variant, version, user, key_id, route, status, latency_s, time.time(),
                             chosen_by))

    @property
    def buffered(self) -> int:
        """Request rows waiting for the next flush."""
        return len(self._buffer)

    def flush(self) -> int:
        """Write buffered request rows; returns how many."""
        with self._lock:
            rows = [self._buffer.popleft() for _ in range(len(self._buffer))]
            if rows:
                with self.engine.begin() as conn:
                    conn.execute(self._insert, [dict(zip(self._FIELDS, row)) for row in rows])
        return len(rows)

    def add_feedback(self, request_id: str, score: float, comment: str | None = None,
                     key_id: str | None = None) -> str:
        """Store the score for a served request, once, from the key that made it; returns its variant.

        Raises:
            UnknownRequestError: no such request. ForeignRequestError: it was made with another key
            (a request made without a key, auth off, takes feedback from anyone).
            DuplicateFeedbackError: it has its feedback already.
        """
        self.flush()
        requests = db.requests_log
        with self._lock, self.engine.begin() as conn:
            # A no-op UPDATE first locks the request (PostgreSQL: its row; SQLite: the database's write
            # lock), so a second score for it, from this or another replica, waits for this transaction
            # and then sees its feedback row: the check and the insert below are one atomic step.
            row = conn.execute(requests.update().where(requests.c.request_id == request_id)
                               .values(variant=requests.c.variant)
                               .returning(requests.c.variant, requests.c.key_id)).first()
            if row is None:
                raise UnknownRequestError(request_id)
            if row.key_id is not None and row.key_id != key_id:
                raise ForeignRequestError(request_id)
            if conn.execute(sa.select(sa.literal(1)).where(db.feedback.c.request_id == request_id)).first():
                raise DuplicateFeedbackError(request_id)
            conn.execute(db.feedback.insert().values(request_id=request_id, score=float(score), comment=comment,
                                                     created_at=time.time()))
        return row.variant

    def close(self) -> None:
        self.flush()


def ab_report(location: str | Path, reference: str | None = None, since: float | None = None) -> dict[str, Any]:
    """Per-variant outcomes and significance tests against ``reference`` (default: most requests).

    Args:
        location: the state database (URL, or the SQLite file's path).

    Returns:
        ``{"variants": [{variant, requests, feedback, mean_score, success_rate, ...}],
        "reference": name, "tests": [{variant, z, p_value, test, mann_whitney_p, significant}]}``
    """
    requests, feedback = db.requests_log, db.feedback
    window = [requests.c.created_at >= since] if since else []
    with db.engine(location).connect() as conn:
        counts: dict[str, int] = dict(conn.execute(sa.select(requests.c.variant, sa.func.count()).where(*window)
                                   .group_by(requests.c.variant)).fetchall())
        scores: dict[str, list[float]] = {}
        joined = sa.select(requests.c.variant, feedback.c.score).select_from(
            feedback.join(requests, requests.c.request_id == feedback.c.request_id)).where(*window)
        for variant, score in conn.execute(joined):
            scores.setdefault(variant, []).append(score)
    names = sorted(set(counts) | set(scores))
    rows: list[dict[str, Any]] = []
    for name in names:
        s = scores.get(name, [])
        successes = sum(1 for v in s if v > 0)
        rows.append({
            "variant": name, "requests": counts.get(name, 0), "feedback": len(s), "successes": successes,
            "mean_score": (sum(s) / len(s)) if s else None, "success_rate": (successes / len(s)) if s else None,
        })
    if not rows:
        return {"variants": [], "reference": None, "tests": []}
    ref = reference if reference in names else max(rows, key=lambda r: r["requests"])["variant"]
    ref_row = next(r for r in rows if r["variant"] == ref)
    tests = [_compare(ref_row, row, scores.get(ref, []), scores.get(row["variant"], []))
             for row in rows if row["variant"] != ref]
    return {"variants": rows, "reference": ref, "tests": tests}


def _compare(ref: dict, other: dict, ref_scores: list[float], other_scores: list[float],
             alpha: float = 0.05) -> dict[str, Any]:
    from scipy import stats

    out: dict[str, Any] = {"variant": other["variant"], "against": ref["variant"], "test": None, "z": None,
                           "p_value": None, "mann_whitney_p": None, "significant": False}
    n1, n2 = ref["feedback"], other["feedback"]
    if n1 == 0 or n2 == 0:
        out["note"] = "no feedback for one of the variants"
        return out
    s1, s2 = ref["successes"], other["successes"]
    out["difference"] = s2 / n2 - s1 / n1
    if min(s1, n1 - s1, s2, n2 - s2) < 5:
        _, p = stats.fisher_exact([[s1, n1 - s1], [s2, n2 - s2]])
        out |= {"test": "fisher_exact", "p_value": float(p)}
    else:
        pooled = (s1 + s2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
        z = (s2 / n2 - s1 / n1) / se if se > 0 else 0.0
        out |= {"test": "two_proportion_z", "z": z, "p_value": float(2 * stats.norm.sf(abs(z)))}
    if len(set(ref_scores + other_scores)) > 1:
        out["mann_whitney_p"] = float(stats.mannwhitneyu(other_scores, ref_scores, alternative="two-sided").pvalue)
    out["significant"] = out["p_value"] is not None and out["p_value"] < alpha
    return out
