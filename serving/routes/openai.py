"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving import protocol
from serving.backends.base import Backend, Chunk, Constraint
from serving.errors import APIError
from serving.protocol import ChatCompletionRequest, CompletionRequest
from serving.router import VARIANT_HEADER
from serving.routes.common import context, gateway, parse, read_json
from serving.service import Gateway, RequestContext
from serving.structured import check_constraint

log = logging.getLogger(__name__)
router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    context(request, "models")
    gw = gateway(request)
    cards = [protocol.model_card(gw.cfg.served_model, variants=list(gw.pool.slots))]
    cards += [protocol.model_card(name, version=slot.ref.version if slot.ref else None, state=slot.state,
                                  adapters=slot.ref.backend.adapters() if slot.ref else [])
              for name, slot in gw.pool.slots.items()]
    # Runtime adapters as vLLM lists them: a model whose parent is the served model, root its path.
    cards += [protocol.model_card(name, parent=gw.cfg.served_model, root=str(path)) for name, path in gw.loras.items()]
    return JSONResponse({"object": "list", "data": cards})


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> JSONResponse:
    """vLLM's runtime adapter loading (same request shape); admin keys only, paths inside the allowed roots."""
    context(request, "admin", admin=True)
    body = parse(protocol.LoadLoRARequest, await read_json(request))
    return JSONResponse(await gateway(request).load_lora(body.lora_name, body.lora_path))


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> JSONResponse:
    context(request, "admin", admin=True)
    body = parse(protocol.UnloadLoRARequest, await read_json(request))
    gateway(request).unload_lora(body.lora_name)
    return JSONResponse({"lora_name": body.lora_name, "unloaded": True})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    ctx = context(request, "chat", cost=0)
    body = parse(ChatCompletionRequest, await read_json(request))
    gateway(request).limit(ctx, body.n)
    messages = body.chat()
    return await _serve(request, ctx, body, lambda backend: backend.render_chat(messages), chat=True)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    ctx = context(request, "completions", prefix="cmpl", cost=0)
    body = parse(CompletionRequest, await read_json(request))
    gateway(request).limit(ctx, len(body.prompt) * body.n)
    if len(body.prompt) > 1:
        if body.stream:
            raise APIError(400, "streaming supports a single prompt", param="prompt")
        if body.n > 1:
            raise APIError(400, "use n > 1 with a single prompt", param="n")
        return await _batch_completions(request, ctx, body)
    prompt = body.prompt[0]
    return await _serve(request, ctx, body, lambda _: prompt, chat=False, echo=prompt if body.echo else "")


async def _serve(request: Request, ctx: RequestContext, body, build: Callable[[Backend], str], chat: bool,
                 echo: str = "") -> Response:
    gw = gateway(request)
    ctx.user = body.user or ctx.user
    routed, adapter = gw.model_and_adapter(body.model)
    variant = gw.choose_variant(routed, ctx)
    params = gw.sampling(body.max_tokens, body.temperature, body.top_p, body.stop, body.seed, adapter=adapter,
                         ignore_eos=body.ignore_eos, stream=bool(body.stream), constraint=_constraint(body))
    stream = gw.run(ctx, variant, build, params, body.n)
    model = body.model
    if not body.stream:
        texts, finishes = [echo] * body.n, ["stop"] * body.n
        prompt_tokens = completion_tokens = 0
        engine_s = 0.0
        try:
            async with contextlib.aclosing(stream):
                async for index, chunk in stream:
                    texts[index] += chunk.text
                    if chunk.finish_reason:
                        finishes[index] = chunk.finish_reason
                        prompt_tokens = chunk.prompt_tokens
                        completion_tokens += chunk.completion_tokens
                        engine_s = max(engine_s, chunk.engine_s)
        except APIError as err:
            gw.log_request(ctx, err.status)
            raise
        gw.log_request(ctx, 200)
        build_response = protocol.chat_response if chat else protocol.completion_response
        payload = build_response(ctx.request_id, model, texts, finishes, prompt_tokens, completion_tokens)
        return JSONResponse(payload, headers=_headers(ctx, engine_s))
    # Streaming: wait for the first chunk before answering, so admission, validation and the
    # first-attempt failures still produce a proper HTTP status and the right variant header.
    try:
        first = await anext(stream)
    except StopAsyncIteration:
        first = None
    except APIError as err:
        await stream.aclose()
        gw.log_request(ctx, err.status)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    events = _sse(gw, ctx, stream, first, model, chat, body.n, include_usage, echo)
    return _StallGuardedStream(events, gw, ctx, media_type="text/event-stream", headers=_headers(ctx))


class _ClientStalled(Exception):
    pass


class _StallGuardedStream(StreamingResponse):
    """A streamed response whose writes wait at most ``serve.stream_write_timeout_s`` for the client.

    Why: a client that stops reading (but keeps the connection) fills the socket buffers, and every
    write then waits for it; the event generator, suspended at its ``yield``, would hold its admission
    slot (and the engine its sequence) for as long as the client lives. On the timeout the generator
    is closed, which frees both, and the connection is dropped.
    """

    def __init__(self, content: AsyncGenerator[bytes, None], gw: Gateway, ctx: RequestContext, **kwargs):
        super().__init__(content, **kwargs)
        self.gw, self.ctx = gw, ctx
        self._events = content  # what starlette keeps as body_iterator, typed as the generator it is

    async def stream_response(self, send) -> None:
        timeout = self.gw.cfg.stream_write_timeout_s

        async def guarded(message) -> None:
            try:
                async with asyncio.timeout(timeout):
                    await send(message)
            except TimeoutError:
                raise _ClientStalled from None

        try:
            await super().stream_response(guarded)
        except _ClientStalled:
            await self._events.aclose()  # runs the generator's cleanup now: slots freed, request logged
            self.gw.metrics.errors.labels(self.ctx.variant or "none", "client_stalled").inc()
            log.warning("request %s: the client read nothing for %.0fs; stream ended, its slots freed",
                        self.ctx.request_id, timeout)
            # Returning without the final message makes the server close the connection.


async def _sse(gw, ctx: RequestContext, stream: AsyncGenerator[tuple[int, Chunk], None], first, model: str, chat: bool,
               n: int, include_usage: bool, echo: str) -> AsyncGenerator[bytes, None]:
    created = int(time.time())
    rid = ctx.request_id
    prompt_tokens = completion_tokens = 0
    status = 200
    try:
        async with contextlib.aclosing(stream):
            if chat:
                for index in range(n):
                    yield _event(protocol.chat_chunk(rid, model, created, index, {"role": "assistant", "content": ""}))
            elif echo:
                for index in range(n):
                    yield _event(protocol.completion_chunk(rid, model, created, index, echo))
            pending = [first] if first is not None else []
            while True:
                if pending:
                    index, chunk = pending.pop()
                else:
                    try:
                        index, chunk = await anext(stream)
                    except StopAsyncIteration:
                        break
                if chunk.finish_reason:
                    prompt_tokens = chunk.prompt_tokens
                    completion_tokens += chunk.completion_tokens
                if not chunk.text and not chunk.finish_reason:
                    continue
                if chat:
                    delta = {"content": chunk.text} if chunk.text else {}
                    yield _event(protocol.chat_chunk(rid, model, created, index, delta, chunk.finish_reason))
                else:
                    yield _event(protocol.completion_chunk(rid, model, created, index, chunk.text,
                                                           chunk.finish_reason))
        if include_usage:
            kind = "chat.completion.chunk" if chat else "text_completion"
            yield _event({"id": rid, "object": kind, "created": created, "model": model, "choices": [],
                          "usage": protocol.usage(prompt_tokens, completion_tokens)})
        yield b"data: [DONE]\n\n"
    except APIError as err:
        # Headers are gone; the OpenAI clients raise on an error event in the stream.
        status = err.status
        yield _event(err.body())
    except (GeneratorExit, asyncio.CancelledError):
        status = 499  # the client went away or stopped reading (nginx's "client closed request")
        raise
    finally:
        gw.log_request(ctx, status)


def _event(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _batch_completions(request: Request, ctx: RequestContext, body: CompletionRequest) -> Response:
    gw = gateway(request)
    ctx.user = body.user or ctx.user
    routed, adapter = gw.model_and_adapter(body.model)
    variant = gw.choose_variant(routed, ctx)
    stop = cast(list[str], body.stop)  # CompletionRequest's validator made it a list
    params = gw.sampling(body.max_tokens, body.temperature, body.top_p, stop, body.seed, adapter=adapter,
                         ignore_eos=body.ignore_eos, stream=False, constraint=_constraint(body))

    async def one(prompt: str) -> tuple[str, str, int, int]:
        text, finish, p_tokens, c_tokens = "", "stop", 0, 0
        async with contextlib.aclosing(gw.run(ctx, variant, lambda _: prompt, params)) as stream:
            async for _, chunk in stream:
                text += chunk.text
                if chunk.finish_reason:
                    finish, p_tokens, c_tokens = chunk.finish_reason, chunk.prompt_tokens, chunk.completion_tokens
        return text, finish, p_tokens, c_tokens

    try:
        results = await asyncio.gather(*(one(p) for p in body.prompt))
    except APIError as err:
        gw.log_request(ctx, err.status)
        raise
    gw.log_request(ctx, 200)
    payload = protocol.completion_response(
        ctx.request_id, body.model, [r[0] for r in results], [r[1] for r in results],
        sum(r[2] for r in results), sum(r[3] for r in results))
    return JSONResponse(payload, headers=_headers(ctx))


def _constraint(body: ChatCompletionRequest | CompletionRequest) -> Constraint | None:
    """The request's structured-output constraint, compiled once here (a 400 if it cannot be)."""
    param = "structured_outputs" if body.structured_outputs is not None else "response_format"
    return check_constraint(body.constraint(), param)


def _headers(ctx: RequestContext, engine_s: float = 0.0) -> dict[str, str]:
    headers = {"X-Request-Id": ctx.request_id}
    if engine_s:  # W3C Server-Timing: the client's latency minus this is what the gateway and network added
        headers["Server-Timing"] = f"engine;dur={engine_s * 1000:.2f}"
    if ctx.variant:
        headers[VARIANT_HEADER] = ctx.variant
    if ctx.version:
        headers["X-Lmforge-Version"] = ctx.version
    return headers
