"""Prefix caching on vs off in the OpenVINO engine: time to first token and JSON-RPC throughput (issue 19).

    .venv/bin/python bench/bench_prefix_cache.py IR_DIR [--rounds 2] [--ttft-requests 40] [--rpc-seconds 30]
                                                       [--clients 8]

Every JSON-RPC call of a task sends the same system prompt and instruction before the text, which a
prefix cache computes once. For each setting (``serve.prefix_caching`` false / true, alternated over
``--rounds`` so drift on a shared machine hits both alike): ``lmforge serve`` in its own process on the IR
(auth off, no registry watcher, a temporary home), then

* **TTFT**: ``--ttft-requests`` streamed chat completions one after another, each a task prompt (the
  sentiment or NER template around an SST-2 / CoNLL sentence, as ``/rpc`` renders it): time from sending
  to the first content chunk;
* **/rpc throughput**: ``--clients`` clients calling ``classify_sentiment`` / ``extract_entities``
  back to back on different sentences for ``--rpc-seconds``: calls per second.

Prints P50/P95 TTFT (ms) and calls/s per setting (medians over rounds) and the on/off ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_serving import GatewayProcess, _port, _variant  # noqa: E402

from serving.routes.rpc import task_messages  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def sentences(limit: int = 400) -> list[str]:
    """Real inputs from the shipped data: SST-2 dev reviews and CoNLL validation sentences, interleaved."""
    reviews = [line.split("\t")[0] for line in (REPO / "data/raw/sst2/dev.tsv").read_text().splitlines() if line]
    conll, words = [], []
    for line in (REPO / "data/raw/conll2003/valid.txt").read_text().splitlines():
        if not line.strip() or line.startswith("-DOCSTART-"):
            if len(words) > 4:
                conll.append(" ".join(words))
            words = []
        else:
            words.append(line.split()[0])
    return [s for pair in zip(reviews, conll, strict=False) for s in pair][:limit]


def ttft(base: str, texts: list[str], count: int) -> list[float]:
    out = []
    with httpx.Client(base_url=base, timeout=120) as http:
        for i in range(count):
            task = ("sentiment", "ner")[i % 2]
            body = {"model": "lmforge-assistant", "messages": task_messages(task, texts[i % len(texts)]),
                    "max_tokens": 8, "temperature": 0, "stream": True}
            started = time.perf_counter()
            with http.stream("POST", "/v1/chat/completions", json=body) as response:
                for line in response.iter_lines():
                    if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                        out.append((time.perf_counter() - started) * 1000)
                        break
    return out


async def rpc_rate(base: str, texts: list[str], clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(k: int) -> None:
        nonlocal done
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            i = k
            while time.perf_counter() < deadline:
                method = ("classify_sentiment", "extract_entities")[i % 2]
                call = {"jsonrpc": "2.0", "method": method, "params": {"text": texts[i % len(texts)]}, "id": i}
                answer = (await http.post("/rpc", json=call)).json()
                if "result" not in answer:
                    raise RuntimeError(f"rpc failed: {answer}")
                done += 1
                i += clients

    started = time.perf_counter()
    await asyncio.gather(*(client(k) for k in range(clients)))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ir", type=Path, help="OpenVINO IR directory to serve")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--ttft-requests", type=int, default=40)
    parser.add_argument("--rpc-seconds", type=float, default=30)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    texts = sentences()
    results: dict[bool, dict[str, list[float]]] = {False: {"p50": [], "p95": [], "rate": []},
                                                   True: {"p50": [], "p95": [], "rate": []}}
    for round_ in range(args.rounds):
        for enabled in ((False, True) if round_ % 2 == 0 else (True, False)):
            with tempfile.TemporaryDirectory(prefix="lmforge-prefix-") as home:
                gateway = GatewayProcess(Path(home), [_variant("champion", str(args.ir)), "serve.watch=false",
                                                      f"serve.prefix_caching={str(enabled).lower()}"], _port())
                try:
                    ttft(gateway.base, texts, 4)  # warm-up: compile, first allocations
                    times = sorted(ttft(gateway.base, texts, args.ttft_requests))
                    rate = asyncio.run(rpc_rate(gateway.base, texts, args.clients, args.rpc_seconds))
                finally:
                    gateway.stop()
            p50, p95 = statistics.median(times), times[min(len(times) - 1, int(0.95 * len(times)))]
            for key, value in (("p50", p50), ("p95", p95), ("rate", rate)):
                results[enabled][key].append(value)
            print(f"round {round_ + 1} prefix_caching={enabled}: TTFT P50 {p50:.1f} ms P95 {p95:.1f} ms, "
                  f"/rpc {rate:.2f} calls/s", flush=True)
    med = {k: {m: statistics.median(v) for m, v in r.items()} for k, r in results.items()}
    print(f"\nIR {args.ir}; medians over {args.rounds} round(s); {args.clients} /rpc clients\n")
    print("| prefix caching | TTFT P50 (ms) | TTFT P95 (ms) | /rpc calls/s |")
    print("|---|---:|---:|---:|")
    for enabled in (False, True):
        print(f"| {'on' if enabled else 'off'} | {med[enabled]['p50']:.1f} | {med[enabled]['p95']:.1f} | "
              f"{med[enabled]['rate']:.2f} |")
    print(f"| on / off | {med[True]['p50'] / med[False]['p50']:.2f}x | {med[True]['p95'] / med[False]['p95']:.2f}x | "
          f"{med[True]['rate'] / med[False]['rate']:.2f}x |")


if __name__ == "__main__":
    main()
