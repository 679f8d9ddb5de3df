"""Gateway overhead at C clients: gateway runs alternating with the engine's step loop, each against the
engine runs on either side, in blocks of fresh processes started in alternating order.

A narrower companion of ``bench_serving.py`` for the overhead criterion alone: one row per gateway
run, compared with the mean of the two engine runs around it (which cancels a linear drift in the
shared host's speed), plus the share of each request's latency spent outside the engine.

Why blocks with the start order alternated: of two identical engine processes, the one started
second measured 1-7% faster in 6 of 6 fresh pairs, and 1% faster to 7% slower when started first
(5 pairs; same memory layout, no transparent huge pages; cause not found). Every run before
2026-12-02 started the gateway first, so its engine was always the one started first. Each block
here starts both anew, the gateway first in even blocks and the engine first in odd ones, so the
effect cancels in the pooled estimate.

Why alternating (``E G E G E``) instead of a fresh bracket per trial (``E G E E G E``): in A/A checks
(a second engine process in the gateway's slot) the bracketed design favoured the middle process by
4-5%, the alternating one by 1.8%. Every run is appended to ``<home>/bench/overhead_trials.jsonl``
(``--record``), which ``pool_overhead.py`` pools over runs.

    flock /tmp/bench.lock .venv/bin/python bench/bracket_gateway.py --home .lmforge --trials 16 --blocks 4
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_serving as bench  # noqa: E402 - after the path fix, like bench_serving's own imports
from bench.pool_overhead import TRIALS, append_trial, paired_ratio  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".lmforge"),
                        help="lmforge home with models/ (default .lmforge)")
    parser.add_argument("--trials", type=int, default=16, help="gateway runs per HTTP client (default 16)")
    parser.add_argument("--blocks", type=int, default=4,
                        help="blocks of fresh processes the trials are split into, the start order alternating "
                             "(default 4; use an even number so both orders count alike)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rounds", type=int, default=6, help="requests per client per trial (default 6)")
    parser.add_argument("--http-client", choices=[*bench.HTTP_CLIENTS, "both"], default="httpx",
                        help="the clients' HTTP library; both: one gateway run with each per trial, in alternating "
                             "order (default httpx)")
    parser.add_argument("--record", type=Path, default=None,
                        help=f"append each trial here for pool_overhead.py (default <home>/bench/{TRIALS.name})")
    parser.add_argument("--no-record", action="store_true", help="do not record the trials")
    args = parser.parse_args()
    args.record = args.record or args.home / "bench" / TRIALS.name
    if args.trials < 2 or not 1 <= args.blocks <= args.trials:
        parser.error("--trials must be at least 2 (for an interval) and --blocks between 1 and --trials")
    run = time.strftime("%Y-%m-%dT%H:%M") + " alternating"
    libraries = list(bench.HTTP_CLIENTS) if args.http_client == "both" else [args.http_client]

    ir = bench.prepare(args.home)
    work = args.home / "bench" / "bracket"
    work.mkdir(parents=True, exist_ok=True)
    ratios: dict[str, list[float]] = {lib: [] for lib in libraries}
    by_order: dict[str, list[float]] = {"gateway": [], "engine": []}
    outside: dict[str, list[float]] = {lib: [] for lib in libraries}
    print("| trial | started first | HTTP client | engine before | gateway | engine after | gateway / mean "
          "| outside engine (median ms, share) | client / gateway CPU per request (ms) |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|")
    trial = 0
    block_trials = [args.trials // args.blocks + (block < args.trials % args.blocks) for block in range(args.blocks)]
    for block, trials_here in enumerate(block_trials):
        first = "gateway" if block % 2 == 0 else "engine"
        gateway = direct = None
        try:
            # One at a time, so that whichever started is stopped below if the other fails to start.
            if first == "gateway":
                gateway = bench.ir_gateway(work, ir)
                direct = bench.DirectWorker(ir)
            else:
                direct = bench.DirectWorker(ir)
                gateway = bench.ir_gateway(work, ir)
            before = direct.run(args.clients, args.rounds, "step")["tok_s"]
            for _ in range(trials_here):
                for lib in libraries if trial % 2 == 0 else libraries[::-1]:
                    served = bench.bench_gateway(gateway.base, args.clients, args.rounds,
                                                 server_pid=gateway.process.pid, http_client=lib)
                    after = direct.run(args.clients, args.rounds, "step")["tok_s"]
                    ratio = paired_ratio(before, served["tok_s"], after)
                    if not args.no_record:
                        append_trial(run, "alternating", args.clients, lib, bench.REGROUP_MS, before, served["tok_s"],
                                     after, served["outside_engine_ms_median"], args.record, block=block,
                                     started_first=first)
                    ratios[lib].append(ratio)
                    by_order[first].append(ratio)
                    outside[lib].append(served["outside_engine_ms_median"] / (served["p50_latency_s"] * 1000))
                    print(f"| {trial} | {first} | {lib} | {before:.1f} | {served['tok_s']:.1f} | {after:.1f} | "
                          f"{ratio:.3f} | {served['outside_engine_ms_median']:.1f}, {outside[lib][-1]:.1%} | "
                          f"{served['client_cpu_ms_per_request']:.2f} / {served['server_cpu_ms_per_request']:.2f} |",
                          flush=True)
                    before = after  # the next gateway run is compared with this engine run and the next
                trial += 1
        finally:
            for process in (gateway, direct):
                if process is not None:
                    process.stop()
    for lib in libraries:
        low, high = bench.median_interval(ratios[lib])
        median = statistics.median(ratios[lib])
        print(f"\n{args.clients} clients, {args.trials} trials in {args.blocks} blocks, {lib}, load average "
              f"{os.getloadavg()[0]:.1f}: gateway / engine median {median:.3f} (overhead {1 - median:+.1%}), 95% "
              f"bootstrap interval {low:.3f}-{high:.3f}, range {min(ratios[lib]):.3f}-{max(ratios[lib]):.3f}; "
              f"outside the engine median {statistics.median(outside[lib]):.1%} of a request")
    for first, values in by_order.items():
        if values:
            print(f"{first} started first: median {statistics.median(values):.3f} over {len(values)} runs")


if __name__ == "__main__":
    main()
