"""Gateway overhead pooled over every recorded paired trial (``<home>/bench/overhead_trials.jsonl``).

One run of the serving bench leaves a 95% interval 8-16 points wide on this shared host, too wide to
settle a 5% target. Every trial that pairs a gateway run with engine runs just before and after it is
a valid estimate whichever session made it, so the trials are recorded (``bracket_gateway.py`` appends
its own) and pooled here. The log is local data, not part of the repository: it lives under the lmforge
home (``$LMFORGE_HOME``, else ``.lmforge`` in the repository; git-ignored). The trials behind
docs/SERVING_RESULTS.md are in git history:
``git show caa0111:bench/overhead_trials.jsonl > .lmforge/bench/overhead_trials.jsonl``.

    .venv/bin/python bench/pool_overhead.py            # tables for 1 and 8 clients
    .venv/bin/python bench/pool_overhead.py --since 2026-12-01T15:00

Each row: ``run`` (start time and design), ``design`` ("bracketed": the engine's step loop before and
after the gateway, the gateway started first; "alternating": ``bracket_gateway.py`` since 2026-12-02, the
engine and gateway runs alternating within ``block``s of fresh processes, ``started_first`` saying which
process each block started first; "full": bench_serving.py's rows, the step loop before and
``generate()`` after),
``clients``, ``http_client`` (the benchmark clients' library: httpx by default, aiohttp with
``--http-client``), ``regroup_ms`` (the engine's ``serve.regroup_ms``: 0 before 2026-12-01 19:49;
10 until 21:49, waiting for one group counted from its first successor; 30 since, waiting for every
successor owed, counted from the finishing step, with the hold from 22:55), the three tok/s and
``ratio`` = gateway / mean of the two engine runs. The pooled interval is a stratified percentile
bootstrap (trials resampled within their run, or block), so a run with a slow host cannot stand in for
another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Local measurements, kept out of the repository: <lmforge home>/bench/ (LMFORGE_HOME, else <repo>/.lmforge).
TRIALS = Path(os.environ.get("LMFORGE_HOME") or REPO / ".lmforge") / "bench" / "overhead_trials.jsonl"


def read_trials(path: Path = TRIALS) -> list[dict]:
    if not path.is_file():
        raise SystemExit(f"no trials recorded in {path}: run bench/bracket_gateway.py or bench/bench_serving.py "
                         "first, or restore the historical log with "
                         f"`mkdir -p {path.parent} && git show caa0111:bench/overhead_trials.jsonl > {path}`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def paired_ratio(before: float, gateway: float, after: float) -> float:
    """The gateway's tok/s over the mean of the engine runs just before and after it."""
    return 2 * gateway / (before + after)


def append_trial(run: str, design: str, clients: int, http_client: str, regroup_ms: float, before: float,
                 gateway: float, after: float, outside_ms: float | None = None, path: Path = TRIALS,
                 block: int | None = None, started_first: str | None = None) -> None:
    """Append one trial (one line: an interrupted bench loses at most the trial it was running); its
    ratio is :func:`paired_ratio`."""
    ratio = paired_ratio(before, gateway, after)
    row = {"run": run, "design": design, "clients": clients, "http_client": http_client, "regroup_ms": regroup_ms,
           "engine_before": round(before, 1), "gateway": round(gateway, 1), "engine_after": round(after, 1),
           "ratio": round(ratio, 4)}
    if outside_ms is not None:
        row["outside_ms"] = round(outside_ms, 1)
    if block is not None:
        row["block"], row["started_first"] = block, started_first
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps(row) + "\n")


def pooled(rows: list[dict], reps: int = 10_000, seed: int = 0) -> dict:
    """Pooled median ratio, its stratified bootstrap 95% interval, and the spread of the medians per run
    (per block of fresh processes for ``bracket_gateway.py``'s blocked runs)."""
    import numpy as np

    by_run: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:  # a block of fresh processes is a stratum of its own (see bracket_gateway.py)
        by_run[row["run"], row.get("block")].append(row["ratio"])
    groups = [np.asarray(v) for v in by_run.values()]
    rng = np.random.default_rng(seed)
    medians = np.empty(reps)
    for i in range(reps):
        medians[i] = np.median(np.concatenate([g[rng.integers(0, len(g), len(g))] for g in groups]))
    run_medians = [statistics.median(v) for v in by_run.values()]
    return {"trials": len(rows), "runs": len({row["run"] for row in rows}),
            "median": statistics.median(r["ratio"] for r in rows),
            "low": float(np.percentile(medians, 2.5)), "high": float(np.percentile(medians, 97.5)),
            "run_median_low": min(run_medians), "run_median_high": max(run_medians)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", type=Path, default=TRIALS, help=f"trials file (default {TRIALS})")
    parser.add_argument("--since", default="", help="only runs started at or after this ISO time")
    args = parser.parse_args()
    rows = [r for r in read_trials(args.file) if r["run"] >= args.since]
    print("| clients | regroup wait | HTTP client | design | runs | trials | overhead (1 - gateway/engine), "
          "pooled median | 95% interval | medians per run or block |")
    print("|---:|---:|---|---|---:|---:|---:|---:|---:|")
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["clients"], row.get("regroup_ms", 0.0), row.get("http_client", "httpx"))].append(row)
    for (clients, regroup, lib), mine in sorted(groups.items()):
        subsets = {design: [r for r in mine if r["design"] == design] for design in ("bracketed", "full")}
        if subsets["bracketed"] and subsets["full"]:  # both started the gateway first: biased alike
            subsets["bracketed + full"] = subsets["bracketed"] + subsets["full"]
        alternating = [r for r in mine if r["design"] == "alternating"]
        if alternating:  # balanced by start order when the blocks of both orders are counted alike
            subsets["alternating"] = alternating
            for first in ("gateway", "engine"):
                subsets[f"alternating, {first} started first"] = [r for r in alternating
                                                                  if r.get("started_first") == first]
        for design, subset in subsets.items():
            if not subset:
                continue
            p = pooled(subset)
            print(f"| {clients} | {regroup:g} ms | {lib} | {design} | {p['runs']} | {p['trials']} | "
                  f"{1 - p['median']:+.1%} | {1 - p['high']:+.1%} to {1 - p['low']:+.1%} | "
                  f"{1 - p['run_median_high']:+.1%} to {1 - p['run_median_low']:+.1%} |")


if __name__ == "__main__":
    main()
