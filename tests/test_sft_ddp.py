"""Scale-out through Lightning: real DDP with 2 CPU processes (gloo) on the tiny model."""

from __future__ import annotations

import json

from safetensors.torch import load_file

from configs.schema import SFTConfig
from sft_helpers import sst2_records
from tasks.sft.train import TrainSpec, run_training, write_records


def test_ddp_two_cpu_ranks_train_the_same_adapter(tmp_path, tiny_model_dir):
    from tasks.models import load_tokenizer

    records = tmp_path / "train.jsonl"
    write_records(sst2_records(load_tokenizer(tiny_model_dir), 48), records)
    cfg = SFTConfig(method="lora", strategy="ddp", accelerator="cpu", devices=2, batch_size=4, max_steps=4,
                    warmup_steps=1, learning_rate=3e-3, checkpoint_every_n_steps=2, cpu_threads=1)
    spec = TrainSpec(run_dir=str(tmp_path / "run"), model_dir=str(tiny_model_dir), sft=cfg.model_dump(mode="json"),
                     max_seq_len=256, records_path=str(records), progress_bar=False)

    # Lightning launches the second rank by re-running `python -m tasks.sft.train <spec>`.
    summary = run_training(spec)

    assert summary["world_size"] == 2
    hashes = summary["rank_adapter_sha256"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]  # gradients were all-reduced: replicas identical
    assert summary["rank_examples_seen"] == [16, 16]  # 4 steps x batch 4 on each rank
    assert summary["tokens_seen"] > 0 and summary["steps"] == 4
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["rank_adapter_sha256"] == hashes
    adapter = load_file(str(tmp_path / "run" / "adapter" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "checksum.json").is_file()
