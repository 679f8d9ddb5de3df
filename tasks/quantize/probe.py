"""Measure one IR variant in a fresh process: peak RSS when loaded, a chat answer, tokens/s, and the
P50/P95 latency of single requests (what the registry's ``max_latency_ms`` gate compares).

Run as ``python -m tasks.quantize.probe IR_DIR --concurrency 1 8 ...``; prints one JSON object on
the last line of stdout. A separate process is the only honest way to get the memory a model costs
(``ru_maxrss`` of a process that did nothing else) and keeps a crashing runtime away from the flow.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

CHAT_PROMPT = "Is the sentiment of this review positive or negative? 'A warm, funny and moving film.'"


def _rss_mb() -> float:
    """Peak resident set of this process so far, in MiB.

    VmHWM is per address space and starts afresh at exec; ``ru_maxrss`` would not do here because
    Linux carries it across fork+exec, so a probe started from a big parent would report the parent.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(ir_dir: Path, concurrency: list[int], max_new_tokens: int, cache_gb: float, adapter: Path | None,
            latency_requests: int = 20) -> dict:
    """Load, answer one chat prompt, time greedy generation at each concurrency level, then time
    ``latency_requests`` single requests one after another (concurrency 1) for P50/P95 latency."""
    import numpy as np
    import openvino_genai as og

    baseline = _rss_mb()
    started = time.perf_counter()
    adapters = og.AdapterConfig(og.Adapter(str(adapter))) if adapter else None
    pipe = og.LLMPipeline(str(ir_dir), "CPU", **({"adapters": adapters} if adapters else {}))
    load_seconds = time.perf_counter() - started
    config = og.GenerationConfig(max_new_tokens=16, do_sample=False)
    history = og.ChatHistory()
    history.append({"role": "user", "content": CHAT_PROMPT})
    answer = pipe.generate(history, config)
    answer_text = answer.texts[0] if hasattr(answer, "texts") else str(answer)
    peak_loaded = _rss_mb()
    del pipe

    scheduler = og.SchedulerConfig()
    scheduler.cache_size = max(1, round(cache_gb))
    properties = {"adapters": adapters} if adapters else {}
    cb = og.ContinuousBatchingPipeline(str(ir_dir), scheduler, "CPU", properties)
    bench = og.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
    bench.ignore_eos = True  # fixed-length answers so every variant does the same amount of work
    if adapters:
        bench.adapters = adapters
    tokenizer = cb.get_tokenizer()
    # Token ids in, token ids out: the count of generated tokens is then exact, not inferred from text.
    prompts = [
        tokenizer.encode(f"Write a short story about a robot number {i} who learns to paint.").input_ids
        for i in range(max(concurrency))
    ]
    cb.generate(prompts[:1], [bench])  # warm-up: first inference compiles kernels
    tokens_per_s = {}
    for n in concurrency:
        started = time.perf_counter()
        results = cb.generate(prompts[:n], [bench] * n)
        elapsed = time.perf_counter() - started
        generated = sum(len(r.m_generation_ids[0]) for r in results)
        tokens_per_s[str(n)] = round(generated / elapsed, 2)
    latencies_ms = []
    for i in range(latency_requests):
        started = time.perf_counter()
        cb.generate([prompts[i % len(prompts)]], [bench])
        latencies_ms.append((time.perf_counter() - started) * 1000)
    lengths = [int(prompt.get_shape()[-1]) for prompt in prompts[:latency_requests]]
    return {
        "baseline_rss_mb": round(baseline, 1),
        "peak_rss_mb": round(peak_loaded, 1),
        "model_rss_mb": round(peak_loaded - baseline, 1),
        "load_seconds": round(load_seconds, 2),
        "chat_answer": answer_text,
        "tokens_per_s": tokens_per_s,
        "latency_p50_ms": round(float(np.percentile(latencies_ms, 50)), 2),
        "latency_p95_ms": round(float(np.percentile(latencies_ms, 95)), 2),
        "latency_measured": (f"{latency_requests} single requests one after another (concurrency 1) to "
                             f"ContinuousBatchingPipeline on CPU after warm-up, {max_new_tokens} new tokens each "
                             f"(ignore_eos), prompts of {min(lengths)}-{max(lengths)} tokens; "
                             "wall time of each generate call, no HTTP"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("ir_dir", type=Path)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--cache-gb", type=float, default=1.0)
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--latency-requests", type=int, default=20)
    args = parser.parse_args(argv)
    result = measure(args.ir_dir, args.concurrency, args.max_new_tokens, args.cache_gb, args.adapter,
                     args.latency_requests)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
