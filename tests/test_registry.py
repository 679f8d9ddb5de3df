"""MLflow registry on a real SQLite store: registration, lineage tags, gates, promote, rollback, pyfunc."""

from __future__ import annotations

import json

import mlflow
import pytest

from configs.schema import PromotionGates, RegistryConfig
from tasks.registry import (
    CHALLENGER,
    CHAMPION,
    PREVIOUS,
    RegistryError,
    aliases,
    check_gates,
    gate_version,
    promote,
    register_version,
    rollback,
    version_metrics,
)
from tasks.tracking import use_mlflow

GOOD = {"sentiment_accuracy": 0.90, "ner_f1": 0.50, "summarization_rougeL": 0.30, "format_compliance": 0.97,
        "format_compliance_sentiment": 0.95, "format_compliance_ner": 0.92, "n_sentiment": 40, "n_ner": 40}
LINEAGE = {"data_version": "d123", "config_hash": "c456", "code_commit": "abc", "base_model": "tiny",
           "base_sha256": "ff" * 32, "quant_format": "int8", "sft_run_id": "r1"}


@pytest.fixture()
def registry(tmp_path, mlflow_uri) -> RegistryConfig:
    use_mlflow(mlflow_uri, "test", tmp_path / "artifacts")
    return RegistryConfig(model_name="lmforge-test",
                          gates=PromotionGates(max_metric_drop=2.0, min_format_compliance=0.9))


def register(registry, ir_dir, metrics=GOOD):
    return register_version(registry, {"openvino": ir_dir}, metrics, LINEAGE)


def test_check_gates_in_points():
    gates = PromotionGates(max_metric_drop=2.0, min_format_compliance=0.9, max_size_mb=100)
    assert check_gates(GOOD, GOOD, gates, size_mb=50) == []
    worse = {**GOOD, "ner_f1": 0.47}  # 3 points below
    assert check_gates(worse, GOOD, gates, size_mb=50) == [
        "ner_f1 0.4700 is 3.0 points below champion 0.5000 (allowed 2.0)"]
    assert check_gates({**GOOD, "ner_f1": 0.485}, GOOD, gates, size_mb=50) == []  # 1.5 points: allowed
    assert check_gates(GOOD, None, gates, size_mb=120) == ["size 120.0 MB (measured IR) > 100.0 MB"]


def test_gates_fail_closed_on_a_metric_missing_on_either_side():
    gates = PromotionGates(max_metric_drop=2.0, min_format_compliance=0.9)
    without_ner = {k: v for k, v in GOOD.items() if k != "ner_f1"}
    assert check_gates(without_ner, GOOD, gates) == [
        "ner_f1 is missing on this version (the champion has 0.5000): cannot compare against the champion"]
    assert check_gates(GOOD, without_ner, gates) == [
        "ner_f1 is missing on the champion (this version has 0.5000): cannot compare against the champion"]
    # A task neither side was evaluated on is not a comparison that failed.
    no_summaries = {k: v for k, v in GOOD.items() if k != "summarization_rougeL"}
    assert check_gates(no_summaries, no_summaries, gates) == []


def test_size_and_latency_gates_fail_closed_without_a_measurement():
    gates = PromotionGates(min_format_compliance=0.9, max_size_mb=100, max_latency_ms=500)
    assert check_gates(GOOD, None, gates) == ["max_size_mb is 100.0 but the size was not measured",
                                              "max_latency_ms is 500.0 but the latency was not measured"]
    assert check_gates(GOOD, None, gates, size_mb=99.0, latency_ms=501.0) == [
        "P95 latency 501 ms (measured) > 500.0 ms"]
    assert check_gates(GOOD, None, gates, size_mb=99.0, latency_ms=499.0) == []


def test_format_compliance_is_gated_per_structured_task_not_on_the_average():
    gates = PromotionGates(min_format_compliance=0.9)
    # Summaries are always "well-formed": a high average hides NER answers that do not parse.
    hidden = {**GOOD, "format_compliance": 0.93, "format_compliance_ner": 0.6, "format_compliance_summarization": 1.0}
    assert check_gates(hidden, None, gates) == ["format_compliance_ner 0.600 < 0.9"]
    unmeasured = {k: v for k, v in GOOD.items() if k != "format_compliance_sentiment"}
    assert check_gates(unmeasured, None, gates) == ["format_compliance_sentiment was not measured"]
    # A task absent from the evaluation set (n_ner == 0) has nothing to gate; no structured task at all fails.
    no_ner = {k: v for k, v in GOOD.items() if k not in ("format_compliance_ner", "ner_f1")} | {"n_ner": 0}
    assert check_gates(no_ner, None, gates) == []
    assert check_gates({"summarization_rougeL": 0.3, "n_sentiment": 0, "n_ner": 0}, None, gates) == [
        "no structured task (sentiment, ner) was evaluated: format compliance was not measured"]


def test_gate_inputs_come_from_the_selected_rows_measurements():
    from tasks.registry import gate_inputs

    row = {"variant": "int8", "ir_bytes": 137_800_000, "latency_p95_ms": 812.5,
           "latency_measured": "20 single requests"}
    measured = gate_inputs(row)
    assert measured["size_mb"] == pytest.approx(137.8) and measured["latency_ms"] == 812.5
    assert measured["measured"]["variant"] == "int8" and measured["measured"]["latency"] == "20 single requests"
    assert gate_inputs({"variant": "merged_hf"})["size_mb"] is None


def test_register_gate_promote_rollback_round_trip(registry, tiny_ir_dir):
    v1 = register(registry, tiny_ir_dir)
    client = mlflow.MlflowClient()
    tags = client.get_model_version(registry.model_name, v1.version).tags
    assert {k: tags[k] for k in LINEAGE} == LINEAGE
    assert version_metrics(registry.model_name, v1.version) == pytest.approx(GOOD)
    run = client.get_run(v1.run_id)
    assert run.data.metrics["sentiment_accuracy"] == pytest.approx(0.90)
    assert run.data.params["data_version"] == "d123"

    first = gate_version(registry, v1.version)
    assert first.gate_reasons == [] and set(first.aliases) == {CHALLENGER, CHAMPION}

    v2 = register(registry, tiny_ir_dir, {**GOOD, "sentiment_accuracy": 0.91})
    assert gate_version(registry, v2.version).aliases == [CHALLENGER]
    assert aliases(registry.model_name) == {CHAMPION: v1.version, CHALLENGER: v2.version}

    promote(registry, v2.version)
    assert aliases(registry.model_name) == {CHAMPION: v2.version, CHALLENGER: v2.version, PREVIOUS: v1.version}
    rollback(registry)
    assert aliases(registry.model_name)[CHAMPION] == v1.version
    assert aliases(registry.model_name)[PREVIOUS] == v2.version
    rollback(registry)
    assert aliases(registry.model_name)[CHAMPION] == v2.version


def test_failing_gate_leaves_no_alias_and_records_why(registry, tiny_ir_dir):
    v1 = register(registry, tiny_ir_dir)
    gate_version(registry, v1.version)
    bad = register(registry, tiny_ir_dir, {**GOOD, "sentiment_accuracy": 0.80, "format_compliance_sentiment": 0.5})
    result = gate_version(registry, bad.version)
    assert len(result.gate_reasons) == 2 and result.aliases == []
    tags = mlflow.MlflowClient().get_model_version(registry.model_name, bad.version).tags
    assert tags["gate_status"] == "failed"
    assert any("sentiment_accuracy" in r for r in json.loads(tags["gate_reasons"]))
    assert bad.version not in aliases(registry.model_name).values()
    with pytest.raises(RegistryError, match="did not pass the promotion gates"):
        promote(registry, bad.version)
    promote(registry, bad.version, force=True)
    assert aliases(registry.model_name)[CHAMPION] == bad.version


def test_promote_refuses_unknown_version_and_rollback_without_previous(registry, tiny_ir_dir):
    with pytest.raises(RegistryError, match="no version 7"):
        promote(registry, "7")
    v1 = register(registry, tiny_ir_dir)
    gate_version(registry, v1.version)
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        rollback(registry)


def test_registration_requires_the_ir(registry, tmp_path):
    with pytest.raises(RegistryError, match="must include 'openvino'"):
        register_version(registry, {"adapter": tmp_path}, GOOD, LINEAGE)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RegistryError, match="missing or empty"):
        register_version(registry, {"openvino": tmp_path / "empty"}, GOOD, LINEAGE)


def test_registered_model_loads_as_pyfunc_and_generates(registry, tiny_ir_dir):
    v1 = register(registry, tiny_ir_dir)
    gate_version(registry, v1.version)
    model = mlflow.pyfunc.load_model(f"models:/{registry.model_name}@{CHAMPION}")
    outputs = model.predict(["hello there", "what is 2+2?"], params={"max_new_tokens": 4})
    assert len(outputs) == 2 and all(isinstance(o, str) for o in outputs)
    # Greedy decoding: the same input gives the same output.
    assert model.predict(["hello there"], params={"max_new_tokens": 4}) == outputs[:1]


def test_a_failure_after_logging_does_not_duplicate_the_version_on_rerun(registry, tiny_ir_dir, monkeypatch):
    """The run dies after the model is logged and the version created (here: setting its description);
    re-running the same registration finds that version by its register key instead of adding one."""
    from tasks.registry import register_and_gate

    real_update = mlflow.MlflowClient.update_model_version

    def registry_goes_away(self, *args, **kwargs):
        raise ConnectionError("tracking server unreachable")

    monkeypatch.setattr(mlflow.MlflowClient, "update_model_version", registry_goes_away)
    with pytest.raises(ConnectionError):
        register_and_gate(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="stage-key-1")
    monkeypatch.setattr(mlflow.MlflowClient, "update_model_version", real_update)

    again = register_and_gate(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="stage-key-1")
    versions = mlflow.MlflowClient().search_model_versions(f"name='{registry.model_name}'")
    assert [str(v.version) for v in versions] == [again.version] == ["1"]
    assert set(again.aliases) == {CHAMPION, CHALLENGER} and again.gate_reasons == []
    assert mlflow.MlflowClient().get_run(again.run_id).data.params["data_version"] == "d123"
    # The same key once more: still one version; a different key is a new registration.
    artifacts = {"openvino": tiny_ir_dir}
    assert register_and_gate(registry, artifacts, GOOD, LINEAGE, register_key="stage-key-1").version == "1"
    assert register_version(registry, artifacts, GOOD, LINEAGE, register_key="stage-key-2").version == "2"


def test_holds_registration_checks_the_registry_mlflow_points_at(registry, tiny_ir_dir, tmp_path):
    from tasks.registry import holds_registration

    v1 = register_version(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="k1")
    assert holds_registration(registry.model_name, v1.version, "k1")
    assert not holds_registration(registry.model_name, v1.version, "another-key")
    assert not holds_registration(registry.model_name, "99", "k1")
    use_mlflow(f"sqlite:///{tmp_path / 'other.db'}", "test", tmp_path / "other-artifacts")
    assert not holds_registration(registry.model_name, v1.version, "k1"), "another registry has no such version"
