"""Scheduled runs for real: `lmforge deploy --cron` on a real Prefect server (its scheduler creates the
run) with a process worker that executes it; on Prefect's temporary server the command refuses."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.serving_helpers import free_port


def _prefect_env(tmp_path, url: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env |= {"PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "WARNING"}
    if url:
        env["PREFECT_API_URL"] = url
    return env


@pytest.fixture()
def prefect_server(tmp_path):
    """`prefect server start` (SQLite in tmp_path) with a fast scheduler loop; yields its API URL.

    Started through deploy.prefect_server, as the stack starts it: on SQLAlchemy 2.1 the plain
    `prefect server start` scheduler fails every loop and the run below never appears.
    """
    port = free_port()
    env = _prefect_env(tmp_path, None) | {
        "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}",
        # The scheduler looks for schedules to fill every 60 s by default; the test cannot wait that long.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "deploy.prefect_server", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    url = f"http://127.0.0.1:{port}/api"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("prefect server did not start")
        yield url
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _lmforge(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


def test_deploy_refuses_the_temporary_server_and_says_what_to_start(tmp_path):
    result = _lmforge(["deploy", "--cron", "0 2 * * *", "-c", "tiny"], _prefect_env(tmp_path, None))
    assert result.returncode == 2, result.stderr
    assert "temporary" in result.stderr and "prefect worker start --pool lmforge" in result.stderr
    assert "prefect server start" in result.stderr


def test_deploy_names_a_server_that_does_not_answer(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/api"
    result = _lmforge(["deploy", "--cron", "0 2 * * *", "-c", "tiny"], _prefect_env(tmp_path, url))
    assert result.returncode == 1
    assert "does not answer" in result.stderr


def test_a_cron_deployment_fires_by_itself_through_a_process_worker(prefect_server, tmp_path):
    home = tmp_path / "home"
    env = _prefect_env(tmp_path, prefect_server)
    # Every minute: the server's scheduler creates the run; nothing in this test creates one.
    result = _lmforge(["deploy", "--cron", "* * * * *", "--stage", "curate", "--name", "every-minute",
                       "-c", "tiny", f"home={home}"], env)
    assert result.returncode == 0, result.stderr
    assert "work pool 'lmforge'" in result.stdout

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with SyncPrefectClient(prefect_server) as client:
        pool = client.read_work_pool("lmforge")
        assert pool.type == "process"
        deployment = client.read_deployment_by_name("scheduled-pipeline/every-minute")
        assert [s.schedule.cron for s in deployment.schedules] == ["* * * * *"]
        assert deployment.work_pool_name == "lmforge"

    worker_log = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "lmforge",
                               "--type", "process", "--prefetch-seconds", "5"],
                              env=env | {"PREFECT_WORKER_QUERY_SECONDS": "2"}, cwd=tmp_path,
                              stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600  # next minute boundary + a curate run (minutes on a busy 2-core box)
        finished = None
        with SyncPrefectClient(prefect_server) as client:
            while time.monotonic() < deadline and finished is None:
                # Every paging field given: Prefect 3.8's server rejects the nulls the client sends otherwise.
                runs = client.read_flow_runs(deployment_filter=DeploymentFilter(
                    name=DeploymentFilterName(any_=["every-minute"])), sort=FlowRunSort.EXPECTED_START_TIME_ASC,
                    limit=20, offset=0)
                done = [r for r in runs if r.state and r.state.is_final()]
                if done:
                    finished = done[0]
                assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
                time.sleep(2)
    finally:
        # The worker waits for a flow run it started; on a busy machine that outlasts a short grace period.
        os.killpg(worker.pid, signal.SIGTERM)
        try:
            worker.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(worker.pid, signal.SIGKILL)
            worker.wait(30)
        worker_log.close()
    assert finished is not None, (tmp_path / "worker.log").read_text()[-3000:]
    assert finished.state.is_completed(), (finished.state, (tmp_path / "worker.log").read_text()[-3000:])
    # Created by the scheduler from the cron schedule, not by hand, and run by the worker: real work done.
    assert finished.auto_scheduled
    assert finished.work_pool_name == "lmforge"
    assert (home / "data" / "LATEST").is_file()
