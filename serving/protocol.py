"""Request and response shapes of the gateway: OpenAI-compatible, JSON-RPC 2.0, admin, feedback.

Requests are pydantic models (validation errors become OpenAI-style 400s naming the field).
A request field the gateway does not honour is a 400 that names it (:func:`unsupported_fields`),
never silently dropped: a client asking for tools or logprobs must not get free text and a 200.
Only fields that cannot change the answer (``metadata``, ``store``, ...) and no-op values (``tools: []``,
``logprobs: false``, ``presence_penalty: 0``) pass. Structured output (``response_format``, vLLM's
``structured_outputs``) becomes a :class:`~serving.backends.base.Constraint`.
Responses are plain dicts built by the helpers here: streaming builds one per token, and dicts
keep that path cheap.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from serving.backends.base import Constraint

MAX_STOP = 4
MAX_N = 8
MAX_CHOICES = 64

# OpenAI request fields that cannot change the answer: accepted and not used.
IGNORED_FIELDS = frozenset({"metadata", "store", "service_tier", "parallel_tool_calls", "prompt_cache_key",
                            "safety_identifier"})
# Fields accepted at the value that asks for nothing (what clients send as defaults), refused otherwise.
NOOP_VALUES: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False), "top_logprobs": (None, 0), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "presence_penalty": (None, 0),
    "frequency_penalty": (None, 0), "repetition_penalty": (None, 1), "logit_bias": (None, {}), "best_of": (None, 1),
    "suffix": (None, ""), "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
    "reasoning_effort": (None,), "web_search_options": (None,), "guided_json": (None,), "guided_regex": (None,),
    "guided_choice": (None,), "guided_grammar": (None,),
}
WHY_UNSUPPORTED = {
    "logprobs": "token log-probabilities are not returned by this gateway",
    "top_logprobs": "token log-probabilities are not returned by this gateway",
    "tools": "tool calling is not implemented", "tool_choice": "tool calling is not implemented",
    "functions": "function calling is not implemented", "function_call": "function calling is not implemented",
    "guided_json": "use response_format or structured_outputs.json (vLLM >= 0.12 names)",
    "guided_regex": "use structured_outputs.regex (vLLM >= 0.12 names)",
    "guided_choice": "use structured_outputs.choice (vLLM >= 0.12 names)",
}


class APIRequest(BaseModel):
    # Unknown fields are kept so unsupported_fields() can name them in a 400 instead of dropping them.
    model_config = ConfigDict(extra="allow")

    def unsupported_fields(self) -> list[tuple[str, str]]:
        """(field, why) for every request field this gateway would not honour."""
        out = []
        for name, value in (self.model_extra or {}).items():
            if name in IGNORED_FIELDS or (name in NOOP_VALUES and value in NOOP_VALUES[name]):
                continue
            why = WHY_UNSUPPORTED.get(name, "not supported by this gateway" if name in NOOP_VALUES
                                      else "unknown parameter")
            out.append((name, why))
        return out


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


def _check_schema(schema: Any) -> dict[str, Any]:
    from jsonschema import SchemaError
    from jsonschema.validators import validator_for

    if not isinstance(schema, dict):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    try:
        validator_for(schema).check_schema(schema)
    except SchemaError as err:
        raise ValueError(f"not a valid JSON schema: {err.message}") from None
    return schema


def _check_regex(pattern: str) -> str:
    try:
        re.compile(pattern)
    except re.error as err:
        raise ValueError(f"not a valid regex: {err}") from None
    return pattern


class JSONSchemaFormat(BaseModel):
    """``response_format.json_schema`` as OpenAI defines it."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    strict: bool | None = None

    @field_validator("schema_")
    @classmethod
    def _valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        return _check_schema(value)


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type 'json_schema' and only allowed with it")
        return self

    def constraint(self) -> Constraint | None:
        if self.type == "json_object":
            return Constraint("json_object")
        if self.json_schema is not None:
            return Constraint("json_schema", self.json_schema.schema_ or {"type": "object"})
        return None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` request field (the same names vLLM accepts)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    json_: dict[str, Any] | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1, max_length=MAX_CHOICES)
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _schema(cls, value: dict[str, Any] | str | None) -> dict[str, Any] | None:
        if isinstance(value, str):
            import json

            try:
                value = json.loads(value)
            except ValueError as err:
                raise ValueError(f"is a string but not JSON: {err}") from None
        return None if value is None else _check_schema(value)

    @field_validator("regex")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        return None if value is None else _check_regex(value)

    @field_validator("choice")
    @classmethod
    def _choices(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not c for c in value):
            raise ValueError("choices must be non-empty strings")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputs:
        given = [n for n, v in (("json", self.json_), ("regex", self.regex), ("choice", self.choice),
                                ("json_object", self.json_object or None)) if v is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of json, regex, choice, json_object (got {', '.join(given) or 'none'})")
        return self

    def constraint(self) -> Constraint:
        if self.json_ is not None:
            return Constraint("json_schema", self.json_)
        if self.regex is not None:
            return Constraint("regex", self.regex)
        if self.choice is not None:
            return Constraint("choice", tuple(self.choice))
        return Constraint("json_object")


class _SamplingFields(APIRequest):
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
    response_format: ResponseFormat | None = None
    """OpenAI structured output: ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema": {...}}``."""
    structured_outputs: StructuredOutputs | None = None
    """vLLM's structured-output extension: exactly one of ``json``, ``regex``, ``choice``, ``json_object``."""

    @model_validator(mode="after")
    def _one_constraint(self) -> _SamplingFields:
        if self.structured_outputs is not None and self.response_format is not None \
                and self.response_format.type != "text":
            raise ValueError("give response_format or structured_outputs, not both")
        return self

    def constraint(self) -> Constraint | None:
        """What the answer must match, or None for free text."""
        if self.structured_outputs is not None:
            return self.structured_outputs.constraint()
        if self.response_format is not None:
            return self.response_format.constraint()
        return None

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


class FeedbackRequest(APIRequest):
    """POST /v1/feedback: a score for an earlier response, by its id."""

    request_id: str = Field(min_length=1, max_length=128)
    score: float = Field(ge=-1.0, le=1.0)
    """1 = good, 0 = bad (or any value in [-1, 1]; the report treats > 0 as a success)."""
    comment: str | None = Field(None, max_length=2000)


class LoadLoRARequest(APIRequest):
    """POST /v1/load_lora_adapter (vLLM's shape): make ``lora_path`` servable as model ``lora_name``."""

    lora_name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    lora_path: str = Field(min_length=1)
    """A PEFT adapter directory or an adapter safetensors file, inside the lmforge home or serve.adapter_roots."""
    load_inplace: bool = False
    """vLLM's flag to replace an adapter of the same name; accepted for compatibility (a new load replaces)."""


class UnloadLoRARequest(APIRequest):
    """POST /v1/unload_lora_adapter (vLLM's shape)."""

    lora_name: str = Field(min_length=1, max_length=64)
    lora_int_id: int | None = None
    """vLLM's numeric id; ignored (adapters are named)."""


class AdminVariantRequest(APIRequest):
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
