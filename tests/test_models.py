"""Base-model store: SmolLM2 from the shipped GGUF, the tiny test model, local dirs, hub ids."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from configs.schema import load
from tasks import models
from tasks.models import ModelImportError, import_model, load_model, load_tokenizer, read_manifest, resolve_spec


def file_sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def smollm2(session_home) -> dict:
    return import_model("smollm2-135m", session_home)


def test_smollm2_import_writes_safetensors_tokenizer_template_and_manifest(smollm2):
    path = Path(smollm2["path"])
    assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "manifest.json"} <= {
        p.name for p in path.iterdir()
    }
    manifest = read_manifest(path)
    gguf = Path(manifest["source"])
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert manifest["source_sha256"] == file_sha(gguf)
    assert manifest["param_count"] == 134_515_008
    assert manifest["dtype"] == "float32"
    # The GGUF quantisation marker must be gone, or save/load through HF tooling breaks later.
    assert "quantization_config" not in json.loads((path / "config.json").read_text())


def test_smollm2_answers_a_chat_prompt(smollm2):
    path = Path(smollm2["path"])
    tokenizer, model = load_tokenizer(path), load_model(path)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_reimport_is_a_noop(smollm2, session_home):
    weights = Path(smollm2["path"]) / "model.safetensors"
    before = weights.stat().st_mtime_ns
    again = import_model("smollm2-135m", session_home)
    assert again["skipped"] is True
    assert again["source_sha256"] == smollm2["source_sha256"]
    assert weights.stat().st_mtime_ns == before


def test_tiny_model_is_deterministic_by_seed(tmp_path):
    cfg = load("tiny")
    a = import_model("tiny", tmp_path / "a", cfg.model)
    b = import_model("tiny", tmp_path / "b", cfg.model)
    assert file_sha(Path(a["path"]) / "model.safetensors") == file_sha(Path(b["path"]) / "model.safetensors")
    assert a["num_layers"] == 2 and a["param_count"] < 5_000_000

    other = load("tiny", ["model.tiny.seed=1"]).model
    c = import_model("tiny", tmp_path / "c", other)
    assert c["source_sha256"] != a["source_sha256"]
    assert file_sha(Path(c["path"]) / "model.safetensors") != file_sha(Path(a["path"]) / "model.safetensors")

    # Same weights give the same logits; the real SmolLM2 tokenizer and chat template come along.
    tokenizer = load_tokenizer(Path(a["path"]))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert "<|im_start|>assistant" in prompt
    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        la = load_model(Path(a["path"]))(**ids).logits
        lb = load_model(Path(b["path"]))(**ids).logits
    assert torch.equal(la, lb)


def test_tiny_import_does_not_disturb_callers_rng(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    import_model("tiny", tmp_path, load("tiny").model)
    assert torch.equal(torch.rand(3), expected)


def test_local_directory_import(tiny_model_dir, tmp_path):
    manifest = import_model(str(tiny_model_dir), tmp_path)
    assert manifest["kind"] == "local"
    assert manifest["source"] == str(tiny_model_dir.resolve())
    assert Path(manifest["path"]).parent == tmp_path / "models"
    assert import_model(str(tiny_model_dir), tmp_path)["skipped"] is True


def test_hub_id_without_hub_access_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelImportError, match=r"could not download 'someorg/some-model'.*import its directory"):
        import_model("someorg/some-model", tmp_path)
    assert not (tmp_path / "models" / "someorg--some-model").exists()


@pytest.mark.parametrize("spec", ["", "not a model", "./missing-dir"])
def test_unknown_specs_are_rejected(spec):
    with pytest.raises(ModelImportError, match="unknown model spec"):
        resolve_spec(spec)


def test_directory_without_config_is_rejected(tmp_path):
    with pytest.raises(ModelImportError, match="no config.json"):
        resolve_spec(str(tmp_path))


def test_interrupted_import_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    def crash(model, tokenizer, staging, dtype):
        staging.mkdir(parents=True)
        (staging / "config.json").write_text("{}")
        raise KeyboardInterrupt  # the process being stopped half-way through writing

    monkeypatch.setattr(models, "_save", crash)
    with pytest.raises(KeyboardInterrupt):
        import_model("tiny", tmp_path, load("tiny").model)
    assert not (tmp_path / "models" / "tiny").exists()
    assert [p.name for p in (tmp_path / "models").iterdir()] == []


def test_cli_import_prints_manifest_and_reuses(tmp_path):
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path)}
    cmd = [sys.executable, "-m", "flows.cli", "models", "import", "-c", "tiny", "--json"]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert first.returncode == 0, first.stderr
    manifest = json.loads(first.stdout)
    assert manifest["name"] == "tiny" and manifest["skipped"] is False
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert json.loads(second.stdout)["skipped"] is True
    listed = subprocess.run([sys.executable, "-m", "flows.cli", "models", "list"], capture_output=True, text=True,
                            env=env, timeout=120)
    assert "tiny" in listed.stdout


def test_cli_unknown_model_spec_is_usage_error(tmp_path):
    env = {**os.environ, "LMFORGE_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "flows.cli", "models", "import", "--model", "bogus spec"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "unknown model spec 'bogus spec'" in result.stderr
    assert "Traceback" not in result.stderr
