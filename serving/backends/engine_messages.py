"""Messages over the pipe between the OpenVINO backend (gateway process) and its engine process.

Named tuples, so each side reads fields by name (a positional ``message[3]`` once read the wrong one
after a field was added) and they pickle as cheaply as plain tuples.
"""

from __future__ import annotations

from typing import Any, NamedTuple


# --------------------------------------------------------------------------- gateway -> engine
class Add(NamedTuple):
    """Generate for ``prompt`` under ``fields`` (GenerationConfig fields), with ``adapter`` (None = base)."""

    rid: int
    prompt: str
    fields: dict[str, Any]
    adapter: str | None
    stream: bool


class Cancel(NamedTuple):
    rid: int


class LoadAdapter(NamedTuple):
    """Read a LoRA adapter file under ``name``; answered by a :class:`Reply` with the same token."""

    token: int
    name: str
    path: str


class Close(NamedTuple):
    pass


# --------------------------------------------------------------------------- engine -> gateway
class Ready(NamedTuple):
    info: dict[str, Any]


class LoadFailed(NamedTuple):
    """The engine could not start (sent instead of :class:`Ready`)."""

    message: str


class Tokens(NamedTuple):
    """New output of one request after a step. ``reason`` is None while it runs, "stop"/"length" when it
    finished, "invalid" when the engine refused it as asked (with ``error``: a client error); ``error``
    alone: the engine dropped it."""

    rid: int
    ids: list[int]
    reason: str | None
    engine_s: float
    error: str | None


class Out(NamedTuple):
    tokens: list[Tokens]


class Reply(NamedTuple):
    token: int
    error: str | None


class Stats(NamedTuple):
    active_adapter: str | None
    switch_s: float


class Dead(NamedTuple):
    """The engine failed and stopped; every request in it is lost."""

    message: str
