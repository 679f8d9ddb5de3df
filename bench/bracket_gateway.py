"""Gateway overhead at C clients, each gateway trial bracketed by the engine's step loop before and after.

A narrower companion of ``bench_serving.py`` for the overhead criterion alone: one row per trial, the
gateway compared with the mean of the two engine runs around it (which cancels a linear drift in the
shared host's speed), plus the share of each request's latency spent outside the engine.

    flock /tmp/bench.lock .venv/bin/python bench/bracket_gateway.py --home .lmforge --trials 14 --clients 8
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import bench_serving as bench  # noqa: E402 - after the path fix, like bench_serving's own imports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--home", type=Path, default=Path(".lmforge"), help="lmforge home with models/ (default .lmforge)")
    parser.add_argument("--trials", type=int, default=14, help="bracketed trials (default 14)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--rounds", type=int, default=6, help="requests per client per trial (default 6)")
    args = parser.parse_args()

    ir = bench.prepare(args.home)
    work = args.home / "bench" / "bracket"
    work.mkdir(parents=True, exist_ok=True)
    gateway = bench.ir_gateway(work, ir)
    direct = bench.DirectWorker(ir)
    ratios, outside = [], []
    print("| trial | engine before | gateway | engine after | gateway / mean | outside engine (median ms, share) |")
    print("|---:|---:|---:|---:|---:|---:|")
    try:
        for trial in range(args.trials):
            before = direct.run(args.clients, args.rounds, "step")["tok_s"]
            served = bench.bench_gateway(gateway.base, args.clients, args.rounds, server_pid=gateway.process.pid)
            after = direct.run(args.clients, args.rounds, "step")["tok_s"]
            ratios.append(2 * served["tok_s"] / (before + after))
            outside.append(served["outside_engine_ms_median"] / (served["p50_latency_s"] * 1000))
            print(f"| {trial} | {before:.1f} | {served['tok_s']:.1f} | {after:.1f} | {ratios[-1]:.3f} | "
                  f"{served['outside_engine_ms_median']:.1f}, {outside[-1]:.1%} |", flush=True)
    finally:
        gateway.stop()
        direct.stop()
    low, high = bench.median_interval(ratios)
    print(f"\n{args.clients} clients, {args.trials} trials, load average {os.getloadavg()[0]:.1f}: gateway / engine "
          f"median {statistics.median(ratios):.3f} (overhead {1 - statistics.median(ratios):+.1%}), 95% bootstrap "
          f"interval {low:.3f}-{high:.3f}, range {min(ratios):.3f}-{max(ratios):.3f}; outside the engine median "
          f"{statistics.median(outside):.1%} of a request")


if __name__ == "__main__":
    main()
