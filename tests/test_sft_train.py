"""SFT training on the tiny model: loss falls, QLoRA really is 4-bit, checkpoints fall back on corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.schema import SFTConfig
from sft_helpers import sst2_records
from tasks.sft.checkpoints import latest_valid, list_checkpoints, verify
from tasks.sft.qlora import SFTModelError, build_peft_model
from tasks.sft.train import TrainSpec, train_sft


@pytest.fixture(scope="module")
def records(tiny_model_dir: Path) -> list[dict]:
    from tasks.models import load_tokenizer

    return sst2_records(load_tokenizer(tiny_model_dir), 48)


def _spec(run_dir: Path, model_dir: Path, **sft) -> TrainSpec:
    cfg = SFTConfig(**{"method": "lora", "batch_size": 4, "warmup_steps": 1, "learning_rate": 3e-3, "cpu_threads": 1,
                       **sft})
    return TrainSpec(run_dir=str(run_dir), model_dir=str(model_dir), sft=cfg.model_dump(mode="json"),
                     max_seq_len=256, progress_bar=False)


def test_loss_falls_and_outputs_are_written(tmp_path, tiny_model_dir, records):
    summary = train_sft(_spec(tmp_path / "run", tiny_model_dir, max_steps=12, checkpoint_every_n_steps=6,
                              lora_dropout=0.0), records)
    losses = [loss for _, loss in summary["loss_curve"]]
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, 13))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.05  # a real drop, not noise
    adapter = tmp_path / "run" / "adapter"
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 8 and set(config["target_modules"]) == set(SFTConfig().target_modules)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["steps"] == 12 and metrics["tokens_per_s"] > 0 and metrics["peak_rss_mb"] > 100
    assert metrics["data"]["kept"] == 48 and metrics["tokens_seen"] > 12 * 4 * 40
    assert [name for _, name in [(s, p.name) for s, p in list_checkpoints(tmp_path / "run" / "checkpoints")]] == [
        "step-00000012", "step-00000006"]


def test_qlora_base_is_nf4_double_quantised_and_trains(tmp_path, tiny_model_dir, records):
    cfg = SFTConfig(method="qlora", target_modules=["q_proj", "v_proj", "down_proj"])
    model = build_peft_model(tiny_model_dir, cfg)
    q_proj = model.get_base_model().model.layers[0].self_attn.q_proj
    assert type(q_proj.base_layer).__name__ == "Linear4bit"
    state = q_proj.base_layer.weight.quant_state
    assert state.quant_type == "nf4" and state.nested  # nested = double quantisation
    assert {n for n, p in model.named_parameters() if p.requires_grad} and all(
        "lora_" in n for n, p in model.named_parameters() if p.requires_grad)

    summary = train_sft(_spec(tmp_path / "q", tiny_model_dir, method="qlora", max_steps=3,
                              target_modules=["q_proj", "v_proj", "down_proj"]), records)
    assert summary["steps"] == 3 and summary["method"] == "qlora"
    tensors = load_file(str(tmp_path / "q" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in tensors.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained


def test_unknown_target_module_is_a_clear_error(tiny_model_dir):
    with pytest.raises(SFTModelError, match=r"unknown module\(s\) 'qkv_proj'.*available: .*q_proj"):
        build_peft_model(tiny_model_dir, SFTConfig(method="lora", target_modules=["q_proj", "qkv_proj"]))


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(tmp_path, tiny_model_dir, records):
    spec = _spec(tmp_path / "run", tiny_model_dir, max_steps=4, checkpoint_every_n_steps=2)
    train_sft(spec, records)
    root = tmp_path / "run" / "checkpoints"
    newest = root / "step-00000004" / "state.ckpt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    newest.write_bytes(bytes(data))
    assert "sha256" in verify(newest.parent)
    (root / ".tmp-step-00000006").mkdir()  # a write that was killed half-way is ignored

    path, skipped = latest_valid(root)
    assert path == root / "step-00000002" / "state.ckpt"
    assert len(skipped) == 1 and "step-00000004" in skipped[0] and "corrupt" in skipped[0]

    spec.resume = True
    spec.sft = {**spec.sft, "max_steps": 5}
    summary = train_sft(spec, records)
    assert summary["resumed_from"].endswith("step-00000002/state.ckpt")
    assert [s for s, _ in summary["loss_curve"]] == [1, 2, 3, 4, 5] and summary["steps"] == 5  # curve kept
    assert summary["skipped_checkpoints"] and not (root / ".tmp-step-00000006").exists()


def test_truncated_checkpoint_is_detected(tmp_path):
    from tasks.sft.checkpoints import write_checksum

    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save({"x": torch.arange(100)}, ckpt / "state.ckpt")
    write_checksum(ckpt / "state.ckpt", 1)
    assert verify(ckpt) is None
    with open(ckpt / "state.ckpt", "r+b") as handle:
        handle.truncate(10)
    assert "truncated" in verify(ckpt)
    (ckpt / "checksum.json").unlink()
    assert "incomplete" in verify(ckpt)
