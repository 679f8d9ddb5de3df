"""Registry watcher: poll the aliases the variants are bound to and hot-swap when one moves.

Polling (not a push hook) because the MLflow registry has no change notifications; one
``get_model_version_by_alias`` per variant per interval is cheap. A moved alias starts a
background load (download, compile, warm-up) while the old version keeps serving; the swap itself
is the atomic reference assignment in :meth:`serving.engine.VariantPool.load`. Variants that
failed to load or went down are retried on every poll.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from typing import Any

from serving.engine import VariantPool
from serving.registry import AliasNotFound, current_version

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Follows registry aliases for a :class:`VariantPool`."""

    def __init__(self, pool: VariantPool, tracking_uri: str | None, interval_s: float):
        self.pool, self.tracking_uri, self.interval_s = pool, tracking_uri, interval_s
        self._loads: dict[str, asyncio.Task] = {}
        self._missing: set[str] = set()  # variants whose alias was gone at the last poll
        self.events: collections.deque[dict[str, Any]] = collections.deque(maxlen=100)  # recent loads

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception as err:  # noqa: BLE001 - a registry hiccup must not kill the watcher
                log.warning("registry poll failed: %s", err)
            await asyncio.sleep(self.interval_s)

    async def check_once(self) -> list[str]:
        """Start loads for variants whose alias moved (or that are not serving); returns their names."""
        started = []
        for name, ref in self.pool.registry_refs().items():
            slot = self.pool.slots[name]
            if name in self._loads and not self._loads[name].done():
                continue
            try:
                version = await asyncio.to_thread(current_version, ref, self.tracking_uri)
            except AliasNotFound as err:
                # A missing alias is a state, not news: say so when it goes missing, not on every poll.
                if name not in self._missing and slot.state != "absent":
                    log.warning("variant %s: %s; still serving what it served", name, err)
                self._missing.add(name)
                continue
            except Exception as err:  # noqa: BLE001
                log.warning("variant %s: %s", name, err)
                continue
            self._missing.discard(name)
            serving = slot.ref.version if slot.ref is not None else None
            if version == serving and slot.ready:
                self.pool.clear_refusal(name)  # e.g. a refused promotion was undone
                continue
            if serving:
                reason = f"alias @{ref.alias}: v{serving} -> v{version}"
            else:
                reason = f"alias @{ref.alias} set: v{version}" if slot.state == "absent" else f"retry: v{version}"
            # A refused version is re-checked every poll (a reviewer may force it), said only once.
            (log.debug if slot.refused_version == version else log.info)(
                "variant %s: %s, loading in the background", name, reason)
            self._loads[name] = asyncio.create_task(self._load(name, reason), name=f"load-{name}")
            started.append(name)
        return started

    async def _load(self, name: str, reason: str) -> None:
        try:
            self.events.append(await self.pool.load(name, reason=reason))
        except Exception as err:  # noqa: BLE001 - keep the old version; retry next poll
            self.events.append({"variant": name, "reason": reason, "error": str(err)})

    async def wait_idle(self) -> None:
        """Wait for background loads started so far (tests, shutdown)."""
        await asyncio.gather(*self._loads.values(), return_exceptions=True)

    async def cancel_loads(self) -> None:
        for task in self._loads.values():
            task.cancel()
        await self.wait_idle()
