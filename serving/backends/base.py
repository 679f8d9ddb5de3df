"""The small engine interface every backend implements, and the types that cross it.

A backend owns one loaded model (plus optional LoRA adapters). The gateway only ever calls:
``load``, ``render_chat``, ``count_tokens``, ``generate`` (an async iterator of :class:`Chunk`),
``health`` and ``release``. Everything engine-specific stays behind it.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable


class BackendError(RuntimeError):
    """The engine failed (crashed, unreachable, out of memory); the request may be retried elsewhere."""


class BackendInputError(ValueError):
    """The request cannot be served by this engine as asked (e.g. unknown adapter); a client error.

    ``param`` names the request field at fault (the 400's ``param``)."""

    def __init__(self, message: str, param: str | None = "adapter"):
        super().__init__(message)
        self.param = param


@dataclasses.dataclass(frozen=True)
class Constraint:
    """What the answer must match (structured output), in engine-neutral form.

    ``kind`` is ``json_schema`` (``value``: the schema as a dict), ``json_object`` (any JSON object),
    ``regex`` (``value``: the pattern) or ``choice`` (``value``: the allowed answers).
    """

    kind: Literal["json_schema", "json_object", "regex", "choice"]
    value: Any = None

    def as_regex(self) -> str:
        """``choice`` as a regex alternation (escaped for the engines' regex dialects); ``regex`` as is."""
        if self.kind == "regex":
            return str(self.value)
        if self.kind != "choice":
            raise ValueError(f"a {self.kind} constraint is not a regex")
        from tasks.parsing import regex_literal

        return "(" + "|".join(regex_literal(choice) for choice in self.value) + ")"

    def json_schema_text(self) -> str:
        """``json_schema`` / ``json_object`` as schema text (any object for ``json_object``)."""
        if self.kind == "json_object":
            return json.dumps({"type": "object"})
        if self.kind != "json_schema":
            raise ValueError(f"a {self.kind} constraint is not a JSON schema")
        return json.dumps(self.value)


@dataclasses.dataclass
class SamplingParams:
    """What the client asked for, in engine-neutral form."""

    max_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    adapter: str | None = None
    """Name of a LoRA adapter loaded into this backend, or None for the base weights."""
    ignore_eos: bool = False
    prompt_tokens: int | None = None
    """The prompt's token count when the caller has counted it already (the gateway's context check),
    so the backend need not encode the prompt again."""
    constraint: Constraint | None = None
    """Structured output: the answer must match this (None = free text)."""
    constraint_optional: bool = False
    """The constraint is a preference (the JSON-RPC task formats): a backend without structured output
    decodes freely instead of refusing the request."""
    stream: bool = True
    """The consumer wants tokens as they come. False (a non-streaming response) lets a backend hand
    over the whole completion at once instead of waking the event loop at every engine step."""

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclasses.dataclass
class Chunk:
    """A piece of streamed output. The last chunk has ``finish_reason`` and the usage counts."""

    text: str = ""
    finish_reason: str | None = None  # "stop" | "length" | None while streaming
    prompt_tokens: int = 0
    completion_tokens: int = 0
    engine_s: float = 0.0  # last chunk: admission into the engine's batch to the last token (0: not measured)


@runtime_checkable
class Backend(Protocol):
    """An inference engine holding one model version."""

    kind: str
    model_dir: Path | None
    context_length: int
    structured_output: bool
    """Honours ``SamplingParams.constraint``; a backend without it refuses constrained requests."""

    async def load(self, model_dir: Path, adapter: Path | None = None, extra_adapters: Sequence[Path] = ()) -> None:
        """Load the model in ``model_dir`` (and optionally a LoRA adapter as the default one, and
        ``extra_adapters`` under their file stems)."""

    async def add_adapter(self, name: str, path: Path) -> float:
        """Make a LoRA adapter available under ``name``; returns seconds taken."""

    def adapters(self) -> list[str]:
        """Names of loaded adapters."""

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """Apply the model's chat template with the generation prompt."""

    def count_tokens(self, prompt: str) -> int:
        """Tokens the engine will see for ``prompt``."""

    def generate(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        """Stream the completion of ``prompt``; the final chunk carries finish_reason and usage."""

    async def health(self) -> bool:
        """True while the engine can serve."""

    async def release(self) -> None:
        """Free the model (after in-flight requests have finished)."""

    def info(self) -> dict[str, Any]:
        """Facts for /admin and logs."""


class StopMatcher:
    """Cut streamed text at the first stop string, holding back a possible partial match.

    Engines may stop on stop strings themselves, but tokens already streamed cannot be recalled,
    so the gateway holds back any tail that could still become a stop string.
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops or [] if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        """Text that is safe to emit now; sets ``stopped`` when a stop string was found."""
        if self.stopped:
            return ""
        if not self.stops:
            return text
        self._pending += text
        cut = min((i for i in (self._pending.find(s) for s in self.stops) if i != -1), default=-1)
        if cut != -1:
            out, self._pending, self.stopped = self._pending[:cut], "", True
            return out
        hold = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self._pending)), 0, -1):
                if self._pending.endswith(stop[:k]):
                    hold = max(hold, k)
                    break
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out):]
        return out

    def flush(self) -> str:
        """Whatever was held back, at the end of generation."""
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out


class IncrementalDecoder:
    """Turn a growing list of token ids into text deltas without splitting multi-byte characters.

    Decodes only a short window (the TGI/vLLM prefix-offset scheme), so cost stays linear.
    """

    def __init__(self, decode):
        self._decode = decode
        self.ids: list[int] = []
        self._prefix = 0
        self._read = 0

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the newly complete text."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self._prefix:self._read]) if self._read > self._prefix else ""
        new_text = self._decode(self.ids[self._prefix:])
        # A trailing U+FFFD means a character is still incomplete: wait for the next token.
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self.ids)
            return new_text[len(prefix_text):]
        return ""


def release_free_heap() -> None:
    """Give freed heap pages back to the OS. glibc keeps them after a large transient allocation:
    loading tokenizer.json leaves ~16 MiB of freed heap in the gateway, compiling the model ~11 MiB in
    the engine, held for the process's lifetime otherwise. A no-op where malloc_trim does not exist."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
