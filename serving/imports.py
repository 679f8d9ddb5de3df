"""Heavy modules that variant loader threads import: one thread at a time.

Variants load in parallel worker threads (``asyncio.to_thread``). transformers resolves its top-level
names lazily, and two threads doing that at once fail with ``ImportError: cannot import name
'AutoTokenizer' from 'transformers'`` (seen when champion and challenger loaded together). Under the
lock the first import and name lookup happen once; afterwards the names are plain attributes and the
lock is held for microseconds.
"""

from __future__ import annotations

import importlib
import threading
from typing import Any

_LOCK = threading.Lock()


def import_names(module: str, *names: str) -> tuple[Any, ...]:
    """``from module import *names`` (or just ``import module`` without names), serialised across threads."""
    with _LOCK:
        loaded = importlib.import_module(module)
        return tuple(getattr(loaded, name) for name in names)
