"""Operations: A/B split statistics, load shedding, hot swap on a real MLflow alias flip, runtime
LoRA through the admin API, and a backend process that dies mid-request."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from configs.schema import ServeConfig
from serving.app import build_app
from serving.auth import KeyStore
from serving.backends import engine_messages as msg
from serving.errors import APIError
from serving.metrics import Metrics
from serving.router import ABRouter
from serving.service import Admission
from tests.serving_helpers import free_port, register_versions, running_gateway, tiny_lora, wait_for

REPO = Path(__file__).resolve().parents[1]
HELLO = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def ir_dir(tiny_ir_dir):
    return tiny_ir_dir


# --------------------------------------------------------------------------- A/B split
def test_ab_split_10k_users_within_one_point_and_sticky():
    router = ABRouter([("champion", 0.9), ("challenger", 0.1)])
    users = [f"user-{i}" for i in range(10_000)]
    first = [router.assign(u) for u in users]
    share = first.count("challenger") / len(users)
    assert abs(share - 0.10) <= 0.01, share
    # Another replica (a fresh router, as after a restart) and repeated calls agree for every user.
    replica = ABRouter([("champion", 9), ("challenger", 1)])
    assert [replica.assign(u) for u in users] == first
    assert [router.assign(u) for u in users] == first
    # Ramping the challenger to 20% keeps every existing challenger user on the challenger.
    ramped = ABRouter([("champion", 0.8), ("challenger", 0.2)])
    moved = [ramped.assign(u) for u, v in zip(users, first) if v == "challenger"]
    assert set(moved) == {"challenger"}
    # A down variant's users are spread over the live ones; the others keep their assignment.
    only = [router.assign(u, available={"champion"}) for u in users[:200]]
    assert set(only) == {"champion"}


# --------------------------------------------------------------------------- load shedding
def test_admission_sheds_low_priority_first_and_never_hangs():
    cfg = ServeConfig(max_concurrency=1, max_queue=2, request_timeout_s=0.5,
                      priority_shares={"high": 1.0, "normal": 1.0, "low": 0.5})
    admission = Admission(cfg, Metrics())

    async def main():
        release = asyncio.Event()
        order = []

        async def hold(priority, tag):
            async with admission.slot(priority):
                order.append(tag)
                await release.wait()

        running = asyncio.create_task(hold("normal", "first"))
        await asyncio.sleep(0.01)
        waiting = asyncio.create_task(hold("low", "queued-low"))
        await asyncio.sleep(0.01)
        with pytest.raises(APIError) as low:  # low may fill half the queue: one waiter is enough
            async with admission.slot("low"):
                pass
        high = asyncio.create_task(hold("high", "queued-high"))
        await asyncio.sleep(0.01)
        with pytest.raises(APIError) as full:
            async with admission.slot("high"):
                pass
        release.set()
        await asyncio.gather(running, waiting, high)
        timed_out = asyncio.create_task(hold("normal", "blocker"))
        release.clear()
        await asyncio.sleep(0.01)
        started = time.perf_counter()
        with pytest.raises(APIError) as late:
            async with admission.slot("normal"):
                pass
        waited = time.perf_counter() - started
        release.set()
        await timed_out
        return low.value, full.value, late.value, waited, order

    low, full, late, waited, order = asyncio.run(main())
    assert low.status == 503 and "priority low" in low.message and low.headers["Retry-After"]
    assert full.status == 503
    assert late.status == 503 and "timed out" in late.message and waited < 2.0
    assert order[:3] == ["first", "queued-low", "queued-high"]


def test_token_bucket_lets_a_batch_larger_than_the_burst_through_once_and_then_owes_it():
    from serving.auth import TokenBucket

    bucket = TokenBucket(capacity=60, rate=1.0)
    assert bucket.take(64, now=bucket.stamp) == 0.0, "a full bucket admits a batch larger than itself"
    assert bucket.take(1, now=bucket.stamp) == pytest.approx(5.0), "4 owed + 1 needed at 1 token/s"
    assert bucket.take(1, now=bucket.stamp + 5.0) == 0.0
    assert bucket.take(60, now=bucket.stamp + 30.0) == pytest.approx(30.0), "half full: 30 s to go"


def test_a_client_that_stops_reading_a_stream_frees_its_slot(tmp_path, ir_dir):
    """One admission slot. A real client asks for 8 long streams, reads the first bytes and stops
    reading (connection open). Its stream fills the socket buffers, the gateway's write waits
    ``stream_write_timeout_s`` and then ends the stream: the next request gets the slot (it would have
    waited out its 8 s queue timeout for a 503) and the stalled connection is closed."""
    import socket
    from urllib.parse import urlsplit

    cfg = ServeConfig(backend="openvino", auth=False, watch=False, cache_gb=1, max_concurrency=1,
                      request_timeout_s=8, stream_write_timeout_s=1.0, max_tokens_limit=1500,
                      variants=[{"name": "champion", "model_uri": str(ir_dir)}])
    with running_gateway(build_app(cfg, tmp_path / "home"), send_buffer=4096) as base:
        url = urlsplit(base)
        body = json.dumps({"model": "lmforge-assistant", "messages": HELLO, "max_tokens": 1500, "n": 8,
                           "stream": True, "ignore_eos": True}).encode()
        stalled = socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stalled.connect((url.hostname, url.port))
        try:
            stalled.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            assert stalled.recv(512).startswith(b"HTTP/1.1 200")  # streaming; from now on it reads nothing
            started = time.perf_counter()
            after = httpx.post(base + "/v1/chat/completions", timeout=30,
                               json={"model": "lmforge-assistant", "messages": HELLO, "max_tokens": 2})
            waited = time.perf_counter() - started
            assert after.status_code == 200, after.text
            assert waited < 7, f"the next request waited {waited:.1f}s for the slot"
            metrics = httpx.get(base + "/metrics").text
            assert 'lmforge_errors_total{kind="client_stalled",variant="champion"} 1.0' in metrics
            assert 'lmforge_requests_total{route="chat",status="499",variant="champion"} 1.0' in metrics
            # The stream was cut short: draining what was buffered ends in EOF, not in [DONE].
            stalled.settimeout(10)
            tail = b""
            while chunk := stalled.recv(65536):
                tail += chunk
            assert tail and b"[DONE]" not in tail
        finally:
            stalled.close()


# --------------------------------------------------------------------------- hot swap
def _register(tracking_uri: str, ir_dir: Path, artifacts: Path) -> tuple[str, str]:
    from mlflow import MlflowClient

    v1, v2 = register_versions(tracking_uri, ir_dir, artifacts)
    MlflowClient(tracking_uri, tracking_uri).set_registered_model_alias("lmforge-assistant", "champion", v1)
    return v1, v2


def test_alias_flip_swaps_without_restart_or_failed_requests(tmp_path, mlflow_uri, ir_dir):
    from mlflow import MlflowClient

    v1, v2 = _register(mlflow_uri, ir_dir, tmp_path / "artifacts")
    home = tmp_path / "home"
    # The load below runs flat out on the tiny model (hundreds of requests/s): not what rate limits are tested on.
    admin_key = KeyStore(home / "serving" / "keys.sqlite").add("ops", admin=True, rate_per_minute=10**6,
                                                                burst=10**6)[0]
    cfg = ServeConfig(backend="openvino", auth=True, poll_interval_s=0.2, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": "models:/lmforge-assistant@champion"}])
    app = build_app(cfg, home, tracking_uri=mlflow_uri)
    with running_gateway(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=admin_key, max_retries=0)
        first = client.chat.completions.with_raw_response.create(model="lmforge-assistant", messages=HELLO,
                                                                 max_tokens=4)
        assert first.headers["x-lmforge-version"] == v1
        old_engine = app.state.gateway.pool.slots["champion"].ref

        # (status, version, sent, done, engine seconds): responses land in completion order, and a request sent
        # to the old engine just before the swap may finish after one sent to the new engine, so order is
        # judged by times.
        results: list[tuple[int, str | None, float, float, float]] = []
        stop = threading.Event()

        def load() -> None:
            with httpx.Client(timeout=30) as http:
                while not stop.is_set():
                    sent = time.monotonic()
                    r = http.post(base + "/v1/chat/completions", headers={"Authorization": f"Bearer {admin_key}"},
                                  json={"model": "lmforge-assistant", "messages": HELLO, "max_tokens": 16})
                    engine_s = float(r.headers.get("server-timing", "engine;dur=0").split("=")[1]) / 1000
                    results.append((r.status_code, r.headers.get("x-lmforge-version"), sent, time.monotonic(),
                                    engine_s))

        workers = [threading.Thread(target=load) for _ in range(3)]
        for w in workers:
            w.start()
        wait_for(lambda: len(results) >= 3)
        MlflowClient(mlflow_uri, mlflow_uri).set_registered_model_alias("lmforge-assistant", "champion", v2)
        wait_for(lambda: any(r[1] == v2 for r in results[-3:]), timeout=60)
        time.sleep(0.3)
        stop.set()
        for w in workers:
            w.join()

        assert [r[0] for r in results if r[0] != 200] == [], "no failed request during the swap"
        versions = [r[1] for r in results]
        assert v1 in versions and v2 in versions
        assert versions.index(v2) > versions.index(v1)
        # Once any client has seen v2, no request sent afterwards is served by v1 (the swap is one-way and atomic).
        first_v2_done = min(done for _, v, _, done, _ in results if v == v2)
        sent_after = [v for _, v, sent, _, _ in results if sent > first_v2_done]
        assert sent_after and set(sent_after) == {v2}, sent_after
        info = httpx.get(base + "/admin/variants", headers={"Authorization": f"Bearer {admin_key}"}).json()
        swap = info["variants"][0]["swaps"][-1]
        assert swap["version"] == v2 and swap["reason"].startswith("alias @champion")
        assert swap["warmup_s"] > 0, "the new engine was warmed up before it took traffic"
        # What the swap costs the requests it happens under: the time the requests in flight at the switch
        # spent outside the engine (latency minus the engine's Server-Timing: the gateway and the network,
        # where a switch that held up the event loop would show) is about what other requests spent there.
        # Engine time is left out: the new engine's background load competes with it for the cores.
        switched = time.monotonic() - (time.time() - swap["at"])  # the gateway runs in this process
        outside = {(sent, done): done - sent - engine_s for *_, sent, done, engine_s in results if engine_s}
        across = [t for (sent, done), t in outside.items() if sent <= switched <= done]
        others = [t for (sent, done), t in outside.items() if not sent <= switched <= done]
        assert across and others, "no request was in flight at the switch"
        assert max(across) - statistics.median(others) < 0.5, (max(across), statistics.median(others))
        wait_for(lambda: old_engine.backend.released, timeout=30)  # released after draining: engine process gone
        assert old_engine.inflight == 0
        metrics = httpx.get(base + "/metrics").text
        assert 'lmforge_swaps_total{kind="model",variant="champion"} 2.0' in metrics
        assert 'lmforge_variant_version{variant="champion"} 2.0' in metrics


def test_admin_loads_lora_adapters_at_runtime(tmp_path, ir_dir, tiny_model_dir):
    home = tmp_path / "home"
    # Adapters are read only from inside the lmforge home (or serve.adapter_roots).
    lora_a = tiny_lora(tiny_model_dir, home / "adapters" / "lora_a.safetensors", seed=1)
    lora_b = tiny_lora(tiny_model_dir, home / "adapters" / "lora_b.safetensors", seed=2)
    outside = tiny_lora(tiny_model_dir, tmp_path / "elsewhere" / "lora_c.safetensors", seed=3)
    store = KeyStore(home / "serving" / "keys.sqlite")
    admin_key, user_key = store.add("ops", admin=True)[0], store.add("user")[0]
    cfg = ServeConfig(backend="openvino", watch=False, cache_gb=1,
                      variants=[{"name": "champion", "model_uri": str(ir_dir)}])
    with running_gateway(build_app(cfg, home)) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key=admin_key, max_retries=0)

        def greedy() -> str:
            return client.completions.create(model="champion", prompt="The weather", max_tokens=8,
                                             temperature=0).choices[0].text

        def admin(body, key=admin_key):
            return httpx.post(base + "/admin/variants/champion", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {key}"})

        base_text = greedy()
        assert admin({"adapter": str(lora_a)}, key=user_key).status_code == 403
        first = admin({"adapter": str(lora_a)})
        assert first.status_code == 200, first.text
        assert first.json()["adapter"]["reason"].startswith("adapter (engine rebuilt")
        text_a = greedy()
        second = admin({"adapter": str(lora_b)})
        assert second.status_code == 200 and second.json()["adapter"]["reason"] == "adapter"
        text_b = greedy()
        assert len({base_text, text_a, text_b}) == 3, "each adapter changes the greedy output"
        back = admin({"adapter": str(lora_a)}).json()["adapter"]
        assert back["reason"] == "adapter", "switched in place, not by rebuilding the engine"
        # The engine switches when the next request for the adapter arrives (a 1-token generate with it)
        # and times that; it happens inside this request, so it is part of, and shorter than, its latency.
        started = time.perf_counter()
        assert greedy() == text_a, "switching back restores adapter A exactly"
        first_request_ms = (time.perf_counter() - started) * 1000
        engine = httpx.get(base + "/admin/variants", headers={"Authorization": f"Bearer {admin_key}"}).json()
        engine = engine["variants"][0]["engine"]
        assert engine["active_adapter"] == lora_a.stem
        assert 0 < engine["adapter_switch_ms"] < min(first_request_ms, 2000), (engine["adapter_switch_ms"],
                                                                              first_request_ms)
        missing = admin({"adapter": str(home / "adapters" / "nope.safetensors")})
        assert missing.status_code == 400 and "not found" in missing.json()["error"]["message"]
        refused = admin({"adapter": str(outside)})
        assert refused.status_code == 403 and refused.json()["error"]["param"] == "adapter", refused.text
        assert admin({}).status_code == 400
        assert greedy() == text_a, "a failed admin call leaves the variant as it was"


# --------------------------------------------------------------------------- a backend dies
def _start_upstream(home: Path, ir_dir: Path, port: int) -> subprocess.Popen:
    """A second gateway process, used as the remote OpenAI-compatible backend of the first."""
    overrides = [f"serve.port={port}", "serve.auth=false", "serve.watch=false", "serve.served_model=upstream",
                 f"serve.variants=[{{name: up, model_uri: '{ir_dir}'}}]", "serve.cache_gb=1"]
    env = {**os.environ, "LMFORGE_HOME": str(home)}
    return subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", "-c", "tiny", *overrides], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_backend_dies_mid_request_then_fallback_serves(tmp_path, ir_dir, tiny_model_dir):
    port = free_port()
    upstream = _start_upstream(tmp_path / "upstream", ir_dir, port)
    try:
        wait_for(lambda: _ready(f"http://127.0.0.1:{port}"), timeout=90, interval=0.3)
        # A url variant is a vLLM-kind variant: its model_uri supplies the tokenizer from HF weights (the
        # resolver gives vLLM/HF variants no OpenVINO IR directory).
        cfg = ServeConfig(backend="openvino", auth=False, watch=False, cache_gb=1, fallback_variant="local",
                          variants=[{"name": "remote", "model_uri": str(tiny_model_dir),
                                     "url": f"http://127.0.0.1:{port}",
                                     "weight": 1.0},
                                    {"name": "local", "model_uri": str(ir_dir), "weight": 0.0}])
        with running_gateway(build_app(cfg, tmp_path / "home")) as base:
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
            ok = client.chat.completions.with_raw_response.create(model="lmforge-assistant", messages=HELLO,
                                                                  max_tokens=4)
            assert ok.headers["x-lmforge-variant"] == "remote"
            stream = client.chat.completions.create(model="lmforge-assistant", messages=HELLO, max_tokens=1500,
                                                    stream=True)
            received = []
            with pytest.raises(openai.APIError, match="backend"):
                for chunk in stream:
                    received.append(chunk)
                    if len(received) == 3:
                        upstream.send_signal(signal.SIGKILL)
            assert len(received) >= 3, "the stream had started before the backend died"
            upstream.wait(timeout=10)

            after = client.chat.completions.with_raw_response.create(model="lmforge-assistant", messages=HELLO,
                                                                     max_tokens=4)
            assert after.headers["x-lmforge-variant"] == "local"
            assert after.parse().choices[0].message.content is not None
            assert httpx.get(base + "/health/live").status_code == 200
            ready = httpx.get(base + "/health/ready")
            assert ready.status_code == 503 and ready.json()["variants"]["remote"] == "down"
            pinned = httpx.post(base + "/v1/chat/completions",
                                json={"model": "remote", "messages": HELLO, "max_tokens": 2})
            assert pinned.status_code == 200 and pinned.headers["x-lmforge-variant"] == "local", "fallback"
    finally:
        if upstream.poll() is None:
            upstream.kill()
            upstream.wait(timeout=10)


def test_openvino_engine_process_dies_mid_request_then_fallback_serves(tmp_path, ir_dir):
    """The OpenVINO engine runs in its own process: killing it fails the request in flight with a
    clear error, the next one is served by the fallback variant, and the gateway stays up."""
    import shutil

    # A copy: variants on one model directory would share the engine (and die with it).
    fallback_ir = shutil.copytree(ir_dir, tmp_path / "fallback-ir")
    cfg = ServeConfig(backend="openvino", auth=False, watch=False, cache_gb=1, fallback_variant="local",
                      variants=[{"name": "champion", "model_uri": str(ir_dir), "weight": 1.0},
                                {"name": "local", "model_uri": str(fallback_ir), "weight": 0.0}])
    app = build_app(cfg, tmp_path / "home")
    with running_gateway(app) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        engine_pid = app.state.gateway.pool.slots["champion"].ref.backend.info()["engine_pid"]
        assert engine_pid and engine_pid != os.getpid()
        stream = client.chat.completions.create(model="lmforge-assistant", messages=HELLO, max_tokens=1500,
                                                stream=True, extra_body={"ignore_eos": True})
        received = []
        with pytest.raises(openai.APIError, match="engine"):
            for chunk in stream:
                received.append(chunk)
                if len(received) == 3:
                    os.kill(engine_pid, signal.SIGKILL)
        assert len(received) >= 3, "the stream had started before the engine died"
        after = client.chat.completions.with_raw_response.create(model="lmforge-assistant", messages=HELLO,
                                                                 max_tokens=4)
        assert after.headers["x-lmforge-variant"] == "local"
        assert httpx.get(base + "/health/live").status_code == 200
        ready = httpx.get(base + "/health/ready")
        assert ready.status_code == 503 and ready.json()["variants"]["champion"] == "down"
        app.state.gateway.feedback.flush()  # the request log says the fallback chose the variant
        with contextlib.closing(sqlite3.connect(tmp_path / "home" / "serving" / "feedback.sqlite")) as db:
            chosen = db.execute("SELECT chosen_by FROM requests WHERE request_id = ?",
                                (after.headers["x-request-id"],)).fetchone()
        assert chosen == ("fallback",)


def _finished_groups(parent, n: int) -> list[set[int]]:
    """The requests each "out" message from an engine finished, until n have."""
    groups: list[set[int]] = []
    while sum(map(len, groups)) < n:
        assert parent.poll(60), "the engine stopped answering"
        message = parent.recv()
        assert isinstance(message, msg.Out) and all(t.error is None for t in message.tokens)
        groups.append({t.rid for t in message.tokens if t.reason})
    return [g for g in groups if g]


@contextlib.contextmanager
def _engine_over_pipe(ir_dir, regroup_ms: float, queued: list[int]):
    """The OpenVINO engine loop in a thread behind a real pipe, with requests of ``queued`` new tokens
    sent before it starts (so they are admitted in one step); yields ``add(new_tokens=3, stream=False)``."""
    import multiprocessing

    from serving.backends.openvino_engine import _Engine

    parent, child = multiprocessing.Pipe()
    rids = itertools.count()

    def add(new_tokens: int = 3, stream: bool = False) -> None:
        fields = {"max_new_tokens": new_tokens, "ignore_eos": True, "do_sample": False}
        parent.send(msg.Add(next(rids), "Hello there", fields, None, stream))

    for new_tokens in queued:
        add(new_tokens)
    thread = None
    try:
        engine = _Engine(child, str(ir_dir), "CPU", 1, 8, None, {}, regroup_ms)
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        yield add, parent
    finally:
        if thread is not None:
            parent.send(msg.Close())
            thread.join(timeout=30)
        parent.close()
        child.close()
    assert thread is not None and not thread.is_alive()


@pytest.mark.parametrize("regroup_ms", [2000.0, 0.0])
def test_openvino_engine_regroups_requests_that_finished_together(ir_dir, regroup_ms):
    """Three requests admitted together finish in one step; their successors, arriving 300 ms apart,
    prefill in one step when the engine waits for them (regroup) and one by one when it does not. A
    lone finished request's successor never waits."""
    with _engine_over_pipe(ir_dir, regroup_ms, [3, 3, 3]) as (add, parent):
        assert _finished_groups(parent, 3) == [{0, 1, 2}]
        for _ in range(3):
            add()
            time.sleep(0.3)
        assert _finished_groups(parent, 3) == ([{3, 4, 5}] if regroup_ms else [{3}, {4}, {5}])
        add()
        _finished_groups(parent, 1)  # may wait for a group of 3 that does not come back: at most once
        started = time.perf_counter()
        add()
        assert _finished_groups(parent, 1) == [{7}]
        assert time.perf_counter() - started < 1.0, "a lone request's successor waited (2 s if it did)"


@pytest.mark.parametrize("regroup_ms", [2000.0, 0.0])
def test_openvino_engine_regroups_requests_that_finished_a_step_apart(ir_dir, regroup_ms):
    """A finishes one step before B and C (2 vs 3 new tokens): all three are owed a successor, so the
    successors, arriving 300 ms apart, prefill in one step with the wait (not A' + B', then C') and one
    by one without it."""
    with _engine_over_pipe(ir_dir, regroup_ms, [2, 3, 3]) as (add, parent):
        assert _finished_groups(parent, 3) == [{0}, {1, 2}]
        for _ in range(3):
            add()
            time.sleep(0.3)
        assert _finished_groups(parent, 3) == ([{3, 4, 5}] if regroup_ms else [{3}, {4}, {5}])


def test_openvino_engine_holds_new_requests_out_of_a_batch_that_ends_with_the_next_step(ir_dir):
    """A, B and C (1 new token) finish in the first step, D and E (2) are left on their last one.
    A', B' and C', arriving while the engine waits for them, are held out of that step, so they
    prefill with D' and E' and all five finish together (without the hold: A'-C', then D' and E')."""
    with _engine_over_pipe(ir_dir, 2000.0, [1, 1, 1, 2, 2]) as (add, parent):
        assert _finished_groups(parent, 3) == [{0, 1, 2}]
        for _ in range(3):
            add()
        assert _finished_groups(parent, 2) == [{3, 4}]
        add()
        add()
        assert _finished_groups(parent, 5) == [{5, 6, 7, 8, 9}]


def test_openvino_engine_sends_non_streaming_output_once_and_streaming_output_per_step(ir_dir):
    """A non-streaming request's ids cross the pipe once, when it finishes (nobody reads partial output,
    and every message wakes the gateway beside a running step); a streaming one's arrive step by step."""
    with _engine_over_pipe(ir_dir, 0.0, [4, 4]) as (add, parent):
        assert parent.poll(60)
        message = parent.recv()
        assert isinstance(message, msg.Out) and [(t.rid, len(t.ids), t.reason) for t in message.tokens] == [
            (0, 4, "length"), (1, 4, "length")], message
        add(4, stream=True)
        streamed: list[list[int]] = []
        reason = None
        while reason is None:
            assert parent.poll(60), "the engine stopped answering"
            [tokens] = parent.recv().tokens
            reason = tokens.reason
            streamed.append(tokens.ids)
        assert reason == "length" and len(streamed) >= 2 and sum(map(len, streamed)) == 4, streamed


def test_openvino_engine_holds_each_request_once(ir_dir):
    """The hold's bookkeeping on a real engine: only when every running request is on its last
    counted step, never twice for a request, and not at all while a held request is pending (step
    counts can run ahead of tokens, so a batch may outlive the step the hold waited for)."""
    import multiprocessing

    from serving.backends.openvino_engine import _Engine, _Running

    parent, child = multiprocessing.Pipe()
    try:
        engine = _Engine(child, str(ir_dir), "CPU", 1, 8, None, {}, 30.0)
        engine.active = {0: _Running(None, False, 0.0, 2)}
        engine.pending = [[1, "x", None, None, False]]
        assert not engine.hold(), "the running request has two steps left"
        engine.active[0].steps_left = 1
        assert engine.hold() and not engine.hold(), "request 1 was held twice"
        engine.pending.append([2, "y", None, None, False])
        assert not engine.hold(), "request 2 was held while request 1, already held, waited"
        engine.pending = [[3, "z", None, None, False]]
        assert engine.hold()
        engine.regroup_s = 0.0
        engine.pending, engine.held = [[4, "w", None, None, False]], set()
        assert not engine.hold(), "regroup_ms 0 turns the hold off"
    finally:
        parent.close()
        child.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(base + "/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- backends agree
def test_openvino_matches_hf_reference_greedy(ir_dir, tiny_model_dir):
    from serving.backends.base import SamplingParams
    from serving.backends.hf import HFBackend
    from serving.backends.openvino import OpenVINOBackend

    async def main():
        outputs = []
        for backend, model_dir in ((OpenVINOBackend(cache_gb=1), ir_dir), (HFBackend(), tiny_model_dir)):
            await backend.load(model_dir)
            prompt = backend.render_chat([{"role": "user", "content": "Name a colour."}])
            chunks = [c async for c in backend.generate(prompt, SamplingParams(max_tokens=12, temperature=0))]
            outputs.append(("".join(c.text for c in chunks), chunks[-1].prompt_tokens, chunks[-1].completion_tokens))
            await backend.release()
        return outputs

    openvino_out, hf_out = asyncio.run(main())
    assert openvino_out == hf_out


def test_openvino_gateway_text_without_openvino_and_pacer(ir_dir):
    """The gateway's text side (tokenizer.json + the chat template, verified at load against the
    engine's OpenVINO tokenizer) renders, counts and streams exactly what the OpenVINO tokenizer would,
    and the gateway process never imports OpenVINO; the CorePacer runs only while requests generate."""
    from serving.backends.base import SamplingParams
    from serving.backends.openvino import OpenVINOBackend
    from serving.backends.text import OpenVINOText

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo 🙂 naïve café?"}]
    params = SamplingParams(max_tokens=24, temperature=1.0, seed=3, ignore_eos=True)

    async def main():
        backend = OpenVINOBackend(cache_gb=1, keep_awake=True)
        await backend.load(ir_dir)
        assert backend.info()["detokenizer"] == "tokenizers" and backend.info()["keep_awake"]
        results = []
        for codec in (backend._text, OpenVINOText(ir_dir)):
            backend._text = codec
            prompt = backend.render_chat(chat)
            chunks = [c async for c in backend.generate(prompt, params)]
            results.append((prompt, backend.count_tokens(prompt), "".join(c.text for c in chunks),
                            chunks[-1].completion_tokens))
        await asyncio.sleep(0.1)
        idle = not backend._pacer._busy.is_set()
        await backend.release()
        return results, idle

    # A fresh interpreter: this test process may have imported OpenVINO for other tests.
    probe = ("import asyncio, sys; from pathlib import Path; from serving.backends.openvino import OpenVINOBackend\n"
             "async def main():\n    b = OpenVINOBackend(cache_gb=1); await b.load(Path(sys.argv[1]))\n"
             "    b.render_chat([{'role': 'user', 'content': 'Hi'}]); await b.release()\n"
             "asyncio.run(main()); print(sorted(m for m in sys.modules if m.split('.')[0] == 'openvino_genai'))")
    loaded = subprocess.run([sys.executable, "-c", probe, str(ir_dir)], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip().endswith("[]"), loaded.stderr[-2000:]
    (fast, slow), idle = asyncio.run(main())
    assert fast == slow and fast[3] == 24
    assert idle, "the pacer sleeps when nothing generates"


def test_gateway_text_falls_back_to_openvino_when_the_chat_template_differs(ir_dir, tmp_path):
    """A chat template that renders differently from the engine's tokenizer is not used."""
    import shutil

    import openvino_genai as ov_genai

    from serving.backends.text import HFText, openvino_reference, text_codec

    reference = openvino_reference(ov_genai.Tokenizer(str(ir_dir)), ir_dir)
    assert text_codec(ir_dir, reference).kind == "tokenizers"
    changed = shutil.copytree(ir_dir, tmp_path / "ir")
    template = changed / "chat_template.jinja"
    if template.is_file():
        template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        config = json.loads((changed / "tokenizer_config.json").read_text())
        config["chat_template"] = config["chat_template"].replace("<|im_start|>", "<|im_start|> ")
        (changed / "tokenizer_config.json").write_text(json.dumps(config))
    assert "chat template" in (HFText(changed).mismatch(reference) or "")
    assert text_codec(changed, reference).kind == "openvino"
    assert text_codec(ir_dir, None).kind == "openvino"  # no reference from the engine: no guessing


def test_release_free_heap_returns_freed_heap_to_the_os():
    """After a burst of heap allocations is freed below a live block, glibc keeps the pages; the gateway
    and the engine call release_free_heap after loading so that memory is not held for their lifetime."""
    import psutil

    from serving.backends.base import release_free_heap

    rss = lambda: psutil.Process().memory_info().rss / 2**20  # noqa: E731
    blocks = [bytes(2000) for _ in range(40_000)]  # > 512 bytes each: glibc malloc, not Python's arenas
    pinned = blocks[::50]  # live blocks spread over the heap, so free() alone cannot shrink it
    del blocks
    before = rss()
    release_free_heap()
    assert before - rss() > 30, "about 76 MiB were freed; most of it goes back to the OS"
    assert len(pinned) == 800
