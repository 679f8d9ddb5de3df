"""Adapter validation: every broken or foreign adapter fails fast, with a message naming file and cause,
before any export directory is created."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from tasks.quantize.validate import AdapterError, validate_adapter
from tests.quantize_helpers import make_adapter, other_base, rewrite_json, samples_of, sentiment_records


@pytest.fixture(scope="module")
def good_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapters") / "good")


@pytest.fixture()
def adapter_copy(good_adapter, tmp_path) -> Path:
    target = tmp_path / "adapter"
    shutil.copytree(good_adapter, target)
    return target


def test_valid_adapter_is_described(good_adapter, tiny_model_dir):
    info = validate_adapter(good_adapter, tiny_model_dir)
    assert info.rank == 4 and info.lora_alpha == 8
    # 2 layers x 4 target modules, each found in the base with matching shapes
    assert len(info.modules) == 8
    assert all(m.startswith("model.layers.") for m in info.modules)
    assert info.name_matches_base
    assert info.scaling(info.modules[0], json.loads((good_adapter / "adapter_config.json").read_text())) == 2.0
    assert len(info.sha256) == 64


def test_missing_directory(tiny_model_dir, tmp_path):
    with pytest.raises(AdapterError, match="adapter directory not found"):
        validate_adapter(tmp_path / "nope", tiny_model_dir)


def test_missing_config(adapter_copy, tiny_model_dir):
    (adapter_copy / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match=r"adapter_config\.json is missing"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_unparseable_config(adapter_copy, tiny_model_dir):
    (adapter_copy / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    with pytest.raises(AdapterError, match=r"adapter_config\.json: not valid JSON"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_not_lora(adapter_copy, tiny_model_dir):
    rewrite_json(adapter_copy / "adapter_config.json", peft_type="PREFIX_TUNING")
    with pytest.raises(AdapterError, match="only LoRA adapters"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_missing_weights(adapter_copy, tiny_model_dir):
    (adapter_copy / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"adapter_model\.safetensors is missing"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_truncated_weights(adapter_copy, tiny_model_dir):
    weights = adapter_copy / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_garbage_weights(adapter_copy, tiny_model_dir):
    (adapter_copy / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file at all")
    with pytest.raises(AdapterError, match="corrupt or truncated"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_nan_weights(adapter_copy, tiny_model_dir):
    import torch
    from safetensors.torch import load_file, save_file

    path = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(str(path))
    key = next(k for k in tensors if "lora_B" in k)
    tensors[key][0, 0] = float("nan")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    assert torch.isnan(load_file(str(path))[key]).any()
    with pytest.raises(AdapterError, match=f"{key} contains NaN"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_adapter_for_a_differently_shaped_base(tiny_model_dir, tmp_path):
    other = other_base(tmp_path / "other-model", hidden_size=32)
    foreign = make_adapter(other, tmp_path / "foreign")
    # Same module names, other widths: caught by the shape comparison, with the module named.
    with pytest.raises(AdapterError, match=r"shape mismatch at model\.layers\.0\..*different base model"):
        validate_adapter(foreign, tiny_model_dir, allow_name_mismatch=True)


def test_adapter_naming_another_base(adapter_copy, tiny_model_dir):
    rewrite_json(adapter_copy / "adapter_config.json", base_model_name_or_path="HuggingFaceTB/SmolLM2-360M-Instruct")
    with pytest.raises(AdapterError, match="trained for another base"):
        validate_adapter(adapter_copy, tiny_model_dir)
    # Shapes still fit, so a renamed copy of the base can be accepted explicitly.
    info = validate_adapter(adapter_copy, tiny_model_dir, allow_name_mismatch=True)
    assert not info.name_matches_base


def test_adapter_for_missing_module(adapter_copy, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    path = adapter_copy / "adapter_model.safetensors"
    tensors = load_file(str(path))
    renamed = {k.replace("layers.1.", "layers.7."): v.contiguous() for k, v in tensors.items()}
    save_file(renamed, str(path))
    with pytest.raises(AdapterError, match=r"model\.layers\.7\..* does not exist in the base"):
        validate_adapter(adapter_copy, tiny_model_dir)


def test_bad_adapter_fails_before_any_export_work(tiny_model_dir, tmp_path, tiny_config):
    """plan_export validates first: a foreign adapter creates no export directory and takes well under a second."""
    from tasks.quantize.steps import plan_export

    other = other_base(tmp_path / "other-model", hidden_size=32)
    foreign = make_adapter(other, tmp_path / "foreign")
    home = tmp_path / "home"
    started = time.perf_counter()
    with pytest.raises(AdapterError, match="shape mismatch"):
        plan_export(home, tiny_model_dir, foreign, tiny_config.quantize, samples_of(sentiment_records(tiny_model_dir)))
    assert time.perf_counter() - started < 5
    assert not (home / "exports").exists()


def test_cli_reports_bad_adapter_with_exit_code_2(tiny_model_dir, tiny_config, tmp_path, prefect_harness):
    from typer.testing import CliRunner

    from flows.cli import app

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{ nope")
    exports = tiny_config.home / "exports"  # shared with other tests: compare, don't expect absence
    before = sorted(exports.iterdir()) if exports.exists() else []
    result = CliRunner().invoke(app, ["quantize", "-c", "tiny", "--adapter", str(broken), "--no-mlflow",
                                      f"home={tiny_config.home}"])
    assert result.exit_code == 2, result.output
    assert "not valid JSON" in result.output
    assert (sorted(exports.iterdir()) if exports.exists() else []) == before


def test_default_adapter_is_the_newest_sft_run(tmp_path, good_adapter):
    from tasks.quantize.steps import resolve_adapter

    home = tmp_path / "home"
    with pytest.raises(AdapterError, match="no fine-tuning run found"):
        resolve_adapter(home, None)
    run = home / "runs" / "sft" / "sft-1"
    run.mkdir(parents=True)
    (home / "runs" / "sft" / "LATEST").write_text("sft-1\n")
    with pytest.raises(AdapterError, match="has no adapter/ yet"):
        resolve_adapter(home, None)
    shutil.copytree(good_adapter, run / "adapter")
    assert resolve_adapter(home, None) == run / "adapter"
    assert resolve_adapter(home, tmp_path / "explicit") == tmp_path / "explicit"


def test_default_adapter_is_the_newest_aligned_one_when_there_is_one(tmp_path, good_adapter):
    """`lmforge quantize` alone exports what alignment produced, not the SFT adapter it started from."""
    from tasks.quantize.steps import resolve_adapter

    home = tmp_path / "home"
    shutil.copytree(good_adapter, home / "runs" / "sft" / "sft-1" / "adapter")
    (home / "runs" / "sft" / "LATEST").write_text("sft-1\n")
    assert resolve_adapter(home, None) == home / "runs" / "sft" / "sft-1" / "adapter"
    aligned = home / "runs" / "align" / "align-1" / "adapter"
    shutil.copytree(good_adapter, aligned)
    (home / "runs" / "align" / "LATEST").write_text("align-1\n")
    assert resolve_adapter(home, None) == aligned
    assert resolve_adapter(home, tmp_path / "explicit") == tmp_path / "explicit"
    shutil.rmtree(aligned)
    with pytest.raises(AdapterError, match="newest alignment run .*align-1 has no adapter/"):
        resolve_adapter(home, None)
