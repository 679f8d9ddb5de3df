"""The whole pipeline on the tiny preset, with real Prefect and a real MLflow SQLite store.

One scenario, because every step is real work: a first run is killed while it writes an export
variant; the re-run reuses curate/finetune/align (same keys) and resumes at quantize without
trusting anything half-written. The random 2-layer model then fails the default promotion gates
(its answers do not parse), gets no alias, and passes once the threshold is lowered, as the same
version. Re-runs against another registry, after an alias moved, and with a size gate show that
nothing is trusted from the stage cache that the registry does not confirm. Finally the README
command serves the champion.
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

from configs.schema import PromotionGates, load
from flows.pipeline import register_key, stage_inputs
from tasks.quantize.variants import is_complete, read_variant
from tasks.stage_cache import read_progress, stage_key
from tests.conftest import REPO

LINEAGE_TAGS = {"data_version", "config_hash", "code_commit", "stage_code", "base_model", "base_sha256",
                "quant_format", "curate_run_id", "sft_run_id", "align_run_id", "quantize_run_id", "quality_vs_fp32"}
STAGES = ("finetune", "align", "quantize", "evaluate", "register")
# The schema's default threshold; tiny.yaml lowers it to 0 so its demo has something to serve.
DEFAULT_GATES = [f"registry.gates.min_format_compliance={PromotionGates().min_format_compliance}"]


def _env(home) -> dict[str, str]:
    return {**os.environ, "LMFORGE_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _kill_while_writing_a_variant(home, timeout_s: float = 1500) -> dict:
    """SIGKILL `lmforge run -c tiny` once a variant is half-written in its export's staging dir."""
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", "tiny"], cwd=REPO, env=_env(home),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            if read_progress(home).get("quantize", {}).get("status") == "running" and any(
                    any(p.iterdir()) for p in (home / "exports").glob("*/.tmp-*")):
                break
            assert proc.poll() is None, f"pipeline exited early with {proc.returncode}"
            time.sleep(0.05)
        else:
            raise AssertionError("no export variant was ever being written")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    return read_progress(home)


def test_pipeline_resumes_gates_and_registers_only_what_the_registry_confirms(prefect_harness, tmp_path, monkeypatch):
    home = tmp_path / "home"
    killed = _kill_while_writing_a_variant(home)
    assert killed["quantize"]["status"] == "running"
    assert {killed[s]["status"] for s in ("finetune", "align")} == {"done"}
    [export_root] = list((home / "exports").iterdir())
    half_written = [p.name for p in export_root.glob(".tmp-*")]
    visible = {p.name: read_variant(p) for p in export_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert half_written, "the kill landed while a variant was being written"
    assert all(meta is not None for meta in visible.values()), f"a variant dir without its marker: {visible}"

    from flows.pipeline import pipeline_flow

    cfg = load("tiny", [f"home={home}", *DEFAULT_GATES])
    result = pipeline_flow(cfg)

    # Resumed at quantize: the earlier stages were reused with the same keys (same versions).
    assert result.reused == {"curate": True, "finetune": True, "align": True, "quantize": False,
                                "evaluate": False, "register": False}
    progress = read_progress(home)
    for stage in ("finetune", "align"):
        assert progress[stage]["key"] == killed[stage]["key"]
    # The keys are the ones stage_inputs computes (config, upstream keys, code hashes).
    client = mlflow.MlflowClient()
    registered = result.register
    version = client.get_model_version(cfg.registry.model_name, registered.version)
    inputs = stage_inputs(cfg, version.tags["base_sha256"], result.data.version)
    assert {s: progress[s]["key"] for s in STAGES} == {s: stage_key(s, inputs[s]) for s in STAGES}

    # Nothing half-written was used: staging is gone, complete variants from the killed run were
    # reused as they were, and every variant of the export is complete for these inputs.
    exported = result.quantize
    assert exported.root == export_root and not list(export_root.glob(".tmp-*"))
    for name, meta in visible.items():
        assert read_variant(export_root / name)["created_at"] == meta["created_at"], f"{name} was rebuilt"
    for name in {r["variant"] for r in exported.rows}:
        assert is_complete(export_root / name, exported.inputs_sha256), name

    # The default gates: a random 2-layer model's sentiment/NER answers do not parse, so it gets no alias.
    reasons = registered.gate_reasons
    assert any(r.startswith("format_compliance_sentiment") and r.endswith("< 0.9") for r in reasons), reasons
    assert registered.aliases == [] and version.tags["gate_status"] == "failed"
    assert version.aliases == []
    assert LINEAGE_TAGS <= set(version.tags)
    assert version.tags["data_version"] == result.data.version
    assert version.tags["code_commit"] == exported.code_commit
    assert json.loads(version.tags["stage_code"])["finetune"]["code_hash"] == inputs["finetune"]["code"]
    assert float(version.tags["metric.format_compliance_sentiment"]) < 0.9
    intervals = json.loads(version.tags["quality_vs_fp32"])  # the selected variant's paired intervals
    assert intervals == exported.selection["compare"].get(exported.selected, {})
    assert all({"difference", "low", "high", "drop_upper", "n"} <= set(c) for c in intervals.values())
    report = result.report
    assert f"registered **{cfg.registry.model_name} v{registered.version}**" in report
    assert "aliases: none; gates failed: format_compliance_sentiment" in report
    assert "| finetune | reused |" in report and "| quantize | ran |" in report and "| register | ran |" in report

    # tiny.yaml's threshold (0) re-gates the same version (no duplicate): challenger and champion.
    cfg = load("tiny", [f"home={home}"])
    result = pipeline_flow(cfg)
    assert result.reused == {"curate": True, "finetune": True, "align": True, "quantize": True, "evaluate": True,
                                "register": False}
    passed = result.register
    assert passed.version == registered.version and passed.gate_reasons == []
    assert set(passed.aliases) == {"challenger", "champion"}
    assert len(client.search_model_versions(f"name='{cfg.registry.model_name}'")) == 1

    model = mlflow.pyfunc.load_model(f"models:/{cfg.registry.model_name}@champion")
    outputs = model.predict(["Classify the sentiment: a wonderful film."], params={"max_new_tokens": 4})
    assert len(outputs) == 1 and isinstance(outputs[0], str) and outputs == model.predict(
        ["Classify the sentiment: a wonderful film."], params={"max_new_tokens": 4})

    # A reviewer moved the champion away: a reused registration reports the registry's aliases.
    client.delete_registered_model_alias(cfg.registry.model_name, "champion")
    moved = pipeline_flow(cfg)
    assert moved.reused["register"] and moved.register.aliases == ["challenger"]
    client.set_registered_model_alias(cfg.registry.model_name, "champion", passed.version)

    _another_registry_gets_its_own_version(cfg, home, tmp_path, monkeypatch, result)
    _size_gate_refuses_promotion_with_the_measured_size(home, exported)
    _readme_command_serves_the_champion(home)


def _another_registry_gets_its_own_version(cfg, home, tmp_path, monkeypatch, earlier) -> None:
    """Same artefacts, another tracking store: registered there (not "reused" from the first store),
    with the lineage of the run that built them even though the checkout has moved on since."""
    import tasks.stage_cache
    from flows.pipeline import pipeline_flow

    monkeypatch.setattr(tasks.stage_cache, "code_commit", lambda: "a-later-checkout")
    other_uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    other = load("tiny", [f"home={home}", f"registry.tracking_uri={other_uri}"])
    result = pipeline_flow(other)
    assert result.reused["quantize"] and not result.reused["register"]
    client = mlflow.MlflowClient(other_uri, other_uri)
    [version] = client.search_model_versions(f"name='{other.registry.model_name}'")
    assert str(version.version) == result.register.version
    assert version.tags["lmforge.register_key"] == register_key(
        stage_inputs(other, version.tags["base_sha256"], result.data.version)["register"])
    assert version.tags["code_commit"] == earlier.quantize.code_commit != "a-later-checkout"
    assert set(client.get_registered_model(other.registry.model_name).aliases) == {"champion", "challenger"}
    # A stored registration whose version was deleted since is not reused either.
    client.delete_model_version(other.registry.model_name, version.version)
    again = pipeline_flow(other)
    assert not again.reused["register"]
    assert client.get_model_version(other.registry.model_name, again.register.version)
    first_store = mlflow.MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    assert len(first_store.search_model_versions(f"name='{cfg.registry.model_name}'")) == 1
    monkeypatch.undo()
    from tasks.tracking import use_mlflow

    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())


def _size_gate_refuses_promotion_with_the_measured_size(home, exported) -> None:
    """`lmforge run -c tiny registry.gates.max_size_mb=1 --serve`: the measured IR size fails the gate,
    so the new registered model gets no alias and there is nothing to serve."""
    selected = next(r for r in exported.rows if r["variant"] == exported.selected)
    name = "lmforge-size-gated"
    done = subprocess.run(
        [sys.executable, "-m", "flows.cli", "run", "-c", "tiny", "--serve", f"registry.model_name={name}",
         "registry.gates.max_size_mb=1"], cwd=REPO, env=_env(home), capture_output=True, text=True, timeout=600)
    output = " ".join((done.stdout + done.stderr).split())  # rich wraps long lines
    assert done.returncode == 1, output[-3000:]
    assert f"size {selected['ir_bytes'] / 1e6:.1f} MB (measured IR) > 1.0 MB" in output
    assert f"{name} has no champion to serve" in output
    cfg = load("tiny", [f"home={home}"])
    client = mlflow.MlflowClient(cfg.tracking_uri(), cfg.tracking_uri())
    [version] = client.search_model_versions(f"name='{name}'")
    assert version.tags["gate_status"] == "failed" and version.aliases == []
    assert json.loads(version.tags["gate_inputs"]) == {"size_mb": selected["ir_bytes"] / 1e6,
                                                       "latency_ms": selected["latency_p95_ms"]}


def _readme_command_serves_the_champion(home) -> None:
    """`lmforge run --serve` (what `make run` does): the cached pipeline, then the gateway on the
    champion, with a first API key printed; the official OpenAI client gets an answer."""
    import httpx
    import openai

    from tests.serving_helpers import free_port

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-c", "tiny", "--serve",
                             f"serve.port={port}"],
                            cwd=REPO, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
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
        engine = "-m serving.backends.openvino_engine"
        assert children and all(engine in c for c in commands), f"only engine processes expected: {commands}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        _, alive = psutil.wait_procs(children, timeout=15)  # the engines
        assert alive == [], f"processes outlived the gateway: {alive}"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
