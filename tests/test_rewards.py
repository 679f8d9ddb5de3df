"""Reward functions on hand-made completions give hand-computed values; weights and schedules."""

from __future__ import annotations

import json

import pytest

from configs.schema import AlignConfig, AlignStageConfig, JudgeConfig
from tasks.judge import Judge
from tasks.parsing import format_target
from tasks.rewards import (
    WeightSchedule,
    build_reward_funcs,
    clipped,
    combine,
    completion_text,
    entity_f1_reward,
    entity_precision_reward,
    entity_recall_reward,
    format_reward,
    format_score,
    label_match_reward,
    make_judge_reward,
    rouge_l_reward,
)

JOHN, PARIS = {"text": "John", "type": "PER"}, {"text": "Paris", "type": "LOC"}


def call(func, completions, tasks, labels):
    return func(prompts=["p"] * len(completions), completions=completions, task=tasks, label=labels)


def test_label_match_is_plus_minus_one_and_none_elsewhere():
    out = call(
        label_match_reward,
        ["positive", "Negative", "Sentiment: positive.", "maybe", "positive"],
        ["sentiment"] * 4 + ["ner"],
        ["positive", '"positive"', "positive", "negative", "[]"],
    )
    assert out == [1.0, -1.0, 1.0, -1.0, None]


def test_entity_rewards_per_sample():
    predicted = format_target("ner", [JOHN, {"text": "Paris", "type": "ORG"}, {"text": "Bob", "type": "PER"}])
    completions = [predicted, "none", "no entities", "- John", format_target("ner", [JOHN, PARIS]), "x"]
    tasks = ["ner"] * 5 + ["summarization"]
    labels = [json.dumps([JOHN, PARIS]), "[]", [], [JOHN], [JOHN, PARIS], "a summary"]
    # row 0: matched 1 of 3 predicted, 1 of 2 gold -> P 1/3, R 1/2, F1 0.4
    # rows 1-2: nothing to find: a well-formed "none" earns 1, anything else 0; row 3: a line without a type -> 0
    assert call(entity_f1_reward, completions, tasks, labels) == pytest.approx([0.4, 1.0, 0.0, 0.0, 1.0, None])
    assert call(entity_recall_reward, completions, tasks, labels) == pytest.approx([0.5, 1.0, 0.0, 0.0, 1.0, None])
    assert call(entity_precision_reward, completions, tasks, labels) == pytest.approx(
        [1 / 3, 1.0, 0.0, 0.0, 1.0, None])
    assert [f.__name__ for f in (entity_f1_reward, entity_recall_reward, entity_precision_reward)] == [
        "entity_f1", "entity_recall", "entity_precision"]


def test_entity_f1_separates_good_from_bad_completions_of_one_prompt():
    """GRPO learns from differences within a group: the reward must rank a better answer higher,
    including an empty answer to a sentence that has entities (the old format score gave it 1.0)."""
    gold = [JOHN, PARIS]
    group = [format_target("ner", gold), format_target("ner", [JOHN]), "none", "- John (place)"]
    scores = call(entity_f1_reward, group, ["ner"] * 4, [gold] * 4)
    assert scores[0] > scores[1] > scores[2] == scores[3] == 0.0


def test_format_score_rules():
    long_summary = " ".join(["word"] * 120)
    cases = [
        ("sentiment", "positive", 1.0),
        ("sentiment", "Positive.", 0.5),
        ("sentiment", "I think it is positive", 0.0),
        ("ner", format_target("ner", [JOHN]), 1.0),
        ("ner", "none", 1.0),
        ("ner", "- John (PER)", 0.5),  # readable, but the code instead of its word
        ("ner", "Entities: " + json.dumps([JOHN]), 0.5),
        ("ner", "John is a name", 0.0),
        ("summarization", "Two friends plan a trip.", 1.0),
        ("summarization", long_summary, 0.5),  # 60-word limit: 60 / 120
        ("summarization", "  ", 0.0),
        ("generation", long_summary, 1.0),  # 150-word limit
        (None, "anything", 1.0),
    ]
    for task, text, expected in cases:
        assert format_score(task, text) == pytest.approx(expected), (task, text)
    assert call(format_reward, ["positive", "none"], ["sentiment", "ner"], [None, None]) == [1.0, 1.0]


def test_rouge_l_reward_only_on_text_tasks():
    out = call(rouge_l_reward, ["the cat sat", "", "the cat sat", "positive"],
               ["summarization", "summarization", "generation", "sentiment"],
               ["the cat sat on the mat", "a dog", "the cat sat", "positive"])
    assert out == pytest.approx([2 / 3, 0.0, 1.0, None])


def test_conversational_completions_are_read():
    assert completion_text([{"role": "assistant", "content": "positive"}]) == "positive"
    parts = [{"type": "text", "text": "neg"}, {"type": "text", "text": "ative"}]
    assert completion_text([{"role": "assistant", "content": parts}]) == "negative"
    reply = [{"role": "assistant", "content": "negative"}]
    assert call(label_match_reward, [reply], ["sentiment"], ["negative"]) == [1.0]


def test_clipping_to_configured_range():
    f = clipped(label_match_reward, 0.0, 0.5, name="label_match")
    got = call(f, ["positive", "negative", "x"], ["sentiment", "sentiment", "ner"], ["positive"] * 3)
    assert got == [0.5, 0.0, None]
    assert f.__name__ == "label_match"
    funcs = build_reward_funcs(["label_match", "format"], AlignConfig(reward_clip=(-0.5, 0.8)))
    assert call(funcs[0], ["positive", "negative"], ["sentiment"] * 2, ["positive"] * 2) == [0.8, -0.5]
    assert call(funcs[1], ["positive"], ["sentiment"], ["positive"]) == [0.8]
    with pytest.raises(ValueError, match="unknown reward"):
        build_reward_funcs(["bleu"], AlignConfig())
    with pytest.raises(ValueError, match="align.judge.url"):
        build_reward_funcs(["judge"], AlignConfig())


def test_weights_change_the_aggregated_reward():
    rows = (["positive", format_target("ner", [JOHN]), "Negative."], ["sentiment", "ner", "sentiment"],
            ["positive", [JOHN, PARIS], "positive"])
    names = ["label_match", "entity_f1", "format"]
    funcs = build_reward_funcs(names, AlignConfig())
    per_func = {n: call(f, *rows) for n, f in zip(names, funcs)}
    # label_match [1, None, -1]; entity_f1 [None, 2/3 (P 1, R 1/2), None]; format [1, 1, 0.5]
    assert per_func["entity_f1"] == pytest.approx([None, 2 / 3, None])
    default = combine(per_func, {"label_match": 0.5, "entity_f1": 0.3, "format": 0.2})
    assert default == pytest.approx([0.5 + 0.2, 0.3 * 2 / 3 + 0.2, -0.5 + 0.1])
    other = combine(per_func, {"label_match": 0.1, "entity_f1": 0.1, "format": 0.8})
    assert other == pytest.approx([0.1 + 0.8, 0.1 * 2 / 3 + 0.8, -0.1 + 0.4])
    assert combine({"label_match": [None]}, {"label_match": 1.0}) == [None]
    with pytest.raises(ValueError, match="no weight"):
        combine(per_func, {"label_match": 1.0})


def test_reward_functions_and_weights_follow_the_stage_config():
    stage = AlignStageConfig(name="summaries", reward_weights={"rouge_l": 0.7, "judge": 0.3})
    cfg = AlignConfig(reward_clip=(0.0, 0.6), stages=[stage], judge=JudgeConfig(url="http://127.0.0.1:9/v1"))
    funcs = build_reward_funcs(list(stage.reward_weights), cfg, judge=Judge(JudgeConfig(url=None)))
    assert [f.__name__ for f in funcs] == ["rouge_l", "judge"]
    # ROUGE-L 1.0 and the judge's offline fallback (the rule-based format score) are clipped to 0.6.
    assert call(funcs[0], ["the cat sat", "a dog"], ["summarization"] * 2, ["the cat sat", "the cat sat"]) == [0.6, 0.0]
    assert call(funcs[1], ["Positive.", "positive"], ["sentiment"] * 2, [None] * 2) == [0.5, 0.6]
    assert WeightSchedule.from_config(stage, cfg).weights() == {"rouge_l": 0.7, "judge": 0.3}


def test_a_stage_weighting_the_judge_needs_a_judge_endpoint():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="align.judge.url is not set"):
        AlignConfig(stages=[AlignStageConfig(name="judged", reward_weights={"judge": 1.0})])


def test_fixed_schedule_never_moves():
    base = {"label_match": 0.5, "entity_f1": 0.3, "format": 0.2}
    fixed, moving = WeightSchedule(base, "fixed"), WeightSchedule(base, "saturation", momentum=0.0)
    for schedule in (fixed, moving):
        schedule.observe("format", [1.0] * 8)  # saturated: a saturation schedule takes weight away
    assert moving.weights()["format"] < 0.2
    assert fixed.weights() == base


def test_saturation_schedule_moves_weight_to_unsaturated_rewards():
    base = {"label_match": 0.5, "entity_f1": 0.3, "format": 0.2}
    schedule = WeightSchedule(base, "saturation", clip=(-1.0, 1.0), momentum=0.5, threshold=0.9, min_fraction=0.1)
    schedule.observe("label_match", [1.0, -1.0, None])  # mean 0 on -1..1 -> saturation 0.5
    schedule.observe("format", [1.0, 1.0])  # mean 1 on 0..1 -> saturation 1 -> floor 0.1
    assert schedule.saturation() == pytest.approx({"label_match": 0.5, "format": 1.0})
    scaled_total = 0.5 + 0.3 + 0.02
    assert schedule.weights() == pytest.approx(
        {"label_match": 0.5 / scaled_total, "entity_f1": 0.3 / scaled_total, "format": 0.02 / scaled_total})
    assert sum(schedule.weights().values()) == pytest.approx(1.0)
    # EMA (momentum 0.5): 0.5 * 1.0 + 0.5 * 0.9 = 0.95 -> factor (1 - 0.95) / (1 - 0.9) = 0.5
    schedule.observe("format", [0.9])
    scaled_total = 0.5 + 0.3 + 0.1
    assert schedule.weights()["format"] == pytest.approx(0.1 / scaled_total)


def test_schedule_observes_through_the_reward_functions():
    cfg = AlignConfig(weight_schedule="saturation", saturation_momentum=0.0)
    stage = AlignStageConfig(name="tasks", reward_weights={"label_match": 0.5, "format": 0.5})
    schedule = WeightSchedule.from_config(stage, cfg)
    funcs = build_reward_funcs(list(stage.reward_weights), cfg, schedule=schedule)
    for f in funcs:
        call(f, ["positive", "positive"], ["sentiment"] * 2, ["negative", "negative"])
    # labels all wrong (saturation 0), format perfect (saturation 1)
    weights = schedule.weights()
    assert weights["label_match"] > 0.5 > weights["format"]
    assert weights["format"] == pytest.approx(0.05 / 0.55)


def test_judge_reward_uses_the_judge_or_its_fallback():
    judge = Judge(JudgeConfig(url=None))
    f = make_judge_reward(judge)
    assert f.__name__ == "judge"
    assert call(f, ["positive", "none", ""], ["sentiment", "ner", "summarization"], [None] * 3) == [1.0, 1.0, 0.0]


def test_reward_functions_run_inside_trl_grpo(tiny_model_dir, tmp_path):
    """One real GRPO step on the tiny model with mixed-task rows: TRL accepts the None rewards and
    the schedule can rewrite the trainer's weights."""
    import torch
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from tasks.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    data = Dataset.from_list([
        {"prompt": "<|im_start|>user\nSentiment?<|im_end|>\n<|im_start|>assistant\n", "task": "sentiment",
         "label": json.dumps("positive")},
        {"prompt": "<|im_start|>user\nEntities?<|im_end|>\n<|im_start|>assistant\n", "task": "ner",
         "label": json.dumps([JOHN])},
    ])
    cfg = AlignConfig()
    weights = cfg.stages[1].reward_weights
    schedule = WeightSchedule(weights, "saturation", momentum=0.0)
    funcs = build_reward_funcs(list(weights), cfg, schedule=schedule)
    args = GRPOConfig(
        output_dir=str(tmp_path / "grpo"), max_steps=1, per_device_train_batch_size=4, num_generations=2,
        max_completion_length=4, beta=0.0, reward_weights=list(weights.values()), report_to=[],
        logging_steps=1, save_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0,
    )
    trainer = GRPOTrainer(model=load_model(tiny_model_dir), reward_funcs=funcs, args=args, train_dataset=data,
                          processing_class=tokenizer)
    trainer.train()
    assert trainer.reward_func_names == list(weights)
    assert set(schedule.running) <= set(weights) and "format" in schedule.running
    logged = trainer.state.log_history[0]
    assert "rewards/label_match/mean" in logged and "rewards/format/mean" in logged
    configured = torch.tensor(list(weights.values()))
    assert torch.allclose(trainer.reward_weights, configured)
    schedule.observe("format", [1.0] * 4)  # saturate one reward so the schedule's weights really differ
    expected = torch.tensor([schedule.weights()[n] for n in trainer.reward_func_names])
    assert not torch.allclose(expected, configured)
    schedule.apply_to(trainer)
    assert torch.allclose(trainer.reward_weights, expected)
