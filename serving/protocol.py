"""Request and response shapes of the gateway: OpenAI-compatible, JSON-RPC 2.0, admin, feedback.

Requests are pydantic models (validation errors become OpenAI-style 400s naming the field).
Unknown request fields are ignored, as OpenAI clients send many optional ones; fields that would
change the answer in ways we cannot honour (token-id prompts, image parts) are rejected.
Responses are plain dicts built by the helpers here: streaming builds one per token, and dicts
keep that path cheap.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_STOP = 4
MAX_N = 8


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _content_kind(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list) and all(isinstance(p, dict) for p in value):
            kinds = {p.get("type") for p in value}
            if kinds - {"text"}:
                raise ValueError(f"only text content parts are supported, got {sorted(map(str, kinds - {'text'}))}")
            return value
        raise ValueError(f"content must be a string or a list of text parts, got {type(value).__name__}")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class _SamplingFields(_Request):
    model: str = Field(min_length=1)
    max_tokens: int | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_N)
    stop: str | list[str] | None = Field(None, validate_default=True)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256)
    ignore_eos: bool = False
    """vLLM-compatible extension: keep generating past the end-of-sequence token (benchmarks)."""

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are allowed, got {len(stops)}")
        return [s for s in stops if s]

    @field_validator("max_tokens")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value <= 0:
            raise ValueError(f"must be a positive number of tokens, got {value}")
        return value


class ChatCompletionRequest(_SamplingFields):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None

    @model_validator(mode="after")
    def _merge_max(self) -> ChatCompletionRequest:
        if self.max_completion_tokens is not None:
            if self.max_completion_tokens <= 0:
                raise ValueError(f"max_completion_tokens must be positive, got {self.max_completion_tokens}")
            self.max_tokens = self.max_completion_tokens
        if not any(m.text().strip() for m in self.messages if m.role in ("user", "system", "developer")):
            raise ValueError("messages has no user or system text to respond to")
        return self

    def chat(self) -> list[dict[str, str]]:
        """Messages as plain role/content dicts (developer is the newer name for system)."""
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_SamplingFields):
    """POST /v1/completions."""

    prompt: str | list[str]
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, value: str | list[str]) -> list[str]:
        prompts = [value] if isinstance(value, str) else value
        if not prompts:
            raise ValueError("prompt must not be empty")
        if len(prompts) > MAX_N:
            raise ValueError(f"at most {MAX_N} prompts per request, got {len(prompts)}")
        if any(not p for p in prompts):
            raise ValueError("prompt must not be an empty string")
        return prompts


class FeedbackRequest(_Request):
    """POST /v1/feedback: a score for an earlier response, by its id."""

    request_id: str = Field(min_length=1, max_length=128)
    score: float = Field(ge=-1.0, le=1.0)
    """1 = good, 0 = bad (or any value in [-1, 1]; the report treats > 0 as a success)."""
    comment: str | None = Field(None, max_length=2000)


class AdminVariantRequest(_Request):
    """POST /admin/variants/{name}: load a model version or a LoRA adapter by hand."""

    model_uri: str | None = None
    """models:/name@alias, models:/name/version or a local IR directory; None keeps the model."""
    adapter: str | None = None
    """Path of a LoRA adapter (safetensors file or PEFT directory) to make the variant's default."""
    weight: float | None = Field(None, ge=0)
    """New traffic weight for this variant."""

    @model_validator(mode="after")
    def _something(self) -> AdminVariantRequest:
        if self.model_uri is None and self.adapter is None and self.weight is None:
            raise ValueError("give at least one of model_uri, adapter, weight")
        return self


# --------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI-style error JSON."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, model: str, texts: list[str], finishes: list[str], prompt_tokens: int,
                  completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
            for i, (text, finish) in enumerate(zip(texts, finishes))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}]}


def completion_response(rid: str, model: str, texts: list[str], finishes: list[str], prompt_tokens: int,
                        completion_tokens: int) -> dict[str, Any]:
    return {
        "id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [
            {"index": i, "text": text, "finish_reason": finish, "logprobs": None}
            for i, (text, finish) in enumerate(zip(texts, finishes))
        ],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def completion_chunk(rid: str, model: str, created: int, index: int, text: str,
                     finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}]}


def model_card(name: str, owned_by: str = "lmforge", **extra: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": owned_by, **extra}
