"""The OpenVINO engine loop, run in its own process by :class:`serving.backends.openvino.OpenVINOBackend`.

Why a process: ``ContinuousBatchingPipeline.step()`` holds the Python GIL for the whole step
(measured with openvino_genai 2026.4: a thread spinning beside a 15 ms step advanced once), so in
the gateway's process the event loop could only parse requests and send responses between steps;
at 8 clients a request spent 5% of its life waiting there while its batch slot idled. vLLM runs
its EngineCore in a separate process for the same reason.

Protocol over one duplex ``multiprocessing`` connection, in the named messages of
:mod:`serving.backends.engine_messages`. Parent -> engine: ``Add``, ``Cancel``, ``LoadAdapter``,
``Close``. Engine -> parent: ``Ready`` or ``LoadFailed`` once; then ``Out`` (a ``Tokens`` per request
with new output) after a step, ``Reply`` to a ``LoadAdapter``, ``Stats`` after an adapter switch and,
when the engine fails, ``Dead``.

Regrouping: when more finished requests are owed a successor than are still running (a group of
requests sent together finished together), the engine waits until ``regroup_ms`` after that step for
their successors before stepping on, so they prefill together instead of a step apart (see
:meth:`_Engine.regroup`); and new requests are held out of a step that ends every running request,
so they start with the successors rather than a step ahead of them (:meth:`_Engine.hold`).

Runtime LoRA (see the module docstring of serving.backends.openvino): one adapter is active for
the whole pipeline; requests for another adapter wait until the running batch drains, then the
engine switches with a 1-token ``generate``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serving.backends import engine_messages as msg
from serving.backends.base import release_free_heap
from serving.backends.text import openvino_reference
from tasks.generators import precision_properties


def read_adapter(path: str):
    import openvino_genai as ov_genai

    return ov_genai.Adapter(path)


@dataclass(slots=True)
class _Running:
    """A request in the pipeline."""

    handle: Any
    stream: bool
    added_at: float
    steps_left: int  # counted down per step from max_new_tokens: steps can run ahead of tokens (see hold)


class _Engine:
    def __init__(self, conn, model_dir: str, device: str, cache_gb: float, max_num_seqs: int,
                 num_threads: int | None, adapters: dict[str, str], regroup_ms: float, prefix_caching: bool = True,
                 precision: str = "auto"):
        import openvino_genai as ov_genai

        self.ov = ov_genai
        self.conn = conn
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = max(1, int(round(cache_gb)))
        scheduler.max_num_seqs = max_num_seqs
        scheduler.enable_prefix_caching = prefix_caching
        properties: dict[str, Any] = {}
        if num_threads:
            properties["INFERENCE_NUM_THREADS"] = num_threads
        properties.update(precision_properties(precision))
        self.adapters = {name: read_adapter(path) for name, path in adapters.items()}
        self.lora = bool(self.adapters)
        if self.lora:
            properties["adapters"] = ov_genai.AdapterConfig(list(self.adapters.values()))
        self.pipe = ov_genai.ContinuousBatchingPipeline(model_dir, scheduler, device, properties)
        self.active_adapter: Any = ()  # unknown until the first switch
        self.pending: list[list] = []  # [rid, prompt, config, adapter, stream]
        self.active: dict[int, _Running] = {}
        self.held: set[int] = set()  # pending requests already held back once (see hold)
        self.cancelled: set[int] = set()
        self.regroup_s = regroup_ms / 1000
        self.owed = 0  # requests finished within regroup_s whose successors have not arrived (see regroup)
        self.group_finished = False  # the last step that finished requests finished two or more
        self.finished_at = 0.0  # when the last step that finished a request ended

    # ------------------------------------------------------------------ messages
    def config(self, fields: dict[str, Any]):
        config = self.pipe.get_config()
        config.apply_chat_template = False
        for key, value in fields.items():
            if key == "structured_output_config":
                value = self.ov.StructuredOutputConfig(**value)
            elif key == "stop_strings":
                value = set(value)
            setattr(config, key, value)
        return config

    def handle(self, message: msg.Add | msg.Cancel | msg.LoadAdapter | msg.Close) -> bool:
        if isinstance(message, msg.Add):
            self.owed = max(0, self.owed - 1)
            try:
                config = self.config(message.fields)
            except Exception as err:  # noqa: BLE001 - a config the engine refuses is the request's fault
                refused = msg.Tokens(message.rid, [], "invalid", 0.0, f"the engine refused the request: {err}")
                self.conn.send(msg.Out([refused]))
                return True
            self.pending.append([message.rid, message.prompt, config, message.adapter, message.stream])
        elif isinstance(message, msg.Cancel):
            self.cancelled.add(message.rid)
        elif isinstance(message, msg.LoadAdapter):
            try:
                self.adapters[message.name] = read_adapter(message.path)
                self.conn.send(msg.Reply(message.token, None))
            except Exception as err:  # noqa: BLE001 - reported to the caller as a bad adapter
                self.conn.send(msg.Reply(message.token, f"could not read LoRA adapter {message.path}: {err}"))
        elif isinstance(message, msg.Close):
            return False
        return True

    def drain(self, block: bool) -> bool:
        """Read every waiting message (waiting for one when ``block``); False once told to close."""
        conn = self.conn
        if block and not conn.poll(None):
            return True
        while conn.poll(0):
            if not self.handle(conn.recv()):
                return False
        return True

    # ------------------------------------------------------------------ loop
    def run(self) -> None:
        ov = self.ov
        finished = {ov.GenerationStatus.FINISHED, ov.GenerationStatus.STOP}
        failed = {ov.GenerationStatus.IGNORED, ov.GenerationStatus.CANCEL}
        generating = ov.GenerationStatus.RUNNING
        length, unfinished = ov.GenerationFinishReason.LENGTH, ov.GenerationFinishReason.NONE
        while self.drain(block=not self.pending and not self.active):
            if self.group_finished and self.owed > len(self.active) and not self.regroup():
                return
            if self.cancelled:
                self.pending = [p for p in self.pending if p[0] not in self.cancelled]
                for rid in self.cancelled & self.active.keys():
                    self.active.pop(rid).handle.cancel()
                self.held -= self.cancelled
                self.cancelled.clear()
            new = [] if self.hold() else self.admit()
            if new and self.lora and new[0][3] != self.active_adapter:
                self.switch_adapter(new[0][3])
            refused: list[msg.Tokens] = []
            for rid, prompt, config, _, stream in new:
                self.held.discard(rid)
                try:
                    handle = self.pipe.add_request(rid, prompt, config)
                except Exception as err:  # noqa: BLE001 - e.g. a grammar XGrammar cannot compile: that request only
                    refused.append(msg.Tokens(rid, [], "invalid", 0.0, f"the engine refused the request: {err}"))
                    continue
                self.active[rid] = _Running(handle, stream, time.perf_counter(), config.max_new_tokens)
            if refused:
                self.conn.send(msg.Out(refused))
            if not self.active:
                continue
            self.pipe.step()
            out: list[msg.Tokens] = []
            finished_now = 0
            for rid, request in list(self.active.items()):
                handle, stream, added_at = request.handle, request.stream, request.added_at
                request.steps_left -= 1
                status = handle.get_status()
                if status == generating and not stream:
                    continue  # nobody reads partial output: take it all at the end, as generate() does
                ids: list[int] = []
                reason = None
                if status in finished and not stream:
                    outputs = handle.read_all()
                else:
                    outputs = handle.read().values() if handle.can_read() else ()
                for output in outputs:
                    ids.extend(output.generated_ids)
                    if output.finish_reason != unfinished:
                        reason = "length" if output.finish_reason == length else "stop"
                if status in finished:
                    del self.active[rid]
                    finished_now += 1
                    out.append(msg.Tokens(rid, ids, reason or "stop", time.perf_counter() - added_at, None))
                elif status in failed:
                    del self.active[rid]
                    out.append(msg.Tokens(rid, [], None, 0.0,
                                          f"engine dropped the request ({status.name}): KV cache exhausted?"))
                elif ids:
                    out.append(msg.Tokens(rid, ids, None, 0.0, None))
            if out:
                self.conn.send(msg.Out(out))
            if finished_now and self.regroup_s:
                now = time.perf_counter()
                if now - self.finished_at > self.regroup_s:
                    self.owed = 0  # whoever finished before has had their chance
                self.owed += finished_now
                self.finished_at = now
                self.group_finished = finished_now >= 2

    def regroup(self) -> bool:
        """Wait (until ``regroup_s`` after the last finish) for the successors of requests that just finished.

        Called after a step that finished two or more requests when more requests are owed a successor
        than are running. ``owed`` counts the requests finished while each finish came within
        ``regroup_s`` of the one before, less every arrival since. Closed-loop clients send their next
        request as soon as the last one returns; stepping at once prefills the successors that came
        first while the rest arrive mid-step and wait for the next step boundary, and the split then
        repeats round after round (measured: 4 + 4 and 1 + 7 rounds at 8 clients, each costing a
        prefill step). Waiting costs the running few that long and saves each late arrival most of a
        step. The wait ends ``regroup_s`` after the finishing step, so a request after an idle spell
        never waits; a group that does not come back is forgotten after one wait. Requests that finish
        one per step (a lone client, traffic winding down) never trigger it. False once told to close.
        """
        deadline = self.finished_at + self.regroup_s
        while self.owed:
            remaining = deadline - time.perf_counter()
            if remaining <= 0 or not self.conn.poll(remaining):
                break
            if not self.handle(self.conn.recv()):
                return False
        self.owed, self.group_finished = 0, False
        return True

    def hold(self) -> bool:
        """Hold new requests back for one step when every running request ends with that step.

        A request admitted into the last step of a group finishes a step before the group's
        successors, which then arrive while it runs: the next round splits the same way, and the one
        after (measured at 8 clients: a 1 + 7 split kept for whole runs, each round a step longer).
        Held for that step, it prefills with the successors instead (``regroup`` waits for them).
        ``steps_left`` counts steps, which can run ahead of tokens (a prefill split over steps, a
        preempted request), so the hold can come early; it never holds a request twice, and once a
        held request is pending nothing is held, so no request waits more than one step for it.
        """
        if not (self.regroup_s and self.active and self.pending):
            return False
        if any(running.steps_left > 1 for running in self.active.values()):
            return False
        pending = {p[0] for p in self.pending}
        if pending & self.held:
            return False
        self.held |= pending
        return True

    def admit(self) -> list[list]:
        if not self.lora:
            new, self.pending = self.pending, []
            return new
        if not self.pending:
            return []
        if any(p[3] != self.active_adapter for p in self.pending):
            if self.active:
                return []  # another adapter is waiting: let the running batch drain, admit nothing new
            target = self.pending[0][3]
        else:
            target = self.active_adapter
        new = [p for p in self.pending if p[3] == target]
        self.pending = [p for p in self.pending if p[3] != target]
        return new

    def switch_adapter(self, name: str | None) -> None:
        started = time.perf_counter()
        config = self.pipe.get_config()
        config.apply_chat_template = False
        config.max_new_tokens = 1
        config.do_sample = False
        config.adapters = self.ov.AdapterConfig(self.adapters[name]) if name else self.ov.AdapterConfig()
        self.pipe.generate(["."], [config])
        self.active_adapter = name
        self.conn.send(msg.Stats(name, time.perf_counter() - started))


def engine_main(conn, model_dir: str, device: str, cache_gb: float, max_num_seqs: int, num_threads: int | None,
                adapters: dict[str, str], regroup_ms: float, prefix_caching: bool = True,
                precision: str = "auto") -> None:
    """Entry point of the engine process."""
    import signal

    # Ctrl-C reaches the whole process group: the gateway drains in-flight requests and then
    # closes this process; it must not die first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        engine = _Engine(conn, model_dir, device, cache_gb, max_num_seqs, num_threads, adapters, regroup_ms,
                         prefix_caching, precision)
    except Exception as err:  # noqa: BLE001 - reported to the parent, which raises BackendError
        conn.send(msg.LoadFailed(f"{type(err).__name__}: {err}"))
        return
    try:
        # The gateway checks its own tokenizer against this (serving.backends.text).
        text = openvino_reference(engine.pipe.get_tokenizer(), Path(model_dir))
    except Exception:  # noqa: BLE001 - without it the gateway loads the OpenVINO tokenizer itself
        text = None
    release_free_heap()
    conn.send(msg.Ready({"lora": engine.lora, "text": text}))
    try:
        engine.run()
    except (EOFError, BrokenPipeError):
        return  # the gateway went away
    except Exception as err:  # noqa: BLE001 - the engine is unusable: say so, the parent fails its requests
        try:
            conn.send(msg.Dead(f"{type(err).__name__}: {err}"))
        except OSError:
            pass


class EngineProcess:
    """The engine in a fresh interpreter (``python -m serving.backends.openvino_engine FD``) over a
    socket pair, with the parts of ``multiprocessing.Process`` the backend uses.

    Not multiprocessing's spawn: it re-runs the parent's main module in the child (for ``lmforge
    serve`` the whole CLI and config schema, ~26 MiB) and starts a resource-tracker process (~13 MiB),
    per engine. This child imports the engine module and OpenVINO only. Its arguments go over stdin.
    """

    def __init__(self, **kwargs: Any):
        import json
        import socket
        import subprocess
        import sys
        from multiprocessing.connection import Connection

        ours, theirs = socket.socketpair()
        with theirs:
            self._popen = subprocess.Popen(
                [sys.executable, "-m", "serving.backends.openvino_engine", str(theirs.fileno())],
                stdin=subprocess.PIPE, pass_fds=(theirs.fileno(),))
        assert self._popen.stdin is not None
        with self._popen.stdin as stdin:
            stdin.write(json.dumps(kwargs).encode())
        self.conn = Connection(ours.detach())

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def exitcode(self) -> int | None:
        return self._popen.poll()

    def is_alive(self) -> bool:
        return self._popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        import subprocess

        try:
            self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    def kill(self) -> None:
        self._popen.kill()


if __name__ == "__main__":
    import json
    import sys
    from multiprocessing.connection import Connection

    engine_main(Connection(int(sys.argv[1])), **json.loads(sys.stdin.read()))
