"""Serving benchmark: gateway vs engine throughput, hot-swap time, LoRA switch, A/B split.

    .venv/bin/python bench/bench_serving.py [--home .lmforge] [--rounds 6] [--trials 5] [--skip-hf] [--skip-swap]
                                            [--pacer] [--bursts 30] [--only vllm|ab]

Same harness everywhere: 8 distinct raw prompts, 64 new tokens per request (greedy), C concurrent
clients each sending ``rounds`` requests back to back; tokens/s = generated tokens / wall time.
Every row runs ``trials`` times, interleaved with the others; the tables show medians.

* engine direct: the engine alone in its own process, ``ContinuousBatchingPipeline`` driven by an
  ``add_request``/``step`` loop and by ``generate`` on the C prompts at once; the faster is the baseline.
  Engine and gateway run as deployed; with ``--pacer`` the step loop and a second gateway also run
  with the opt-in ``CorePacer`` (serving/backends/openvino.py), which only helps on oversubscribed cores.
* gateway: ``lmforge serve`` in its own process, C concurrent HTTP clients on /v1/completions
  (non-streaming and streaming), OpenVINO backend on the same IR.
* HF transformers fp32 ``generate``, 1 client.
* vLLM (when ``.venv-vllm`` exists; ``--only vllm`` runs just this): ``lmforge serve`` with
  ``serve.backend=vllm`` starts and manages a vLLM server on the SmolLM2 HF weights; the same clients
  hit that server's /v1/completions directly, and the gateway in front of it.
* swap: a registry alias flip under steady load (4 clients); failed requests, background
  load/warm-up time, the atomic switch, and the extra latency clients saw during the swap.
* LoRA: switching the engine's adapter (random rank-8 LoRA on SmolLM2) through /admin.
* A/B: 10,000 simulated users at 90/10.
* A/B bursts (``--only ab`` runs just these): the spread (min / P10 / median / P90 / max) of bursts of 8
  concurrent 64-token completions through the default champion/challenger split on a real registry,
  both aliases on one version and on two (bench/ab_bursts.py).

Results are printed as a table and written to ``<home>/bench/serving.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import ab_bursts  # noqa: E402 - after the path fix
from configs.schema import GATE_STATUS_TAG, RegistryConfig, ServeConfig  # noqa: E402

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how a bicycle works to a curious child, step by step.",
    "Describe a busy market in a small town on a Saturday morning.",
    "Write a letter from a cat to its owner about the new dog in the house.",
    "Tell the history of a fictional city that was built on a giant turtle.",
    "Describe the journey of a raindrop from the sky to the sea.",
    "Write a dialogue between a robot and a gardener about growing tomatoes.",
    "Explain why the sky changes colour at sunset in simple words.",
]
NEW_TOKENS = 64
_PIPES: dict = {}  # one compiled engine per IR for the direct runs
_RIDS = itertools.count()


# --------------------------------------------------------------------------- model
def prepare(home: Path) -> Path:
    """SmolLM2-135M exported once to OpenVINO INT8 IR (with tokenizer IR) under <home>/serving-bench."""
    root = home / "serving-bench"
    fp32, int8 = root / "smollm2-fp32-ir", root / "smollm2-int8"
    if not (int8 / "openvino_detokenizer.xml").is_file():
        from configs.schema import QuantizeConfig
        from tasks.models import import_model
        from tasks.quantize.export import export_ir, quantize_ir

        base = Path(import_model("smollm2-135m", home)["path"])
        if not (fp32 / "openvino_detokenizer.xml").is_file():
            export_ir(base, fp32)
        quantize_ir(fp32, int8, "int8", QuantizeConfig())
    return int8


# --------------------------------------------------------------------------- engines
class DirectWorker:
    """The engine alone, in a clean process (no torch imported: it competes with OpenVINO's threads)."""

    def __init__(self, ir: Path):
        self.process = subprocess.Popen([sys.executable, __file__, "--direct-worker", str(ir)], cwd=REPO,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def run(self, clients: int, rounds: int, mode: str = "step", awake: bool = False) -> dict:
        self.process.stdin.write(f"{clients} {rounds} {mode} {int(awake)}\n")
        self.process.stdin.flush()
        return json.loads(self.process.stdout.readline())

    def stop(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _direct_worker(ir: Path) -> None:
    bench_direct(ir, 1, 1)
    print("ready", flush=True)
    for line in sys.stdin:
        clients, rounds, mode, awake = line.split()
        print(json.dumps(bench_direct(ir, int(clients), int(rounds), mode, awake == "1")), flush=True)


def bench_direct(ir: Path, clients: int, rounds: int, mode: str = "step", awake: bool = False) -> dict:
    """The engine's own API, no server: ``mode`` "step" drives ``add_request``/``step``/``read`` like a
    server loop; "generate" hands each round's C prompts to ``generate`` at once (the engine's batch API).

    ``awake``: run the opt-in :class:`~serving.backends.openvino.CorePacer` alongside (see there).
    """
    import openvino_genai as ov_genai

    from serving.backends.openvino import CorePacer

    pipe = _PIPES.get(str(ir))
    if pipe is None:
        scheduler = ov_genai.SchedulerConfig()
        scheduler.cache_size = 1
        scheduler.max_num_seqs = 32
        pipe = _PIPES[str(ir)] = ov_genai.ContinuousBatchingPipeline(str(ir), scheduler, "CPU")
    config = pipe.get_config()
    config.max_new_tokens, config.do_sample, config.apply_chat_template = NEW_TOKENS, False, False
    config.ignore_eos = True  # exactly NEW_TOKENS per request, as in the design's harness
    pipe.generate(PROMPTS[:1], [config])  # warm-up
    pacer = CorePacer() if awake else None
    if pacer:
        pacer.busy(True)
    tokens, started = 0, time.perf_counter()
    for r in range(rounds):
        prompts = [PROMPTS[(r + i) % len(PROMPTS)] for i in range(clients)]
        if mode == "generate":
            results = pipe.generate(prompts, [config] * clients)
            tokens += results[0].perf_metrics.get_num_generated_tokens()  # the metrics cover the whole call
            continue
        running = []
        for prompt in prompts:
            running.append(pipe.add_request(next(_RIDS), prompt, config))
        while running:
            pipe.step()
            still = []
            for handle in running:
                if handle.can_read():
                    tokens += sum(len(o.generated_ids) for o in handle.read().values())
                if handle.get_status() == ov_genai.GenerationStatus.RUNNING:
                    still.append(handle)
            running = still
    elapsed = time.perf_counter() - started
    if pacer:
        pacer.close()
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed, "mode": mode, "awake": awake}


HTTP_CLIENTS = ("aiohttp", "httpx")
REGROUP_MS = ServeConfig.model_fields["regroup_ms"].default  # what the bench's gateways run with


def bench_gateway(base: str, clients: int, rounds: int, stream: bool = False, model: str = "lmforge-assistant",
                  server_pid: int | None = None, http_client: str = "httpx") -> dict:
    """C concurrent HTTP clients on ``base``/v1/completions (any OpenAI-compatible server serving ``model``).

    With ``server_pid`` (a gateway), also the CPU time of its event-loop thread and of these clients,
    as a share of the machine's CPU time over the run: what they took from the engine's threads.

    ``http_client``: httpx (the default, and every run before 2026-12-01 19:16) or aiohttp (vLLM's own serving
    benchmark uses). The clients share the engine's 2 cores: httpx spends ~2 ms of CPU per request
    here, aiohttp ~0.4 ms, yet side by side aiohttp did not measure a smaller overhead
    (docs/SERVING_RESULTS.md).
    """
    post = _post_aiohttp if http_client == "aiohttp" else _post_httpx

    async def client(i: int, session) -> tuple[int, list[float], list[float]]:
        tokens, latencies, engine = 0, [], []
        for r in range(rounds):
            body = {"model": model, "prompt": PROMPTS[(r + i) % len(PROMPTS)],
                    "max_tokens": NEW_TOKENS, "temperature": 0, "stream": stream, "ignore_eos": True}
            if stream:
                body["stream_options"] = {"include_usage": True}
            t = time.perf_counter()
            generated, engine_s = await post(session, body)
            latencies.append(time.perf_counter() - t)
            tokens += generated
            if engine_s is not None:
                engine.append(engine_s)
        return tokens, latencies, engine

    async def main():
        async with _http_session(http_client, base, clients) as session:
            await post(session, {"model": model, "prompt": "hi", "max_tokens": 4})
            started = time.perf_counter()
            results = await asyncio.gather(*(client(i, session) for i in range(clients)))
            return results, time.perf_counter() - started

    server = _main_thread_cpu(server_pid) if server_pid else 0.0
    client_cpu = time.process_time()
    results, elapsed = asyncio.run(main())
    client_cpu = time.process_time() - client_cpu
    server = (_main_thread_cpu(server_pid) - server) if server_pid else None
    tokens = sum(r[0] for r in results)
    latencies, engine = [x for r in results for x in r[1]], [x for r in results for x in r[2]]
    out = {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed,
           "p50_latency_s": statistics.median(latencies)}
    if engine and len(engine) == len(latencies):
        # Of each request's life as the client saw it, the share spent outside the engine's batch:
        # HTTP both ways, parsing, queueing, tokenising, detokenising (this machine's own clients included).
        out["outside_engine_share"] = 1 - sum(engine) / sum(latencies)
        out["outside_engine_ms_median"] = statistics.median((a - b) * 1000 for a, b in zip(latencies, engine))
    out["client_cpu_ms_per_request"] = client_cpu * 1000 / len(latencies)
    if server is not None:  # the warm-up request is inside both counts: a slight overestimate
        out["cpu_share"] = (server + client_cpu) / (elapsed * (os.cpu_count() or 1))
        out["server_cpu_ms_per_request"] = server * 1000 / len(latencies)
    return out


def _http_session(http_client: str, base: str, clients: int):
    if http_client == "aiohttp":
        import aiohttp

        return aiohttp.ClientSession(base_url=base, connector=aiohttp.TCPConnector(limit=clients + 2),
                                     timeout=aiohttp.ClientTimeout(total=300))
    return httpx.AsyncClient(base_url=base, timeout=300, limits=httpx.Limits(max_connections=clients + 2))


async def _post_aiohttp(session, body: dict) -> tuple[int, float | None]:
    """POST a completion; (completion tokens, engine seconds from Server-Timing or None)."""
    async with session.post("/v1/completions", json=body) as response:
        response.raise_for_status()
        if body.get("stream"):
            return sum([_usage_tokens(line.decode()) async for line in response.content]), None
        return (await response.json())["usage"]["completion_tokens"], _engine_seconds(response.headers)


async def _post_httpx(http, body: dict) -> tuple[int, float | None]:
    if body.get("stream"):
        async with http.stream("POST", "/v1/completions", json=body) as response:
            response.raise_for_status()
            return sum([_usage_tokens(line) async for line in response.aiter_lines()]), None
    response = await http.post("/v1/completions", json=body)
    response.raise_for_status()
    return response.json()["usage"]["completion_tokens"], _engine_seconds(response.headers)


def _usage_tokens(line: str) -> int:
    """Completion tokens of the SSE usage chunk (``stream_options.include_usage``); 0 for other lines."""
    line = line.strip()
    if line.startswith("data: {") and '"usage":{' in line:
        return json.loads(line[6:])["usage"]["completion_tokens"]
    return 0


def _engine_seconds(headers) -> float | None:
    timing = headers.get("server-timing", "")  # engine;dur=<ms>, when the backend measures it
    return float(timing.split("=")[1]) / 1000 if timing.startswith("engine;dur=") else None


def _main_thread_cpu(pid: int) -> float:
    import psutil

    thread = next(t for t in psutil.Process(pid).threads() if t.id == pid)
    return thread.user_time + thread.system_time


def bench_hf(model_dir: Path, rounds: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens, started = 0, None
    with torch.inference_mode():
        for r in range(rounds + 1):
            if r == 1:
                tokens, started = 0, time.perf_counter()  # round 0 is the warm-up
            ids = tokenizer(PROMPTS[r % len(PROMPTS)], return_tensors="pt")
            out = model.generate(**ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id)
            tokens += out.shape[1] - ids["input_ids"].shape[1]
    elapsed = time.perf_counter() - started
    return {"tokens": tokens, "seconds": elapsed, "tok_s": tokens / elapsed}


# --------------------------------------------------------------------------- gateway process
class GatewayProcess:
    """``lmforge serve`` in its own process (as deployed), stopped with SIGTERM."""

    def __init__(self, home: Path, overrides: list[str], port: int, ready_timeout: float = 300,
                 env: dict[str, str] | None = None, wait: bool = True):
        """Start the gateway; with ``wait`` (the default) return once /health/ready answers 200, else
        return at once and let the caller watch the load-in (bench_rss samples its memory) and call
        :meth:`wait_ready`."""
        self.base = f"http://127.0.0.1:{port}"
        self.ready_timeout = ready_timeout
        env = {**os.environ, "LMFORGE_HOME": str(home), "HF_HUB_OFFLINE": "1", **(env or {})}
        # Without auth the gateway rate-limits per client address: the bench is one address sending flat out.
        cmd = [sys.executable, "-m", "flows.cli", "serve", "-c", "pipeline", f"serve.port={port}",
               "serve.auth=false", "serve.rate_limit_per_minute=100000000", "serve.rate_limit_burst=1000000",
               *overrides]
        self.log = open(home / f"gateway-{port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.close()
                raise RuntimeError(f"gateway exited ({self.process.returncode}); see {self.log.name}")
            try:
                if httpx.get(self.base + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()  # a gateway that never got ready would otherwise run on beside the next benches
        raise TimeoutError(f"gateway not ready after {self.ready_timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a drain that hangs must not leave it running beside the next bench
            self.process.kill()
            self.process.wait()
        self.log.close()


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _variant(name: str, uri: str, extra: str = "") -> str:
    return f"serve.variants=[{{name: {name}, model_uri: '{uri}'{extra}}}]"


def ir_gateway(work: Path, ir: Path, env: dict[str, str] | None = None) -> GatewayProcess:
    """A gateway serving the IR ``ir`` as its one variant, no registry watcher, on a free port."""
    return GatewayProcess(work, [_variant("champion", str(ir)), "serve.watch=false"], _port(), env=env)


# --------------------------------------------------------------------------- vLLM
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"


def bench_vllm(home: Path, work: Path, rounds: int, trials: int, http_client: str = "httpx") -> dict:
    """vLLM in the same harness: the server the gateway manages, hit directly and through the gateway.

    vLLM serves the SmolLM2 HF weights (it picks bf16 on CPU); a variant is served under its name.
    """
    from tasks.models import import_model

    model_dir = Path(import_model("smollm2-135m", home)["path"])
    gateway = GatewayProcess(work, [_variant("champion", str(model_dir)), "serve.watch=false", "serve.backend=vllm",
                                    "serve.vllm_startup_timeout_s=600"], _port(), ready_timeout=660)
    trials_out: dict[str, list[dict]] = {}
    engine: dict = {}
    try:
        engine = httpx.get(gateway.base + "/admin/variants").json()["variants"][0]["engine"]
        print(f"vLLM at {engine['url']} (managed by the gateway, loaded in {engine['load_seconds']:.0f}s)", flush=True)
        vllm_url, base = engine["url"], gateway.base
        for trial in range(trials):
            for c in (1, 8):
                for key, run in ((f"vllm_{c}", lambda c=c: bench_gateway(vllm_url, c, rounds, model="champion",
                                                                             http_client=http_client)),
                                 (f"vllm_gateway_{c}",
                                  lambda c=c: bench_gateway(base, c, rounds, http_client=http_client)),
                                 (f"vllm_gateway_stream_{c}",
                                  lambda c=c: bench_gateway(base, c, rounds, True, http_client=http_client))):
                    trials_out.setdefault(key, []).append(run())
                    print(f"trial {trial} {key}: {trials_out[key][-1]['tok_s']:.1f} tok/s", flush=True)
    finally:
        gateway.stop()
    out: dict = {"vllm_model": str(model_dir), "vllm_load_s": engine["load_seconds"]}
    for key, runs in trials_out.items():
        out[key] = _aggregate(runs)
    return out


def report_vllm(out: dict) -> list[str]:
    if "vllm_1" not in out:
        return ["| vLLM CPU (reference, measured earlier here) | ~38 | ~240 | ~6.3x |"]
    rows = []
    for label, key in (("vLLM CPU direct (SmolLM2 HF weights, bf16)", "vllm"),
                       ("gateway -> vLLM, non-streaming", "vllm_gateway"),
                       ("gateway -> vLLM, streaming", "vllm_gateway_stream")):
        one, eight = out[f"{key}_1"]["tok_s"], out[f"{key}_8"]["tok_s"]
        rows.append(f"| {label} | {one:.1f} | {eight:.1f} | {eight / one:.1f}x |")
    return rows


# --------------------------------------------------------------------------- swap
def bench_swap(ir: Path, work: Path, clients: int = 4) -> dict:
    from mlflow import MlflowClient

    from tasks.registry import register_version
    from tasks.tracking import use_mlflow

    tracking = f"sqlite:///{work / 'mlflow.db'}"
    use_mlflow(tracking, "bench-swap", work / "artifacts")
    client = MlflowClient(tracking, tracking)
    versions = []
    for _ in range(2):
        # Registered as the pipeline does: the gateway finds the IR by its MLmodel's "openvino" artifact.
        versions.append(register_version(RegistryConfig(model_name="lmforge-assistant"), {"openvino": ir}, {},
                                         {"code_commit": "bench"}).version)
        # The gateway serves only versions that passed their gates (or are force-promoted).
        client.set_model_version_tag("lmforge-assistant", versions[-1], GATE_STATUS_TAG, "passed")
    client.set_registered_model_alias("lmforge-assistant", "champion", versions[0])
    gateway = GatewayProcess(work, [_variant("champion", "models:/lmforge-assistant@champion"),
                                    f"registry.tracking_uri={tracking}", "serve.poll_interval_s=0.2"], _port())
    results: list[tuple[float, float, int, str | None]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=gateway.base, timeout=60) as http:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    r = http.post("/v1/completions", json={"model": "lmforge-assistant", "prompt": PROMPTS[0],
                                                           "max_tokens": 16, "temperature": 0})
                    status, version = r.status_code, r.headers.get("x-lmforge-version")
                except httpx.HTTPError:
                    status, version = 0, None
                results.append((t, time.perf_counter(), status, version))

    try:
        workers = [threading.Thread(target=load) for _ in range(clients)]
        for w in workers:
            w.start()
        time.sleep(3)
        flip = time.perf_counter()
        client.set_registered_model_alias("lmforge-assistant", "champion", versions[1])
        while not any(v == versions[1] for *_, v in results[-clients:]):
            time.sleep(0.05)
        switched = time.perf_counter()
        time.sleep(2)
        stop.set()
        for w in workers:
            w.join()
        info = httpx.get(gateway.base + "/admin/variants").json()["variants"][0]["swaps"][-1]
    finally:
        gateway.stop()
    before = [e - s for s, e, _, _ in results if e < flip]
    during = [e - s for s, e, _, _ in results if e >= flip and s <= switched]
    baseline = statistics.median(before)
    return {"failed": sum(1 for *_, status, _ in results if status != 200), "requests": len(results),
            "flip_to_serving_s": switched - flip, "resolve_s": info["resolve_s"], "load_s": info["load_s"],
            "warmup_s": info["warmup_s"], "switch_ms": info["swap_ms"], "baseline_p50_s": baseline,
            "during_max_s": max(during) if during else None,
            "serving_visible_s": (max(during) - baseline) if during else 0.0}


def bench_lora(ir: Path, base_dir: Path, work: Path) -> dict:
    """Adapter switch on a running engine: a first adapter rebuilds the engine, later switches are in place."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    files = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                               LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        path = work / f"lora_{seed}.safetensors"
        save_file({k.replace(".default", ""): v.detach().float().contiguous()
                   for k, v in model.state_dict().items() if "lora_" in k}, str(path))
        files.append(path)
    gateway = GatewayProcess(work, [_variant("champion", str(ir), f", adapter: '{files[0]}'"), "serve.watch=false"],
                             _port())
    switches = []
    try:
        with httpx.Client(base_url=gateway.base, timeout=120) as http:
            body = {"model": "lmforge-assistant", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0}
            http.post("/v1/completions", json=body)
            for i in range(6):
                t = time.perf_counter()
                admin = http.post("/admin/variants/champion", json={"adapter": str(files[(i + 1) % 2])}).json()
                http.post("/v1/completions", json=body)
                end_to_end = time.perf_counter() - t
                engine = http.get("/admin/variants").json()["variants"][0]["engine"]
                switches.append({"admin_ms": admin["adapter"]["total_s"] * 1000,
                                 "engine_switch_ms": engine["adapter_switch_ms"], "end_to_end_ms": end_to_end * 1000})
    finally:
        gateway.stop()
    return {"switches": switches,
            "engine_switch_ms_median": statistics.median(s["engine_switch_ms"] for s in switches),
            "admin_ms_median": statistics.median(s["admin_ms"] for s in switches)}


def run_ab(home: Path, ir: Path, work: Path, count: int) -> dict:
    """A/B bursts on ``home``'s registry (bench/ab_bursts.py); gateways run the pipeline preset's variants."""
    from configs.schema import load

    tracking = load("pipeline", [f"home={home}"]).tracking_uri()
    return ab_bursts.run(home, ir, work, count, prompts=PROMPTS, gateway_factory=lambda w, overrides: GatewayProcess(
        w, [f"registry.tracking_uri={tracking}", *overrides], _port()))


def bench_ab(users: int = 10_000) -> dict:
    from serving.router import ABRouter

    router = ABRouter([("champion", 0.9), ("challenger", 0.1)])
    first = [router.assign(f"user-{i}") for i in range(users)]
    again = [ABRouter([("champion", 0.9), ("challenger", 0.1)]).assign(f"user-{i}") for i in range(users)]
    return {"users": users, "challenger_share": first.count("challenger") / users, "sticky": first == again}


# --------------------------------------------------------------------------- main
def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--direct-worker":
        _direct_worker(Path(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=REPO / ".lmforge")
    parser.add_argument("--rounds", type=int, default=6, help="Requests per client in one measurement.")
    parser.add_argument("--trials", type=int, default=5, help="Interleaved trials per measurement (medians reported).")
    parser.add_argument("--pacer", action="store_true", help="Also measure the opt-in CorePacer (diagnostic).")
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--skip-swap", action="store_true")
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--http-client", choices=HTTP_CLIENTS, default="httpx",
                        help="The benchmark clients' HTTP library (default httpx, as in every earlier run; aiohttp "
                             "uses ~5x less client CPU per request, see docs/SERVING_RESULTS.md).")
    parser.add_argument("--no-record", action="store_true",
                        help="Do not append the paired trials to <home>/bench/overhead_trials.jsonl "
                             "(see pool_overhead.py).")
    parser.add_argument("--bursts", type=int, default=30, help="A/B bursts per scenario (bench/ab_bursts.py).")
    parser.add_argument("--only", choices=["all", "vllm", "ab"], default="all",
                        help="vllm: only vLLM, direct and through the gateway (-> <home>/bench/serving-vllm.json); "
                             "ab: only the A/B bursts (-> <home>/bench/serving-ab.json)")
    args = parser.parse_args()
    home = args.home.resolve()
    work = home / "bench" / f"serving-{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    if args.only == "vllm":
        if not VLLM_PYTHON.is_file():
            sys.exit(f"{VLLM_PYTHON} not found: run `make vllm-env` first")
        out = {"new_tokens": NEW_TOKENS, "rounds": args.rounds,
               **bench_vllm(home, work, args.rounds, args.trials, args.http_client)}
        (home / "bench" / "serving-vllm.json").write_text(json.dumps(out, indent=2))
        print("\n".join(["| engine / path | 1 client tok/s | 8 clients tok/s | 8 vs 1 |", "|---|---:|---:|---:|",
                         *report_vllm(out)]))
        return
    ir = prepare(home)
    if args.only == "ab":
        out = {"ir": str(ir), "loadavg_start": os.getloadavg(), **run_ab(home, ir, work, args.bursts),
               "loadavg_end": os.getloadavg()}
        (home / "bench" / "serving-ab.json").write_text(json.dumps(out, indent=2))
        print("\n".join(ab_bursts.report(out)))
        return
    out: dict = {"ir": str(ir), "new_tokens": NEW_TOKENS, "rounds": args.rounds}

    # The machine is shared: interleave engine and gateway runs trial by trial, so a burst of
    # someone else's load does not land on one side only, and compare medians and the per-trial
    # ratio (a best-of-N favours whichever side has more rows). Engine and gateway run as deployed;
    # with --pacer the opt-in CorePacer rows show what it is worth under the current load.
    out["loadavg_start"] = os.getloadavg()
    out["http_client"] = client = args.http_client
    started = time.strftime("%Y-%m-%dT%H:%M")
    gateway = ir_gateway(work, ir)
    paced = ir_gateway(work, ir, env={"LMFORGE_OV_KEEP_AWAKE": "1"}) if args.pacer else None
    direct = DirectWorker(ir)
    trials: dict[str, list[dict]] = {}
    try:
        for trial in range(args.trials):
            for c in (1, 8):
                runs = [(f"direct_step_{c}", lambda c=c: direct.run(c, args.rounds, "step")),
                        (f"gateway_{c}", lambda c=c: bench_gateway(gateway.base, c, args.rounds,
                                                                   server_pid=gateway.process.pid,
                                                                   http_client=client)),
                        (f"direct_generate_{c}", lambda c=c: direct.run(c, args.rounds, "generate")),
                        (f"gateway_stream_{c}", lambda c=c: bench_gateway(gateway.base, c, args.rounds, True,
                                                                           server_pid=gateway.process.pid,
                                                                           http_client=client))]
                if paced is not None:
                    runs += [(f"direct_step_pacer_{c}",
                              lambda c=c: direct.run(c, args.rounds, "step", awake=True)),
                             (f"gateway_pacer_{c}",
                              lambda c=c: bench_gateway(paced.base, c, args.rounds, http_client=client))]
                for key, run in runs:
                    trials.setdefault(key, []).append(run() | {"loadavg": os.getloadavg()[0]})
                    print(f"trial {trial} {key}: {trials[key][-1]['tok_s']:.1f} tok/s", flush=True)
                if not args.no_record:
                    _record_trial(started, c, trials, client, home)
    finally:
        gateway.stop()
        if paced is not None:
            paced.stop()
        direct.stop()
    out["loadavg_end"] = os.getloadavg()
    out |= summarize(trials)
    if not args.skip_hf:
        out["hf_1"] = bench_hf(home / "models" / "smollm2-135m", args.rounds)
        print(f"hf c=1: {out['hf_1']['tok_s']:.1f} tok/s", flush=True)
    if args.skip_vllm:
        out["vllm"] = "not run (--skip-vllm)"
    elif VLLM_PYTHON.is_file():
        out |= bench_vllm(home, work, args.rounds, args.trials, client)
        out["vllm"] = "measured (SmolLM2 HF weights, same harness)"
    else:
        out["vllm"] = "not run: .venv-vllm absent (make vllm-env)"
    if not args.skip_swap:
        out["swap"] = bench_swap(ir, work)
        print(f"swap: {out['swap']}", flush=True)
        out["lora"] = bench_lora(ir, home / "models" / "smollm2-135m", work)
        print(f"lora: {out['lora']}", flush=True)
    out["ab"] = bench_ab()
    out["ab_bursts"] = run_ab(home, ir, work, args.bursts)
    (home / "bench").mkdir(exist_ok=True)
    (home / "bench" / "serving.json").write_text(json.dumps(out, indent=2))
    print(report(out))


def _record_trial(started: str, clients: int, trials: dict[str, list[dict]], http_client: str, home: Path) -> None:
    """The trial's gateway row with the engine rows around it, in <home>/bench/, for bench/pool_overhead.py."""
    from bench.pool_overhead import TRIALS, append_trial

    before, after = trials[f"direct_step_{clients}"][-1]["tok_s"], trials[f"direct_generate_{clients}"][-1]["tok_s"]
    served = trials[f"gateway_{clients}"][-1]["tok_s"]
    append_trial(f"{started} full", "full", clients, http_client, REGROUP_MS, before, served, after,
                 path=home / "bench" / TRIALS.name)


def _aggregate(runs: list[dict]) -> dict:
    """One row over its trials: the median (reported), the best and every trial's tok/s."""
    rates = [r["tok_s"] for r in runs]
    return {"tok_s": statistics.median(rates), "best_tok_s": max(rates), "all_tok_s": [round(x, 1) for x in rates]}


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """Percentile-bootstrap interval of the median: how uncertain the host's noise leaves it."""
    from scipy.stats import bootstrap

    result = bootstrap((values,), statistics.median, confidence_level=confidence, method="percentile",
                       vectorized=False, random_state=0)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def summarize(trials: dict[str, list[dict]]) -> dict:
    """Median over trials per row; the engine baseline is its faster API by median; the overhead is
    also taken trial by trial (gateway vs the step loop run just before it, and vs the mean of that
    trial's two engine rows) and its median reported."""
    out: dict = {}
    for key, runs in trials.items():
        out[key] = _aggregate(runs) | {"loadavg": [r["loadavg"] for r in runs]}
        if all("cpu_share" in r for r in runs):
            out[key]["cpu_share"] = statistics.median(r["cpu_share"] for r in runs)
        if all("outside_engine_share" in r for r in runs):
            out[key]["outside_engine_share"] = statistics.median(r["outside_engine_share"] for r in runs)
            out[key]["outside_engine_ms_median"] = statistics.median(r["outside_engine_ms_median"] for r in runs)
    for c in (1, 8):
        out[f"direct_{c}"] = max(out[f"direct_step_{c}"], out[f"direct_generate_{c}"], key=lambda r: r["tok_s"])
        for path in ("gateway", "gateway_stream"):
            paired = [g["tok_s"] / d["tok_s"] for g, d in zip(trials[f"{path}_{c}"], trials[f"direct_step_{c}"])]
            out[f"{path}_{c}"]["paired_ratio_median"] = statistics.median(paired)
            out[f"{path}_{c}"]["paired_ratios"] = [round(x, 3) for x in paired]
            # Both engine rows of the trial, one run before the gateway and one after: their mean
            # cancels a drift in the host's speed (the max of two noisy rows would be biased upward;
            # the two APIs run equally fast in one process).
            both = [g["tok_s"] / ((step["tok_s"] + gen["tok_s"]) / 2) for g, step, gen in
                    zip(trials[f"{path}_{c}"], trials[f"direct_step_{c}"], trials[f"direct_generate_{c}"])]
            out[f"{path}_{c}"]["paired_both_ratio_median"] = statistics.median(both)
            out[f"{path}_{c}"]["paired_both_ratios"] = [round(x, 3) for x in both]
            if len(both) >= 3:
                out[f"{path}_{c}"]["paired_both_interval"] = median_interval(both)
    return out


def report(out: dict) -> str:
    rows = ["| engine / path (median of trials) | 1 client tok/s | 8 clients tok/s | 8 vs 1 |", "|---|---:|---:|---:|"]
    for label, key in (("OpenVINO CB direct, faster of the two below (INT8)", "direct"),
                       ("  direct: add_request/step loop", "direct_step"),
                       ("  direct: generate() on the C prompts", "direct_generate"),
                       ("gateway, non-streaming", "gateway"), ("gateway, streaming", "gateway_stream"),
                       ("direct step loop with CorePacer", "direct_step_pacer"),
                       ("gateway with CorePacer, non-streaming", "gateway_pacer")):
        if f"{key}_1" not in out:
            continue
        one, eight = out[f"{key}_1"]["tok_s"], out[f"{key}_8"]["tok_s"]
        rows.append(f"| {label} | {one:.1f} | {eight:.1f} | {eight / one:.1f}x |")
    if "hf_1" in out:
        rows.append(f"| HF transformers fp32 | {out['hf_1']['tok_s']:.1f} | - | - |")
    rows += report_vllm(out)
    for c in (1, 8):
        g, st = out[f"gateway_{c}"], out[f"gateway_stream_{c}"]
        rows.append(f"\ngateway overhead at {c} client(s), medians vs the faster engine API: "
                    f"{1 - g['tok_s'] / out[f'direct_{c}']['tok_s']:+.1%} non-streaming, "
                    f"{1 - st['tok_s'] / out[f'direct_{c}']['tok_s']:+.1%} streaming; trial by trial vs the step "
                    f"loop (median): {1 - g['paired_ratio_median']:+.1%} / {1 - st['paired_ratio_median']:+.1%}; "
                    f"trial by trial vs the mean of both engine rows: {1 - g['paired_both_ratio_median']:+.1%} / "
                    f"{1 - st['paired_both_ratio_median']:+.1%}")
        if "paired_both_interval" in g:
            low, high = g["paired_both_interval"]
            rows.append(f"95% bootstrap interval of that non-streaming overhead: {1 - high:+.1%} to {1 - low:+.1%}")
        if "outside_engine_share" in g:
            rows.append(f"non-streaming requests at {c} client(s) spent {g['outside_engine_share']:.2%} of their "
                        f"latency outside the engine (median {g['outside_engine_ms_median']:.2f} ms per request)"
                        + (f"; the gateway's event loop and the HTTP clients used {g['cpu_share']:.2%} of the CPU"
                           if "cpu_share" in g else ""))
    if "swap" in out:
        s = out["swap"]
        rows.append(f"\nswap under load: {s['failed']} failed of {s['requests']}; alias flip -> new version serving "
                    f"{s['flip_to_serving_s']:.2f}s (resolve {s['resolve_s']:.2f}s, load {s['load_s']:.2f}s, "
                    f"warm-up {s['warmup_s']:.2f}s, switch {s['switch_ms']:.3f} ms); request latency p50 "
                    f"{s['baseline_p50_s']:.3f}s before, max {s['during_max_s'] or 0:.3f}s during -> serving-visible "
                    f"{s['serving_visible_s']:.2f}s")
    if "lora" in out:
        lora = out["lora"]
        rows.append(f"LoRA switch: engine {lora['engine_switch_ms_median']:.1f} ms median, admin call "
                    f"{lora['admin_ms_median']:.1f} ms median")
    ab = out["ab"]
    rows.append(f"A/B 90/10 over {ab['users']} users: challenger {ab['challenger_share']:.2%}, sticky={ab['sticky']}")
    rows.append(f"vLLM: {out['vllm']}")
    if "ab_bursts" in out:
        rows += ["", *ab_bursts.report(out["ab_bursts"])]
    return "\n".join(rows)


if __name__ == "__main__":
    main()
