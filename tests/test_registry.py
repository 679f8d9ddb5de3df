"""MLflow registry on a real SQLite store: registration, lineage tags, gates, promote, rollback, pyfunc."""

from __future__ import annotations

import json

import mlflow
import pytest

from configs.schema import PromotionGates, RegistryConfig
from tasks.registry import (
    CHALLENGER, CHAMPION, PREVIOUS, RegistryError, aliases, check_gates, gate_version, promote, register_version,
    rollback, version_metrics,
)
from tasks.tracking import use_mlflow

GOOD = {"sentiment_accuracy": 0.90, "ner_f1": 0.50, "summarization_rougeL": 0.30, "format_compliance": 0.97}
LINEAGE = {"data_version": "d123", "config_hash": "c456", "code_commit": "abc", "base_model": "tiny",
           "base_sha256": "ff" * 32, "quant_format": "int8", "sft_run_id": "r1"}


@pytest.fixture()
def registry(tmp_path, mlflow_uri) -> RegistryConfig:
    use_mlflow(mlflow_uri, "test", tmp_path / "artifacts")
    return RegistryConfig(model_name="lmforge-test", gates=PromotionGates(max_metric_drop=2.0, min_format_compliance=0.9))


def register(registry, ir_dir, metrics=GOOD):
    return register_version(registry, {"openvino": ir_dir}, metrics, LINEAGE)


def test_check_gates_in_points():
    gates = PromotionGates(max_metric_drop=2.0, min_format_compliance=0.9, max_size_mb=100)
    assert check_gates(GOOD, GOOD, gates) == []
    worse = {**GOOD, "ner_f1": 0.47}  # 3 points below
    assert check_gates(worse, GOOD, gates) == ["ner_f1 0.4700 is 3.0 points below champion 0.5000 (allowed 2.0)"]
    assert check_gates({**GOOD, "ner_f1": 0.485}, GOOD, gates) == []  # 1.5 points: allowed
    assert check_gates({**GOOD, "format_compliance": 0.8}, None, gates) == ["format_compliance 0.800 < 0.9"]
    assert check_gates(GOOD, None, gates, size_mb=120) == ["size 120.0 MB > 100.0 MB"]
    assert "format_compliance was not measured" in check_gates({"ner_f1": 0.5}, None, gates)


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
    bad = register(registry, tiny_ir_dir, {**GOOD, "sentiment_accuracy": 0.80, "format_compliance": 0.5})
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
    assert register_and_gate(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="stage-key-1").version == "1"
    assert register_version(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="stage-key-2").version == "2"


def test_holds_registration_checks_the_registry_mlflow_points_at(registry, tiny_ir_dir, tmp_path):
    from tasks.registry import holds_registration

    v1 = register_version(registry, {"openvino": tiny_ir_dir}, GOOD, LINEAGE, register_key="k1")
    assert holds_registration(registry.model_name, v1.version, "k1")
    assert not holds_registration(registry.model_name, v1.version, "another-key")
    assert not holds_registration(registry.model_name, "99", "k1")
    use_mlflow(f"sqlite:///{tmp_path / 'other.db'}", "test", tmp_path / "other-artifacts")
    assert not holds_registration(registry.model_name, v1.version, "k1"), "another registry has no such version"
