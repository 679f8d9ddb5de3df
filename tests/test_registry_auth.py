"""The registry is not an open door: MLflow's basic-auth app, configured as the stack configures it,
refuses an alias move without credentials (401) and from the gateways' read-only user (403)."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO
from tests.serving_helpers import free_port


@pytest.fixture()
def mlflow_with_auth(tmp_path):
    """`mlflow server --app-name basic-auth` with deploy/mlflow/basic_auth.ini; yields (url, admin password)."""
    from deploy.files import DEPLOY_DIR

    port, password = free_port(), secrets.token_urlsafe(16)
    ini = tmp_path / "basic_auth.ini"
    ini.write_text((DEPLOY_DIR / "mlflow" / "basic_auth.ini").read_text().replace(
        "sqlite:////mlflow/basic_auth.db", f"sqlite:///{tmp_path / 'auth.db'}"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {
        "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(16)}
    log = open(tmp_path / "mlflow.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host",
                             "127.0.0.1", "--port", str(port), "--workers", "1",
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--serve-artifacts"],
                            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise TimeoutError("mlflow server did not start")
        yield url, password
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()


def _as(monkeypatch, user: str | None, password: str | None) -> None:
    for key, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
        if value is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, value)


def test_an_alias_moves_only_with_credentials_that_may_write(mlflow_with_auth, monkeypatch, tmp_path):
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from deploy.mlflow_auth import ensure_user

    url, admin_password = mlflow_with_auth
    _as(monkeypatch, "admin", admin_password)
    reader_password = secrets.token_urlsafe(16)
    assert ensure_user(url, "gateway", reader_password) is True
    assert ensure_user(url, "gateway", reader_password) is False  # idempotent: `stack up` runs it every time
    mlflow.set_tracking_uri(url)
    mlflow.set_experiment("auth")
    artifact = tmp_path / "weights.txt"
    artifact.write_text("not a model, just a registered artifact")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(artifact), "model")
    admin = MlflowClient(url)
    admin.create_registered_model("lmforge-assistant")
    first = admin.create_model_version("lmforge-assistant", f"runs:/{run.info.run_id}/model", run.info.run_id)
    second = admin.create_model_version("lmforge-assistant", f"runs:/{run.info.run_id}/model", run.info.run_id)
    admin.set_registered_model_alias("lmforge-assistant", "champion", first.version)

    _as(monkeypatch, None, None)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(url).set_registered_model_alias("lmforge-assistant", "champion", second.version)
    _as(monkeypatch, "admin", "wrong-" + admin_password)
    with pytest.raises(MlflowException, match="401"):
        MlflowClient(url).set_registered_model_alias("lmforge-assistant", "champion", second.version)
    _as(monkeypatch, "gateway", reader_password)
    reader = MlflowClient(url)
    assert reader.get_model_version_by_alias("lmforge-assistant", "champion").version == first.version  # may read
    with pytest.raises(MlflowException, match="403"):
        reader.set_registered_model_alias("lmforge-assistant", "champion", second.version)

    _as(monkeypatch, "admin", admin_password)
    assert MlflowClient(url).get_model_version_by_alias("lmforge-assistant", "champion").version == first.version
    MlflowClient(url).set_registered_model_alias("lmforge-assistant", "champion", second.version)
    assert MlflowClient(url).get_model_version_by_alias("lmforge-assistant", "champion").version == second.version
