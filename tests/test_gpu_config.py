"""The GPU path is configuration: ``configs/gpu.yaml`` reaches every trainer's arguments and the
evaluation's device. There is no GPU here, so the constructors that would need one are watched
instead of run on one: each spy records its arguments, then stops the run (Lightning, TRL) or loads
where this machine can (the CPU). Everything else (config loading, data encoding, model and adapter
set-up) runs for real."""

from __future__ import annotations

import pytest

from configs.schema import load
from tests.align_helpers import records as align_records
from tests.quantize_helpers import make_adapter
from tests.sft_helpers import sst2_records


class _Stop(Exception):
    """Raised by a spy once it has what it came for."""


@pytest.fixture()
def gpu_cfg(tmp_path):
    return load("gpu", [f"home={tmp_path / 'home'}"])


@pytest.fixture()
def model_loads(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``AutoModelForCausalLM.from_pretrained`` call; a device map is
    replaced by the CPU for the actual load (this machine has no GPU)."""
    from transformers import AutoModelForCausalLM

    seen: list[dict] = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, path, *args, **kwargs):
        seen.append(dict(kwargs))
        if "device_map" in kwargs:
            kwargs = {**kwargs, "device_map": {"": "cpu"}}
        return real(cls, path, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return seen


def test_gpu_preset_reaches_lightning_and_the_4bit_base(gpu_cfg, tiny_model_dir, model_loads, monkeypatch, tmp_path):
    import pytorch_lightning as pl

    from tasks.models import load_tokenizer
    from tasks.sft.train import TrainSpec, train_sft

    trainer_args: dict = {}

    def spy_trainer(**kwargs):
        trainer_args.update(kwargs)
        raise _Stop

    monkeypatch.setattr(pl, "Trainer", spy_trainer)
    monkeypatch.setenv("LOCAL_RANK", "1")  # the second DDP rank on this node loads onto its own GPU
    spec = TrainSpec(run_dir=str(tmp_path / "run"), model_dir=str(tiny_model_dir),
                     sft=gpu_cfg.sft.model_dump(mode="json"), max_seq_len=256, progress_bar=False)
    with pytest.raises(_Stop):
        train_sft(spec, sst2_records(load_tokenizer(tiny_model_dir), 8))
    assert (trainer_args["accelerator"], trainer_args["strategy"], trainer_args["devices"]) == ("gpu", "ddp", "auto")
    assert trainer_args["precision"] == "bf16-mixed"
    [base] = model_loads
    assert base["device_map"] == {"": "cuda:1"}, "bitsandbytes quantises the base on this rank's GPU"
    assert base["quantization_config"].load_in_4bit and base["quantization_config"].bnb_4bit_quant_type == "nf4"


def test_gpu_preset_reaches_trl_and_the_policy_load(gpu_cfg, tiny_model_dir, model_loads, monkeypatch, tmp_path):
    import trl

    from tasks.align.data import prompt_rows
    from tasks.align.trainer import run_stage
    from tasks.models import load_tokenizer

    grpo_args: dict = {}

    def spy_config(**kwargs):
        grpo_args.update(kwargs)
        raise _Stop

    monkeypatch.setattr(trl, "GRPOConfig", spy_config)
    adapter = make_adapter(tiny_model_dir, tmp_path / "sft-adapter")
    rows = prompt_rows(align_records(load_tokenizer(tiny_model_dir)), ["sentiment", "ner"])
    stage = gpu_cfg.align.stages[-1]
    with pytest.raises(_Stop):
        run_stage(tiny_model_dir, adapter, tmp_path / "out" / "adapter", rows, gpu_cfg.align, stage, "qlora")
    assert grpo_args["use_cpu"] is False and grpo_args["bf16"] is True
    assert model_loads[-1]["device_map"] == {"": "cuda:0"} and model_loads[-1]["quantization_config"].load_in_4bit


def test_gpu_preset_evaluates_on_cuda(gpu_cfg, tiny_model_dir, tmp_path):
    """Asked for CUDA where there is none, evaluation fails naming it instead of quietly using the CPU."""
    from tasks.evaluate import evaluate_model
    from tasks.models import load_tokenizer

    assert gpu_cfg.evaluate.device == "cuda"
    records = sst2_records(load_tokenizer(tiny_model_dir), 2)
    with pytest.raises((AssertionError, RuntimeError), match="CUDA|NVIDIA"):
        evaluate_model(tiny_model_dir, gpu_cfg.evaluate, tmp_path / "eval", records=records)
    on_cpu = evaluate_model(tiny_model_dir, gpu_cfg.evaluate.model_copy(update={"device": "cpu", "max_new_tokens": 2}),
                            tmp_path / "eval-cpu", records=records)
    assert on_cpu["metrics"]["n_sentiment"] == 2


def test_defaults_stay_on_this_machine(tmp_path):
    """'auto' everywhere: no GPU here, so the pipeline preset trains and evaluates on the CPU."""
    from tasks.align.trainer import grpo_args
    from tasks.runtime import torch_device

    cfg = load("pipeline", [f"home={tmp_path}"])
    assert {cfg.sft.accelerator, cfg.align.accelerator, cfg.evaluate.device} == {"auto"}
    assert torch_device("auto") == "cpu"
    args = grpo_args(cfg.align, cfg.align.stages[0], tmp_path)
    assert args.use_cpu and not args.bf16
