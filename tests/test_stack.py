"""The production stack on loopback, end to end (`pytest -m stack`; not in the default run, see docs/DEPLOYMENT.md).

`lmforge stack up`'s code starts PostgreSQL, MLflow (basic auth) on it, a Prefect server + process
worker, two gateway replicas and nginx with a generated CA, and Prometheus. Then: a cron deployment
fires by itself and registers a tiny-preset model into the MLflow server, both replicas serve it,
the official `openai` client gets answers over verified HTTPS, plain HTTP redirects, an alias moved
with credentials (refused without) reaches both replicas, a revoked key and a rate limit hold across
both, and killing a replica under Locust load loses no non-streaming request while its streams end
in an error, not a hang; Prometheus sees both replicas, then the killed one down.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.stack

MODEL = "lmforge-assistant"
POLL_S = 1.0
PHASES: dict[str, float] = {}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from deploy import postgres
    from deploy.programs import StackPorts, StackSpec
    from deploy.stack import Stack, ensure_tools

    ensure_tools()
    root = tmp_path_factory.mktemp("stack")
    spec = StackSpec(root=root, ports=StackPorts.free(2), config="tiny", overrides=[f"serve.poll_interval_s={POLL_S}"],
                     autorestart=False, scheduler_loop_s=2, worker_query_s=2)
    started = time.monotonic()
    stack = Stack(spec)
    try:
        stack.up()
        PHASES["stack up"] = time.monotonic() - started
        yield stack
    finally:
        try:
            stack.down()
        finally:
            shutil.rmtree(postgres.data_dir(root), ignore_errors=True)
            print("\nstack test phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in PHASES.items()))


def _lmforge(args: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=os.environ | env,
                          capture_output=True, text=True, timeout=timeout)


def _chat(base: str, key: str, verify=True, **extra) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Is this review positive? Great film."}],
            "max_tokens": 4} | extra
    return httpx.post(f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=60, verify=verify)


def _wait(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what}: not within {timeout:.0f}s")


def _served_version(base: str, key: str) -> str | None:
    try:
        response = _chat(base, key)
    except httpx.HTTPError:
        return None
    return response.headers.get("x-lmforge-version") if response.status_code == 200 else None


def _wait_for_scheduled_run(spec, deployment: str, timeout: float):
    """The first run of ``deployment`` (created by the server's scheduler) once it is final."""
    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    def final_run():
        with SyncPrefectClient(spec.prefect_api_url, auth_string=spec.admin_env()["PREFECT_API_AUTH_STRING"]) as client:
            by_name = DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            runs = client.read_flow_runs(deployment_filter=by_name, sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                                         limit=50, offset=0)
            started = [r for r in runs if r.state and not r.state.is_scheduled()]
            if started:  # one run is all this test needs: no more cron ticks
                client.pause_deployment(runs[0].deployment_id)
                for waiting in (r for r in runs if r.state and r.state.is_scheduled()):
                    with contextlib.suppress(ObjectNotFound, PrefectHTTPStatusError):  # the pause may have removed it
                        client.delete_flow_run(waiting.id)
            # On a loaded machine a second tick can start before the pause; wait for every started run,
            # so no registration lands after the test has read the champion.
            if started and all(r.state.is_final() for r in started):
                return started[0]
            return None

    return _wait(final_run, timeout, "a scheduled pipeline run that finished")


def test_the_stack_end_to_end(stack, monkeypatch):
    import openai
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from serving.auth import KeyStore

    spec = stack.spec
    admin_env = spec.admin_env()
    ca = str(spec.certs_dir / "ca.crt")
    gateways = [spec.gateway_url(i) for i in range(spec.replicas)]

    # --- a cron deployment fires by itself through the worker and registers into the MLflow server
    t0 = time.monotonic()
    deployed = _lmforge(["deploy", "--cron", "* * * * *", "--name", "stack-nightly", "-c", "tiny",
                         f"registry.tracking_uri={spec.mlflow_url}", f"home={spec.home}"], admin_env)
    assert deployed.returncode == 0, deployed.stderr
    run = _wait_for_scheduled_run(spec, "stack-nightly", timeout=1800)  # the tiny pipeline: 4-20 min by load
    assert run.state.is_completed(), (run.state, stack.log("prefect-worker"))
    assert run.auto_scheduled and run.work_pool_name == "lmforge"
    PHASES["cron run (wait + tiny pipeline)"] = time.monotonic() - t0

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, admin_env[name])
    registry = MlflowClient(spec.mlflow_url)
    champion = registry.get_model_version_by_alias(MODEL, "champion")

    keys = KeyStore(spec.database_url())
    admin_key, _ = keys.add("stack-admin", priority="high", admin=True, rate_per_minute=10**6, burst=10**5)

    # --- both replicas serve the new champion
    t0 = time.monotonic()
    for base in gateways:
        _wait(lambda b=base: _served_version(b, admin_key) == str(champion.version), 300, f"{base} serving")
    PHASES["replicas load the champion"] = time.monotonic() - t0

    # --- the official client over verified HTTPS through nginx; plain HTTP redirects; operator routes closed
    client = openai.OpenAI(base_url=f"{spec.public_url}/v1", api_key=admin_key,
                           http_client=httpx.Client(verify=ca, timeout=60))
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "Is this review positive or negative? A joyless mess."}],
        max_tokens=8)
    answer = raw.parse()
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens > 0
    assert raw.headers["x-lmforge-version"] == str(champion.version)
    with pytest.raises(openai.APIConnectionError):  # the CA is not in the system store: verification is real
        openai.OpenAI(base_url=f"{spec.public_url}/v1", api_key=admin_key, max_retries=0).models.list()
    redirect = httpx.get(f"http://localhost:{spec.ports.http}/v1/models", follow_redirects=False)
    assert redirect.status_code == 308
    assert redirect.headers["location"] == f"{spec.public_url}/v1/models"
    for path in ("/metrics", "/admin/variants"):
        assert httpx.get(f"{spec.public_url}{path}", verify=ca).status_code == 404
    assert httpx.get(f"{gateways[0]}/metrics").status_code == 200  # where Prometheus scrapes

    # --- an alias moves only with credentials, and reaches both replicas
    import mlflow

    from configs.schema import GATE_STATUS_TAG

    mlflow.set_tracking_uri(spec.mlflow_url)
    second = mlflow.register_model(champion.source, MODEL)  # the same logged model as a new version
    # The gateway serves only gated versions (serving/promotion.py): the copy carries the champion's result.
    registry.set_model_version_tag(MODEL, second.version, GATE_STATUS_TAG, champion.tags[GATE_STATUS_TAG])
    with monkeypatch.context() as anonymous:
        anonymous.delenv("MLFLOW_TRACKING_USERNAME")
        anonymous.delenv("MLFLOW_TRACKING_PASSWORD")
        with pytest.raises(MlflowException, match="401"):
            MlflowClient(spec.mlflow_url).set_registered_model_alias(MODEL, "champion", second.version)
    assert registry.get_model_version_by_alias(MODEL, "champion").version == champion.version
    t0, moved_at = time.monotonic(), time.time()
    registry.set_registered_model_alias(MODEL, "champion", second.version)
    for base in gateways:
        _wait(lambda b=base: _served_version(b, admin_key) == str(second.version), 300, f"{base} swapping")
    PHASES["alias move served by both replicas"] = time.monotonic() - t0
    # Each replica's watcher saw the move within a poll (its swap record starts then); the rest of the
    # time above is downloading the version from the MLflow server and compiling it.
    for index, base in enumerate(gateways):
        variants = httpx.get(f"{base}/admin/variants", headers={"Authorization": f"Bearer {admin_key}"}).json()
        champion_slot = next(v for v in variants["variants"] if v["name"] == "champion")
        swap = next(s for s in champion_slot["swaps"] if str(s["version"]) == str(second.version))
        seen_after = swap["at"] - swap["total_s"] - moved_at
        PHASES[f"alias move seen by gateway-{index + 1}"] = seen_after
        assert 0 <= seen_after <= POLL_S + 4, seen_after

    # --- one key, one bucket across both replicas; a key revoked once is refused by both
    limited, record = keys.add("limited", rate_per_minute=1, burst=4)
    statuses = [_chat(gateways[i % 2], limited).status_code for i in range(8)]
    assert statuses[:4] == [200] * 4 and statuses[4:] == [429] * 4, statuses
    revoked = _lmforge(["keys", "revoke", "limited", "-c", "tiny"], admin_env)
    assert revoked.returncode == 0, revoked.stderr
    for base in gateways:
        response = _chat(base, limited)
        assert response.status_code == 401 and "revoked" in response.text

    # --- Prometheus scrapes both replicas
    prometheus = f"http://127.0.0.1:{spec.ports.prometheus}"

    def targets() -> dict[str, str]:
        active = httpx.get(f"{prometheus}/api/v1/targets").json()["data"]["activeTargets"]
        return {t["labels"]["instance"]: t["health"] for t in active if t["labels"]["job"] == "lmforge-gateway"}

    instances = [f"127.0.0.1:{p}" for p in spec.ports.gateways]
    _wait(lambda: targets() == dict.fromkeys(instances, "up"), 60, "both replicas scraped")

    # --- kill a replica under load: no non-streaming request is lost, its streams end in an error
    t0 = time.monotonic()
    load = _start_locust(spec, admin_key, ca, users=6, seconds=40)
    time.sleep(8)
    # Streams through nginx land where least_conn puts them (maybe all on one replica), so two more go
    # straight to each replica: those on the killed one must end in an error, the others complete.
    through_nginx = _open_streams(spec.public_url, admin_key, ca, count=4)
    on_survivor = _open_streams(gateways[0], admin_key, None, count=2)
    on_victim = _open_streams(gateways[1], admin_key, None, count=2)
    time.sleep(1.0)  # the streams are generating
    # The replica and its engine process (supervisord gives each program its own process group).
    os.killpg(stack.pid("gateway-2"), signal.SIGKILL)
    outcomes = {name: [s.join() for s in group] for name, group in
                (("nginx", through_nginx), ("survivor", on_survivor), ("victim", on_victim))}
    stats = _finish_locust(load)
    PHASES["kill under load"] = time.monotonic() - t0
    PHASES["kill: Locust requests (count)"] = stats["requests"]
    assert stats["requests"] > 50, stats
    assert stats["failures"] == 0, stats
    assert all(o in ("done", "error") for o in outcomes["nginx"]), outcomes  # nothing hung
    assert outcomes["victim"] == ["error"] * 2 and outcomes["survivor"] == ["done"] * 2, outcomes
    _wait(lambda: targets().get(instances[1]) == "down" and targets().get(instances[0]) == "up", 60,
          "the killed replica reported down")
    assert _chat(spec.public_url, admin_key, verify=ca).status_code == 200  # nginx routes around it


class _Stream(threading.Thread):
    """One long streaming request through nginx; ends as 'done', 'error' or (if it hangs) 'hung'."""

    def __init__(self, url: str, key: str, ca: str | None):
        super().__init__(daemon=True)
        self.url, self.key, self.ca, self.outcome = url, key, ca, "hung"

    def run(self) -> None:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 200,
                "ignore_eos": True, "stream": True}
        try:
            with httpx.stream("POST", f"{self.url}/v1/chat/completions", json=body, verify=self.ca or True,
                              headers={"Authorization": f"Bearer {self.key}"}, timeout=60) as response:
                for line in response.iter_lines():
                    if line.startswith("data: ") and '"error"' in line[:20]:
                        self.outcome = "error"
                        return
                    if line == "data: [DONE]":
                        self.outcome = "done"
                        return
            self.outcome = "error"  # closed without [DONE]
        except httpx.HTTPError:
            self.outcome = "error"

    def join(self, timeout: float | None = 90) -> str:  # type: ignore[override]
        super().join(timeout)
        return self.outcome


def _open_streams(url: str, key: str, ca: str | None, count: int) -> list[_Stream]:
    streams = [_Stream(url, key, ca) for _ in range(count)]
    for stream in streams:
        stream.start()
    return streams


def _start_locust(spec, key: str, ca: str, users: int, seconds: int):
    out = spec.root / f"locust-{time.time_ns()}"
    env = os.environ | {"LMFORGE_BENCH_HOSTS": spec.public_url, "LMFORGE_BENCH_CA": ca,
                        "LMFORGE_BENCH_KEY_HIGH": key, "LMFORGE_BENCH_KEY_LOW": key,
                        "LMFORGE_BENCH_TASKS": "chat,rpc", "LMFORGE_BENCH_MAX_TOKENS": "8"}
    proc = subprocess.Popen([sys.executable, "-m", "locust", "-f", str(REPO / "bench" / "locustfile.py"),
                             "--headless", "-u", str(users), "-r", str(users), "-t", f"{seconds}s", "--csv", str(out),
                             "--only-summary", "--stop-timeout", "30"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=open(f"{out}.log", "wb"))
    return proc, out


def _finish_locust(load) -> dict:
    proc, out = load
    proc.wait(timeout=120)
    with open(f"{out}_stats.csv") as handle:
        total = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    failures = Path(f"{out}_failures.csv").read_text() if Path(f"{out}_failures.csv").is_file() else ""
    return {"requests": int(total["Request Count"]), "failures": int(total["Failure Count"]), "detail": failures,
            "rps": float(total["Requests/s"]), "log": json.dumps(Path(f"{out}.log").read_text()[-1500:])}
