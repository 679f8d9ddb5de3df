"""The MLflow helpers every stage shares, on a real SQLite store."""

from __future__ import annotations

import contextlib
import logging
import math

import pytest
from mlflow import MlflowClient

from tasks.tracking import DATA_VERSION_TAG, STAGE_TAG, create_run, flat_params, is_metric, mark_failed


def test_flat_params_prefixes_the_section_and_keeps_structure_as_json():
    params = flat_params("sft", {"lora_r": 8, "target_modules": ["q_proj", "v_proj"], "stages": {"a": 1}},
                         {"data_version": "v1", "train_records": 40})
    assert params == {"sft.lora_r": "8", "sft.target_modules": '["q_proj", "v_proj"]', "sft.stages": '{"a": 1}',
                      "data_version": "v1", "train_records": "40"}


def test_create_run_tags_the_stage_and_logs_every_param(tmp_path, mlflow_uri):
    # 150 params cross MLflow's 100-per-batch cap; a 7000-char value crosses its 6000-char cap.
    params = {f"p{i:03d}": str(i) for i in range(150)} | {"long": "x" * 7000}
    run_id = create_run(mlflow_uri, "tracking-test", "sft-1", "sft", params, {DATA_VERSION_TAG: "v9"},
                        tmp_path / "artifacts")
    run = MlflowClient(mlflow_uri).get_run(run_id)
    assert run.data.tags[STAGE_TAG] == "sft" and run.data.tags[DATA_VERSION_TAG] == "v9"
    assert run.info.run_name == "sft-1" and run.info.status == "RUNNING"
    assert len(run.data.params) == 151 and run.data.params["p149"] == "149"
    assert run.data.params["long"] == "x" * 6000
    assert run.info.artifact_uri.startswith((tmp_path / "artifacts").resolve().as_uri())


def test_mark_failed_ends_the_run_and_never_raises(tmp_path, mlflow_uri, caplog):
    client = MlflowClient(mlflow_uri)
    failed = create_run(mlflow_uri, "tracking-test", "align-1", "align", {}, None, tmp_path / "artifacts")
    killed = create_run(mlflow_uri, "tracking-test", "sft-2", "sft", {}, None, tmp_path / "artifacts")
    mark_failed(mlflow_uri, failed)
    mark_failed(mlflow_uri, killed, status="KILLED")
    assert client.get_run(failed).info.status == "FAILED"
    assert client.get_run(killed).info.status == "KILLED"
    with caplog.at_level(logging.WARNING, logger="tasks.tracking"):
        mark_failed(mlflow_uri, "0" * 32)  # no such run: a warning, not an exception hiding the real error
    assert "could not mark MLflow run" in caplog.text


def test_is_metric_takes_finite_numbers_only():
    assert is_metric(1) and is_metric(0.5) and is_metric(-3)
    assert not any(is_metric(v) for v in (True, math.nan, math.inf, "1", None, [1]))


def test_ui_stopped_with_sigterm_leaves_no_mlflow_server_or_workers(tmp_path):
    """`lmforge ui` runs `mlflow server` (a web server with worker processes); a SIGTERM to lmforge
    must stop all of them, as a service manager or `kill` would expect."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import httpx
    import psutil

    from tests.conftest import REPO
    from tests.serving_helpers import free_port

    port = free_port()
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path / "home"), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", "-c", "tiny", "--port", str(port)], cwd=REPO,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    descendants: list[psutil.Process] = []
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"lmforge ui exited with {proc.returncode}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise AssertionError("the MLflow UI never answered")
        descendants = psutil.Process(proc.pid).children(recursive=True)
        assert len(descendants) >= 2, f"expected the server and its workers: {descendants}"
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        _, alive = psutil.wait_procs(descendants, timeout=15)
        assert alive == [], f"still running after lmforge ui got SIGTERM: {[p.cmdline() for p in alive]}"
        assert code == 128 + signal.SIGTERM
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        for child in [*descendants, psutil.Process(proc.pid)] if proc.poll() is None else descendants:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.wait(timeout=30)
