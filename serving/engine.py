"""Variants and their engines: load, warm up, swap atomically, drain and release the old one.

Each variant is a :class:`VariantSlot` holding a reference to the :class:`EngineRef` that serves
it. A request *acquires* the current ref (a refcount) and keeps using it to the end, so a swap
(one assignment on the event loop, hence atomic for every request) never disturbs requests in
flight: they finish on the old engine, which is released once its refcount drains to zero.

Variants that load the same thing (backend, server URL, model directory, i.e. registry version,
adapter) share one engine: ``champion`` and ``challenger`` naming one version is the normal state
after a first run, and two engine processes of one model on a small machine compete for the same
cores, so a request sent to the second engine ran alone there while its burst waited for it
(issue 22). An engine is released when no variant is bound to it and its requests have drained.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

from configs.schema import ServeConfig, VariantConfig
from serving.backends import make_backend
from serving.backends.base import Backend, BackendError, BackendInputError, SamplingParams
from serving.metrics import Metrics
from serving.promotion import PromotionRefused, check_promotable
from serving.registry import AliasNotFound, current_version, parse_model_uri, resolve_model_dir

log = logging.getLogger(__name__)


class VariantUnavailable(RuntimeError):
    """The variant has no engine that can serve right now."""


@dataclasses.dataclass(frozen=True)
class EngineKey:
    """What an engine loads; variants with equal keys share one engine."""

    kind: str
    url: str | None
    model_dir: str
    adapter: str | None
    extra_adapters: tuple[str, ...] = ()


class EngineRef:
    """One loaded backend, the variants bound to it and the requests currently using it."""

    def __init__(self, key: EngineKey, backend: Backend, model_dir: Path, version: str | None):
        self.key, self.backend, self.model_dir, self.version = key, backend, model_dir, version
        self.variants: set[str] = set()
        self.inflight = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.loaded_at = time.time()
        self.load_s = self.warmup_s = 0.0

    def info(self) -> dict[str, Any]:
        return {"version": self.version, "model_dir": str(self.model_dir), "variants": sorted(self.variants),
                "inflight": self.inflight, "loaded_at": self.loaded_at, **self.backend.info()}


class VariantSlot:
    """A named variant: config, the engine serving it, state and swap history."""

    def __init__(self, cfg: VariantConfig):
        self.name, self.uri, self.adapter, self.weight = cfg.name, cfg.model_uri, cfg.adapter, cfg.weight
        self.backend_kind, self.url = ("vllm" if cfg.url else cfg.backend), cfg.url
        self.ref: EngineRef | None = None
        # loading | ready | down | failed | absent (its registry alias does not exist) | refused (its registry
        # version may not serve, see serving.promotion; a variant already serving stays ready on its old version)
        self.state = "loading"
        self.error: str | None = None
        self.refused_version: str | None = None
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
        self._engines: dict[EngineKey, EngineRef] = {}  # live engines a loading variant may share
        self._building: dict[EngineKey, asyncio.Future] = {}  # engines being built, so a key builds once

    # ------------------------------------------------------------------ requests
    def acquire(self, name: str) -> EngineRef:
        """The engine serving ``name`` now, with its refcount taken (pair with :meth:`release`)."""
        slot = self.slots[name]
        ref = slot.ref
        if ref is None or not slot.ready:
            raise VariantUnavailable(f"variant {name!r} is {slot.state}" + (f": {slot.error}" if slot.error else ""))
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
        """After a backend failure: take the engine's variants out of rotation if it is really unhealthy."""
        if name not in ref.variants or await _healthy(ref.backend):
            return
        if self._engines.get(ref.key) is ref:
            del self._engines[ref.key]  # a reload builds a fresh engine
        for bound in sorted(ref.variants):
            slot = self.slots[bound]
            if slot.ref is ref and slot.state != "down":
                slot.state, slot.error = "down", reason
                self.metrics.variant_ready.labels(bound).set(0)
                log.error("variant %s is down: %s", bound, reason)

    # ------------------------------------------------------------------ loading and swapping
    async def load(self, name: str, model_uri: str | None = None, adapter: str | None = None,
                   reason: str = "startup") -> dict[str, Any]:
        """Load (or reload) a variant in the background of serving; swap it in when warm.

        A variant whose model, adapter and backend match a live engine binds to that engine instead
        of building its own (``shared`` in the timings).

        Returns the timings: resolve_s, load_s, warmup_s (0 for a shared engine), swap_ms (the
        reference assignment that makes the switch atomic; requests see no pause) and total_s.
        """
        slot = self.slots[name]
        async with slot.lock:
            uri = model_uri or slot.uri
            adapter = adapter if adapter is not None else slot.adapter
            started = time.perf_counter()
            kind = slot.backend_kind or self.kind
            try:
                model_dir, version = await self._resolve(uri, kind)
                resolved = time.perf_counter()
                key = EngineKey(kind, slot.url, str(model_dir), adapter,
                                tuple(str(p) for p in self.extra_adapters.get(name, [])))
                engine, built = await self._engine_for(key, name, model_dir, version)
            except AliasNotFound as err:  # not a fault: nobody has set this alias (yet); the watcher follows it
                if slot.ref is None:
                    if slot.state != "absent":
                        log.info("variant %s: %s; serving without it until the alias is set", name, err)
                    slot.state, slot.error = "absent", f"{err}; serving without this variant"
                else:
                    slot.error = f"{err}; still serving version {slot.ref.version}"
                    log.warning("variant %s: %s; still serving version %s", name, err, slot.ref.version)
                raise
            except PromotionRefused as err:
                self._refuse(slot, err)
                raise
            except Exception as err:  # noqa: BLE001 - keep serving the old engine; report why
                slot.error = f"{type(err).__name__}: {err}"
                if slot.ref is None:
                    slot.state = "failed"
                log.error("loading variant %s from %s failed: %s", name, uri, slot.error)
                raise
            # The swap: a single reference assignment on the event loop thread.
            swap_start = time.perf_counter()
            old, slot.ref = slot.ref, engine
            engine.variants.add(name)
            slot.state, slot.error, slot.uri, slot.adapter = "ready", None, uri, adapter
            swap_ms = (time.perf_counter() - swap_start) * 1000
            self.clear_refusal(name)
            timings = {"variant": name, "reason": reason, "uri": uri, "version": version, "adapter": adapter,
                       "resolve_s": round(resolved - started, 3),
                       "load_s": round(engine.load_s if built else 0.0, 3),
                       "warmup_s": round(engine.warmup_s if built else 0.0, 3), "swap_ms": round(swap_ms, 4),
                       "shared": not built, "engine_variants": sorted(engine.variants),
                       "total_s": round(time.perf_counter() - started, 3), "at": time.time()}
            slot.history.append(timings)
            self._record(name, timings, "model")
            self.metrics.variant_version.labels(name).set(float(version) if version and version.isdigit() else 0)
            if old is not None and old is not engine:
                self._unbind(name, old)
            log.info("variant %s now serves %s (version %s) in %.2fs%s", name, uri, version, timings["total_s"],
                     f", sharing the engine of {', '.join(sorted(engine.variants - {name}))}" if not built else "")
            return timings

    async def _resolve(self, uri: str, kind: str) -> tuple[Path, str | None]:
        """The directory of ``uri``'s artifact that backend ``kind`` serves (by its registered key, see
        serving.registry) and its registry version; a registry version must be allowed to serve.

        An alias is resolved once and the version it named is the one checked and loaded, so an
        alias moving meanwhile cannot slip an unchecked version in.
        """
        ref = parse_model_uri(uri)
        if ref is not None:
            version = await asyncio.to_thread(current_version, ref, self.tracking_uri)
            await asyncio.to_thread(check_promotable, ref.name, version, self.tracking_uri)
            uri = f"models:/{ref.name}/{version}"
        return await asyncio.to_thread(resolve_model_dir, uri, self.tracking_uri, self.cache_dir, kind)

    def _refuse(self, slot: VariantSlot, err: PromotionRefused) -> None:
        """Keep serving what the variant serves (nothing: state refused) and say why, once per version."""
        if slot.ref is None:
            slot.state, slot.error = "refused", str(err)
        else:
            slot.error = f"{err}; still serving version {slot.ref.version}"
        if slot.refused_version != err.version:
            log.warning("variant %s: %s%s", slot.name, err,
                        f"; still serving version {slot.ref.version}" if slot.ref else "")
            self.metrics.promotions_refused.labels(slot.name).inc()
        slot.refused_version = err.version
        self.metrics.refused_version.labels(slot.name).set(float(err.version) if err.version.isdigit() else -1)

    def clear_refusal(self, name: str) -> None:
        """The variant's alias names an allowed version again (or it loaded one): forget the refusal."""
        slot = self.slots[name]
        if slot.refused_version is None:
            return
        log.info("variant %s: no longer refusing version %s", name, slot.refused_version)
        slot.refused_version = None
        if slot.ready:
            slot.error = None
        self.metrics.refused_version.labels(name).set(0)

    async def _engine_for(self, key: EngineKey, name: str, model_dir: Path,
                          version: str | None) -> tuple[EngineRef, bool]:
        """The live engine for ``key``, or a new one (built once even when several variants ask at once);
        returns (engine, built here)."""
        while (pending := self._building.get(key)) is not None:
            await asyncio.shield(pending)  # the build's failure is this load's failure too
        engine = self._engines.get(key)
        if engine is not None:
            return engine, False
        future = asyncio.get_running_loop().create_future()
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # waiters are optional
        self._building[key] = future
        try:
            engine = await self._build(key, name, model_dir, version)
        except BaseException as err:
            future.set_exception(err)
            raise
        finally:
            del self._building[key]
        self._engines[key] = engine
        future.set_result(engine)
        return engine, True

    async def _build(self, key: EngineKey, name: str, model_dir: Path, version: str | None) -> EngineRef:
        started = time.perf_counter()
        backend = make_backend(key.kind, self.cfg, url=key.url, name=name)
        if key.extra_adapters:
            await backend.load(model_dir, Path(key.adapter) if key.adapter else None,
                               extra_adapters=[Path(p) for p in key.extra_adapters])
        else:
            await backend.load(model_dir, Path(key.adapter) if key.adapter else None)
        loaded = time.perf_counter()
        await self._warm_up(backend)
        engine = EngineRef(key, backend, model_dir, version)
        engine.load_s, engine.warmup_s = loaded - started, time.perf_counter() - loaded
        return engine

    def _unbind(self, name: str, engine: EngineRef) -> None:
        """``name`` no longer uses ``engine``; retire it once no variant does."""
        engine.variants.discard(name)
        if engine.variants:
            return
        if self._engines.get(engine.key) is engine:
            del self._engines[engine.key]
        task = asyncio.create_task(self._retire(name, engine))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def set_adapter(self, name: str, adapter: str) -> dict[str, Any]:
        """Switch a variant's default LoRA adapter: in place when the engine supports it and serves no
        other variant, else on an engine of its own.

        In place, ``swap_ms`` is only the change of default; the engine switches its weights when the
        next request for the adapter arrives and reports that time as ``adapter_switch_ms`` in its info.
        """
        slot = self.slots[name]
        ref = slot.ref
        lora = ref is not None and getattr(ref.backend, "lora_enabled", False)
        if ref is not None and ref.variants - {name}:
            return await self.load(name, adapter=adapter, reason="adapter (own engine: the old one is shared)")
        if ref is None or not lora:  # (no engine: no LoRA)
            return await self.load(name, adapter=adapter, reason="adapter (engine rebuilt with LoRA)")
        async with slot.lock:
            started = time.perf_counter()
            adapter_name = Path(adapter).stem
            read_s = await ref.backend.add_adapter(adapter_name, Path(adapter))
            switch_start = time.perf_counter()
            ref.backend.set_default_adapter(adapter_name)  # type: ignore[attr-defined]  # LoRA backends have it
            switch_ms = (time.perf_counter() - switch_start) * 1000
            slot.adapter = adapter
            self._rekey(ref, dataclasses.replace(ref.key, adapter=adapter))
            timings = {"variant": name, "reason": "adapter", "adapter": adapter, "read_s": round(read_s, 4),
                       "swap_ms": round(switch_ms, 4), "total_s": round(time.perf_counter() - started, 4),
                       "at": time.time()}
            slot.history.append(timings)
            self._record(name, timings, "adapter")
            return timings

    def _rekey(self, engine: EngineRef, key: EngineKey) -> None:
        """The engine now loads what ``key`` says (its default adapter changed in place)."""
        if self._engines.get(engine.key) is engine:
            del self._engines[engine.key]
        engine.key = key
        self._engines.setdefault(key, engine)

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
        """Release an engine no variant uses once its in-flight requests finished (or the drain timeout passed)."""
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
        engines = {id(slot.ref): slot.ref for slot in self.slots.values() if slot.ref is not None}
        for engine in engines.values():
            await engine.backend.release()
        for slot in self.slots.values():
            slot.ref, slot.state = None, "down"
        self._engines.clear()


async def _healthy(backend: Backend) -> bool:
    try:
        return bool(await asyncio.wait_for(backend.health(), timeout=5))
    except Exception:  # noqa: BLE001 - an engine that cannot answer a health check is not healthy
        return False
