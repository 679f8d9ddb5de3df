"""HF transformers backend: the reference implementation (fp32 ``generate``, one request at a time).

Useful to check the other engines' outputs against and as the baseline in the benchmark; not for
production traffic (no batching: requests queue on a lock).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

from serving.backends.base import BackendError, BackendInputError, Chunk, SamplingParams, StopMatcher
from serving.imports import import_names


class HFBackend:
    """``transformers`` causal LM with ``TextIteratorStreamer``."""

    kind = "hf"
    structured_output = False  # the reference backend decodes freely; constrained requests get a 400

    def __init__(self, dtype: str = "float32"):
        self.dtype = dtype
        self.model_dir: Path | None = None
        self.context_length = 2048
        self._model: Any = None  # transformers objects, set by load()
        self._tokenizer: Any = None
        self._lock = asyncio.Lock()
        self.load_seconds = 0.0

    async def load(self, model_dir: Path, adapter: Path | None = None, extra_adapters: Sequence[Path] = ()) -> None:
        if adapter is not None or extra_adapters:
            raise BackendInputError("the hf reference backend does not take runtime adapters; merge them first")
        started = time.perf_counter()
        await asyncio.to_thread(self._load_sync, Path(model_dir))
        self.load_seconds = time.perf_counter() - started

    def _load_sync(self, model_dir: Path) -> None:
        import torch

        names = import_names("transformers", "AutoModelForCausalLM", "AutoTokenizer")
        AutoModelForCausalLM, AutoTokenizer = names  # noqa: N806 - the classes, as imported

        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
            self._model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, self.dtype)).eval()
        except Exception as err:  # noqa: BLE001
            raise BackendError(f"could not load {model_dir} with transformers: {err}") from err
        self.model_dir = model_dir
        self.context_length = int(getattr(self._model.config, "max_position_embeddings", 2048))

    async def add_adapter(self, name: str, path: Path) -> float:
        raise BackendInputError("the hf reference backend does not take runtime adapters")

    def adapters(self) -> list[str]:
        return []

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        import torch

        (TextIteratorStreamer,) = import_names("transformers", "TextIteratorStreamer")  # noqa: N806
        if self._model is None:
            raise BackendError("backend is not loaded")
        if params.adapter:
            raise BackendInputError("the hf reference backend does not take runtime adapters")
        if params.constraint is not None:
            raise BackendInputError("structured output (response_format / structured_outputs) needs the openvino "
                                    "or vllm backend; the hf reference backend decodes unconstrained",
                                    param="response_format")
        async with self._lock:
            inputs = self._tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            streamer = TextIteratorStreamer(self._tokenizer, skip_prompt=True, skip_special_tokens=True)
            kwargs: dict[str, Any] = {"max_new_tokens": params.max_tokens, "streamer": streamer,
                                      "do_sample": not params.greedy, "pad_token_id": self._tokenizer.eos_token_id}
            if not params.greedy:
                kwargs |= {"temperature": params.temperature, "top_p": params.top_p, "top_k": 0}
            result: dict[str, Any] = {}

            def run() -> None:
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                try:
                    with torch.inference_mode():
                        result["ids"] = self._model.generate(**inputs, **kwargs)
                except Exception as err:  # noqa: BLE001 - surfaced to the awaiting request
                    result["error"] = err
                    streamer.end()

            thread = threading.Thread(target=run, daemon=True)
            thread.start()
            stops = StopMatcher(params.stop)
            iterator = iter(streamer)
            while True:
                piece = await asyncio.to_thread(next, iterator, None)
                if piece is None:
                    break
                text = stops.feed(piece)
                if text:
                    yield Chunk(text=text)
                if stops.stopped:
                    break
            await asyncio.to_thread(thread.join)
            if "error" in result:
                raise BackendError(f"transformers generate failed: {result['error']}")
            tail = stops.flush()
            if tail:
                yield Chunk(text=tail)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            generated = int(result["ids"].shape[1]) - prompt_tokens
            finish = "stop" if stops.stopped or generated < params.max_tokens else "length"
            yield Chunk(finish_reason=finish, prompt_tokens=prompt_tokens, completion_tokens=generated)

    async def health(self) -> bool:
        return self._model is not None

    async def release(self) -> None:
        self._model = self._tokenizer = None

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_dir": str(self.model_dir), "dtype": self.dtype,
                "context_length": self.context_length, "load_seconds": round(self.load_seconds, 3)}
