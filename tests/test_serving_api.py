"""The gateway's public API against the real app and the tiny model on OpenVINO, via the official
``openai`` client (sync, async, streaming), raw HTTP for bad input, and JSON-RPC."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time

import httpx
import openai
import pytest

from configs.data_schema import DEFAULT_TEMPLATES
from configs.schema import ServeConfig
from serving.app import build_app
from serving.auth import KeyStore
from serving.feedback import ab_report
from serving.routes.rpc import DEFAULT_MAX_TOKENS
from tasks.parsing import answer_pattern, parse_completion
from tests.serving_helpers import running_gateway

MODEL = "lmforge-assistant"
HELLO = [{"role": "user", "content": "Say hello."}]
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def ir_dir(tiny_ir_dir):
    return tiny_ir_dir


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, ir_dir, tiny_model_dir):
    home = tmp_path_factory.mktemp("serve-home")
    store = KeyStore(home / "serving" / "keys.sqlite")
    keys = {
        "user": store.add("user")[0],
        "ops": store.add("ops", admin=True)[0],  # pins variants: an admin privilege
        "limited": store.add("limited", rate_per_minute=1, burst=2)[0],
        "doomed": store.add("doomed")[0],
        "low": store.add("low", priority="low")[0],
        # 66 generations, then about one a minute: what the generation counting test spends.
        "batch": store.add("batch", rate_per_minute=1, burst=66)[0],
        "n": store.add("n", rate_per_minute=1, burst=7)[0],
        "once": store.add("once", rate_per_minute=1, burst=1)[0],
    }
    cfg = ServeConfig(
        backend="openvino", watch=False, auth=True, cache_gb=1, max_tokens_limit=1024, max_body_bytes=BODY_LIMIT,
        variants=[{"name": "champion", "model_uri": str(ir_dir), "weight": 0.9},
                  {"name": "challenger", "model_uri": str(ir_dir), "weight": 0.1}],
        task_routes={"summarization": {"variant": "challenger"}},
        # f32: on a CPU with AVX512-BF16 OpenVINO computes in bf16 by default, and a random model's flat
        # distributions then sample differently once the prompt comes from the prefix cache (seed test).
        inference_precision="f32",
    )
    app = build_app(cfg, home)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))  # what training renders prompts with
    with running_gateway(app) as base:
        yield {"base": base, "keys": keys, "store": store, "home": home, "app": app, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def client(gateway):
    """An admin key's client: the tests below pin variants ("champion") to compare outputs."""
    return openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["ops"], max_retries=0)


def _post(gateway, path, content, key="user", headers=None):
    headers = {"Authorization": f"Bearer {gateway['keys'][key]}", **(headers or {})}
    if isinstance(content, (dict, list)):
        return httpx.post(gateway["base"] + path, json=content, headers=headers, timeout=60)
    return httpx.post(gateway["base"] + path, content=content, headers=headers, timeout=60)


# --------------------------------------------------------------------------- openai client
def test_sync_chat_and_completions(client):
    started = time.perf_counter()
    raw = client.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, max_tokens=6, user="ann",
                                                            temperature=0)
    latency_ms = (time.perf_counter() - started) * 1000
    chat = raw.parse()
    assert raw.headers["x-lmforge-variant"] in ("champion", "challenger")
    timing = raw.headers["server-timing"]  # engine;dur=<ms>: what the engine took of the client's latency
    assert timing.startswith("engine;dur=") and 0 < float(timing.split("=")[1]) < latency_ms
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.completion_tokens == 6 or chat.choices[0].finish_reason == "stop"
    assert chat.usage.prompt_tokens > 5
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    done = client.completions.create(model="champion", prompt="Once upon a time", max_tokens=5, n=3,
                                     temperature=0.9, seed=7)
    assert [c.index for c in done.choices] == [0, 1, 2]
    assert done.usage.completion_tokens == sum(1 for _ in done.choices) * 5
    again = client.completions.create(model="champion", prompt="Once upon a time", max_tokens=5, n=3,
                                      temperature=0.9, seed=7)
    assert [c.text for c in again.choices] == [c.text for c in done.choices], "same seed, same samples"
    assert len({c.text for c in done.choices}) > 1, "n samples with seed+i differ"


def test_stop_sequences_cut_the_output(client):
    full = client.completions.create(model="champion", prompt="The", max_tokens=12, temperature=0.8, seed=3)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[2:4]
    cut = client.completions.create(model="champion", prompt="The", max_tokens=12, temperature=0.8, seed=3,
                                    stop=[stop])
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_streaming_matches_non_streaming(client):
    plain = client.chat.completions.create(model="champion", messages=HELLO, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model="champion", messages=HELLO, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="champion", prompt="Hello", max_tokens=8, temperature=0, stream=True))
    assert streamed == client.completions.create(model="champion", prompt="Hello", max_tokens=8,
                                                 temperature=0).choices[0].text


def test_async_client_concurrent(gateway):
    async def main():
        client = openai.AsyncOpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["user"], max_retries=0)
        calls = [client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, user=f"u{i}")
                 for i in range(8)]
        stream = await client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=8, stream=True)
        results = await asyncio.gather(*calls)
        parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await client.close()
        return results, parts

    results, parts = asyncio.run(main())
    assert all(r.usage.completion_tokens >= 1 for r in results)
    assert len({r.id for r in results}) == 8
    assert "".join(parts)


def test_models_health_metrics(gateway, client):
    # This test's own traffic, so the metric lines below do not depend on what other tests ran.
    client.chat.completions.create(model="champion", messages=HELLO, max_tokens=2)
    ids = [m.id for m in client.models.list().data]
    assert ids == [MODEL, "champion", "challenger"]
    assert httpx.get(gateway["base"] + "/health/live").status_code == 200
    ready = httpx.get(gateway["base"] + "/health/ready").json()
    assert ready["status"] == "ready" and set(ready["variants"].values()) == {"ready"}
    metrics = httpx.get(gateway["base"] + "/metrics").text
    assert 'lmforge_requests_total{route="chat",status="200",variant="champion"}' in metrics
    assert 'lmforge_ttft_seconds_count{variant="champion"}' in metrics
    assert 'lmforge_tokens_total{kind="completion",variant="champion"}' in metrics


def _responses(gateway) -> dict[tuple[str, str], float]:
    from prometheus_client.parser import text_string_to_metric_families

    families = text_string_to_metric_families(httpx.get(gateway["base"] + "/metrics").text)
    return {(s.labels["route"], s.labels["status"]): s.value for f in families
            if f.name == "lmforge_http_responses" for s in f.samples if s.name.endswith("_total")}


def test_metrics_count_refused_requests_by_route_and_status(gateway):
    before = _responses(gateway)
    _post(gateway, CHAT, {"model": MODEL, "messages": []})  # 400
    _post(gateway, CHAT, b"{oops")  # 400
    httpx.post(gateway["base"] + CHAT, json={"model": MODEL, "messages": HELLO})  # 401: no key
    _post(gateway, CHAT, {"model": "gpt-99", "messages": HELLO})  # 404: unknown model
    _post(gateway, "/v1/engines", {})  # 404: no such route
    _post(gateway, "/rpc", b"x" * (BODY_LIMIT + 1))  # 413
    _post(gateway, "/v1/feedback", {"request_id": "chatcmpl-nope", "score": 1})  # 404
    once = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["once"], max_retries=0)
    once.models.list()  # 200
    with pytest.raises(openai.RateLimitError):
        once.models.list()  # 429
    after = _responses(gateway)
    grown = {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}
    expected = {(CHAT, "400"): 2, (CHAT, "401"): 1, (CHAT, "404"): 1, ("unmatched", "404"): 1, ("/rpc", "413"): 1,
                ("/v1/feedback", "404"): 1, ("/v1/models", "429"): 1}
    assert {k: v for k, v in grown.items() if k != ("/v1/models", "200") and k[0] != "/metrics"} == expected


# --------------------------------------------------------------------------- auth and limits
def test_auth_no_key_wrong_key_revoked_key(gateway):
    base = gateway["base"] + "/v1"
    no_key = httpx.post(base + "/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert no_key.status_code == 401 and "missing API key" in no_key.json()["error"]["message"]
    with pytest.raises(openai.AuthenticationError, match="invalid API key"):
        openai.OpenAI(base_url=base, api_key="lmf_deadbeef_nottherightsecret", max_retries=0).models.list()
    doomed = openai.OpenAI(base_url=base, api_key=gateway["keys"]["doomed"], max_retries=0)
    assert doomed.models.list().data
    assert gateway["store"].revoke("doomed") == 1
    with pytest.raises(openai.AuthenticationError, match="revoked"):
        doomed.models.list()
    assert no_key.json()["error"]["type"] == "authentication_error"


def test_rate_limit_429_with_retry_after(gateway):
    client = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["limited"], max_retries=0)
    client.models.list()
    client.models.list()
    with pytest.raises(openai.RateLimitError) as info:
        client.models.list()
    assert int(info.value.response.headers["retry-after"]) >= 1
    assert info.value.body["code"] == "rate_limit_exceeded"


def test_rate_limits_count_generations(gateway):
    """A 64-call JSON-RPC batch costs 64 of the key's 66; two more generations, then 429. n samples and
    prompt lists cost one each."""
    batch = [{"jsonrpc": "2.0", "method": "generate", "params": {"text": f"hi {i}", "max_tokens": 1}, "id": i}
             for i in range(64)]
    assert len(_post(gateway, "/rpc", batch, key="batch").json()) == 64
    for _ in range(2):
        assert _post(gateway, "/rpc", batch[0], key="batch").status_code == 200
    refused = _post(gateway, "/rpc", batch[0], key="batch")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert "costs 1 generation" in refused.json()["error"]["message"]

    client = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["n"], max_retries=0)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=1, n=3)  # 3 of 7
    client.completions.create(model=MODEL, prompt=["a", "b", "c"], max_tokens=1)  # 6 of 7
    with pytest.raises(openai.RateLimitError, match="costs 2 generations"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=1, n=2)
    client.completions.create(model=MODEL, prompt="a", max_tokens=1)  # the 7th


def test_rate_limits_apply_per_client_address_without_auth(tmp_path, ir_dir):
    cfg = ServeConfig(backend="openvino", watch=False, auth=False, cache_gb=1, rate_limit_per_minute=1,
                      rate_limit_burst=3, variants=[{"name": "champion", "model_uri": str(ir_dir)}])
    with running_gateway(build_app(cfg, tmp_path / "home")) as base:
        body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1}
        codes = [httpx.post(base + "/v1/completions", json=body, timeout=60).status_code for _ in range(4)]
        assert codes == [200, 200, 200, 429]
        refused = httpx.post(base + "/v1/completions", json=body, timeout=60)
        assert "client 127.0.0.1" in refused.json()["error"]["message"] and int(refused.headers["retry-after"]) >= 1


# --------------------------------------------------------------------------- bad input
CHAT = "/v1/chat/completions"
BAD_INPUTS = [
    ("malformed json", CHAT, b'{"model": "lmforge-assistant", "messages": [', 400, "malformed JSON"),
    ("invalid utf-8", CHAT, b'{"model": "lmforge-assistant", "messages": [{"role": "user", "content": "\xff\xfe"}]}',
     400, "not valid UTF-8"),
    ("not an object", CHAT, b"[1, 2]", 400, "must be a JSON object"),
    ("empty body", CHAT, b"", 400, "empty"),
    ("unknown model", CHAT, {"model": "gpt-99", "messages": HELLO}, 404, "does not exist"),
    ("empty messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("no text", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "  "}]}, 400, "no user or system"),
    ("non-string content", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": 42}]}, 400,
     "content must be a string"),
    ("image part", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "only text content"),
    ("bad role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "role"),
    ("max_tokens zero", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 0}, 400, "positive"),
    ("max_tokens negative", "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": -3}, 400, "positive"),
    ("max_tokens huge", CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 10**9}, 400, "largest allowed"),
    ("prompt + max_tokens > context", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 1200}],
                                             "max_tokens": 1000}, 400, "exceeds the context"),
    ("prompt longer than context", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": "word " * 2500}]},
     400, "context"),
    ("temperature out of range", CHAT, {"model": MODEL, "messages": HELLO, "temperature": 7}, 400, "temperature"),
    ("too many stops", CHAT, {"model": MODEL, "messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ("token-id prompt", "/v1/completions", {"model": MODEL, "prompt": [1, 2, 3]}, 400, "prompt"),
    ("unknown route", "/v1/engines", {"model": MODEL}, 404, "no such endpoint"),
]


@pytest.mark.parametrize("name,path,body,status,needle", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_a_clear_4xx(gateway, name, path, body, status, needle):
    response = _post(gateway, path, body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert needle.lower() in error["message"].lower(), error
    assert set(error) == {"message", "type", "param", "code"}


def _raw(gateway, path: str, headers: dict[str, str], parts: list[bytes], wait: float = 5.0) -> bytes:
    """POST over a bare socket: the head, then ``parts`` as they are; the start of the answer (b"" if none
    came within ``wait`` seconds: the server is still waiting for the body)."""
    import socket
    from urllib.parse import urlsplit

    url = urlsplit(gateway["base"])
    head = {"Host": url.netloc, "Authorization": f"Bearer {gateway['keys']['user']}",
            "Content-Type": "application/json", **headers}
    with socket.create_connection((url.hostname, url.port), timeout=wait) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\n".encode() + "".join(f"{k}: {v}\r\n" for k, v in head.items()).encode()
                     + b"\r\n")
        for part in parts:
            sock.sendall(part)
        try:
            return sock.recv(65536)
        except TimeoutError:
            return b""


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


@pytest.mark.parametrize("path", [CHAT, "/rpc"])
def test_body_over_the_limit_by_content_length_is_refused_unread(gateway, path):
    """A Content-Length over serve.max_body_bytes gets 413 at once, without the body ever being sent."""
    declared = _raw(gateway, path, {"Content-Length": str(10 * 1024 * 1024)}, [b'{"model": '])
    assert declared.startswith(b"HTTP/1.1 413"), declared[:200]
    assert b"limit is 65536" in declared and b"connection: close" in declared.lower()


@pytest.mark.parametrize("path", [CHAT, "/rpc"])
def test_chunked_body_is_refused_as_soon_as_it_passes_the_limit(gateway, path):
    """A chunked upload gets 413 once it passes the limit, before its end; under the limit it is served."""
    # 8 bytes past the 64 KiB limit and no final chunk: the upload has not ended when the 413 comes. (Sending
    # more after the limit races the server's close: unread bytes make the kernel reset the connection.)
    over = [_chunk(b'{"text": "' + b"x" * 8190)] + [_chunk(b"y" * 8192)] * 7
    streamed = _raw(gateway, path, {"Transfer-Encoding": "chunked"}, over)
    assert streamed.startswith(b"HTTP/1.1 413"), streamed[:200]
    assert b"over the limit of 65536" in streamed

    rpc_call = {"jsonrpc": "2.0", "method": "classify_sentiment", "params": {"text": "Fine."}, "id": 1}
    small = json.dumps({"model": MODEL, "messages": HELLO, "max_tokens": 1} if path == CHAT else rpc_call).encode()
    ok = _raw(gateway, path, {"Transfer-Encoding": "chunked"}, [_chunk(small[:10]), _chunk(small[10:]), b"0\r\n\r\n"],
              wait=30)
    assert ok.startswith(b"HTTP/1.1 200"), ok[:300]


def _holds(obj, needle: str, depth: int = 4, seen: set[int] | None = None) -> bool:
    """Whether ``obj`` keeps a string containing ``needle`` (in attributes and containers, ``depth`` deep)."""
    seen = set() if seen is None else seen
    if isinstance(obj, str):
        return needle in obj
    if depth < 0 or id(obj) in seen or isinstance(obj, (int, float, bytes, type)):
        return False
    seen.add(id(obj))
    if isinstance(obj, dict):
        items = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    else:
        items = list(getattr(obj, "__dict__", {}).values())
    return any(_holds(item, needle, depth - 1, seen) for item in items)


def test_rejected_prompts_are_not_kept(gateway):
    """A prompt refused for its length leaves nothing behind in the engines (the token-count cache kept
    every prompt it counted, up to 256 of them of any size)."""
    marker = "unkept-marker-4711"
    response = _post(gateway, CHAT, {"model": MODEL, "messages": [{"role": "user", "content": f"{marker} " * 2500}]})
    assert response.status_code == 400 and "context" in response.json()["error"]["message"]
    engines = {id(s.ref): s.ref.backend for s in gateway["app"].state.gateway.pool.slots.values() if s.ref}
    assert engines and not any(_holds(backend, marker) for backend in engines.values())


def test_gateway_survives_bad_input(client, gateway):
    for body in (b"\x00\x01", b'{"model": 1}', b'{"messages": "nope"}', b"null"):
        assert 400 <= _post(gateway, CHAT, body).status_code < 500
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).choices


# --------------------------------------------------------------------------- A/B, feedback
def test_sticky_assignment_override_and_feedback(gateway, client):
    seen = {client.chat.completions.with_raw_response.create(
        model=MODEL, messages=HELLO, max_tokens=1, user="sticky-user").headers["x-lmforge-variant"] for _ in range(4)}
    assert len(seen) == 1
    header = {"X-User-Id": "sticky-user"}
    via_header = _post(gateway, CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 1}, headers=header)
    assert via_header.headers["x-lmforge-variant"] in seen
    other = ({"champion", "challenger"} - seen).pop()
    forced = _post(gateway, CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 1}, key="ops",
                   headers={**header, "X-Lmforge-Variant": other})
    assert forced.status_code == 200 and forced.headers["x-lmforge-variant"] == other

    ok = _post(gateway, "/v1/feedback", {"request_id": forced.json()["id"], "score": 1}, key="ops")
    assert ok.status_code == 200 and ok.json()["variant"] == other
    bad = _post(gateway, "/v1/feedback", {"request_id": via_header.json()["id"], "score": 0})
    assert bad.json()["variant"] in seen
    missing = _post(gateway, "/v1/feedback", {"request_id": "chatcmpl-nope", "score": 1})
    assert missing.status_code == 404
    out_of_range = _post(gateway, "/v1/feedback", {"request_id": forced.json()["id"], "score": 5}, key="ops")
    assert out_of_range.status_code == 400
    report = ab_report(gateway["home"] / "serving" / "feedback.sqlite")
    rows = {r["variant"]: r for r in report["variants"]}
    assert rows[other]["successes"] >= 1 and rows[other]["feedback"] >= 1
    assert sum(r["requests"] for r in rows.values()) >= 6


def _logged(gateway, request_id: str) -> dict:
    import sqlite3

    gateway["app"].state.gateway.feedback.flush()
    with contextlib.closing(sqlite3.connect(gateway["home"] / "serving" / "feedback.sqlite")) as db:
        db.row_factory = sqlite3.Row
        return dict(db.execute("SELECT * FROM requests WHERE request_id = ?", (request_id,)).fetchone())


def test_feedback_once_per_request_from_the_key_that_made_it(gateway):
    served = _post(gateway, CHAT, {"model": MODEL, "messages": HELLO, "max_tokens": 1})
    rid = served.json()["id"]
    other = _post(gateway, "/v1/feedback", {"request_id": rid, "score": 1}, key="low")
    assert other.status_code == 403 and other.json()["error"]["code"] == "not_your_request"
    assert _post(gateway, "/v1/feedback", {"request_id": rid, "score": 1}).status_code == 200
    again = _post(gateway, "/v1/feedback", {"request_id": rid, "score": 0})
    assert again.status_code == 409 and "already has feedback" in again.json()["error"]["message"]
    import sqlite3

    with contextlib.closing(sqlite3.connect(gateway["home"] / "serving" / "feedback.sqlite")) as db:
        assert db.execute("SELECT score FROM feedback WHERE request_id = ?", (rid,)).fetchall() == [(1.0,)]


def test_pinning_a_variant_needs_an_admin_key_and_the_log_says_how_a_variant_was_chosen(gateway):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 1}
    by_header = _post(gateway, CHAT, body, headers={"X-Lmforge-Variant": "challenger"})
    by_model = _post(gateway, CHAT, {**body, "model": "challenger"})
    by_rpc = _post(gateway, "/rpc", {"jsonrpc": "2.0", "method": "generate", "id": 1,
                                     "params": {"text": "hi", "max_tokens": 1, "model": "challenger"}})
    for refused, param in ((by_header, "X-Lmforge-Variant"), (by_model, "model")):
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "pin_not_allowed" and refused.json()["error"]["param"] == param
    assert by_rpc.json()["error"]["data"] == {"status": 403, "code": "pin_not_allowed"}

    hashed = _post(gateway, CHAT, {**body, "user": "someone"})
    pinned = _post(gateway, CHAT, body, key="ops", headers={"X-Lmforge-Variant": "challenger"})
    routed = _post(gateway, "/rpc", {"jsonrpc": "2.0", "method": "summarize", "id": 2,
                                     "params": {"text": "A: hi\nB: hello", "max_tokens": 1}}).json()["result"]
    assert pinned.headers["x-lmforge-variant"] == "challenger" and routed["variant"] == "challenger"
    assert _logged(gateway, hashed.json()["id"])["chosen_by"] == "hash"
    assert _logged(gateway, pinned.json()["id"])["chosen_by"] == "pin"
    assert _logged(gateway, routed["request_id"])["chosen_by"] == "route"


# --------------------------------------------------------------------------- JSON-RPC
def test_rpc_batch_tasks_and_errors(gateway):
    calls = [
        {"jsonrpc": "2.0", "method": "classify_sentiment", "params": {"text": "A wonderful film."}, "id": 1},
        {"jsonrpc": "2.0", "method": "extract_entities", "params": ["Angela Merkel visited Paris."], "id": "b"},
        {"jsonrpc": "2.0", "method": "summarize", "params": {"text": "A: hi\nB: hello", "max_tokens": 5}, "id": 3},
        {"jsonrpc": "2.0", "method": "generate", "params": {"text": "A: how are you?", "max_tokens": 3}},
        {"jsonrpc": "2.0", "method": "translate", "params": {"text": "x"}, "id": 5},
        {"jsonrpc": "2.0", "method": "summarize", "params": {"text": ""}, "id": 6},
        {"method": "summarize", "id": 7},
    ]
    response = _post(gateway, "/rpc", calls)
    assert response.status_code == 200
    answers = {a["id"]: a for a in response.json()}
    assert set(answers) == {1, "b", 3, 5, 6, 7}, "the notification gets no answer"
    sentiment, ner, summary = answers[1]["result"], answers["b"]["result"], answers[3]["result"]
    assert sentiment["task"] == "sentiment" and sentiment["variant"] in ("champion", "challenger")
    # The prompt training renders (tasks.data.templates.render, the HF tokenizer's chat template, the
    # paraphrase the RPC methods use), sent raw through /v1/completions under the same answer-format
    # constraint: same tokens, same greedy output.
    client = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["ops"], max_retries=0)
    for task, text, result, max_tokens in (
            ("sentiment", "A wonderful film.", sentiment, DEFAULT_MAX_TOKENS["sentiment"]),
            ("ner", "Angela Merkel visited Paris.", ner, DEFAULT_MAX_TOKENS["ner"]),
            ("summarization", "A: hi\nB: hello", summary, 5)):
        prompt = _training_prompt(gateway["tokenizer"], task, text)
        done = client.completions.create(model=result["variant"], prompt=prompt, temperature=0, max_tokens=max_tokens,
                                         extra_body=_task_constraint(task))
        assert result["text"] == done.choices[0].text
        assert result["usage"]["prompt_tokens"] == done.usage.prompt_tokens
        assert [result["label"], result["format_ok"]] == list(parse_completion(task, result["text"]))
    assert isinstance(ner["label"], list)
    assert summary["finish_reason"] in ("stop", "length") and isinstance(summary["label"], str)
    assert answers[5]["error"]["code"] == -32601
    assert answers[6]["error"]["code"] == -32602
    assert answers[7]["error"]["code"] == -32600
    assert _post(gateway, "/rpc", b"{oops").json()["error"]["code"] == -32700
    assert _post(gateway, "/rpc", []).json()["error"]["code"] == -32600


def _task_constraint(task: str) -> dict:
    """What the RPC methods decode under (serve.constrain_tasks): label and entity tasks follow their answer format."""
    pattern = answer_pattern(task)
    return {"structured_outputs": {"regex": pattern}} if pattern else {}


def _training_prompt(tokenizer, task: str, text: str) -> str:
    """The prompt training renders for ``text`` with the paraphrase the RPC methods use (the first)."""
    from tasks.data.templates import render

    for i in itertools.count():  # render picks the paraphrase from the record id: find an id that gets the first
        rendered = render(f"rpc-{i}", task, text, "", DEFAULT_TEMPLATES[task], tokenizer)
        if rendered["template"] == 0:
            return rendered["prompt"]


def test_rpc_prompts_are_the_prompts_training_renders(gateway):
    """The JSON-RPC methods' prompts, as the engine's tokenizer renders them, equal what training's
    renderer makes of the same text (for every task), compared on the prompt token count the engine
    reports and the greedy completion."""
    client = openai.OpenAI(base_url=gateway["base"] + "/v1", api_key=gateway["keys"]["ops"], max_retries=0)
    for method, task in (("classify_sentiment", "sentiment"), ("extract_entities", "ner"),
                         ("summarize", "summarization"), ("generate", "generation")):
        text = "Obama met Merkel in Berlin on a rainy day; both said the talks were useful."
        call = {"jsonrpc": "2.0", "method": method, "params": {"text": text, "max_tokens": 24, "model": "champion"},
                "id": 1}
        result = _post(gateway, "/rpc", call, key="ops").json()["result"]
        done = client.completions.create(model="champion", prompt=_training_prompt(gateway["tokenizer"], task, text),
                                         temperature=0, max_tokens=24, extra_body=_task_constraint(task))
        assert (result["usage"]["prompt_tokens"], result["text"]) == (done.usage.prompt_tokens, done.choices[0].text)
