"""Shared fixtures (an isolated state dir per test, one tiny model per test session) and the test tiers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# --------------------------------------------------------------------------- tiers
# Every test gets exactly one tier marker, so `pytest -m unit` (or integration, e2e) runs one tier:
#   unit         pure functions and files: no model, no Prefect/MLflow/database, no server, no CLI subprocess
#                (`pytest -m unit` takes well under 2 minutes)
#   integration  a tiny model, Prefect's test API, MLflow, PostgreSQL/SQLite stores, loopback servers, the CLI
#   e2e          the whole pipeline, the loopback production stack, real engines and schedulers end to end
# A module listed in UNIT_MODULES or E2E_MODULES has that tier; every other module is integration (a
# new module is never unit by accident). In a unit module a test that uses one of HEAVY_FIXTURES is
# integration. A tier marker written on a test (or as a module's pytestmark) wins over all of this.
# `slow` and `stack` are separate and stay deselected by default (addopts in pyproject.toml).
TIERS = ("unit", "integration", "e2e")
UNIT_MODULES = {
    "test_config", "test_curate_build", "test_curate_cleaning", "test_curate_loaders", "test_evaluate", "test_parsing",
    "test_quantize_extension_build", "test_quantize_report", "test_registry", "test_rewards", "test_sft_data",
    "test_runs", "test_stage_cache", "test_task_literals",
}
E2E_MODULES = {
    "test_pipeline",      # the whole pipeline, then the README command serving its champion
    "test_stack",         # the loopback production stack (also marked stack)
    "test_serving_vllm",  # the gateway managing a real vLLM server
    "test_deploy",        # a cron deployment fired by a real Prefect server and process worker
}
HEAVY_FIXTURES = {"tiny_model_dir", "tiny_ir_dir", "prefect_harness", "mlflow_uri", "postgres_url"}


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(tier) for tier in TIERS):
            continue
        module = item.path.stem
        if module in E2E_MODULES:
            tier = "e2e"
        elif module in UNIT_MODULES and not HEAVY_FIXTURES.intersection(item.fixturenames):
            tier = "unit"
        else:
            tier = "integration"
        item.add_marker(tier)

# Nothing in the tests may reach a hub: fail fast instead of hanging on the closed network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture()
def tmp_home(tmp_path, monkeypatch) -> Path:
    """A fresh LMFORGE_HOME for one test."""
    home = tmp_path / "home"
    monkeypatch.setenv("LMFORGE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def session_home(tmp_path_factory) -> Path:
    """A state dir shared by the whole session (models imported once)."""
    return tmp_path_factory.mktemp("lmforge-home")


@pytest.fixture(scope="session")
def tiny_config(session_home):
    """The tiny preset, pointed at the session state dir."""
    from configs.schema import load

    return load(REPO / "configs" / "tiny.yaml", [f"home={session_home}"])


@pytest.fixture(scope="session")
def tiny_model_dir(tiny_config) -> Path:
    """The 2-layer tiny Llama with SmolLM2's tokenizer, imported once per session."""
    from tasks.models import import_model

    manifest = import_model("tiny", tiny_config.home, tiny_config.model)
    return Path(manifest["path"])


@pytest.fixture(scope="session")
def prefect_harness():
    """Real Prefect API (temporary SQLite-backed server) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture()
def mlflow_uri(tmp_path) -> str:
    """A fresh MLflow SQLite store for one test."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture(scope="session")
def tiny_ir_dir(session_home, tiny_model_dir) -> Path:
    """The tiny model as an OpenVINO IR with tokenizer/detokenizer IRs (loadable by openvino_genai);
    the same export the serving tests use, made once per session."""
    from tests.serving_helpers import tiny_ir

    return tiny_ir(session_home, tiny_model_dir)


def read_artifact(key: str):
    """The newest Prefect artifact with ``key`` from the running API.

    Every filter field is passed explicitly: Prefect 3.8's server on fastapi 0.154 rejects the nulls
    the client sends for omitted ones (what ``Artifact.get`` does).
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter
    from prefect.client.schemas.sorting import ArtifactSort

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])), flow_run_filter=FlowRunFilter(),
            task_run_filter=TaskRunFilter(), sort=ArtifactSort.CREATED_DESC, limit=1, offset=0,
        )
    return found[0] if found else None


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory):
    """A real PostgreSQL 15 server in a temp dir for the session; yields a SQLAlchemy URL to a fresh database."""
    import secrets
    import shutil
    import signal
    import subprocess
    import time

    from deploy import postgres
    from tests.serving_helpers import free_port

    if not shutil.which("initdb"):
        pytest.skip("PostgreSQL's initdb is not on PATH")
    owner = tmp_path_factory.mktemp("pg-owner")
    data, password, port = postgres.data_dir(owner), secrets.token_urlsafe(16), free_port()
    shutil.rmtree(data, ignore_errors=True)
    postgres.init_cluster(data, password)
    log = open(owner / "postgres.log", "wb")
    proc = subprocess.Popen([*postgres.run_as(), *postgres.server_argv(data, port)], stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    dsn = f"postgresql://{postgres.SUPERUSER}:{password}@127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while not postgres.ready(f"{dsn}/postgres"):
            assert proc.poll() is None and time.monotonic() < deadline, (owner / "postgres.log").read_text()
            time.sleep(0.3)
        postgres.create_databases(f"{dsn}/postgres", ("lmforge_test",))
        yield f"postgresql+psycopg://{postgres.SUPERUSER}:{password}@127.0.0.1:{port}/lmforge_test"
    finally:
        from serving import db

        db.dispose_all()
        os.killpg(proc.pid, signal.SIGINT)  # fast shutdown
        proc.wait(30)
        log.close()
        shutil.rmtree(data, ignore_errors=True)
