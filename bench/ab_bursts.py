"""A/B bursts through the gateway's default champion/challenger split on a real MLflow registry.

A burst is 8 concurrent 64-token completions (greedy, ``ignore_eos``); its time is the wall time
until the last of the 8 answers. Reported as min / P10 / median / P90 / max over ``--bursts``
bursts, with how many bursts touched the challenger, because a burst split between two engines
costs far more than its share (issue 22: ~1.2 s on one engine, ~2.1 s when one request of the 8
ran alone in a second engine process on the same 2 cores), which a median or a best-of-N hides.

Scenarios (the pipeline preset's variants: champion 0.9, challenger 0.1, ``serve.auth=false``):

* ``same_version``: both aliases name version 1, requests carry no ``user`` (what ``make run``
  leaves behind, hit by one client);
* ``two_versions``: champion v1, challenger v2 (the same INT8 IR registered twice, so two engines
  of equal cost), each request with a fresh ``user`` (many users: ~10% reach the challenger).

The registry holds the SmolLM2-135M base model's INT8 IR (``bench_serving.prepare``) registered as
lmforge-assistant v1 and v2 and promoted with ``--force`` (it never went through the gates: it is
the untrained base model, only its serving cost matters here).
"""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from pathlib import Path

import httpx

SCENARIOS = {"same_version": ("1", "1", False), "two_versions": ("1", "2", True)}
MODEL_NAME = "lmforge-assistant"


def _config(home: Path):
    from configs.schema import load

    return load("pipeline", [f"home={home}"])


def register_versions(home: Path, ir: Path) -> list[str]:
    """Versions 1 and 2 of lmforge-assistant in ``home``'s registry, both the INT8 IR (registered once)."""
    from mlflow import MlflowClient

    from tasks.registry import register_version
    from tasks.tracking import use_mlflow

    cfg = _config(home)
    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    client = MlflowClient()
    existing = [str(v.version) for v in client.search_model_versions(f"name='{MODEL_NAME}'")]
    while len(existing) < 2:
        lineage = {"source": "bench/ab_bursts.py: SmolLM2-135M-Instruct base, INT8 weight-only IR, untrained",
                   "quant_format": "int8"}
        existing.append(register_version(cfg.registry, {"openvino": ir}, {}, lineage, run_name="bench-ab").version)
    return sorted(existing, key=int)[:2]


def point_aliases(home: Path, champion: str, challenger: str) -> None:
    """Move the aliases with ``lmforge promote --force`` semantics (these versions were never gated)."""
    from tasks.registry import promote
    from tasks.tracking import use_mlflow

    cfg = _config(home)
    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    promote(cfg.registry, champion, "champion", force=True)
    promote(cfg.registry, challenger, "challenger", force=True)


def bursts(base: str, count: int, clients: int = 8, users: bool = False, prompts: list[str] | None = None,
           new_tokens: int = 64) -> dict:
    """``count`` bursts (after one warm-up burst) of ``clients`` concurrent completions; burst times and
    which variants served each burst."""
    prompts = prompts or ["Hello"]

    async def one(http: httpx.AsyncClient, i: int) -> tuple[str, int]:
        body = {"model": MODEL_NAME, "prompt": prompts[i % len(prompts)], "max_tokens": new_tokens,
                "temperature": 0, "ignore_eos": True}
        if users:
            body["user"] = uuid.uuid4().hex
        response = await http.post("/v1/completions", json=body)
        response.raise_for_status()
        return response.headers.get("x-lmforge-variant", "?"), response.json()["usage"]["completion_tokens"]

    async def main() -> list[tuple[float, list[str], int]]:
        out = []
        async with httpx.AsyncClient(base_url=base, timeout=300,
                                     limits=httpx.Limits(max_connections=clients + 2)) as http:
            for b in range(count + 1):
                started = time.perf_counter()
                results = await asyncio.gather(*(one(http, b * clients + i) for i in range(clients)))
                if b:  # burst 0 warms up connections and engines
                    out.append((time.perf_counter() - started, [v for v, _ in results], sum(t for _, t in results)))
        return out

    runs = asyncio.run(main())
    times = sorted(t for t, _, _ in runs)
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    split = [t for t, served, _ in runs if len(set(served)) > 1]
    whole = [t for t, served, _ in runs if len(set(served)) == 1]
    return {"bursts": len(runs), "clients": clients, "new_tokens": new_tokens, "users": users,
            "min_s": times[0], "p10_s": deciles[0], "median_s": statistics.median(times), "p90_s": deciles[-1],
            "max_s": times[-1], "mean_tok_s": sum(n for *_, n in runs) / sum(times),
            "bursts_touching_challenger": sum(1 for _, served, _ in runs if "challenger" in served),
            "split_bursts": len(split), "split_median_s": statistics.median(split) if split else None,
            "whole_median_s": statistics.median(whole) if whole else None,
            "times_s": [round(t, 3) for t, _, _ in runs],
            "on_challenger": [served.count("challenger") for _, served, _ in runs]}


def run(home: Path, ir: Path, work: Path, count: int, gateway_factory, prompts: list[str],
        scenarios: list[str] | None = None) -> dict:
    """Each scenario: point the aliases, start a gateway on the registry, run the bursts, stop it."""
    versions = register_versions(home, ir)
    out: dict = {"versions": versions}
    for name in scenarios or list(SCENARIOS):
        champion, challenger, users = SCENARIOS[name]
        point_aliases(home, versions[int(champion) - 1], versions[int(challenger) - 1])
        gateway = gateway_factory(work, ["serve.watch=false"])
        try:
            variants = httpx.get(gateway.base + "/admin/variants").json()["variants"]
            engines = {v["engine"]["engine_pid"] for v in variants if v.get("engine")}
            out[name] = bursts(gateway.base, count, users=users, prompts=prompts) | {"engine_processes": len(engines)}
        finally:
            gateway.stop()
        r = out[name]
        print(f"ab {name}: bursts min {r['min_s']:.2f} / p10 {r['p10_s']:.2f} / median {r['median_s']:.2f} / "
              f"p90 {r['p90_s']:.2f} / max {r['max_s']:.2f} s; {r['bursts_touching_challenger']} of {r['bursts']} "
              f"touched the challenger; {r['engine_processes']} engine process(es)", flush=True)
    return out


def report(out: dict) -> list[str]:
    rows = ["| A/B scenario (burst = 8 concurrent x 64 tokens; seconds) | engines | min | P10 | median | P90 | max "
            "| split bursts | median whole / split | tok/s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SCENARIOS:
        if name not in out:
            continue
        r = out[name]
        medians = " / ".join("-" if m is None else f"{m:.2f}" for m in (r["whole_median_s"], r["split_median_s"]))
        rows.append(f"| {name} | {r['engine_processes']} | {r['min_s']:.2f} | {r['p10_s']:.2f} | {r['median_s']:.2f} "
                    f"| {r['p90_s']:.2f} | {r['max_s']:.2f} | {r['split_bursts']}/{r['bursts']} | {medians} "
                    f"| {r['mean_tok_s']:.0f} |")
    return rows
