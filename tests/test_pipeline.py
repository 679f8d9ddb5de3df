"""The whole pipeline on the tiny preset, with real Prefect and a real MLflow SQLite store.

One scenario, because every step is real work: a first run is killed while quantizing; the re-run
must reuse curate/finetune/align (same versions) and resume at quantize, then register a version
that passes the gates (first run: challenger and champion), carries the lineage tags, and loads
as an MLflow pyfunc model.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import mlflow
import psutil

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

    _readme_command_serves_the_champion(home)


def _readme_command_serves_the_champion(home) -> None:
    """`lmforge run --serve` (what `make run` does): the cached pipeline, then the gateway on the
    champion, with a first API key printed; the official OpenAI client gets an answer."""
    import httpx
    import openai

    from tests.serving_helpers import free_port

    port = free_port()
    env = {**os.environ, "LMFORGE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", "tiny", "--serve", f"serve.port={port}"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    try:
        key, deadline = None, time.time() + 300
        while key is None and time.time() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                assert proc.poll() is None, f"lmforge run --serve exited with {proc.returncode} before printing a key"
                continue
            key = line.strip() if line.startswith("lmf_") else None
        assert key, "no API key printed within 300 s"
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 180
        while time.time() < deadline:
            assert proc.poll() is None, f"gateway exited with {proc.returncode}"
            try:
                if httpx.get(base + "/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        else:
            raise AssertionError("gateway never became ready")
        client = openai.OpenAI(base_url=base + "/v1", api_key=key)
        raw = client.chat.completions.with_raw_response.create(
            model="lmforge-assistant", messages=[{"role": "user", "content": "Say hi."}], max_tokens=4, user="u1")
        assert raw.headers["x-lmforge-variant"] in {"champion", "challenger"}
        assert raw.parse().usage.completion_tokens >= 1
        with_bad_key = openai.OpenAI(base_url=base + "/v1", api_key="lmf_nope_nope", max_retries=0)
        try:
            with_bad_key.models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        # The gateway replaced the pipeline process: the temporary Prefect server it started is gone
        # (its children are the OpenVINO engine processes only), and SIGTERM drains and exits cleanly.
        children = psutil.Process(proc.pid).children(recursive=True)
        commands = [" ".join(child.cmdline()) for child in children]
        assert children and all("multiprocessing" in c for c in commands), f"only engine processes expected: {commands}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=15)  # engines, and multiprocessing's resource tracker
        assert alive == [], f"processes outlived the gateway: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
