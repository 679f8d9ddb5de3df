"""OpenVINO GenAI backend: one ``ContinuousBatchingPipeline`` stepped by an engine process.

Why ``add_request`` + ``step`` instead of ``pipeline.generate`` per request: that is how continuous
batching is meant to be driven by a server (new requests join the running batch at the next step).
Why a process (:mod:`serving.backends.openvino_engine`): ``step()`` holds the GIL for the whole
step, which would freeze the gateway's event loop. The engine sends each step's new token ids in one
message; a reader thread here hands them to the event loop in one ``call_soon_threadsafe`` per
message. Non-streaming requests get their ids once, at the end. Chat templates, prompt token counts
and detokenising happen here, on the event loop, with HF ``tokenizers`` checked at load against the
engine's OpenVINO tokenizer, so the gateway does not load OpenVINO (:mod:`serving.backends.text`).

Runtime LoRA, as measured with openvino_genai 2026.4: LoRA is enabled only when the pipeline is
built with at least one adapter (an empty AdapterConfig silently disables it); after that further
adapters can be used without rebuilding. But the adapter state is pipeline-wide and is applied
only by ``generate()`` (``add_request`` ignores ``GenerationConfig.adapters``), and it persists for
later steps. So the engine process keeps one *active* adapter, runs requests for it together, and
switches (a 1-token ``generate`` with the new AdapterConfig) only when the batch has drained;
once a request for another adapter waits, new requests for the active one wait too, so no group
starves. A backend built without adapters refuses ``add_adapter`` and the gateway rebuilds it
with the adapter instead (a model swap, done in the background).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from serving.backends import engine_messages as msg
from serving.backends.base import (
    BackendError,
    BackendInputError,
    Chunk,
    Constraint,
    IncrementalDecoder,
    SamplingParams,
    StopMatcher,
    release_free_heap,
)
from serving.backends.text import TextCodec, text_codec

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from serving.backends.openvino_engine import EngineProcess

log = logging.getLogger(__name__)
_DONE = object()


def structured_output_fields(constraint: Constraint) -> dict[str, str]:
    """A constraint as ``openvino_genai.StructuredOutputConfig`` keyword arguments (plain strings, so they
    cross the engine pipe; the engine builds the config)."""
    if constraint.kind in ("json_schema", "json_object"):
        return {"json_schema": constraint.json_schema_text()}
    return {"regex": constraint.as_regex()}


class _Request:
    __slots__ = ("rid", "loop", "queue", "engine_s")

    def __init__(self, rid: int, loop: asyncio.AbstractEventLoop):
        self.rid, self.loop = rid, loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.engine_s = 0.0  # admission into the engine's batch to the last token, set when it finishes


def _deliver(items: list[tuple[_Request, Any]]) -> None:
    """On the event loop: hand each item to its request's queue."""
    for request, item in items:
        request.queue.put_nowait(item)


def _post(items: list[tuple[_Request, Any]]) -> None:
    """From the reader thread: deliver ``items`` with one event-loop wake-up per loop (usually one)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
    for request, item in items:
        by_loop.setdefault(request.loop, []).append((request, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            pass


class CorePacer:
    """While the engine is busy, a thread that wakes every ``period_s`` so the CPUs never go idle.

    Why: OpenVINO splits every layer of a step across its inference threads, which hand work to
    each other hundreds of times per step. When the cores are oversubscribed (other jobs on this
    2-vCPU VM, load average 6-15) a sleeping inference thread is woken late at each hand-off; one
    more thread that merely sleeps 0.5 ms in a loop made the single-stream step loop 2-2.5x faster
    there (~35 -> ~85 tok/s; the vCPUs here halt as soon as they idle: cpuidle ``haltpoll`` with
    ``guest_halt_poll_ns=0``). On a quiet machine it does not help and costs ~5% at one stream (its
    wake-ups preempt an inference thread), so it is off by default: ``LMFORGE_OV_KEEP_AWAKE=1``
    (or ``keep_awake=True``) turns it on. It runs only while requests are generating.
    """

    def __init__(self, period_s: float = 0.0005):
        self.period_s = period_s
        self._busy = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="ov-pacer", daemon=True)
        self._thread.start()

    def busy(self, on: bool) -> None:
        if on:
            self._busy.set()
        else:
            self._busy.clear()

    def close(self) -> None:
        self._closed = True
        self._busy.set()
        self._thread.join(timeout=2)

    def _run(self) -> None:
        sleep, wait = time.sleep, self._busy.wait
        while not self._closed:
            wait()
            sleep(self.period_s)


def _answer(future: asyncio.Future, error: str | None) -> None:
    """From the reader thread: settle an adapter load's future (None = loaded) on its own loop."""
    def settle() -> None:
        if not future.done():
            future.set_result(error)

    future.get_loop().call_soon_threadsafe(settle)


class OpenVINOBackend:
    """``ContinuousBatchingPipeline`` on CPU (or any OpenVINO device) in an engine process (see
    :mod:`serving.backends.openvino_engine` for why), streaming, runtime LoRA.

    This side keeps the tokenizer (chat template, prompt length, detokenising) and the requests'
    queues; a reader thread hands the engine's token ids to the event loop.
    """

    kind = "openvino"
    structured_output = True  # OpenVINO GenAI's StructuredOutputConfig (XGrammar) in the engine process

    def __init__(self, device: str = "CPU", cache_gb: float = 1.0, max_num_seqs: int = 32,
                 num_threads: int | None = None, keep_awake: bool | None = None, regroup_ms: float = 30.0,
                 prefix_caching: bool = True, precision: str = "auto"):
        self.device, self.cache_gb, self.max_num_seqs, self.num_threads = device, cache_gb, max_num_seqs, num_threads
        self.regroup_ms, self.prefix_caching, self.precision = regroup_ms, prefix_caching, precision
        if keep_awake is None:  # LMFORGE_OV_KEEP_AWAKE=1 turns the CorePacer on
            keep_awake = os.environ.get("LMFORGE_OV_KEEP_AWAKE", "0").lower() in ("1", "true", "yes")
        self.keep_awake = keep_awake and device.upper().startswith("CPU")
        self._pacer: CorePacer | None = None
        self.model_dir: Path | None = None
        self.context_length = 2048
        self._proc: EngineProcess | None = None  # the engine process
        self._conn: Connection | None = None
        self._send_lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._text: TextCodec | None = None  # chat template, token counts, detokenising (serving.backends.text)
        self._lora = False
        self._adapters: dict[str, Path] = {}
        self._default_adapter: str | None = None
        self._active_adapter: str | None = None
        self.adapter_switch_s = 0.0
        self._requests: dict[int, _Request] = {}
        self._replies: dict[int, asyncio.Future] = {}  # adapter loads waiting for the engine's answer
        self._closing = False
        self._dead: str | None = None
        self._ids = itertools.count()
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def load(self, model_dir: Path, adapter: Path | None = None, extra_adapters: Sequence[Path] = ()) -> None:
        """Start the engine process on the IR in ``model_dir``; the text side here (serving.backends.text).

        With ``adapter`` LoRA is enabled and it becomes the default; ``extra_adapters`` (e.g. per-task
        adapters) are loaded too, under their file stems, and also enable LoRA.
        """
        started = time.perf_counter()
        await asyncio.to_thread(self._load_sync, Path(model_dir), Path(adapter) if adapter else None,
                                [Path(p) for p in extra_adapters])
        self.load_seconds = time.perf_counter() - started
        if self.keep_awake:
            self._pacer = CorePacer()
        self._reader = threading.Thread(target=self._read_loop, name=f"ov-reader-{model_dir}", daemon=True)
        self._reader.start()

    def _load_sync(self, model_dir: Path, adapter: Path | None, extra: list[Path]) -> None:
        from serving.backends.openvino_engine import EngineProcess

        if not (model_dir / "openvino_model.xml").is_file():
            raise BackendError(f"{model_dir} has no openvino_model.xml (not an OpenVINO IR directory)")
        for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            if not (model_dir / name).is_file():
                raise BackendError(f"{model_dir} has no {name}; export the tokenizer with openvino_tokenizers")
        for path in extra:
            self._adapters[path.stem] = self._adapter_file(path)
        if adapter is not None:
            self._adapters[adapter.stem] = self._adapter_file(adapter)
            self._default_adapter = adapter.stem
        self._lora = bool(self._adapters)
        # A new interpreter, not a fork: forking a process with threads (the event loop's, uvicorn's) is unsafe.
        self._proc = EngineProcess(
            model_dir=str(model_dir), device=self.device, cache_gb=self.cache_gb, max_num_seqs=self.max_num_seqs,
            num_threads=self.num_threads, adapters={name: str(path) for name, path in self._adapters.items()},
            regroup_ms=self.regroup_ms, prefix_caching=self.prefix_caching, precision=self.precision)
        self._conn = self._proc.conn
        try:
            message = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            message = msg.LoadFailed(f"the engine process exited with code {self._proc.exitcode}")
        if not isinstance(message, msg.Ready):
            self._stop_process()
            raise BackendError(f"could not load {model_dir} with OpenVINO: {getattr(message, 'message', message)}")
        try:
            self._text = text_codec(model_dir, message.info.get("text"))
        except Exception as err:  # noqa: BLE001
            self._stop_process()
            raise BackendError(f"could not load the tokenizer of {model_dir}: {err}") from err
        release_free_heap()
        self.model_dir = model_dir
        self.context_length = _context_length(model_dir)

    @staticmethod
    def _adapter_file(path: Path) -> Path:
        file = path / "adapter_model.safetensors" if path.is_dir() else path
        if path.is_dir() and (path / "genai_adapter.safetensors").is_file():
            file = path / "genai_adapter.safetensors"
        if not file.is_file():
            raise BackendInputError(f"adapter file not found: {file}")
        return file

    def _send(self, message: tuple) -> None:
        conn = self._conn
        assert conn is not None  # load() opened it; it stays set after release
        with self._send_lock:
            conn.send(message)

    async def add_adapter(self, name: str, path: Path) -> float:
        """Register a LoRA adapter for per-request use; needs a pipeline built with LoRA enabled."""
        if not self._lora:
            raise BackendInputError("this engine was built without LoRA; reload the variant with an adapter")
        file = self._adapter_file(Path(path))
        if self._dead is not None or self._conn is None:
            raise BackendError(f"engine is down: {self._dead or 'released'}")
        token = next(self._ids)
        future = self._replies[token] = asyncio.get_running_loop().create_future()
        started = time.perf_counter()
        self._send(msg.LoadAdapter(token, name, str(file)))
        error = await future
        if error:
            raise BackendInputError(error)
        self._adapters[name] = file
        return time.perf_counter() - started

    def set_default_adapter(self, name: str | None) -> None:
        """Adapter used when a request names none (None = base weights)."""
        if name is not None and name not in self._adapters:
            raise BackendInputError(f"adapter {name!r} is not loaded; loaded: {sorted(self._adapters)}")
        self._default_adapter = name

    def adapters(self) -> list[str]:
        return sorted(self._adapters)

    @property
    def lora_enabled(self) -> bool:
        return self._lora

    async def health(self) -> bool:
        return (self._proc is not None and self._proc.is_alive() and self._dead is None
                and bool(self._reader and self._reader.is_alive()))

    async def release(self) -> None:
        self._closing = True
        await asyncio.to_thread(self._stop_process)
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
        if self._pacer is not None:
            self._pacer.close()
            self._pacer = None
        self._text = None
        self._adapters.clear()

    def _stop_process(self) -> None:
        proc, conn = self._proc, self._conn
        if proc is None or conn is None:  # set together by load()
            return
        try:
            with self._send_lock:
                conn.send(msg.Close())
        except (OSError, ValueError):
            pass
        proc.join(10)
        if proc.is_alive():
            proc.kill()
            proc.join(5)
        conn.close()
        self._proc = None

    @property
    def released(self) -> bool:
        return self._proc is None and self._text is None

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_dir": str(self.model_dir), "device": self.device, "lora": self._lora,
                "adapters": self.adapters(), "default_adapter": self._default_adapter,
                "context_length": self.context_length, "load_seconds": round(self.load_seconds, 3),
                "active_adapter": self._active_adapter, "adapter_switch_ms": round(self.adapter_switch_s * 1000, 3),
                "detokenizer": self._text.kind if self._text else None, "keep_awake": self.keep_awake,
                "engine_pid": self._proc.pid if self._proc else None, "dead": self._dead}

    # ------------------------------------------------------------------ text
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        assert self._text is not None, "load() first"
        return self._text.render_chat(messages)

    def count_tokens(self, prompt: str) -> int:
        assert self._text is not None, "load() first"
        return self._text.count_tokens(prompt)

    def _decode(self, ids: list[int]) -> str:
        assert self._text is not None, "load() first"
        return self._text.decode(ids)

    # ------------------------------------------------------------------ generation
    @staticmethod
    def _generation_fields(params: SamplingParams) -> dict[str, Any]:
        """GenerationConfig fields for the engine process (the config object itself does not pickle)."""
        fields: dict[str, Any] = {"max_new_tokens": params.max_tokens, "ignore_eos": params.ignore_eos}
        if params.greedy:
            fields["do_sample"] = False
        else:
            fields.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=0)
            if params.seed is not None:
                fields["rng_seed"] = params.seed
        if params.stop:
            fields["stop_strings"] = list(params.stop)
        if params.constraint is not None:
            fields["structured_output_config"] = structured_output_fields(params.constraint)
        return fields

    def _adapter_for(self, params: SamplingParams) -> str | None:
        if params.adapter and not self._lora:
            raise BackendInputError(f"adapter {params.adapter!r} requested but this engine has no LoRA support")
        if params.adapter and params.adapter not in self._adapters:
            raise BackendInputError(f"adapter {params.adapter!r} is not loaded; loaded: {self.adapters()}")
        return (params.adapter or self._default_adapter) if self._lora else None

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncGenerator[Chunk, None]:
        if self._dead is not None:
            raise BackendError(f"engine is down: {self._dead}")
        if self._proc is None or self._closing:
            raise BackendError("engine is not loaded (released, shutting down or never loaded)")
        adapter = self._adapter_for(params)
        # The gateway counted the prompt for its context check: no second encode (nor a cache of prompts).
        prompt_tokens = params.prompt_tokens if params.prompt_tokens is not None else self.count_tokens(prompt)
        request = _Request(next(self._ids), asyncio.get_running_loop())
        self._requests[request.rid] = request
        if self._pacer is not None:
            self._pacer.busy(True)
        try:
            self._send(msg.Add(request.rid, prompt, self._generation_fields(params), adapter, params.stream))
        except (OSError, ValueError) as err:
            self._forget(request)
            raise BackendError(f"engine is down: {err}") from err
        decoder = IncrementalDecoder(self._decode)
        stops = StopMatcher(params.stop)
        finish: str | None = None
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                if item is _DONE:
                    break
                ids, reason = item
                text = stops.feed(decoder.add(ids)) if ids else ""
                if stops.stopped:
                    finish = "stop"
                    if text:
                        yield Chunk(text=text)
                    break  # the finally below cancels it: no need to compute tokens we will not send
                if text:
                    yield Chunk(text=text)
                if reason is not None:
                    finish = reason
                    break
            tail = stops.flush()
            if tail:
                yield Chunk(text=tail)
            yield Chunk(finish_reason=finish or "stop", prompt_tokens=prompt_tokens,
                        completion_tokens=len(decoder.ids), engine_s=request.engine_s)
        finally:
            if request.rid in self._requests:  # still generating: client gone, stop string or timeout
                self._forget(request)
                with contextlib.suppress(OSError, ValueError):
                    self._send(msg.Cancel(request.rid))

    def _forget(self, request: _Request) -> None:
        self._requests.pop(request.rid, None)
        if self._pacer is not None and not self._requests:
            self._pacer.busy(False)

    # ------------------------------------------------------------------ reader thread
    def _read_loop(self) -> None:
        """Engine process -> event loop: token ids, replies, adapter stats, failure."""
        conn = self._conn
        assert conn is not None  # started by load(), after the pipe
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                if not self._closing:
                    self._fail(f"the engine process exited (code {self._proc.exitcode if self._proc else None})")
                return
            if isinstance(message, msg.Out):
                out: list[tuple[_Request, Any]] = []
                for rid, ids, reason, engine_s, error in message.tokens:
                    request = self._requests.get(rid)
                    if request is None:
                        continue  # cancelled here already
                    if error is not None:
                        self._forget(request)
                        # reason "invalid": the engine refused the request as asked (e.g. a schema XGrammar
                        # cannot compile), a client error; otherwise the engine failed it.
                        failure = (BackendInputError(error, param="response_format") if reason == "invalid"
                                   else BackendError(error))
                        out.append((request, failure))
                        continue
                    out.append((request, (ids, reason)))
                    if reason is not None:
                        request.engine_s = engine_s
                        self._forget(request)
                        out.append((request, _DONE))
                if out:
                    _post(out)
            elif isinstance(message, msg.Reply):
                _answer(self._replies.pop(message.token), message.error)
            elif isinstance(message, msg.Stats):
                self._active_adapter, self.adapter_switch_s = message.active_adapter, message.switch_s
            elif isinstance(message, msg.Dead):
                self._fail(message.message)
                return

    def _fail(self, reason: str) -> None:
        self._dead = reason
        log.error("OpenVINO engine failed: %s", reason)
        requests, self._requests = list(self._requests.values()), {}
        _post([(r, BackendError(f"engine failed mid-request: {reason}")) for r in requests])
        for future in self._replies.values():
            _answer(future, f"engine failed: {reason}")
        self._replies.clear()
        if self._pacer is not None:
            self._pacer.busy(False)


def _context_length(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 2048
