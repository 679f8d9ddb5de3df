"""Peak serving RSS per OpenVINO IR variant: the real gateway under C concurrent chat clients (issue 18).

    .venv/bin/python bench/bench_rss.py EXPORT/fp32_ir EXPORT/int8 [--clients 8] [--requests-per-client 6]
                                        [--max-tokens 64] [--repeats 1] [--out rss.json] [--set serve.cache_gb=1]

The first directory is the reference (the fp32 IR); the criterion of issue 18 is the champion's peak
serving RSS <= 55% of the reference's under the same load.

For each variant (``--repeats`` rounds, variants interleaved within a round): ``lmforge serve`` in its
own process with the directory as its one variant (auth off, registry watcher off, a temporary
LMFORGE_HOME so no real state is touched), the RSS of the gateway and all its descendants (the
OpenVINO engine process) summed every ``--interval`` s from launch to the end
of the load; ``C`` clients with the official ``openai`` client, each sending ``--requests-per-client``
non-streaming chat completions back to back (greedy, up to ``--max-tokens``), short prompts as the
tasks are served: a sentiment sentence, an NER sentence, a dialogue to summarise, with the preset's
system messages.

Reported per variant: IR MB (openvino_model.xml + .bin, 10^6 B), idle RSS after load-in (median over
``--idle-s`` after /health/ready), peak RSS under load (max sample while the clients ran), that peak as
% of the reference's, completion tokens/s over the load's wall time, request P50/P95 latency; the JSON
(``--out``) also has the load-in peak, the peak split per process and into anonymous vs file-backed
memory. RSS is in MiB. Summing RSS over processes counts pages they share (libraries) once per process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_serving import GatewayProcess, _port, _variant  # noqa: E402 - after the path fix

MIB = 1024 * 1024
TARGET = 0.55  # issue 18: champion's peak serving RSS <= 55% of the fp32 IR's
# Inputs as clients send them: the task's preset system message + the bare text (data.templates).
INPUTS = {
    "sentiment": [
        "The battery died after two days and support never answered my emails.",
        "A warm, funny and moving film; I left the cinema smiling.",
        "The hotel was clean, the staff friendly, and breakfast was excellent.",
    ],
    "ner": [
        "Angela Merkel met Emmanuel Macron in Paris on Tuesday to discuss the EU budget.",
        "Apple opened a new office in Munich, said Tim Cook during a visit to Germany.",
        "Lionel Messi scored twice as Inter Miami beat Orlando City at home.",
    ],
    "summarization": [
        ("#Person1#: Are you coming to the party tonight?\n#Person2#: I can't, I have to finish my report.\n"
         "#Person1#: That's a pity. Maybe next week then?\n#Person2#: Sure, let's have dinner on Friday."),
        ("#Person1#: Excuse me, how do I get to the train station?\n#Person2#: Go straight, turn left at the "
         "bank, and it's on your right.\n#Person1#: Is it far?\n#Person2#: About ten minutes on foot."),
    ],
}


# --------------------------------------------------------------------------- memory
@dataclass
class Sample:
    t: float
    rss: dict[str, int]  # role -> RSS bytes (summed over processes of that role)
    shared: int  # file-backed + shmem resident bytes over the tree (psutil "shared")

    @property
    def total(self) -> int:
        return sum(self.rss.values())


def _role(proc: psutil.Process, root_pid: int) -> str:
    """What a process of the gateway's tree is, from its command line (all are ``python``)."""
    if proc.pid == root_pid:
        return "gateway"
    cmd = " ".join(proc.cmdline())
    if "serving.backends.openvino_engine" in cmd:  # the OpenVINO backend's engine process
        return "engine"
    return proc.name()


def tree_memory(root: psutil.Process, seen: dict[int, psutil.Process] | None = None) -> Sample:
    """RSS of ``root`` and every descendant now; ``seen`` collects the processes (for clean-up)."""
    rss: dict[str, int] = {}
    shared = 0
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for proc in procs:
        try:
            info = proc.memory_info()
            role = _role(proc, root.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited between listing and reading
            continue
        if seen is not None:
            seen.setdefault(proc.pid, proc)
        rss[role] = rss.get(role, 0) + info.rss
        shared += getattr(info, "shared", 0)
    return Sample(time.monotonic(), rss, shared)


def tree_unique_memory(root: psutil.Process) -> dict[str, float]:
    """RSS, PSS and USS of the tree in MiB, once: PSS splits shared pages between the processes mapping
    them, so unlike summed RSS it counts the libraries the gateway and the engine share once. Reading
    smaps is too slow for the 0.1 s sampler, so this is a snapshot."""
    totals = {"rss": 0, "pss": 0, "uss": 0}
    with contextlib.suppress(psutil.NoSuchProcess):
        for proc in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
                info = proc.memory_full_info()
                for key in totals:
                    totals[key] += getattr(info, key)
    return {f"{key}_mib": value / MIB for key, value in totals.items()}


@dataclass
class TreeSampler:
    """Samples :func:`tree_memory` of ``pid`` every ``interval`` s on a thread until :meth:`stop`."""

    pid: int
    interval: float = 0.1
    samples: list[Sample] = field(default_factory=list)
    seen: dict[int, psutil.Process] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._root = psutil.Process(self.pid)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.is_set():
            self.samples.append(tree_memory(self._root, self.seen))
            self._done.wait(self.interval)

    def stop(self) -> None:
        self._done.set()
        self._thread.join(timeout=5)

    def window(self, start: float, end: float | None = None) -> list[Sample]:
        return [s for s in self.samples if s.t >= start and (end is None or s.t <= end)]


def peak(samples: list[Sample]) -> Sample | None:
    return max(samples, key=lambda s: s.total, default=None)


# --------------------------------------------------------------------------- load
def requests_for(client: int, count: int, templates: dict) -> list[list[dict]]:
    """Chat messages for one client: tasks and inputs rotate, so clients send different things at once."""
    tasks = list(INPUTS)
    out = []
    for r in range(count):
        task = tasks[(client + r) % len(tasks)]
        text = INPUTS[task][(client + r // len(tasks)) % len(INPUTS[task])]
        template = templates[task]
        out.append([{"role": "system", "content": template.system},
                    {"role": "user", "content": template.instructions[0].replace("{input}", text)}])
    return out


async def _client(base: str, messages: list[list[dict]], max_tokens: int) -> tuple[int, list[float], int]:
    """One client: its requests back to back; (completion tokens, latencies s, failures)."""
    from openai import AsyncOpenAI, OpenAIError

    tokens, latencies, failures = 0, [], 0
    # max_retries=0: a failed request counts as failed here rather than being hidden by a silent retry.
    async with AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=300) as client:
        for chat in messages:
            started = time.perf_counter()
            try:
                response = await client.chat.completions.create(model="lmforge-assistant", messages=chat,
                                                                max_tokens=max_tokens, temperature=0)
            except OpenAIError as err:
                failures += 1
                print(f"  request failed: {err}", file=sys.stderr, flush=True)
                continue
            latencies.append(time.perf_counter() - started)
            tokens += response.usage.completion_tokens if response.usage else 0
    return tokens, latencies, failures


def run_load(base: str, clients: int, per_client: int, max_tokens: int, templates: dict) -> dict:
    """``clients`` concurrent clients; completion tokens/s over the wall time, latency percentiles."""

    async def main() -> tuple[list, float]:
        started = time.perf_counter()
        results = await asyncio.gather(*(_client(base, requests_for(i, per_client, templates), max_tokens)
                                         for i in range(clients)))
        return results, time.perf_counter() - started

    results, elapsed = asyncio.run(main())
    tokens = sum(r[0] for r in results)
    latencies = sorted(x * 1000 for r in results for x in r[1])
    return {"requests": clients * per_client, "failed": sum(r[2] for r in results), "completion_tokens": tokens,
            "seconds": elapsed, "tok_s": tokens / elapsed,
            "p50_ms": statistics.median(latencies) if latencies else None,
            "p95_ms": _percentile(latencies, 95) if latencies else None}


def _percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1]


# --------------------------------------------------------------------------- one variant
def ir_bytes(ir: Path) -> int:
    return sum((ir / name).stat().st_size for name in ("openvino_model.xml", "openvino_model.bin"))


def measure(ir: Path, args: argparse.Namespace, templates: dict) -> dict:
    """One gateway on ``ir``: memory from launch to the end of the load, then a clean stop."""
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as home:
        # An empty LMFORGE_DATABASE_URL: keys and request logs go to SQLite in the temporary home,
        # never to a shared database this shell may point at.
        gateway = GatewayProcess(Path(home), [_variant("champion", str(ir)), "serve.watch=false", *args.set],
                                 _port(), ready_timeout=args.ready_timeout, env={"LMFORGE_DATABASE_URL": ""},
                                 wait=False)
        launched = time.monotonic()
        sampler = TreeSampler(gateway.process.pid, args.interval)
        try:
            gateway.wait_ready()
            ready = time.monotonic()
            time.sleep(args.idle_s)  # idle window: the engine is loaded and warmed, nothing in flight
            load_start = time.monotonic()
            load = run_load(gateway.base, args.clients, args.requests_per_client, args.max_tokens, templates)
            load_end = time.monotonic()
            after_load = tree_unique_memory(psutil.Process(gateway.process.pid))
        except BaseException:
            print(_tail(Path(gateway.log.name)), file=sys.stderr)  # the log goes with the temporary home
            raise
        finally:
            sampler.stop()
            leftovers = stop_tree(gateway, sampler.seen)
    idle = [s.total for s in sampler.window(ready, load_start)]
    top, loading = peak(sampler.window(load_start, load_end)), peak(sampler.window(launched, ready))
    return {"variant": ir.name, "ir": str(ir), "ir_bytes": ir_bytes(ir), "load_in_s": ready - launched,
            "load_in_peak_rss_mib": loading.total / MIB if loading else None,
            "idle_rss_mib": statistics.median(idle) / MIB if idle else None,
            "peak_rss_mib": top.total / MIB if top else None,
            "peak_by_process_mib": {k: v / MIB for k, v in top.rss.items()} if top else {},
            # file-backed = the mmapped IR weights and the shared libraries; the rest is anonymous memory
            "peak_file_backed_mib": top.shared / MIB if top else None,
            "peak_anon_mib": (top.total - top.shared) / MIB if top else None,
            "after_load": after_load, "samples": len(sampler.samples), "leftover_processes_killed": leftovers, **load}


def _tail(log: Path, lines: int = 30) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    return f"(no log at {log})"


def stop_tree(gateway: GatewayProcess, seen: dict[int, psutil.Process], grace_s: float = 5.0) -> list[str]:
    """SIGTERM the gateway (it drains and releases its engine), give its children ``grace_s`` to follow,
    then kill, by pid, whatever of its tree is still there: the engine is a daemon child that an
    abnormal exit can orphan. Returns the command lines of the processes that had to be killed."""
    gateway.stop()
    rest = [p for p in seen.values() if p.pid != gateway.process.pid and _alive(p)]
    _, rest = psutil.wait_procs(rest, timeout=grace_s)
    killed = []
    for proc in rest:
        with contextlib.suppress(psutil.NoSuchProcess):
            killed.append(" ".join(proc.cmdline())[:120])
            proc.terminate()
    _, still = psutil.wait_procs(rest, timeout=5)
    for proc in still:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    return killed


def _alive(proc: psutil.Process) -> bool:
    try:  # is_running() also checks the create time, so a reused pid is not taken for ours
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --------------------------------------------------------------------------- report
def summarize(runs: list[dict]) -> list[dict]:
    """Per variant (in the order given), medians over repeats; % of the first variant's peak."""
    rows = []
    for name in dict.fromkeys(r["ir"] for r in runs):
        mine = [r for r in runs if r["ir"] == name]
        row = {"variant": mine[0]["variant"], "ir": name, "ir_mb": mine[0]["ir_bytes"] / 1e6,
               "repeats": len(mine), "failed": sum(r["failed"] for r in mine)}
        for key in ("idle_rss_mib", "peak_rss_mib", "load_in_peak_rss_mib", "tok_s", "p50_ms", "p95_ms"):
            values = [r[key] for r in mine if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        row["after_load_pss_mib"] = statistics.median(r["after_load"]["pss_mib"] for r in mine)
        row["peak_rss_all_mib"] = [round(r["peak_rss_mib"], 1) for r in mine if r["peak_rss_mib"]]
        rows.append(row)
    reference = rows[0]["peak_rss_mib"]
    for row in rows:
        row["peak_vs_reference"] = row["peak_rss_mib"] / reference if reference and row["peak_rss_mib"] else None
    return rows


def selected_variant(irs: list[Path]) -> str | None:
    """The variant the export's quantize selection picked (export.json beside the variant dirs), if any."""
    export = irs[0].parent / "export.json"
    try:
        return json.loads(export.read_text()).get("selected")
    except (OSError, ValueError):
        return None


def verdicts(rows: list[dict], selected: str | None, target: float) -> list[str]:
    """Whether the smallest IR, and the export's selected variant, meet the target vs the reference."""
    if len(rows) < 2:
        return []
    lines = []
    smallest = min(rows[1:], key=lambda r: r["ir_mb"])
    picks = [("smallest IR", smallest)]
    picks += [("selected by the export (export.json)", r) for r in rows if r["variant"] == selected]
    for label, row in picks:
        share = row["peak_vs_reference"]
        if share is None:
            lines.append(f"{label}: {row['variant']}: no peak measured.")
            continue
        verdict = "meets" if share <= target else "does NOT meet"
        lines.append(f"{label}: {row['variant']} peaks at {share:.1%} of {rows[0]['variant']}'s RSS under load: "
                     f"{verdict} the <= {target:.0%} target.")
    return lines


def table(rows: list[dict]) -> str:
    def num(value: float | None, fmt: str = ".1f") -> str:
        return "-" if value is None else format(value, fmt)

    out = ["| variant | IR MB | idle RSS MiB | peak RSS MiB under load | peak % of reference | tok/s | P50 / P95 ms |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['variant']} | {r['ir_mb']:.1f} | {num(r['idle_rss_mib'])} | {num(r['peak_rss_mib'])} | "
                   f"{num(r['peak_vs_reference'] and r['peak_vs_reference'] * 100)}% | {num(r['tok_s'])} | "
                   f"{num(r['p50_ms'], '.0f')} / {num(r['p95_ms'], '.0f')} |")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("irs", nargs="+", type=Path, metavar="IR_DIR",
                        help="OpenVINO IR variant directories; the first is the reference (the fp32 IR).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients (default 8, as in issue 18).")
    parser.add_argument("--requests-per-client", type=int, default=6, help="Requests each client sends back to back.")
    parser.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every chat completion.")
    parser.add_argument("--repeats", type=int, default=1,
                        help="Rounds; each starts a fresh gateway per variant, variants interleaved (medians shown).")
    parser.add_argument("--interval", type=float, default=0.1, help="RSS sampling period, seconds.")
    parser.add_argument("--idle-s", type=float, default=2.0,
                        help="Seconds sampled between readiness and the load (the idle RSS is their median).")
    parser.add_argument("--target", type=float, default=TARGET, help="Peak RSS share of the reference to meet.")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="Extra config override for the gateways, e.g. --set serve.cache_gb=1 (repeatable).")
    parser.add_argument("--ready-timeout", type=float, default=300, help="Seconds a gateway may take to get ready.")
    parser.add_argument("--out", type=Path, help="Also write the numbers as JSON here.")
    args = parser.parse_args(argv)
    for ir in args.irs:
        if not (ir / "openvino_model.xml").is_file():
            parser.error(f"{ir} has no openvino_model.xml (not an OpenVINO IR directory)")
    args.irs = [ir.resolve() for ir in args.irs]
    return args


def main(argv: list[str] | None = None) -> None:
    from configs.schema import load

    args = parse_args(argv)
    templates = load("pipeline").data.templates  # the system messages the gateway's tasks are served with
    runs = []
    for round_ in range(args.repeats):
        for ir in args.irs:
            run = measure(ir, args, templates)
            runs.append(run)
            print(f"round {round_} {run['variant']}: idle {run['idle_rss_mib']:.0f} MiB, peak {run['peak_rss_mib']:.0f}"
                  f" MiB ({', '.join(f'{k} {v:.0f}' for k, v in run['peak_by_process_mib'].items())}), "
                  f"{run['tok_s']:.1f} tok/s, {run['failed']} failed", flush=True)
    rows = summarize(runs)
    selected = selected_variant(args.irs)
    lines = verdicts(rows, selected, args.target)
    print()
    print(table(rows))
    print()
    print("\n".join(lines))
    # PSS counts the libraries gateway and engine share once: the same comparison without that double count.
    reference_pss = rows[0]["after_load_pss_mib"]
    print("PSS of the tree right after the load: " + ", ".join(
        f"{r['variant']} {r['after_load_pss_mib']:.0f} MiB ({r['after_load_pss_mib'] / reference_pss:.1%})"
        for r in rows))
    print(f"\n{args.clients} clients x {args.requests_per_client} chat completions (max_tokens {args.max_tokens}, "
          f"greedy), RSS of the gateway + its child processes sampled every {args.interval} s; medians of "
          f"{args.repeats} round(s); {os.cpu_count()} CPUs.")
    if args.out:
        config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "irs"}
        out = {"config": config, "irs": [str(p) for p in args.irs], "selected": selected, "rows": rows,
               "verdicts": lines, "runs": runs, "loadavg": os.getloadavg()}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
