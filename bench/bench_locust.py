"""Load test of the gateway replicas with Locust, direct and through nginx, in two priority classes.

    flock /tmp/bench.lock .venv/bin/python bench/bench_locust.py --start-stack        # its own stack (tiny IR)
    flock /tmp/bench.lock .venv/bin/python bench/bench_locust.py --stack-dir .lmforge/stack   # a running one

1. Capacity: closed-loop users (direct to the replicas) doubling from 1 until answered requests/s
   stop growing by 10%; the capacity is the fewest users within 10% of the best throughput.
2. Runs at 8 users, at 1x, 2x and 4x the capacity, and past the gateways' admission limit
   (``--overload-users``, default 2 x replicas x (max_concurrency + max_queue): the queues fill and
   shed low priority first), each directly against the replicas (users
   spread round robin) and through nginx (TLS, least_conn); bench/locustfile.py sends the mixed
   traffic (chat 5 : stream 3 : rpc batch 2) from a high- and a low-priority key.
3. Prints a Markdown table per class: requests/s, P50/P95/P99 latency (ms), failures; and the
   nginx/direct throughput ratio at 8 users.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LOCUSTFILE = REPO / "bench" / "locustfile.py"


@dataclass
class Row:
    target: str
    users: int
    label: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float

    @property
    def answered_rps(self) -> float:
        return self.rps * (1 - self.failures / self.requests) if self.requests else 0.0


def run_locust(hosts: list[str], users: int, seconds: int, env: dict[str, str], out: Path) -> list[Row]:
    """One headless Locust run; its per-class rows plus the aggregate."""
    prefix = out / f"{len(hosts)}h-{users}u-{time.time_ns()}"
    subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", str(users),
                    "-r", str(users), "-t", f"{seconds}s", "--csv", str(prefix), "--only-summary",
                    "--stop-timeout", "30", "--loglevel", "WARNING"],
                   env=env | {"LMFORGE_BENCH_HOSTS": ",".join(hosts)}, check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    with open(f"{prefix}_stats.csv") as handle:
        for rec in csv.DictReader(handle):
            name = rec["Name"] if rec["Name"] in ("high", "low") else "all"
            rows.append(Row("", users, "", name, int(rec["Request Count"]), int(rec["Failure Count"]),
                            float(rec["Requests/s"]), _ms(rec["50%"]), _ms(rec["95%"]), _ms(rec["99%"])))
    return rows


def _ms(value: str) -> float:
    return float(value) if value not in ("N/A", "") else float("nan")


def capacity(hosts: list[str], env: dict[str, str], out: Path, seconds: int) -> tuple[int, list[tuple[int, float]]]:
    """The fewest closed-loop users within 10% of the best throughput, and the curve measured.

    Throughput counts answered requests only: past the admission limit the gateways shed requests in
    milliseconds (503), and counting those would read as capacity growing with the users."""
    curve: list[tuple[int, float]] = []
    users = 1
    while users <= 64:
        total = next(r for r in run_locust(hosts, users, seconds, env, out) if r.name == "all")
        rps = total.answered_rps
        curve.append((users, rps))
        print(f"capacity probe: {users} users -> {rps:.1f} req/s", file=sys.stderr)
        if len(curve) >= 2 and rps < curve[-2][1] * 1.10:
            break
        users *= 2
    best = max(rps for _, rps in curve)
    return next(u for u, rps in curve if rps >= 0.9 * best), curve


def table(rows: list[Row]) -> str:
    lines = ["| path | users | class | req/s | P50 ms | P95 ms | P99 ms | failures |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        share = f"{r.failures} ({r.failures / r.requests:.1%})" if r.requests else "0"
        lines.append(f"| {r.target} | {r.users} ({r.label}) | {r.name} | {r.rps:.1f} | {r.p50:.0f} | {r.p95:.0f} | "
                     f"{r.p99:.0f} | {share} |")
    return "\n".join(lines)


def bench(spec, seconds: int, probe_seconds: int, overload_users: int) -> str:
    from serving.auth import KeyStore

    store = KeyStore(spec.database_url())
    keys = {}
    for priority in ("high", "low"):
        # Rate limits far above the offered load: this measures capacity and shedding, not the limiter.
        keys[priority], _ = store.add(f"bench-{priority}-{int(time.time())}", priority=priority,
                                      rate_per_minute=1_000_000, burst=100_000)
    ca = str(spec.certs_dir / "ca.crt")
    env = {**os.environ, "LMFORGE_BENCH_KEY_HIGH": keys["high"], "LMFORGE_BENCH_KEY_LOW": keys["low"],
           "LMFORGE_BENCH_CA": ca, "PYTHONPATH": str(REPO)}
    direct = [spec.gateway_url(i) for i in range(spec.replicas)]
    through_nginx = [spec.public_url]
    for url in direct:
        _wait_ready(url)
    out = Path(tempfile.mkdtemp(prefix="lmforge-locust-"))
    cap, curve = capacity(direct, env, out, probe_seconds)
    rows: list[Row] = []
    loads = sorted({(8, "8 users"), (cap, "1x"), (2 * cap, "2x"), (4 * cap, "4x"), (overload_users, "overload")})
    for users, label in loads:
        for target, hosts in (("direct", direct), ("nginx", through_nginx)):
            for row in run_locust(hosts, users, seconds, env, out):
                row.target, row.label = target, label
                rows.append(row)
            print(f"done: {target} at {users} users", file=sys.stderr)
    at8 = {r.target: r.rps for r in rows if r.users == 8 and r.name == "all"}
    report = [f"capacity: {cap} closed-loop users (req/s by users: "
              + ", ".join(f"{u}: {rps:.1f}" for u, rps in curve) + ")",
              f"throughput through nginx / direct at 8 users: {at8['nginx'] / at8['direct']:.3f}",
              "", table(rows)]
    return "\n".join(report)


def _wait_ready(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=3).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(f"{url} never became ready")


def _start_stack(root: Path, replicas: int, max_queue: int):
    """A stack whose replicas serve the tiny model's IR from disk (no pipeline run needed)."""
    from configs.schema import load
    from deploy.programs import StackPorts, StackSpec
    from deploy.stack import Stack
    from tasks.models import import_model
    from tests.serving_helpers import tiny_ir

    cfg = load(REPO / "configs" / "tiny.yaml", [f"home={root / 'models-home'}"])
    model_dir = Path(import_model("tiny", cfg.home, cfg.model)["path"])
    ir = tiny_ir(cfg.home, model_dir)
    overrides = [f"serve.variants=[{{name: champion, model_uri: '{ir}', weight: 1}}]", "serve.watch=false",
                 f"serve.max_queue={max_queue}", "serve.max_concurrency=8"]
    spec = StackSpec(root=root, ports=StackPorts.free(replicas), config="tiny", overrides=overrides)
    stack = Stack(spec)
    stack.up()
    return stack


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stack-dir", type=Path, help="A running stack (lmforge stack up --dir ...).")
    parser.add_argument("--start-stack", action="store_true", help="Start a stack serving the tiny IR, then stop it.")
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--max-queue", type=int, default=8, help="serve.max_queue of a started stack (shedding).")
    parser.add_argument("--seconds", type=int, default=30, help="Duration of each measured run.")
    parser.add_argument("--overload-users", type=int, default=0,
                        help="Users of the overload run "
                             "(0: 2 x replicas x (8 + max queue), the started stack's limits).")
    parser.add_argument("--probe-seconds", type=int, default=15, help="Duration of each capacity probe.")
    args = parser.parse_args()
    from deploy.programs import StackSpec

    overload = args.overload_users or 2 * args.replicas * (8 + args.max_queue)
    if args.start_stack:
        stack = _start_stack(Path(tempfile.mkdtemp(prefix="lmforge-bench-stack-")), args.replicas, args.max_queue)
        try:
            print(bench(stack.spec, args.seconds, args.probe_seconds, overload))
        finally:
            stack.down()
    elif args.stack_dir:
        print(bench(StackSpec.load(args.stack_dir.resolve()), args.seconds, args.probe_seconds, overload))
    else:
        parser.error("give --stack-dir of a running stack or --start-stack")


if __name__ == "__main__":
    main()
