"""Locust traffic for the gateway: mixed chat / streaming chat / JSON-RPC batches from two priority classes.

Run by bench/bench_locust.py (which creates the keys, measures capacity and ramps the load), or by
hand against a running stack:

    LMFORGE_BENCH_HOSTS=https://localhost:18443 LMFORGE_BENCH_CA=.lmforge/stack/certs/ca.crt \\
    LMFORGE_BENCH_KEY_HIGH=lmf_... LMFORGE_BENCH_KEY_LOW=lmf_... \\
    locust -f bench/locustfile.py --headless -u 16 -r 16 -t 60s

Every request is recorded under its priority class's name ("high", "low"), so the stats give
throughput, latency percentiles and failures per class. A stream counts from the request to its
last event and fails on an error event or a missing ``[DONE]``. ``LMFORGE_BENCH_HOSTS`` lists one
URL (through nginx) or several (direct: each user sticks to one replica, round robin).
``LMFORGE_BENCH_TASKS`` picks the mix (default ``chat,stream,rpc``; weights 5:3:2).
"""

from __future__ import annotations

import itertools
import json
import os
import time

import requests
from locust import HttpUser, constant

HOSTS = [h for h in os.environ.get("LMFORGE_BENCH_HOSTS", "http://127.0.0.1:8000").split(",") if h]
CA = os.environ.get("LMFORGE_BENCH_CA") or True
MAX_TOKENS = int(os.environ.get("LMFORGE_BENCH_MAX_TOKENS", "32"))
MODEL = os.environ.get("LMFORGE_BENCH_MODEL", "lmforge-assistant")
_next_user = itertools.count()
_REVIEWS = ["A joyless mess.", "Warm, funny and beautifully acted.", "I want my two hours back.",
            "The best thing I have seen this year.", "Competent but forgettable."]


class _ClassUser(HttpUser):
    abstract = True
    host = HOSTS[0]
    wait_time = constant(0)  # closed loop: each user sends its next request when the last one ends
    priority = "normal"

    def on_start(self) -> None:
        n = next(_next_user)
        self.client.base_url = HOSTS[n % len(HOSTS)]
        self.client.verify = CA
        self.headers = {"Authorization": f"Bearer {os.environ[f'LMFORGE_BENCH_KEY_{self.priority.upper()}']}",
                        "X-User-Id": f"bench-{self.priority}-{n}"}
        self.stream_session = requests.Session()
        self.turn = n

    def _messages(self) -> list[dict[str, str]]:
        self.turn += 1
        review = _REVIEWS[self.turn % len(_REVIEWS)]
        return [{"role": "user", "content": f"Is this review positive or negative? {review}"}]

    def chat(self) -> None:
        body = {"model": MODEL, "messages": self._messages(), "max_tokens": MAX_TOKENS, "temperature": 0}
        with self.client.post("/v1/chat/completions", json=body, headers=self.headers, name=self.priority,
                              catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code} {response.text[:200]}")
            elif not response.json()["choices"][0]["message"]["content"] and not response.json()["usage"]:
                response.failure("empty completion")

    def stream(self) -> None:
        body = {"model": MODEL, "messages": self._messages(), "max_tokens": MAX_TOKENS, "temperature": 0,
                "stream": True}
        url = self.client.base_url + "/v1/chat/completions"
        started, length, error = time.perf_counter(), 0, None
        try:
            # verify= on the call: a session's verify loses to REQUESTS_CA_BUNDLE from the environment.
            with self.stream_session.post(url, json=body, headers=self.headers, stream=True, timeout=180,
                                          verify=CA) as response:
                if response.status_code != 200:
                    error = RuntimeError(f"{response.status_code} {response.text[:200]}")
                else:
                    done = False
                    for line in response.iter_lines():
                        length += len(line)
                        if line.startswith(b"data: [DONE]"):
                            done = True
                        elif line.startswith(b"data: ") and b'"error"' in line[:20]:
                            error = RuntimeError(f"error event: {line[:200]!r}")
                    if error is None and not done:
                        error = RuntimeError("stream ended without [DONE]")
        except requests.RequestException as err:
            error = err
        self.environment.events.request.fire(
            request_type="POST", name=self.priority, response_time=(time.perf_counter() - started) * 1000,
            response_length=length, exception=error, context={})

    def rpc_batch(self) -> None:
        self.turn += 1
        batch = [
            {"jsonrpc": "2.0", "method": "classify_sentiment",
             "params": {"text": _REVIEWS[self.turn % len(_REVIEWS)], "max_tokens": 4}, "id": 1},
            {"jsonrpc": "2.0", "method": "extract_entities",
             "params": {"text": "Angela Merkel visited Paris.", "max_tokens": MAX_TOKENS}, "id": 2},
            {"jsonrpc": "2.0", "method": "generate",
             "params": {"text": "Say hello.", "max_tokens": MAX_TOKENS}, "id": 3},
        ]
        with self.client.post("/rpc", data=json.dumps(batch),
                              headers=self.headers | {"Content-Type": "application/json"},
                              name=self.priority, catch_response=True) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code} {response.text[:200]}")
                return
            errors = [r["error"] for r in response.json() if "error" in r]
            if errors:
                response.failure(f"rpc errors: {errors[:2]}")


_WEIGHTS = {"chat": (_ClassUser.chat, 5), "stream": (_ClassUser.stream, 3), "rpc": (_ClassUser.rpc_batch, 2)}
_ClassUser.tasks = {fn: weight for name, (fn, weight) in _WEIGHTS.items()
                    if name in os.environ.get("LMFORGE_BENCH_TASKS", "chat,stream,rpc").split(",")}


class HighPriorityUser(_ClassUser):
    priority = "high"


class LowPriorityUser(_ClassUser):
    priority = "low"
