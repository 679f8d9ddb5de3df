"""JSON-RPC 2.0 task API at /rpc (single calls and batch arrays).

Methods apply the same instruction templates as training (``data.templates``: system message +
the first paraphrased instruction) and parse the output with :func:`tasks.parsing.parse_completion`,
so callers get structured results: a sentiment label, an entity list, a summary, a reply. Label and
entity tasks decode constrained to their answer format (:func:`tasks.parsing.answer_pattern`) on
backends with structured output, unless ``serve.constrain_tasks`` is off.
Task routing (``serve.task_routes``) can pin a task to its own variant and LoRA adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from configs.tasks import BUILTIN_TASKS
from serving import protocol
from serving.backends.base import Constraint
from serving.errors import APIError
from serving.protocol import new_id
from serving.routes.common import context, gateway, read_body
from serving.service import Gateway, RequestContext
from tasks.parsing import answer_pattern, parse_completion

router = APIRouter()

# Every registered task is a method (configs/tasks.py): e.g. classify_sentiment, extract_entities, summarize.
METHODS = {spec.rpc_method: name for name, spec in BUILTIN_TASKS.items()}
DEFAULT_MAX_TOKENS = {name: spec.max_new_tokens for name, spec in BUILTIN_TASKS.items()}
MAX_BATCH = 64
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, SERVER_ERROR = -32700, -32600, -32601, -32602, -32000


class RPCError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


def task_messages(task: str, text: str, templates: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """System + user messages for ``task`` exactly as curation renders them (first paraphrase)."""
    template = (templates or {}).get(task) or BUILTIN_TASKS[task].template
    # str.replace, not format: the NER instruction contains JSON braces (same as tasks.data.templates).
    return [{"role": "system", "content": template.system},
            {"role": "user", "content": template.instructions[0].replace("{input}", text)}]


@router.post("/rpc")
async def rpc(request: Request) -> Response:
    base = context(request, "rpc", prefix="rpc", cost=0)
    raw = await read_body(request)
    try:
        payload = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return JSONResponse(_error(None, PARSE_ERROR, f"parse error: {err}"))
    gw = gateway(request)
    if isinstance(payload, list):
        if not payload:
            return JSONResponse(_error(None, INVALID_REQUEST, "empty batch"))
        if len(payload) > MAX_BATCH:
            return JSONResponse(_error(None, INVALID_REQUEST, f"batch of {len(payload)} calls; at most {MAX_BATCH}"))
        gw.limit(base, len(payload))  # every call is a generation: a 64-call batch costs 64
        results = await asyncio.gather(*(_call(gw, base, item) for item in payload))
        answers = [r for r in results if r is not None]
        return JSONResponse(answers) if answers else Response(status_code=204)
    gw.limit(base, 1)
    answer = await _call(gw, base, payload)
    return JSONResponse(answer) if answer is not None else Response(status_code=204)


async def _call(gw: Gateway, base: RequestContext, item: Any) -> dict[str, Any] | None:
    call_id = item.get("id") if isinstance(item, dict) else None
    if not isinstance(item, dict) or item.get("jsonrpc") != "2.0" or not isinstance(item.get("method"), str):
        return _error(call_id, INVALID_REQUEST, "invalid request: expected {\"jsonrpc\": \"2.0\", \"method\": ...}")
    if "id" in item and not isinstance(call_id, (str, int, type(None))):
        return _error(None, INVALID_REQUEST, "id must be a string, number or null")
    notification = "id" not in item
    try:
        result = await _dispatch(gw, base, item["method"], item.get("params"))
    except RPCError as err:
        return None if notification else _error(call_id, err.code, err.message, err.data)
    except APIError as err:
        code = INVALID_PARAMS if err.status == 400 else SERVER_ERROR
        return None if notification else _error(call_id, code, err.message, {"status": err.status, "code": err.code})
    return None if notification else {"jsonrpc": "2.0", "result": result, "id": call_id}


async def _dispatch(gw: Gateway, base: RequestContext, method: str, params: Any) -> dict[str, Any]:
    task = METHODS.get(method)
    if task is None:
        raise RPCError(METHOD_NOT_FOUND, f"method not found: {method!r}; methods: {', '.join(METHODS)}")
    if isinstance(params, list):
        params = {"text": params[0]} if len(params) == 1 else None
    if not isinstance(params, dict):
        raise RPCError(INVALID_PARAMS, "params must be {\"text\": ...} or [text]")
    text = params.get("text")
    if not isinstance(text, str) or not text.strip():
        raise RPCError(INVALID_PARAMS, "params.text must be a non-empty string")
    max_tokens = params.get("max_tokens", DEFAULT_MAX_TOKENS[task])
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0:
        raise RPCError(INVALID_PARAMS, f"params.max_tokens must be a positive integer, got {max_tokens!r}")
    user = params.get("user")
    ctx = dataclasses.replace(base, request_id=new_id("rpc"), route=f"rpc.{method}",
                              user=user if isinstance(user, str) else base.user, variant=None, version=None,
                              chosen_by=None)
    route = gw.cfg.task_routes.get(task)
    variant = gw.choose_variant(params.get("model", gw.cfg.served_model), ctx, pinned=route.variant if route else None)
    # Constrained where the engine can (a label from the set, entity lines of known types): the answer parses.
    pattern = answer_pattern(task) if gw.cfg.constrain_tasks else None
    sampling = gw.sampling(max_tokens, 0.0, 1.0, [], None, adapter=_adapter_name(route.adapter) if route else None,
                           stream=False, constraint=Constraint("regex", pattern) if pattern else None,
                           constraint_optional=True)
    messages = task_messages(task, text, gw.templates)
    output, finish, usage = "", "stop", {}
    try:
        async with contextlib.aclosing(gw.run(ctx, variant, lambda b: b.render_chat(messages), sampling)) as stream:
            async for _, chunk in stream:
                output += chunk.text
                if chunk.finish_reason:
                    finish, usage = chunk.finish_reason, protocol.usage(chunk.prompt_tokens, chunk.completion_tokens)
    except APIError as err:
        gw.log_request(ctx, err.status)
        raise
    gw.log_request(ctx, 200)
    label, format_ok = parse_completion(task, output)
    return {"task": task, "label": label, "format_ok": format_ok, "text": output, "finish_reason": finish,
            "usage": usage, "variant": ctx.variant, "version": ctx.version, "request_id": ctx.request_id}


def _adapter_name(adapter: str | None) -> str | None:
    """A route's adapter may be a path (loaded under its file stem) or a loaded adapter's name."""
    if adapter is None:
        return None
    from pathlib import Path

    return Path(adapter).stem


def _error(call_id: Any, code: int, message: str, data: Any = None) -> dict[str, Any]:
    error: dict[str, Any] = {"code": code, "message": message}
    if data is not None:
        error["data"] = data
    return {"jsonrpc": "2.0", "error": error, "id": call_id}
