"""Variants and their engines: load, warm up, swap atomically, drain and release the old one.

Each variant is a :class:`VariantSlot` holding a reference to the :class:`EngineRef` that serves
it. A request *acquires* the current ref (a refcount) and keeps using it to the end, so a swap
(one assignment on the event loop, hence atomic for every request) never disturbs requests in
flight: they finish on the old engine, which is released once its refcount drains to zero.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

from configs.schema import ServeConfig, VariantConfig
from serving.backends import make_backend
from serving.backends.base import Backend, BackendError, BackendInputError, SamplingParams
from serving.metrics import Metrics
from serving.registry import parse_model_uri, resolve_model_dir

log = logging.getLogger(__name__)


class VariantUnavailable(RuntimeError):
    """The variant has no engine that can serve right now."""


class EngineRef:
    """One loaded backend and the requests currently using it."""

    def __init__(self, backend: Backend, model_dir: Path, version: str | None, uri: str):
        self.backend, self.model_dir, self.version, self.uri = backend, model_dir, version, uri
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.loaded_at = time.time()

    def info(self) -> dict[str, Any]:
        return {"uri": self.uri, "version": self.version, "model_dir": str(self.model_dir),
                "inflight": self.inflight, "loaded_at": self.loaded_at, **self.backend.info()}


class VariantSlot:
    """A named variant: config, the engine serving it, state and swap history."""

    def __init__(self, cfg: VariantConfig):
        self.name, self.uri, self.adapter, self.weight = cfg.name, cfg.model_uri, cfg.adapter, cfg.weight
        self.backend_kind, self.url = ("vllm" if cfg.url else cfg.backend), cfg.url
        self.ref: EngineRef | None = None
        self.state = "loading"  # loading | ready | down | failed
        self.error: str | None = None
        self.lock = asyncio.Lock()
        self.history: list[dict[str, Any]] = []

    @property
    def ready(self) -> bool:
        return self.state == "ready" and self.ref is not None

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "model_uri": self.uri, "adapter": self.adapter, "weight": self.weight,
                "state": self.state, "error": self.error, "engine": self.ref.info() if self.ref else None,
                "swaps": self.history[-5:]}


class VariantPool:
    """All variants of one gateway."""

    def __init__(self, cfg: ServeConfig, kind: str, metrics: Metrics, tracking_uri: str | None = None,
                 cache_dir: Path | None = None):
        self.cfg, self.kind, self.metrics = cfg, kind, metrics
        self.tracking_uri, self.cache_dir = tracking_uri, cache_dir
        self.slots = {v.name: VariantSlot(v) for v in cfg.variants}
        # Per-task adapters (serve.task_routes) are loaded into the variants that serve those tasks.
        self.extra_adapters: dict[str, list[Path]] = {}
        for route in cfg.task_routes.values():
            if route.adapter and Path(route.adapter).exists():
                for name in [route.variant] if route.variant else list(self.slots):
                    self.extra_adapters.setdefault(name, []).append(Path(route.adapter))
        self._retiring: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ requests
    def acquire(self, name: str) -> EngineRef:
        """The engine serving ``name`` now, with its refcount taken (pair with :meth:`release`)."""
        slot = self.slots[name]
        if not slot.ready:
            raise VariantUnavailable(f"variant {name!r} is {slot.state}" + (f": {slot.error}" if slot.error else ""))
        ref = slot.ref
        ref.inflight += 1
        ref.idle.clear()
        return ref

    @staticmethod
    def release(ref: EngineRef) -> None:
        ref.inflight -= 1
        if ref.inflight <= 0:
            ref.idle.set()

    def available(self) -> set[str]:
        return {name for name, slot in self.slots.items() if slot.ready}

    async def mark_down(self, name: str, ref: EngineRef, reason: str) -> None:
        """After a backend failure: take the variant out of rotation if its engine is really unhealthy."""
        slot = self.slots[name]
        if slot.ref is ref and not await _healthy(ref.backend):
            slot.state, slot.error = "down", reason
            self.metrics.variant_ready.labels(name).set(0)
            log.error("variant %s is down: %s", name, reason)

    # ------------------------------------------------------------------ loading and swapping
    async def load(self, name: str, model_uri: str | None = None, adapter: str | None = None,
                   reason: str = "startup") -> dict[str, Any]:
        """Load (or reload) a variant in the background of serving; swap it in when warm.

        Returns the timings: resolve_s, load_s, warmup_s, swap_ms (the serving-visible part) and total_s.
        """
        slot = self.slots[name]
        async with slot.lock:
            uri = model_uri or slot.uri
            adapter = adapter if adapter is not None else slot.adapter
            started = time.perf_counter()
            kind = slot.backend_kind or self.kind
            try:
                model_dir, version = await asyncio.to_thread(
                    resolve_model_dir, uri, self.tracking_uri, self.cache_dir, kind)
                resolved = time.perf_counter()
                backend = make_backend(kind, self.cfg, url=slot.url, name=name)
                extras = self.extra_adapters.get(name, [])
                if extras:
                    await backend.load(model_dir, Path(adapter) if adapter else None, extra_adapters=extras)
                else:
                    await backend.load(model_dir, Path(adapter) if adapter else None)
                loaded = time.perf_counter()
                await self._warm_up(backend)
                warmed = time.perf_counter()
            except Exception as err:  # noqa: BLE001 - keep serving the old engine; report why
                slot.error = f"{type(err).__name__}: {err}"
                if slot.ref is None:
                    slot.state = "failed"
                log.error("loading variant %s from %s failed: %s", name, uri, slot.error)
                raise
            # The swap: a single reference assignment on the event loop thread.
            swap_start = time.perf_counter()
            old, slot.ref = slot.ref, EngineRef(backend, model_dir, version, uri)
            slot.state, slot.error, slot.uri, slot.adapter = "ready", None, uri, adapter
            swap_ms = (time.perf_counter() - swap_start) * 1000
            timings = {"variant": name, "reason": reason, "uri": uri, "version": version, "adapter": adapter,
                       "resolve_s": round(resolved - started, 3), "load_s": round(loaded - resolved, 3),
                       "warmup_s": round(warmed - loaded, 3), "swap_ms": round(swap_ms, 4),
                       "total_s": round(time.perf_counter() - started, 3), "at": time.time()}
            slot.history.append(timings)
            self._record(name, timings, "model")
            self.metrics.variant_version.labels(name).set(float(version) if version and version.isdigit() else 0)
            if old is not None:
                task = asyncio.create_task(self._retire(name, old))
                self._retiring.add(task)
                task.add_done_callback(self._retiring.discard)
            log.info("variant %s now serves %s (version %s) in %.2fs", name, uri, version, timings["total_s"])
            return timings

    async def set_adapter(self, name: str, adapter: str) -> dict[str, Any]:
        """Switch a variant's default LoRA adapter: in place when the engine supports it, else reload."""
        slot = self.slots[name]
        ref = slot.ref
        lora = ref is not None and getattr(ref.backend, "lora_enabled", False)
        if not lora:
            return await self.load(name, adapter=adapter, reason="adapter (engine rebuilt with LoRA)")
        async with slot.lock:
            started = time.perf_counter()
            adapter_name = Path(adapter).stem
            read_s = await ref.backend.add_adapter(adapter_name, Path(adapter))
            switch_start = time.perf_counter()
            ref.backend.set_default_adapter(adapter_name)
            switch_ms = (time.perf_counter() - switch_start) * 1000
            slot.adapter = adapter
            timings = {"variant": name, "reason": "adapter", "adapter": adapter, "read_s": round(read_s, 4),
                       "swap_ms": round(switch_ms, 4), "total_s": round(time.perf_counter() - started, 4),
                       "at": time.time()}
            slot.history.append(timings)
            self._record(name, timings, "adapter")
            return timings

    async def _warm_up(self, backend: Backend) -> None:
        prompt = backend.render_chat([{"role": "user", "content": "Hello"}])
        params = SamplingParams(max_tokens=self.cfg.warmup_tokens, temperature=0.0)
        try:
            async for _ in backend.generate(prompt, params):
                pass
        except (BackendError, BackendInputError) as err:
            await backend.release()
            raise BackendError(f"warm-up failed: {err}") from err

    async def _retire(self, name: str, old: EngineRef) -> None:
        """Release an engine once its in-flight requests finished (or the drain timeout passed)."""
        started = time.perf_counter()
        try:
            await asyncio.wait_for(old.idle.wait(), timeout=self.cfg.drain_timeout_s)
        except TimeoutError:
            log.warning("variant %s: %d requests still on the old engine after %.0fs; releasing anyway",
                        name, old.inflight, self.cfg.drain_timeout_s)
        await old.backend.release()
        self.metrics.swap_seconds.labels(name, "drain").set(time.perf_counter() - started)

    def _record(self, name: str, timings: dict[str, Any], kind: str) -> None:
        for phase in ("resolve_s", "load_s", "warmup_s", "read_s", "total_s"):
            if phase in timings:
                self.metrics.swap_seconds.labels(name, phase[:-2]).set(timings[phase])
        self.metrics.swap_seconds.labels(name, "switch").set(timings["swap_ms"] / 1000)
        self.metrics.swaps.labels(name, kind).inc()
        self.metrics.variant_ready.labels(name).set(1)

    def registry_refs(self) -> dict[str, Any]:
        """Variants bound to registry aliases (the ones the watcher follows)."""
        out = {}
        for name, slot in self.slots.items():
            ref = parse_model_uri(slot.uri) if slot.uri.startswith("models:/") else None
            if ref is not None and ref.alias is not None:
                out[name] = ref
        return out

    async def close(self) -> None:
        for task in list(self._retiring):
            task.cancel()
        for slot in self.slots.values():
            if slot.ref is not None:
                await slot.ref.backend.release()
                slot.ref, slot.state = None, "down"


async def _healthy(backend: Backend) -> bool:
    try:
        return bool(await asyncio.wait_for(backend.health(), timeout=5))
    except Exception:  # noqa: BLE001 - an engine that cannot answer a health check is not healthy
        return False
