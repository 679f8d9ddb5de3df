"""The judge against real HTTP endpoints: a tiny OpenAI-compatible server, a dead port, a slow and
a confused judge."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from configs.schema import JudgeConfig
from tasks.judge import Judge, JudgeError, judge_cache_path, parse_scores
from tasks.rewards import format_score


class JudgeServer:
    """``/v1/chat/completions`` that scores each reply 10 if it is exactly 'positive', else 3."""

    def __init__(self, mode: str = "ok", delay_s: float = 0.0):
        self.mode, self.delay_s = mode, delay_s
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server API
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(body)
                server.auth.append(self.headers.get("Authorization"))
                time.sleep(server.delay_s)
                if self.path != "/v1/chat/completions":
                    self.send_error(404)
                    return
                items = json.loads(body["messages"][-1]["content"])
                scores = [10 if item["reply"] == "positive" else 3 for item in items]
                content = json.dumps(scores) if server.mode == "ok" else "They all look fine to me!"
                payload = json.dumps({
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": content}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }).encode()
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test): nothing to answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


PROMPTS = [f"prompt {i}" for i in range(5)]
REPLIES = ["positive", "Positive.", "positive", "nope", "none"]
TASKS = ["sentiment", "sentiment", "sentiment", "sentiment", "ner"]


def test_live_judge_is_batched_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_JUDGE_API_KEY", "s3cret")
    cache = judge_cache_path(tmp_path)
    with JudgeServer() as server:
        cfg = JudgeConfig(url=server.url, model="grader", batch_size=2, timeout_s=5)
        judge = Judge(cfg, cache_path=cache)
        assert judge.score(PROMPTS, REPLIES, TASKS) == pytest.approx([1.0, 0.3, 1.0, 0.3, 0.3])
        assert len(server.requests) == 3  # 5 completions in batches of 2
        assert [len(json.loads(r["messages"][-1]["content"])) for r in server.requests] == [2, 2, 1]
        assert server.requests[0]["model"] == "grader" and server.requests[0]["temperature"] == 0.0
        assert server.auth[0] == "Bearer s3cret"

        # Second call: everything from the in-memory cache, no request.
        assert judge.score(PROMPTS, REPLIES, TASKS) == pytest.approx([1.0, 0.3, 1.0, 0.3, 0.3])
        assert len(server.requests) == 3 and judge.stats["cache_hits"] == 5

        # A fresh judge (new process, say) reads the SQLite cache; only the new pair is sent.
        fresh = Judge(cfg, cache_path=cache)
        assert fresh.score(PROMPTS + ["new"], REPLIES + ["positive"], TASKS + ["sentiment"])[-1] == 1.0
        assert len(server.requests) == 4
        assert len(json.loads(server.requests[-1]["messages"][-1]["content"])) == 1
        assert cache.is_file()

        # The cache key includes the judge model: another model is asked again.
        other = Judge(cfg.model_copy(update={"model": "other"}), cache_path=cache)
        other.score(PROMPTS[:1], REPLIES[:1], TASKS[:1])
        assert len(server.requests) == 5


def test_dead_endpoint_falls_back_quickly_with_a_warning(tmp_path, caplog):
    cfg = JudgeConfig(url=closed_port_url(), retries=2, timeout_s=2, batch_size=8, cooldown_s=60)
    judge = Judge(cfg, cache_path=tmp_path / "judge.sqlite")
    started = time.perf_counter()
    with caplog.at_level(logging.WARNING, logger="tasks.judge"):
        scores = judge.score(PROMPTS, REPLIES, TASKS)
    elapsed = time.perf_counter() - started
    assert scores == [format_score(t, r) for t, r in zip(TASKS, REPLIES)] == [1.0, 0.5, 1.0, 0.0, 1.0]
    assert elapsed < 3.0  # 3 refused connections + 0.25 s + 0.5 s backoff
    assert judge.stats["failures"] == 3 and judge.stats["fallback"] == 5
    assert any("rule-based format score" in r.getMessage() and cfg.url in r.getMessage() for r in caplog.records)

    # Within the cooldown the dead judge is not even tried, and fallbacks were not cached.
    started = time.perf_counter()
    assert judge.score(PROMPTS, REPLIES, TASKS) == scores
    assert time.perf_counter() - started < 0.2 and judge.stats["failures"] == 3
    assert judge.stats["cache_hits"] == 0


def test_slow_judge_is_cut_off_by_the_timeout():
    with JudgeServer(delay_s=3.0) as server:
        judge = Judge(JudgeConfig(url=server.url, retries=0, timeout_s=0.5))
        started = time.perf_counter()
        assert judge.score(["p"], ["positive"], ["sentiment"]) == [1.0]
        assert time.perf_counter() - started < 2.0
        assert judge.stats["fallback"] == 1 and len(server.requests) == 1


def test_malformed_replies_are_retried_then_fall_back():
    with JudgeServer(mode="chatty") as server:
        judge = Judge(JudgeConfig(url=server.url, retries=1, timeout_s=5))
        assert judge.score(["p"], ["Positive."], ["sentiment"]) == [0.5]
        assert len(server.requests) == 2 and judge.stats["failures"] == 2


def test_no_url_is_the_rule_based_score_without_network():
    judge = Judge(JudgeConfig(url=None))
    assert judge.score(["p", "q"], ["positive", " ".join(["w"] * 120)], ["sentiment", "summarization"]) == [1.0, 0.5]
    assert judge.stats["requests"] == 0


def test_parse_scores():
    assert parse_scores("[10, 0, 7]", 3) == [1.0, 0.0, 0.7]
    assert parse_scores('{"scores": [5, 5]}', 2) == [0.5, 0.5]
    assert parse_scores("```json\n[8, 2.5]\n```", 2) == [0.8, 0.25]
    for bad, n in (("[1, 2]", 3), ("[11]", 1), ('["high"]', 1), ("[true]", 1), ("fine", 1)):
        with pytest.raises(JudgeError):
            parse_scores(bad, n)
