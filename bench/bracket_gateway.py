"""Gateway overhead at C clients, each gateway trial bracketed by the engine's step loop before and after.

A narrower companion of ``bench_serving.py`` for the overhead criterion alone: one row per trial, the
gateway compared with the mean of the two engine runs around it (which cancels a linear drift in the
shared host's speed), plus the share of each request's latency spent outside the engine. Every
trial is appended to ``bench/overhead_trials.jsonl`` (``--record``), which ``pool_overhead.py`` pools
over runs.

    flock /tmp/bench.lock .venv/bin/python bench/bracket_gateway.py --home .lmforge --trials 14 --clients 8
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
    parser.add_argument("--home", type=Path, default=Path(".lmforge"), help="lmforge home with models/ (default .lmforge)")
    parser.add_argument("--trials", type=int, default=14, help="bracketed trials (default 14)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rounds", type=int, default=6, help="requests per client per trial (default 6)")
    parser.add_argument("--http-client", choices=[*bench.HTTP_CLIENTS, "both"], default="httpx",
                        help="the clients' HTTP library; both: one gateway run with each per trial, in alternating "
                             "order, each bracketed by the step loop (default httpx)")
    parser.add_argument("--record", type=Path, default=TRIALS,
                        help=f"append each trial here for pool_overhead.py (default bench/{TRIALS.name})")
    parser.add_argument("--no-record", action="store_true", help="do not record the trials")
    args = parser.parse_args()
    run = time.strftime("%Y-%m-%dT%H:%M") + " bracketed"
    libraries = list(bench.HTTP_CLIENTS) if args.http_client == "both" else [args.http_client]

    ir = bench.prepare(args.home)
    work = args.home / "bench" / "bracket"
    work.mkdir(parents=True, exist_ok=True)
    gateway = bench.ir_gateway(work, ir)
    direct = bench.DirectWorker(ir)
    ratios: dict[str, list[float]] = {lib: [] for lib in libraries}
    outside: dict[str, list[float]] = {lib: [] for lib in libraries}
    print("| trial | HTTP client | engine before | gateway | engine after | gateway / mean "
          "| outside engine (median ms, share) | client / gateway CPU per request (ms) |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    try:
        for trial in range(args.trials):
            before = direct.run(args.clients, args.rounds, "step")["tok_s"]
            order = libraries if trial % 2 == 0 else libraries[::-1]
            for lib in order:
                served = bench.bench_gateway(gateway.base, args.clients, args.rounds, server_pid=gateway.process.pid,
                                             http_client=lib)
                after = direct.run(args.clients, args.rounds, "step")["tok_s"]
                ratio = paired_ratio(before, served["tok_s"], after)
                if not args.no_record:
                    append_trial(run, "bracketed", args.clients, lib, bench.REGROUP_MS, before, served["tok_s"], after,
                                 served["outside_engine_ms_median"], args.record)
                ratios[lib].append(ratio)
                outside[lib].append(served["outside_engine_ms_median"] / (served["p50_latency_s"] * 1000))
                print(f"| {trial} | {lib} | {before:.1f} | {served['tok_s']:.1f} | {after:.1f} | {ratio:.3f} | "
                      f"{served['outside_engine_ms_median']:.1f}, {outside[lib][-1]:.1%} | "
                      f"{served['client_cpu_ms_per_request']:.2f} / {served['server_cpu_ms_per_request']:.2f} |",
                      flush=True)
                before = after  # the next gateway run (--http-client both) is bracketed by this one and the next
    finally:
        gateway.stop()
        direct.stop()
    for lib in libraries:
        low, high = bench.median_interval(ratios[lib])
        median = statistics.median(ratios[lib])
        print(f"\n{args.clients} clients, {args.trials} trials, {lib}, load average {os.getloadavg()[0]:.1f}: "
              f"gateway / engine median {median:.3f} (overhead {1 - median:+.1%}), 95% bootstrap interval "
              f"{low:.3f}-{high:.3f}, range {min(ratios[lib]):.3f}-{max(ratios[lib]):.3f}; outside the engine median "
              f"{statistics.median(outside[lib]):.1%} of a request")


if __name__ == "__main__":
    main()
