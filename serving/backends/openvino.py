"""OpenVINO GenAI backend: one ``ContinuousBatchingPipeline`` driven by a dedicated engine thread.

Why a stepping thread instead of ``pipeline.generate`` per request: ``add_request`` + ``step`` is
how continuous batching is meant to be driven by a server (new requests join the running batch at
the next step), and each request's new tokens are read from its ``GenerationHandle`` after every
step and handed to the asyncio side in one ``call_soon_threadsafe`` per step (not one per request:
each call is a wake-up of the event loop through its self-pipe); a non-streaming request's tokens
are handed over once, at the end, so the event loop does not interrupt the inference threads at every
step for output nobody reads yet. The thread does as little Python as
possible; detokenising happens on the event loop, with the HF ``tokenizers`` library when the IR
directory has a ``tokenizer.json`` that decodes exactly like the OpenVINO detokenizer (checked at
load): ~2 us per call instead of ~150 us of CPU for an OpenVINO detokenizer inference, which would
also compete with the engine's inference threads for the same cores.

Runtime LoRA, as measured with openvino_genai 2026.4: LoRA is enabled only when the pipeline is
built with at least one adapter (an empty AdapterConfig silently disables it); after that further
adapters can be used without rebuilding. But the adapter state is pipeline-wide and is applied
only by ``generate()`` (``add_request`` ignores ``GenerationConfig.adapters``), and it persists for
later steps. So the engine thread keeps one *active* adapter, runs requests for it together, and
switches (a 1-token ``generate`` with the new AdapterConfig) only when the batch has drained;
once a request for another adapter waits, new requests for the active one wait too, so no group
starves. A backend built without adapters refuses ``add_adapter`` and the gateway rebuilds it
with the adapter instead (a model swap, done in the background).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from serving.backends.base import (
    BackendError,
    BackendInputError,
    Chunk,
    IncrementalDecoder,
    SamplingParams,
    StopMatcher,
)

log = logging.getLogger(__name__)
_DONE = object()


class _Request:
    __slots__ = ("rid", "prompt", "config", "loop", "queue", "handle", "cancelled", "adapter", "stream", "added_at",
                 "engine_s")

    def __init__(self, rid: int, prompt: str, config: Any, loop: asyncio.AbstractEventLoop, adapter: str | None,
                 stream: bool = True):
        self.rid, self.prompt, self.config, self.loop, self.adapter = rid, prompt, config, loop, adapter
        self.stream = stream  # False: all tokens are handed over at the end
        self.queue: asyncio.Queue = asyncio.Queue()
        self.handle = None
        self.cancelled = False
        self.added_at = self.engine_s = 0.0

    def push(self, item: Any) -> None:
        _post([(self, item)])


def _deliver(items: list[tuple[_Request, Any]]) -> None:
    """On the event loop: hand each item to its request's queue."""
    for request, item in items:
        request.queue.put_nowait(item)


def _post(items: list[tuple[_Request, Any]]) -> None:
    """From the engine thread: deliver ``items`` with one event-loop wake-up per loop (usually one)."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Request, Any]]] = {}
    for request, item in items:
        by_loop.setdefault(request.loop, []).append((request, item))
    for loop, batch in by_loop.items():
        try:
            loop.call_soon_threadsafe(_deliver, batch)
        except RuntimeError:  # the event loop is gone (shutdown); nobody is listening
            for request, _ in batch:
                request.cancelled = True


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


class OpenVINOBackend:
    """``ContinuousBatchingPipeline`` on CPU (or any OpenVINO device), streaming, runtime LoRA."""

    kind = "openvino"

    def __init__(self, device: str = "CPU", cache_gb: float = 1.0, max_num_seqs: int = 32,
                 num_threads: int | None = None, keep_awake: bool | None = None):
        self.device, self.cache_gb, self.max_num_seqs, self.num_threads = device, cache_gb, max_num_seqs, num_threads
        if keep_awake is None:  # LMFORGE_OV_KEEP_AWAKE=1 turns the CorePacer on
            keep_awake = os.environ.get("LMFORGE_OV_KEEP_AWAKE", "0").lower() in ("1", "true", "yes")
        self.keep_awake = keep_awake and device.upper().startswith("CPU")
        self._pacer: CorePacer | None = None
        self.model_dir: Path | None = None
        self.context_length = 2048
        self._pipe = None
        self._tokenizer = None
        self._fast_decode = None  # HF tokenizers decode, when verified equal to the OpenVINO detokenizer
        self._token_counts: dict[str, int] = {}
        self._lora = False
        self._adapters: dict[str, Any] = {}
        self._default_adapter: str | None = None
        self._active_adapter: str | None | object = _DONE  # unknown until the first switch
        self.adapter_switch_s = 0.0
        self._pending: list[_Request] = []
        self._active: list[_Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._dead: str | None = None
        self._ids = itertools.count()
        self.load_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def load(self, model_dir: Path, adapter: Path | None = None, extra_adapters: list[Path] = ()) -> None:
        """Compile the IR in ``model_dir``.

        With ``adapter`` LoRA is enabled and it becomes the default; ``extra_adapters`` (e.g. per-task
        adapters) are loaded too, under their file stems, and also enable LoRA.
        """
        started = time.perf_counter()
        await asyncio.to_thread(self._load_sync, Path(model_dir), Path(adapter) if adapter else None,
                                [Path(p) for p in extra_adapters])
        self.load_seconds = time.perf_counter() - started
        if self.keep_awake:
            self._pacer = CorePacer()
        self._thread = threading.Thread(target=self._engine_loop, name=f"ov-engine-{model_dir}", daemon=True)
        self._thread.start()

    def _load_sync(self, model_dir: Path, adapter: Path | None, extra: list[Path]) -> None:
        import openvino_genai as ov_genai

        if not (model_dir / "openvino_model.xml").is_file():
            raise BackendError(f"{model_dir} has no openvino_model.xml (not an OpenVINO IR directory)")
        for name in ("openvino_tokenizer.xml", "openvino_detokenizer.xml"):
            if not (model_dir / name).is_file():
                raise BackendError(f"{model_dir} has no {name}; export the tokenizer with openvino_tokenizers")
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(self.cache_gb)))
        scheduler.max_num_seqs = self.max_num_seqs
        properties: dict[str, Any] = {}
        if self.num_threads:
            properties["INFERENCE_NUM_THREADS"] = self.num_threads
        for path in extra:
            self._adapters[path.stem] = self._read_adapter(path)
        if adapter is not None:
            self._adapters[adapter.stem] = self._read_adapter(adapter)
            self._default_adapter = adapter.stem
        if self._adapters:
            properties["adapters"] = ov_genai.AdapterConfig(list(self._adapters.values()))
            self._lora = True
        try:
            self._pipe = ov_genai.ContinuousBatchingPipeline(str(model_dir), scheduler, self.device, properties)
        except Exception as err:  # noqa: BLE001 - report any compile failure with the directory
            raise BackendError(f"could not load {model_dir} with OpenVINO: {err}") from err
        self._tokenizer = self._pipe.get_tokenizer()
        self._fast_decode = _fast_decoder(model_dir, self._tokenizer)
        self.model_dir = model_dir
        self.context_length = _context_length(model_dir)

    @staticmethod
    def _read_adapter(path: Path):
        import openvino_genai as ov_genai

        file = path / "adapter_model.safetensors" if path.is_dir() else path
        if path.is_dir() and (path / "genai_adapter.safetensors").is_file():
            file = path / "genai_adapter.safetensors"
        if not file.is_file():
            raise BackendInputError(f"adapter file not found: {file}")
        try:
            return ov_genai.Adapter(str(file))
        except Exception as err:  # noqa: BLE001
            raise BackendInputError(f"could not read LoRA adapter {file}: {err}") from err

    async def add_adapter(self, name: str, path: Path) -> float:
        """Register a LoRA adapter for per-request use; needs a pipeline built with LoRA enabled."""
        if not self._lora:
            raise BackendInputError("this engine was built without LoRA; reload the variant with an adapter")
        started = time.perf_counter()
        self._adapters[name] = await asyncio.to_thread(self._read_adapter, Path(path))
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
        return self._pipe is not None and self._dead is None and bool(self._thread and self._thread.is_alive())

    async def release(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        if self._pacer is not None:
            self._pacer.close()
            self._pacer = None
        self._pipe = self._tokenizer = self._fast_decode = None
        self._adapters.clear()

    def info(self) -> dict[str, Any]:
        return {"kind": self.kind, "model_dir": str(self.model_dir), "device": self.device, "lora": self._lora,
                "adapters": self.adapters(), "default_adapter": self._default_adapter,
                "context_length": self.context_length, "load_seconds": round(self.load_seconds, 3),
                "active_adapter": None if self._active_adapter is _DONE else self._active_adapter,
                "adapter_switch_ms": round(self.adapter_switch_s * 1000, 3),
                "detokenizer": "tokenizers" if self._fast_decode else "openvino", "keep_awake": self.keep_awake,
                "dead": self._dead}

    # ------------------------------------------------------------------ text
    def render_chat(self, messages: list[dict[str, str]]) -> str:
        return self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)

    def count_tokens(self, prompt: str) -> int:
        # The gateway counts (context check) and then generates the same prompt: encode it once.
        count = self._token_counts.get(prompt)
        if count is None:
            count = int(self._tokenizer.encode(prompt, add_special_tokens=False).input_ids.get_shape()[1])
            if len(self._token_counts) >= 256:
                self._token_counts.clear()
            self._token_counts[prompt] = count
        return count

    def _decode(self, ids: list[int]) -> str:
        if self._fast_decode is not None:
            return self._fast_decode(ids)
        return self._tokenizer.decode(ids, skip_special_tokens=True)

    # ------------------------------------------------------------------ generation
    def _generation_config(self, params: SamplingParams):
        config = self._pipe.get_config()
        config.apply_chat_template = False
        config.max_new_tokens = params.max_tokens
        config.ignore_eos = params.ignore_eos
        if params.greedy:
            config.do_sample = False
        else:
            config.do_sample = True
            config.temperature = params.temperature
            config.top_p = params.top_p
            config.top_k = 0
            if params.seed is not None:
                config.rng_seed = params.seed
        if params.stop:
            config.stop_strings = set(params.stop)
        return config

    def _adapter_for(self, params: SamplingParams) -> str | None:
        if params.adapter and not self._lora:
            raise BackendInputError(f"adapter {params.adapter!r} requested but this engine has no LoRA support")
        if params.adapter and params.adapter not in self._adapters:
            raise BackendInputError(f"adapter {params.adapter!r} is not loaded; loaded: {self.adapters()}")
        return (params.adapter or self._default_adapter) if self._lora else None

    async def generate(self, prompt: str, params: SamplingParams) -> AsyncIterator[Chunk]:
        if self._dead is not None:
            raise BackendError(f"engine is down: {self._dead}")
        if self._pipe is None:
            raise BackendError("engine is not loaded (released or never loaded)")
        adapter = self._adapter_for(params)
        config = self._generation_config(params)
        prompt_tokens = self.count_tokens(prompt)
        request = _Request(next(self._ids), prompt, config, asyncio.get_running_loop(), adapter, params.stream)
        with self._cond:
            if self._closing:
                raise BackendError("engine is shutting down")
            self._pending.append(request)
            self._cond.notify()
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
                    request.cancelled = True  # no need to compute tokens we will not send
                    break
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
            if finish is None or request.cancelled:
                request.cancelled = True
                with self._cond:
                    self._cond.notify()

    # ------------------------------------------------------------------ engine thread
    def _engine_loop(self) -> None:
        import openvino_genai as ov_genai

        finished = {ov_genai.GenerationStatus.FINISHED, ov_genai.GenerationStatus.STOP}
        failed = {ov_genai.GenerationStatus.IGNORED, ov_genai.GenerationStatus.CANCEL}
        length, unfinished = ov_genai.GenerationFinishReason.LENGTH, ov_genai.GenerationFinishReason.NONE
        running = ov_genai.GenerationStatus.RUNNING
        pacer = self._pacer
        while True:
            with self._cond:
                if not self._pending and not self._active:
                    if pacer is not None:
                        pacer.busy(False)
                    while not self._pending and not self._active and not self._closing:
                        self._cond.wait()
                    if self._closing and not self._pending and not self._active:
                        return
                    if pacer is not None:
                        pacer.busy(True)
                new = self._admit()
            try:
                if new and self._lora and new[0].adapter != self._active_adapter:
                    self._switch_adapter(new[0].adapter)
                for request in new:
                    request.handle = self._pipe.add_request(request.rid, request.prompt, request.config)
                    request.added_at = time.perf_counter()
                    self._active.append(request)
                if not self._active:
                    continue
                self._pipe.step()
            except Exception as err:  # noqa: BLE001 - the engine is unusable: fail everyone, stay up
                self._dead = f"{type(err).__name__}: {err}"
                log.error("OpenVINO engine failed: %s", self._dead)
                with self._cond:
                    waiting, self._pending = self._pending, []
                for request in [*self._active, *new, *waiting]:
                    request.push(BackendError(f"engine failed mid-request: {self._dead}"))
                self._active = []
                if pacer is not None:
                    pacer.busy(False)
                return
            still: list[_Request] = []
            out: list[tuple[_Request, Any]] = []
            for request in self._active:
                handle = request.handle
                if request.cancelled:
                    handle.cancel()
                    continue
                status = handle.get_status()
                if status == running and not request.stream:
                    # Nobody reads partial output: leave it in the engine's stream and take it all
                    # at the end (read_all), as the engine's own generate() does. No per-step reads.
                    still.append(request)
                    continue
                ids: list[int] = []
                reason = None
                if status in finished and not request.stream:
                    outputs = handle.read_all()
                else:
                    outputs = handle.read().values() if handle.can_read() else ()
                for output in outputs:
                    ids.extend(output.generated_ids)
                    if output.finish_reason != unfinished:
                        reason = "length" if output.finish_reason == length else "stop"
                if status in finished:
                    request.engine_s = time.perf_counter() - request.added_at
                    out.append((request, (ids, reason or "stop")))
                    out.append((request, _DONE))
                elif status in failed:
                    out.append((request, BackendError(f"engine dropped the request ({status.name}): "
                                                      "KV cache exhausted?")))
                else:
                    if ids:
                        out.append((request, (ids, None)))
                    still.append(request)
            self._active = still
            if out:
                _post(out)

    def _admit(self) -> list[_Request]:
        """Pending requests that may join the batch now (called with the condition held)."""
        if not self._lora:
            new, self._pending = self._pending, []
            return new
        pending = [r for r in self._pending if not r.cancelled]
        if not pending:
            self._pending = []
            return []
        if any(r.adapter != self._active_adapter for r in pending):
            if self._active:
                # Another adapter is waiting: let the running batch drain, admit nothing new.
                self._pending = pending
                return []
            target = pending[0].adapter
        else:
            target = self._active_adapter
        new = [r for r in pending if r.adapter == target]
        self._pending = [r for r in pending if r.adapter != target]
        return new

    def _switch_adapter(self, name: str | None) -> None:
        """Apply adapter ``name`` (None = base weights) to the whole pipeline; needs an empty batch."""
        import openvino_genai as ov_genai

        started = time.perf_counter()
        config = self._pipe.get_config()
        config.apply_chat_template = False
        config.max_new_tokens = 1
        config.do_sample = False
        config.adapters = ov_genai.AdapterConfig(self._adapters[name]) if name else ov_genai.AdapterConfig()
        self._pipe.generate(["."], [config])
        self._active_adapter = name
        self.adapter_switch_s = time.perf_counter() - started


_PROBE = ("Héllo wörld: naïve café, 日本語 and emoji 🙂🚀.\n\tTabs, \"quotes\", code `x = [1, 2]`;  double  spaces "
          "<|im_start|>user\nHi<|im_end|> 3.14159 -- The quick brown fox jumps over the lazy dog!")


# pybind11 initialises its numpy bridge on the first tensor -> numpy conversion through a static
# guard that waits for the GIL: two variants loading at once (champion and challenger) deadlocked
# there, both threads parked in `.data` below. One probe at a time avoids it.
_PROBE_LOCK = threading.Lock()


def _fast_decoder(model_dir: Path, tokenizer: Any):
    with _PROBE_LOCK:
        return _probe_fast_decoder(model_dir, tokenizer)


def _probe_fast_decoder(model_dir: Path, tokenizer: Any):
    """``tokenizers`` decode for ``model_dir/tokenizer.json`` if it matches the OpenVINO detokenizer, else None.

    Checked on every window of up to 6 ids of a probe text (multi-byte characters split across
    tokens, special tokens, whitespace) and on random ids, as the incremental decoder uses it.
    """
    path = model_dir / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        import random

        from tokenizers import Tokenizer

        fast = Tokenizer.from_file(str(path))
        ids = [int(i) for i in tokenizer.encode(_PROBE, add_special_tokens=False).input_ids.data[0]]
        windows = [ids[i:j] for i in range(len(ids)) for j in range(i + 1, min(len(ids), i + 6) + 1)]
        rng = random.Random(0)
        vocab = fast.get_vocab_size(with_added_tokens=True)
        windows += [[rng.randrange(vocab) for _ in range(4)] for _ in range(32)] + [ids]
        for window in windows:
            if fast.decode(window, skip_special_tokens=True) != tokenizer.decode(window, skip_special_tokens=True):
                log.info("%s: tokenizer.json decodes differently from the OpenVINO detokenizer; using the latter",
                         model_dir)
                return None
    except Exception as err:  # noqa: BLE001 - the OpenVINO detokenizer always works
        log.info("%s: fast detokenizer unavailable (%s); using the OpenVINO detokenizer", model_dir, err)
        return None
    return lambda token_ids: fast.decode(token_ids, skip_special_tokens=True)


def _context_length(model_dir: Path) -> int:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return 2048
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return 2048
