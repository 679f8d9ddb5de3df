"""The gateway's request handling, independent of HTTP: auth, admission, variant choice, generation
with timeout and fallback, metrics and the request log. Routes are thin adapters over this.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.schema import ServeConfig
from serving.auth import ApiKey, AuthError, KeyStore, RateLimiter, SqlRateLimiter
from serving.backends import pick_kind
from serving.backends.base import Backend, BackendError, BackendInputError, Chunk, Constraint, SamplingParams
from serving.db import state_locations
from serving.engine import VariantPool, VariantUnavailable
from serving.errors import APIError
from serving.feedback import FeedbackStore
from serving.metrics import Metrics
from serving.promotion import PromotionRefused
from serving.registry import AliasNotFound
from serving.router import ABRouter

if TYPE_CHECKING:
    from serving.watcher import RegistryWatcher

log = logging.getLogger(__name__)


@dataclasses.dataclass
class RequestContext:
    """What the gateway knows about one request while serving it."""

    request_id: str
    route: str
    client: str = "anonymous"
    """Who is calling, for A/B assignment without a user: ``key:<key id>``, or ``addr:<host>`` with auth off."""
    user: str | None = None
    key: ApiKey | None = None
    override: str | None = None
    chosen_by: str | None = None
    """How the variant was chosen: hash, pin, route or fallback (serving.feedback.CHOSEN_BY)."""
    variant: str | None = None
    version: str | None = None
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @property
    def priority(self) -> str:
        return self.key.priority if self.key else "normal"


class Admission:
    """At most ``max_concurrency`` requests generate; a bounded, priority-aware queue holds the rest.

    A request of priority class c may wait only while fewer than ``share[c] * max_queue`` requests
    are waiting, so under load low-priority traffic is shed first; nothing waits unboundedly.
    """

    def __init__(self, cfg: ServeConfig, metrics: Metrics):
        self.cfg, self.metrics = cfg, metrics
        self._sem = asyncio.Semaphore(cfg.max_concurrency)
        self.waiting = 0
        metrics.queue_limit.set(cfg.max_queue)

    @contextlib.asynccontextmanager
    async def slot(self, priority: str):
        if self._sem.locked():
            share = self.cfg.priority_shares.get(priority, self.cfg.priority_shares.get("normal", 1.0))
            if self.waiting >= max(0, int(share * self.cfg.max_queue)):
                self.metrics.shed.labels("queue_full").inc()
                raise APIError(503, f"server overloaded: {self.waiting} requests queued (priority {priority})",
                               code="overloaded", headers={"Retry-After": "1"})
        self.waiting += 1
        self.metrics.queue_depth.set(self.waiting)
        try:
            await asyncio.wait_for(self._sem.acquire(), timeout=self.cfg.request_timeout_s)
        except TimeoutError:
            self.metrics.shed.labels("queue_timeout").inc()
            raise APIError(503, "server overloaded: timed out waiting for a free engine slot", code="overloaded",
                           headers={"Retry-After": "2"}) from None
        finally:
            self.waiting -= 1
            self.metrics.queue_depth.set(self.waiting)
        try:
            yield
        finally:
            self._sem.release()


class Gateway:
    """Everything a route needs: variants, router, keys, limits, feedback, metrics."""

    def __init__(self, cfg: ServeConfig, home: Path, tracking_uri: str | None = None,
                 templates: dict[str, Any] | None = None, kind: str | None = None):
        self.cfg, self.home, self.tracking_uri = cfg, Path(home), tracking_uri
        self.templates = templates or {}
        self.kind = kind or pick_kind(cfg)
        state = self.home / "serving"
        self.metrics = Metrics()
        self.pool = VariantPool(cfg, self.kind, self.metrics, tracking_uri, state / "models")
        self.router = ABRouter([(v.name, v.weight) for v in cfg.variants])
        keys_at, feedback_at = state_locations(cfg.database_url, self.home)
        self.keys = KeyStore(keys_at)
        # Replicas sharing a database share each key's bucket; alone, a bucket in memory is enough.
        self.limiter = (SqlRateLimiter(cfg.database_url, cfg.rate_limit_per_minute, cfg.rate_limit_burst)
                        if cfg.database_url else RateLimiter(cfg.rate_limit_per_minute, cfg.rate_limit_burst))
        self.feedback = FeedbackStore(feedback_at)
        self.admission = Admission(cfg, self.metrics)
        self.draining = False
        self._tasks: list[asyncio.Task] = []
        self.watcher: RegistryWatcher | None = None
        self.loras: dict[str, Path] = {}
        """LoRA adapters loaded at runtime (POST /v1/load_lora_adapter): a request whose ``model`` names one
        is served by the A/B variant it is assigned to, with that adapter (vLLM's per-request adapters)."""

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Load every variant (failures are logged; the watcher retries them) and start background work."""
        from serving.watcher import RegistryWatcher

        results = await asyncio.gather(*(self.pool.load(name) for name in self.pool.slots), return_exceptions=True)
        for name, result in zip(self.pool.slots, results):
            if isinstance(result, BaseException) and not isinstance(result, (AliasNotFound, PromotionRefused)):
                log.error("variant %s did not load: %s", name, result)
        self.watcher = RegistryWatcher(self.pool, self.tracking_uri, self.cfg.poll_interval_s)
        if self.cfg.watch:
            self._tasks.append(asyncio.create_task(self.watcher.run(), name="registry-watcher"))
        self._tasks.append(asyncio.create_task(self._flush_loop(), name="feedback-flush"))

    async def stop(self) -> None:
        self.draining = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.watcher is not None:
            await self.watcher.cancel_loads()
        await self.pool.close()
        self.feedback.close()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.feedback.buffered:  # an idle gateway should not wake a thread twice a second
                await asyncio.to_thread(self.feedback.flush)

    def ready(self) -> tuple[bool, dict[str, str], dict[str, str]]:
        """(ready, state per variant, why per variant that does not serve or has a problem).

        Ready: not draining, some variant serves and every other one is either serving, absent (its
        registry alias does not exist: a champion without a challenger is a whole deployment) or
        refused (its alias names a version that may not serve: a decision, not a fault).
        """
        slots = self.pool.slots.values()
        states = {slot.name: slot.state for slot in slots}
        details = {slot.name: slot.error for slot in slots if slot.error}
        ok = (not self.draining and any(slot.ready for slot in slots)
              and all(slot.ready or slot.state in ("absent", "refused") for slot in slots))
        return ok, states, details

    # ------------------------------------------------------------------ auth
    def authenticate(self, authorization: str | None, admin: bool = False) -> ApiKey | None:
        """The caller's key (None when auth is off); raises 401/403 APIErrors."""
        if not self.cfg.auth:
            return None
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send Authorization: Bearer <key>", code="missing_api_key")
        try:
            key = self.keys.verify(token.strip())
        except AuthError as err:
            raise APIError(401, str(err), code="invalid_api_key") from None
        if admin and not key.admin:
            raise APIError(403, "this key may not use the admin API", code="not_admin")
        return key

    def limit(self, ctx: RequestContext, cost: int = 1) -> None:
        """Charge ``cost`` generations to the caller's bucket (its key, or its address with auth off); 429 if empty."""
        key = ctx.key
        retry = self.limiter.check(ctx.client, cost, key.rate_per_minute if key else None, key.burst if key else None)
        if retry:
            self.metrics.shed.labels("rate_limited").inc()
            who = f"key {key.name!r}" if key else f"client {ctx.client.removeprefix('addr:')}"
            raise APIError(429, f"rate limit exceeded for {who} (this request costs {cost} generation"
                           f"{'s' if cost != 1 else ''}); retry in {retry}s",
                           code="rate_limit_exceeded", headers={"Retry-After": str(retry)})

    # ------------------------------------------------------------------ routing
    def public_models(self) -> list[str]:
        return [self.cfg.served_model, *self.pool.slots, *self.loras]

    # ------------------------------------------------------------------ runtime adapters
    def allowed_adapter_path(self, path: str, param: str) -> Path:
        """``path`` resolved, if it lies inside the lmforge home or ``serve.adapter_roots``; else a 403.

        Why: loading an adapter reads files with the gateway's rights; an admin key is not a licence to
        point the engine at any file on the machine."""
        resolved = Path(path).expanduser().resolve()
        roots = [self.home.resolve(), *(Path(r).expanduser().resolve() for r in self.cfg.adapter_roots)]
        if not any(resolved.is_relative_to(root) for root in roots):
            raise APIError(403, f"{param} {path!r} is outside the allowed adapter roots "
                           f"({', '.join(map(str, roots))}; serve.adapter_roots adds more)",
                           param=param, code="adapter_path_not_allowed")
        if not resolved.exists():
            raise APIError(400, f"{param} {path!r} not found", param=param)
        return resolved

    async def load_lora(self, name: str, path: str) -> dict[str, Any]:
        """Load an adapter into every running engine that serves LoRA, under ``name``."""
        if name in (self.cfg.served_model, *self.pool.slots):
            raise APIError(400, f"lora_name {name!r} is already a model name", param="lora_name")
        resolved = self.allowed_adapter_path(path, "lora_path")
        engines = {id(slot.ref): slot.ref for slot in self.pool.slots.values() if slot.ref is not None}
        lora = [ref for ref in engines.values() if getattr(ref.backend, "lora_enabled", False)]
        if not lora:
            raise APIError(400, "no running engine serves LoRA adapters: load the variants with an adapter "
                           "(serve.variants[].adapter) to enable runtime adapters", param="lora_name")
        seconds = {}
        for ref in lora:
            try:
                seconds[",".join(sorted(ref.variants))] = round(await ref.backend.add_adapter(name, resolved), 4)
            except BackendInputError as err:
                raise APIError(400, str(err), param="lora_path") from None
            except BackendError as err:
                raise APIError(502, f"the engine failed to load the adapter: {err}") from None
        self.loras[name] = resolved
        return {"lora_name": name, "lora_path": str(resolved), "read_s": seconds}

    def unload_lora(self, name: str) -> None:
        """Stop serving ``name`` (engines keep its weights until they are replaced; a new load reuses the name)."""
        if self.loras.pop(name, None) is None:
            raise APIError(404, f"no runtime adapter named {name!r}; loaded: {', '.join(self.loras) or 'none'}",
                           param="lora_name")

    def model_and_adapter(self, model: str) -> tuple[str, str | None]:
        """A request's ``model`` as (what choose_variant routes by, adapter): a runtime adapter's name is the
        served model with that adapter."""
        if model in self.loras:
            return self.cfg.served_model, model
        return model, None

    def choose_variant(self, model: str, ctx: RequestContext, pinned: str | None = None) -> str:
        """Variant for a request: override header > model naming a variant > task pin > sticky A/B.

        Choosing a variant (the header, or a variant's name as the model) is an admin-key privilege: it
        would let a client pick its side of an experiment. ``ctx.chosen_by`` records how it was chosen.
        """
        if ctx.override:
            if ctx.override not in self.pool.slots:
                raise APIError(400, f"unknown variant {ctx.override!r} in X-Lmforge-Variant; "
                               f"variants: {', '.join(self.pool.slots)}", param="X-Lmforge-Variant")
            self._check_pin(ctx, "X-Lmforge-Variant")
            ctx.chosen_by = "pin"
            return ctx.override
        if model in self.pool.slots:
            self._check_pin(ctx, "model")
            ctx.chosen_by = "pin"
            return model
        if model != self.cfg.served_model:
            raise APIError(404, f"the model {model!r} does not exist; available: {', '.join(self.public_models())}",
                           param="model", code="model_not_found")
        if pinned:
            ctx.chosen_by = "route"
            return pinned
        available = self.pool.available()
        fallback = self.cfg.fallback_variant
        # A down variant's users go to the fallback when there is one, else are spread over the rest.
        # Without a user the caller (API key, else client address) is the unit of assignment: one
        # client's concurrent requests land on one variant instead of a weighted coin flip each.
        user = ctx.user or ctx.client
        name = self.router.assign(user)
        ctx.chosen_by = "hash"
        if name not in available and fallback in available:
            ctx.chosen_by = "fallback"
            return fallback
        chosen = self.router.assign(user, available or None)
        if chosen != name:
            ctx.chosen_by = "fallback"
        return chosen

    def _check_pin(self, ctx: RequestContext, param: str) -> None:
        if self.cfg.auth and not (ctx.key is not None and ctx.key.admin):
            raise APIError(403, f"choosing a variant ({param}) needs an admin key; send model "
                           f"{self.cfg.served_model!r} to be assigned one", param=param, code="pin_not_allowed")

    # ------------------------------------------------------------------ generation
    def sampling(self, max_tokens: int | None, temperature: float, top_p: float, stop: list[str],
                 seed: int | None, adapter: str | None = None, ignore_eos: bool = False,
                 stream: bool = True, constraint: Constraint | None = None,
                 constraint_optional: bool = False) -> SamplingParams:
        wanted = max_tokens if max_tokens is not None else self.cfg.default_max_tokens
        if wanted > self.cfg.max_tokens_limit:
            raise APIError(400, f"max_tokens is {wanted}, the largest allowed is {self.cfg.max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        return SamplingParams(max_tokens=wanted, temperature=temperature, top_p=top_p, stop=stop, seed=seed,
                              adapter=adapter, ignore_eos=ignore_eos, stream=stream, constraint=constraint,
                              constraint_optional=constraint_optional)

    async def run(self, ctx: RequestContext, variant: str, build: Callable[[Backend], str],
                  params: SamplingParams, n: int = 1) -> AsyncGenerator[tuple[int, Chunk], None]:
        """Generate ``n`` completions, yielding (index, chunk); on failure before any output, use the fallback.

        ``ctx.variant``/``ctx.version`` name the variant that serves, set before the first yield.
        """
        fallback = self.cfg.fallback_variant
        candidates = [variant] + ([fallback] if fallback and fallback != variant else [])
        last: Exception | None = None
        async with self.admission.slot(ctx.priority):
            for attempt, name in enumerate(candidates):
                try:
                    ref = self.pool.acquire(name)
                except VariantUnavailable as err:
                    last = err
                    continue
                streamed = False
                self.metrics.inflight.labels(name).inc()
                try:
                    prompt = build(ref.backend)
                    prompt_tokens = self._check_length(ref.backend, prompt, params)
                    counted = dataclasses.replace(params, prompt_tokens=prompt_tokens)
                    if counted.constraint_optional and not ref.backend.structured_output:
                        counted.constraint = None  # a preferred format, on a backend that cannot hold to one
                    ctx.variant, ctx.version = name, ref.version
                    if attempt:
                        self.metrics.fallbacks.labels(variant, name).inc()
                        ctx.chosen_by = "fallback"
                    first = True
                    async for index, chunk in _fan_out(ref.backend, prompt, counted, n, self.cfg.request_timeout_s):
                        if first and (chunk.text or chunk.finish_reason):
                            self.metrics.ttft.labels(name).observe(time.perf_counter() - ctx.started)
                            first = False
                        if chunk.finish_reason:
                            self.metrics.tokens.labels(name, "completion").inc(chunk.completion_tokens)
                        streamed = True
                        yield index, chunk
                    self.metrics.tokens.labels(name, "prompt").inc(prompt_tokens * n)
                    self.metrics.latency.labels(name).observe(time.perf_counter() - ctx.started)
                    return
                except BackendInputError as err:
                    raise APIError(400, str(err), param=err.param) from None
                except (BackendError, TimeoutError) as err:
                    kind = "timeout" if isinstance(err, TimeoutError) else "backend"
                    self.metrics.errors.labels(name, kind).inc()
                    last = err
                    if isinstance(err, BackendError):
                        await self.pool.mark_down(name, ref, str(err))
                    log.warning("request %s on %s failed (%s): %s", ctx.request_id, name, kind, err)
                    if streamed:
                        raise _as_api_error(err) from None
                finally:
                    self.metrics.inflight.labels(name).dec()
                    self.pool.release(ref)
        if isinstance(last, VariantUnavailable):
            raise APIError(503, str(last), code="variant_unavailable", headers={"Retry-After": "5"})
        raise _as_api_error(last)

    def _check_length(self, backend: Backend, prompt: str, params: SamplingParams) -> int:
        tokens = backend.count_tokens(prompt)
        limit = backend.context_length
        if tokens >= limit:
            raise APIError(400, f"the prompt is {tokens} tokens; this model's context is {limit} tokens",
                           param="messages", code="context_length_exceeded")
        if tokens + params.max_tokens > limit:
            raise APIError(400, f"prompt ({tokens} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                           f"context of {limit} tokens; lower max_tokens to at most {limit - tokens}",
                           param="max_tokens", code="context_length_exceeded")
        return tokens

    def log_request(self, ctx: RequestContext, status: int) -> None:
        self.metrics.requests.labels(ctx.variant or "none", ctx.route, str(status)).inc()
        if ctx.variant is not None:
            self.feedback.log_request(ctx.request_id, ctx.variant, ctx.version, ctx.user,
                                      ctx.key.key_id if ctx.key else None, ctx.route, status,
                                      time.perf_counter() - ctx.started, ctx.chosen_by)


def _as_api_error(err: Exception | None) -> APIError:
    if isinstance(err, TimeoutError):
        return APIError(504, "the model did not answer within the request timeout", code="timeout")
    return APIError(502, f"the model backend failed: {err}", code="backend_error")


async def _fan_out(backend: Backend, prompt: str, params: SamplingParams, n: int,
                   timeout: float) -> AsyncGenerator[tuple[int, Chunk], None]:
    """Run ``n`` generations (seed + i each) and interleave their chunks, all under one deadline."""
    # asyncio.timeout_at around each wait (not wait_for, which wraps every chunk in a new Task); the
    # timeout never spans a ``yield``, so it cannot fire while the consumer is doing something else.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    if n == 1:
        stream = backend.generate(prompt, params)
        try:
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        chunk = await anext(stream)
                except StopAsyncIteration:
                    return
                yield 0, chunk
        finally:
            await stream.aclose()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int) -> None:
        seeded = dataclasses.replace(params, seed=None if params.seed is None else params.seed + index)
        try:
            async for chunk in backend.generate(prompt, seeded):
                queue.put_nowait((index, chunk))
        except BaseException as err:  # noqa: BLE001 - hand the failure to the consumer
            queue.put_nowait((index, err))
            raise
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(n)]
    try:
        remaining = n
        while remaining:
            async with asyncio.timeout_at(deadline):
                index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
