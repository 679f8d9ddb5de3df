"""Instruction-quality judge over any OpenAI-compatible chat endpoint, with a rule-based fallback.

The judge sees a batch of (prompt, reply) pairs in one chat request and answers with a JSON list
of 0..10 scores, which become 0..1 rewards. Calls are

* **batched** (``JudgeConfig.batch_size`` pairs per request),
* **time-limited** (``timeout_s`` per request, enforced by the ``openai`` client),
* **retried** (``retries`` more attempts with short backoff; a malformed reply counts as a failure),
* **cached** in memory and, given a path, in SQLite (key: sha256 of rubric version, judge model,
  prompt and completion), so a repeated completion never costs a request.

When no URL is configured the rule-based :func:`tasks.rewards.format_score` is the score (the
stage runs offline). When the endpoint fails a batch after its retries, that batch gets the
rule-based score with a logged warning, and the endpoint is skipped for ``cooldown_s`` so a dead
judge does not stall every training step. Fallback scores are never cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.schema import JudgeConfig
from tasks.parsing import first_json_list
from tasks.rewards import format_score

log = logging.getLogger(__name__)

RUBRIC_VERSION = "v1"
_MAX_CHARS = 2000  # per prompt / reply shown to the judge: keeps a batch inside small context windows
RUBRIC = """You grade how well an assistant's reply follows the user's instruction.
For each numbered item you get the conversation prompt and the assistant's reply.
Score each reply from 0 (ignores the instruction or wrong format) to 10 (exactly what was asked:
right format, allowed labels only, concise, no extra chatter).
Answer with only a JSON list of {n} integers, one per item, in item order. No other text."""


class JudgeError(Exception):
    """The judge endpoint failed or answered something that is not a list of scores."""


class Judge:
    """Score completions with an OpenAI-compatible judge; see the module docstring for behaviour.

    Args:
        cfg: the ``align.judge`` section.
        cache_path: SQLite file for the persistent cache (e.g. ``<home>/cache/judge.sqlite``);
            None keeps the cache in memory only.
    """

    def __init__(self, cfg: JudgeConfig, cache_path: str | Path | None = None):
        self.cfg = cfg
        self.cache_path = Path(cache_path) if cache_path is not None and cfg.cache else None
        self._memory: dict[str, float] = {}
        self._client = None
        self._down_until = 0.0
        self.stats = {"requests": 0, "failures": 0, "cache_hits": 0, "fallback": 0, "judged": 0}
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with self._db() as db:
                db.execute("CREATE TABLE IF NOT EXISTS scores (key TEXT PRIMARY KEY, score REAL NOT NULL)")

    # ------------------------------------------------------------------ public
    def score(self, prompts: Sequence[str], completions: Sequence[str],
              tasks: Sequence[str | None] | None = None) -> list[float]:
        """One 0..1 score per completion (judge when reachable, else the rule-based score).

        Args:
            prompts: the prompts the completions answer (chat template applied or plain text).
            completions: assistant replies.
            tasks: per row task name, used by the rule-based fallback (None = generic text rules).
        """
        n = len(completions)
        if len(prompts) != n:
            raise ValueError(f"judge got {len(prompts)} prompts but {n} completions")
        tasks = list(tasks) if tasks is not None else [None] * n
        if self.cfg.url is None:
            return [self._rule(t, c) for t, c in zip(tasks, completions, strict=True)]

        keys = [self._key(p, c) for p, c in zip(prompts, completions, strict=True)]
        scores: list[float | None] = [self._cached(k) for k in keys]
        self.stats["cache_hits"] += sum(s is not None for s in scores)
        todo = [i for i, s in enumerate(scores) if s is None]
        for start in range(0, len(todo), self.cfg.batch_size):
            batch = todo[start : start + self.cfg.batch_size]
            judged = self._judge_batch([prompts[i] for i in batch], [completions[i] for i in batch])
            if judged is None:
                self.stats["fallback"] += len(batch)
                for i in batch:
                    scores[i] = self._rule(tasks[i], completions[i])
                continue
            self.stats["judged"] += len(batch)
            self._store([(keys[i], s) for i, s in zip(batch, judged, strict=True)])
            for i, s in zip(batch, judged, strict=True):
                scores[i] = s
        return [float(s) for s in scores]  # type: ignore[arg-type]  # every None was judged or scored above

    # ------------------------------------------------------------------ endpoint
    def _judge_batch(self, prompts: list[str], completions: list[str]) -> list[float] | None:
        now = time.monotonic()
        if now < self._down_until:
            return None
        error: Exception | None = None
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                time.sleep(min(2.0, 0.25 * 2 ** (attempt - 1)))
            try:
                return self._request(prompts, completions)
            except Exception as err:  # noqa: BLE001 - any transport/protocol failure degrades the same way
                error = err
                self.stats["failures"] += 1
        self._down_until = time.monotonic() + self.cfg.cooldown_s
        log.warning(
            "judge %s (model %s) failed %d time(s): %s; using the rule-based format score for %d "
            "completion(s) and skipping the judge for %.0fs",
            self.cfg.url, self.cfg.model, self.cfg.retries + 1, _short(error), len(completions), self.cfg.cooldown_s,
        )
        return None

    def _request(self, prompts: list[str], completions: list[str]) -> list[float]:
        items = [
            {"item": i + 1, "prompt": p[-_MAX_CHARS:], "reply": c[:_MAX_CHARS]}
            for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
        ]
        self.stats["requests"] += 1
        response = self._openai().chat.completions.create(
            model=self.cfg.model,
            messages=[
                {"role": "system", "content": RUBRIC.format(n=len(items))},
                {"role": "user", "content": json.dumps(items, ensure_ascii=False)},
            ],
            temperature=0.0,
            max_tokens=self.cfg.max_tokens,
        )
        content = response.choices[0].message.content if response.choices else None
        return parse_scores(content or "", len(items))

    def _openai(self):
        if self._client is None:
            from openai import OpenAI

            self._client = OpenAI(
                base_url=self.cfg.url,
                # Local servers (our gateway, vLLM) accept any key; the client insists on one.
                api_key=os.environ.get(self.cfg.api_key_env) or "unused",
                timeout=self.cfg.timeout_s,
                max_retries=0,  # retries are ours, so a dead judge costs exactly retries + 1 attempts
            )
        return self._client

    # ------------------------------------------------------------------ cache + fallback
    def _rule(self, task_name: str | None, completion: str) -> float:
        return format_score(task_name, completion)

    def _key(self, prompt: str, completion: str) -> str:
        payload = json.dumps([RUBRIC_VERSION, self.cfg.model, prompt, completion], ensure_ascii=False)
        return hashlib.sha256(payload.encode()).hexdigest()

    def _cached(self, key: str) -> float | None:
        if not self.cfg.cache:
            return None
        if key in self._memory:
            return self._memory[key]
        if self.cache_path is None:
            return None
        with self._db() as db:
            row = db.execute("SELECT score FROM scores WHERE key = ?", (key,)).fetchone()
        if row is not None:
            self._memory[key] = row[0]
            return row[0]
        return None

    def _store(self, pairs: list[tuple[str, float]]) -> None:
        if not self.cfg.cache:
            return
        self._memory.update(pairs)
        if self.cache_path is not None:
            with self._db() as db:
                db.executemany("INSERT OR REPLACE INTO scores (key, score) VALUES (?, ?)", pairs)

    def _db(self) -> _Closing:
        # A connection per use: the judge may be called from TRL's worker threads.
        assert self.cache_path is not None  # callers check
        conn = sqlite3.connect(self.cache_path, timeout=30)
        return _Closing(conn)


class _Closing:
    """``with`` a connection: commit on success, roll back on error, always close."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, exc_type, *_: Any) -> None:
        try:
            if exc_type is None:
                self.conn.commit()
            else:
                self.conn.rollback()
        finally:
            self.conn.close()


def parse_scores(content: str, n: int) -> list[float]:
    """Read ``n`` 0..10 scores from a judge reply and scale them to 0..1.

    Accepts a bare JSON list, a list inside other text or a code fence, or ``{"scores": [...]}``.

    Raises:
        JudgeError: no list of ``n`` numbers in 0..10 is found.
    """
    values: Any = None
    try:
        decoded = json.loads(content)
        values = decoded.get("scores") if isinstance(decoded, dict) else decoded
    except json.JSONDecodeError:
        values = first_json_list(content)
    if not isinstance(values, list) or len(values) != n:
        raise JudgeError(f"expected a JSON list of {n} scores, got {content[:120]!r}")
    out = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 10:
            raise JudgeError(f"score {value!r} is not a number in 0..10 (reply {content[:120]!r})")
        out.append(float(value) / 10.0)
    return out


def judge_cache_path(home: str | Path) -> Path:
    """Where the persistent judge cache lives under an lmforge home."""
    return Path(home) / "cache" / "judge.sqlite"


def _short(error: Exception | None) -> str:
    text = f"{type(error).__name__}: {error}" if error else "unknown error"
    return text if len(text) <= 200 else text[:199] + "…"
