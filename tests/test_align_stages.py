"""GRPO alignment stages on the tiny model: real TRL steps, real adapters, real reward functions."""

from __future__ import annotations

import json

import pytest

from configs.schema import AlignConfig, AlignStageConfig
from tasks.align.data import AlignDataError, prompt_rows, stage_tasks
from tests.align_helpers import make_adapter, records


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread: the tiny model gains nothing from two, and on a busy shared CPU two
    threads spin against each other (measured 10-30x slower here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from tasks.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("sft") / "adapter")


def _cfg(**update) -> AlignConfig:
    base = {"num_generations": 2, "batch_size": 2, "max_completion_length": 12, "learning_rate": 1e-3,
            "kl_beta": 0.04}
    return AlignConfig.model_validate({**base, **update})


def _stage(weights: dict[str, float], steps: int = 2, **extra) -> AlignStageConfig:
    return AlignStageConfig(name="s", max_steps=steps, reward_weights=weights, **extra)


# --------------------------------------------------------------------------- prompts
def test_stage_tasks_follow_the_rewards():
    assert stage_tasks(_stage({"format": 1.0})) == ["sentiment", "ner", "summarization", "generation"]
    assert stage_tasks(_stage({"label_match": 0.5, "entity_f1": 0.3, "format": 0.2})) == ["sentiment", "ner"]
    # rouge_l scores every text task with a reference
    assert stage_tasks(_stage({"label_match": 0.5, "entity_recall": 0.3, "rouge_l": 0.2})) == [
        "sentiment", "ner", "summarization", "generation"]
    assert stage_tasks(_stage({"label_match": 1.0, "rouge_l": 0.0})) == ["sentiment"]  # zero weight: not sampled
    assert stage_tasks(_stage({"format": 1.0}, tasks=["generation"])) == ["generation"]


def test_prompt_rows_take_turns_over_tasks_and_encode_labels(tokenizer):
    data = records(tokenizer, copies=3)
    rows = prompt_rows(data, ["sentiment", "ner"], limit=5, seed=1)
    assert [r["task"] for r in rows] == ["sentiment", "ner", "sentiment", "ner", "sentiment"]
    assert len({r["id"] for r in rows}) == 5
    ner = next(r for r in rows if r["task"] == "ner")
    source = next(r for r in data if r["id"] == ner["id"])
    assert json.loads(ner["label"]) == source["label"] and ner["prompt"] == source["prompt"]
    assert prompt_rows(data, ["sentiment", "ner"], seed=1) != prompt_rows(data, ["sentiment", "ner"], seed=2)
    with pytest.raises(AlignDataError, match="no training prompts for task"):
        prompt_rows([r for r in data if r["task"] == "sentiment"], ["ner"])


# --------------------------------------------------------------------------- trainer config
def test_grpo_config_comes_from_the_align_section(tmp_path):
    from tasks.align.trainer import grpo_args

    cfg = _cfg(num_generations=3, batch_size=2, kl_beta=0.1, clip_epsilon=0.3, learning_rate=2e-6,
               max_completion_length=20, num_iterations=2, temperature=0.7)
    stage = _stage({"label_match": 0.5, "entity_f1": 0.3, "format": 0.2}, steps=7)
    args = grpo_args(cfg, stage, tmp_path)
    # 2 prompts x 3 generations = 6 completions per step, one generation batch, in micro-batches of 3
    assert args.num_generations == 3 and args.generation_batch_size == 6
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps) == (3, 2)
    explicit = grpo_args(cfg.model_copy(update={"micro_batch_size": 2}), stage, tmp_path)
    assert (explicit.per_device_train_batch_size, explicit.gradient_accumulation_steps) == (2, 3)
    with pytest.raises(ValueError, match="must divide batch_size"):
        _cfg(micro_batch_size=3)  # 2 x 2 = 4 completions
    assert (args.beta, args.epsilon, args.learning_rate) == (0.1, 0.3, 2e-6)
    assert (args.max_steps, args.max_completion_length, args.num_iterations, args.temperature) == (7, 20, 2, 0.7)
    assert args.reward_weights == [0.5, 0.3, 0.2]
    assert args.use_cpu and args.logging_steps == 1 and args.report_to == [] and not args.bf16


# --------------------------------------------------------------------------- real GRPO steps
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_stage_runs_two_real_steps_changes_the_adapter_and_logs_every_step(
        method, tiny_model_dir, sft_adapter, tokenizer, tmp_path, monkeypatch):
    """Two optimiser steps on summaries; a 2-word limit makes the format score of the random model's
    completions differ within a group, so advantages are non-zero and the adapter must move."""
    import torch
    from bitsandbytes.nn import Linear4bit

    from configs.tasks import BUILTIN_TASKS
    from tasks.align.trainer import adapter_tensors, load_policy, run_stage

    monkeypatch.setitem(BUILTIN_TASKS, "summarization",
                        BUILTIN_TASKS["summarization"].model_copy(update={"max_words": 2}))
    cfg = _cfg()
    stage = _stage({"format": 0.3, "rouge_l": 0.7}, tasks=["summarization"])
    rows = prompt_rows(records(tokenizer, copies=2), stage_tasks(stage))
    steps: list[tuple[int, dict]] = []
    out = tmp_path / "stage" / "adapter"
    summary = run_stage(tiny_model_dir, sft_adapter, out, rows, cfg, stage, method, stage_index=1,
                        sink=lambda step, metrics: steps.append((step, metrics)), step_offset=10)

    assert summary["steps"] == 2
    before = adapter_tensors(load_policy(tiny_model_dir, sft_adapter, "lora"))
    trained = load_policy(tiny_model_dir, out, method)
    after = adapter_tensors(trained)
    assert before.keys() == after.keys() and before
    assert any(not torch.equal(before[k], after[k].float()) for k in before), "GRPO did not move the adapter"
    assert all(t.dtype == torch.float32 for t in after.values())
    assert not (out / "ref").exists(), "TRL's frozen reference copy must not be saved as the adapter"
    assert (method == "qlora") == any(isinstance(m, Linear4bit) for m in trained.modules())

    per_step = [(s, m) for s, m in steps if "kl" in m]
    assert [s for s, _ in per_step] == [11, 12]  # global steps continue after the earlier stages
    for _, m in per_step:
        for key in ("rewards/format/mean", "rewards/format/std", "rewards/rouge_l/mean", "reward",
                    "kl", "clip_ratio/region_mean", "completions/mean_length", "loss", "weight/format"):
            assert key in m, key
        assert m["stage"] == 1.0
        # The aggregated reward is the configured weighted sum (both rewards apply to every summary row).
        assert m["reward"] == pytest.approx(
            0.3 * m["rewards/format/mean"] + 0.7 * m["rewards/rouge_l/mean"], abs=1e-5)
    assert any(m["rewards/format/std"] > 0 for _, m in per_step)
    assert any("s/train_runtime" in m for _, m in steps)


def test_saturation_schedule_shifts_weight_off_a_saturated_reward(tiny_model_dir, sft_adapter, tokenizer, tmp_path):
    """Any non-empty summary within the task's word limit scores format 1.0 (saturated) while ROUGE of
    random text stays low: after the first step the format weight drops to its floor."""
    from tasks.align.trainer import run_stage

    cfg = _cfg(weight_schedule="saturation", saturation_momentum=0.0, saturation_threshold=0.9,
               saturation_min_fraction=0.1)
    stage = _stage({"format": 0.5, "rouge_l": 0.5})
    rows = prompt_rows(records(tokenizer), ["summarization"])
    summary = run_stage(tiny_model_dir, sft_adapter, tmp_path / "a", rows, cfg, stage, "lora")

    first = summary["weight_history"][0]
    assert first["running"]["format"] == pytest.approx(1.0)
    assert first["running"]["rouge_l"] < 0.9
    low = 0.05 / (0.05 + 0.5)  # floor 0.1 * 0.5, then rescaled to the configured total of 1.0
    # weights_final is read back from the trainer's reward_weights tensor, in its reward order.
    assert list(summary["weights_final"]) == ["format", "rouge_l"]
    assert summary["weights_final"]["format"] == pytest.approx(low, abs=1e-6)
    assert summary["weights_final"]["rouge_l"] == pytest.approx(1 - low, abs=1e-6)
    # The second step's aggregated reward already used the shifted weights.
    second = [h for h in summary["history"] if "reward" in h][1]
    assert second["reward"] == pytest.approx(
        low * second["rewards/format/mean"] + (1 - low) * second["rewards/rouge_l/mean"], abs=1e-5)
