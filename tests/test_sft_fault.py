"""Fault tolerance, for real: kill the training process (SIGKILL, SIGTERM), resume, compare adapters."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from configs.schema import SFTConfig
from sft_helpers import sst2_records
from tasks.sft.checkpoints import latest_valid, list_checkpoints
from tasks.sft.train import EXIT_SIGTERM, TrainSpec, train_sft, write_records

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 30


@pytest.fixture(scope="module")
def records_path(tiny_model_dir, tmp_path_factory) -> Path:
    from tasks.models import load_tokenizer

    path = tmp_path_factory.mktemp("sft-fault") / "train.jsonl"
    write_records(sst2_records(load_tokenizer(tiny_model_dir), 48), path)
    return path


def _spec(run_dir: Path, model_dir: Path, records_path: Path) -> TrainSpec:
    # Dropout stays on (default 0.05): resuming must restore the RNG, not just the weights.
    cfg = SFTConfig(method="lora", batch_size=4, max_steps=MAX_STEPS, warmup_steps=2, learning_rate=2e-3,
                    checkpoint_every_n_steps=3, keep_checkpoints=3, seed=7, cpu_threads=1)
    return TrainSpec(run_dir=str(run_dir), model_dir=str(model_dir), sft=cfg.model_dump(mode="json"),
                     max_seq_len=256, records_path=str(records_path), progress_bar=False)


@pytest.fixture(scope="module")
def reference(tiny_model_dir, records_path, tmp_path_factory) -> dict:
    """Adapter and loss curve of an uninterrupted run with the same seed."""
    run_dir = tmp_path_factory.mktemp("sft-reference")
    summary = train_sft(_spec(run_dir, tiny_model_dir, records_path))
    return {"adapter": load_file(str(run_dir / "adapter" / "adapter_model.safetensors")),
            "loss_curve": summary["loss_curve"]}


def _start(spec: TrainSpec) -> subprocess.Popen:
    path = spec.save()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "tasks.sft.train", str(path)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_checkpoint(proc: subprocess.Popen, root: Path, timeout: float = 180) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = [s for s, p in list_checkpoints(root) if (p / "checksum.json").is_file()]
        if steps:
            return max(steps)
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint:\n{err[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail("no checkpoint within the timeout")


def _assert_same_run(run_dir: Path, summary: dict, reference: dict) -> None:
    resumed = load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))
    expected = reference["adapter"]
    assert resumed.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.allclose(resumed[name], tensor, atol=1e-5), name
    assert any(t.abs().sum() > 0 for k, t in expected.items() if "lora_B" in k)  # it did train
    # Steps before the kill come from the checkpoint, the rest from the resumed process: same curve.
    assert [s for s, _ in summary["loss_curve"]] == list(range(1, MAX_STEPS + 1))
    assert torch.allclose(torch.tensor([v for _, v in summary["loss_curve"]]),
                          torch.tensor([v for _, v in reference["loss_curve"]]), atol=1e-5)


def test_sigkill_mid_run_then_resume_matches_uninterrupted(tmp_path, tiny_model_dir, records_path, reference):
    spec = _spec(tmp_path / "run", tiny_model_dir, records_path)
    proc = _start(spec)
    _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints")
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (tmp_path / "run" / "adapter").exists()
    resume_from, _ = latest_valid(tmp_path / "run" / "checkpoints")
    killed_at = int(resume_from.parent.name.split("-")[1])
    assert 3 <= killed_at < MAX_STEPS

    spec.resume = True
    summary = train_sft(spec)
    assert summary["resumed_from"] == str(resume_from) and summary["steps"] == MAX_STEPS
    _assert_same_run(tmp_path / "run", summary, reference)


def test_sigterm_checkpoints_then_exits_and_resume_matches(tmp_path, tiny_model_dir, records_path, reference):
    spec = _spec(tmp_path / "run", tiny_model_dir, records_path)
    proc = _start(spec)
    first = _wait_for_checkpoint(proc, tmp_path / "run" / "checkpoints")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_SIGTERM, err[-3000:]
    assert "stopped on SIGTERM" in err and "--resume" in err
    newest, _ = latest_valid(tmp_path / "run" / "checkpoints")
    stopped_at = int(newest.parent.name.split("-")[1])
    assert first <= stopped_at < MAX_STEPS
    assert not (tmp_path / "run" / "adapter").exists()

    spec.resume = True
    summary = train_sft(spec)
    assert summary["resumed_from"] == str(newest)
    _assert_same_run(tmp_path / "run", summary, reference)
