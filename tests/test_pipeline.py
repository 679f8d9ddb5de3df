"""The whole pipeline on the tiny preset, with real Prefect and a real MLflow SQLite store.

One scenario, because every step is real work: a first run is killed while quantizing; the re-run
must reuse curate/finetune/align (same versions) and resume at quantize, then register a version
that passes the gates (first run: challenger and champion), carries the lineage tags, and loads
as an MLflow pyfunc model.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import mlflow

from configs.schema import load
from tasks.stage_cache import read_progress
from tests.conftest import REPO

LINEAGE_TAGS = {"data_version", "config_hash", "code_commit", "base_model", "base_sha256", "quant_format",
                "curate_run_id", "sft_run_id", "align_run_id", "quantize_run_id"}


def _kill_when_quantizing(home, timeout_s: float = 1500) -> dict:
    env = {**os.environ, "LMFORGE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", "tiny"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            progress = read_progress(home)
            if progress.get("quantize", {}).get("status") == "running":
                time.sleep(3)  # let it get into the export itself
                break
            assert proc.poll() is None, f"pipeline exited early with {proc.returncode}"
            time.sleep(1)
        else:
            raise AssertionError("quantize never started")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return read_progress(home)


def test_pipeline_resumes_at_quantize_and_registers_a_champion(prefect_harness, tmp_path):
    home = tmp_path / "home"
    killed = _kill_when_quantizing(home)
    assert killed["quantize"]["status"] == "running"
    assert {killed[s]["status"] for s in ("finetune", "align")} == {"done"}

    from flows.pipeline import pipeline_flow

    cfg = load("tiny", [f"home={home}"])
    result = pipeline_flow(cfg)

    # Resumed at quantize: the earlier stages were reused with the same keys (same versions).
    assert result["reused"] == {"curate": True, "finetune": True, "align": True, "quantize": False,
                                "evaluate": False, "register": False}
    progress = read_progress(home)
    for stage in ("finetune", "align"):
        assert progress[stage]["key"] == killed[stage]["key"]
    # No half-written export from the killed run looks complete.
    selected = result["quantize"]["selected_path"]
    assert (home / "exports").is_dir() and os.path.isdir(selected)

    registered = result["register"]
    assert registered["gate_reasons"] == [], registered
    assert set(registered["aliases"]) == {"challenger", "champion"}
    client = mlflow.MlflowClient()
    version = client.get_model_version(cfg.registry.model_name, registered["version"])
    assert LINEAGE_TAGS <= set(version.tags)
    assert version.tags["data_version"] == result["data"]["version"]
    assert any(k.startswith("metric.") for k in version.tags)
    assert "lmforge-pipeline" in json.dumps(result["report"]) or "Stages" in result["report"]

    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    outputs = model.predict(["Classify the sentiment: a wonderful film."], params={"max_new_tokens": 4})
    assert len(outputs) == 1 and isinstance(outputs[0], str)
