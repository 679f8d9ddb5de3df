"""Evaluation: metrics on hand-made predictions equal hand-computed values; the HF generator and
the Prefect task on the tiny model."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from configs.schema import EvaluateConfig
from tasks import metrics as M
from tasks.evaluate import EvalResult, evaluate_records, evaluate_task, hf_generator, write_results
from tasks.parsing import format_target

POS, NEG = "positive", "negative"


def rec(i, task, label, prompt=None, **extra):
    return {"id": f"{task}-{i}", "task": task, "input": f"input {i}", "prompt": prompt or f"<{task} {i}>",
            "label": label, **extra}


def table_generator(outputs: dict[str, str], calls: list[int] | None = None):
    """A Generator answering each prompt from a fixed table (hand-made predictions)."""

    def generate(prompts: list[str], max_new_tokens: int = 64) -> list[str]:
        if calls is not None:
            calls.append(len(prompts))
        return [outputs[p] for p in prompts]

    return generate


def hand_made():
    records = [
        rec(1, "sentiment", POS), rec(2, "sentiment", POS), rec(3, "sentiment", NEG),
        rec(4, "sentiment", NEG), rec(5, "sentiment", POS),
        rec(1, "ner", [{"text": "John", "type": "PER"}, {"text": "Paris", "type": "LOC"}]),
        rec(2, "ner", json.dumps([{"text": "EU", "type": "ORG"}])),  # JSON-encoded label, as stored on disk
        rec(3, "ner", []),
        rec(4, "ner", [{"text": "Bob", "type": "PER"}, {"text": "Bob", "type": "PER"}]),
        rec(1, "summarization", "the cat sat on the mat"),
        rec(2, "summarization", "a dog barked loudly"),
    ]
    outputs = {
        "<sentiment 1>": "positive", "<sentiment 2>": "negative", "<sentiment 3>": "Negative",
        "<sentiment 4>": "no idea", "<sentiment 5>": "Sentiment: positive",
        "<ner 1>": "- John (person)\n- Paris (organization)",
        "<ner 2>": "EU is an organisation",
        "<ner 3>": "none",
        "<ner 4>": "- Bob (person)",
        "<summarization 1>": "the cat sat",
        "<summarization 2>": "",
    }
    return records, outputs


def test_metrics_equal_hand_computed_values():
    records, outputs = hand_made()
    calls: list[int] = []
    result = evaluate_records(records, table_generator(outputs, calls), EvaluateConfig(batch_size=4))
    m = result.metrics
    # sentiment: parsed pos, neg, neg, None, pos -> 3/5 correct.
    assert m["sentiment_accuracy"] == pytest.approx(0.6)
    # positive: P 2/2, R 2/3 -> F1 0.8; negative: P 1/2, R 1/2 -> 0.5; macro 0.65.
    assert m["sentiment_macro_f1"] == pytest.approx(0.65)
    # ner micro: matched 1+0+0+1 = 2, predicted 2+0+0+1 = 3, gold 2+1+0+2 = 5.
    assert m["ner_precision"] == pytest.approx(2 / 3)
    assert m["ner_recall"] == pytest.approx(0.4)
    assert m["ner_f1"] == pytest.approx(0.5)
    # ROUGE-L: LCS 3 of 3 predicted / 6 reference tokens -> F 2/3; empty -> 0; mean 1/3.
    assert m["summarization_rougeL"] == pytest.approx(1 / 3)
    # format ok: 3 sentiment + 3 ner ("none" is the valid empty answer) + 1 summary = 7 of 11.
    assert m["format_compliance"] == pytest.approx(7 / 11)
    assert m["format_compliance_sentiment"] == pytest.approx(0.6)
    assert m["format_compliance_ner"] == pytest.approx(0.75)
    assert (m["n_examples"], m["n_sentiment"], m["n_ner"], m["n_summarization"], m["n_generation"]) == (11, 5, 4, 2, 0)
    assert "generation_rougeL" not in m and "perplexity" not in m
    assert max(calls) <= 4 and sum(calls) == 11

    rows = {r["id"]: r for r in result.table}
    assert set(rows["ner-1"]) >= {"id", "task", "input", "prompt", "output", "label", "parsed", "format_ok", "score"}
    assert rows["ner-1"]["score"] == pytest.approx(0.5)
    # entity rows keep the counts paired comparisons resample (tasks.stats)
    assert (rows["ner-1"]["matched"], rows["ner-1"]["n_pred"], rows["ner-1"]["n_gold"]) == (1, 2, 2)
    assert rows["ner-2"]["label"] == [{"text": "EU", "type": "ORG"}]
    assert rows["ner-2"]["parsed"] == [] and rows["ner-2"]["format_ok"] is False
    assert rows["ner-3"]["score"] == 1.0
    assert rows["sentiment-5"]["parsed"] == POS and rows["sentiment-5"]["format_ok"] is False
    assert rows["summarization-1"]["score"] == pytest.approx(2 / 3)
    # the table keeps the input order even though prompts were batched by length
    assert [r["id"] for r in result.table] == [r["id"] for r in records]


def test_each_task_is_generated_with_its_own_length_limit_unless_one_is_configured():
    from configs.tasks import get_task

    records, outputs = hand_made()
    seen: dict[int, int] = {}

    def generate(prompts, max_new_tokens):
        seen[max_new_tokens] = seen.get(max_new_tokens, 0) + len(prompts)
        return [outputs[p] for p in prompts]

    evaluate_records(records, generate, EvaluateConfig())
    assert seen == {get_task("sentiment").max_new_tokens: 5, get_task("ner").max_new_tokens: 4,
                    get_task("summarization").max_new_tokens: 2}
    seen.clear()
    evaluate_records(records, generate, EvaluateConfig(max_new_tokens=7))
    assert seen == {7: 11}


def test_max_samples_per_task_takes_the_first_of_each_task():
    records, outputs = hand_made()
    result = evaluate_records(records, table_generator(outputs), EvaluateConfig(max_samples_per_task=2))
    assert [r["id"] for r in result.table] == [
        "sentiment-1", "sentiment-2", "ner-1", "ner-2", "summarization-1", "summarization-2"]
    assert result.metrics["sentiment_accuracy"] == pytest.approx(0.5)


def test_bad_records_and_generators_fail_clearly():
    cfg = EvaluateConfig()
    with pytest.raises(ValueError, match=r"record #0 \(x\): missing key\(s\) prompt"):
        evaluate_records([{"id": "x", "task": "ner", "label": []}], table_generator({}), cfg)
    with pytest.raises(ValueError, match="unknown task 'qa'"):
        evaluate_records([rec(1, "qa", "a")], table_generator({}), cfg)
    with pytest.raises(ValueError, match="returned 0 completions for 1 prompts"):
        evaluate_records([rec(1, "sentiment", POS)], lambda prompts, n: [], cfg)


def test_metric_edge_cases():
    assert M.prf(0, 0, 0) == {"precision": 1.0, "recall": 1.0, "f1": 1.0}
    assert M.prf(0, 0, 3) == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert M.perplexity([(2.0, 1), (4.0, 3)]) == pytest.approx(math.exp(1.5))
    assert math.isnan(M.perplexity([]))
    assert M.label_scores([POS, NEG], [None, None], [POS, NEG]) == {"accuracy": 0.0, "macro_f1": 0.0}
    assert M.rouge_l("Cats are sitting", "cat sits") > 0  # Porter stemmer: cats ~ cat, sitting ~ sits


def test_write_results_writes_json_and_csv(tmp_path):
    records, outputs = hand_made()
    result = evaluate_records(records, table_generator(outputs), EvaluateConfig())
    result.metrics["perplexity"] = float("nan")
    paths = write_results(result, tmp_path / "eval")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["ner_f1"] == pytest.approx(0.5) and metrics["perplexity"] is None
    assert json.loads((tmp_path / "eval" / "eval_table.json").read_text()) == result.table
    with open(paths["table_csv"], newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 11
    assert json.loads(rows[5]["parsed"]) == [{"text": "John", "type": "PER"}, {"text": "Paris", "type": "ORG"}]
    assert sorted(p.name for p in (tmp_path / "eval").iterdir()) == [
        "eval_table.csv", "eval_table.json", "metrics.json",
    ]
    assert isinstance(result, EvalResult) and len(result.to_dataframe()) == 11


# --------------------------------------------------------------------------- tiny model
def chat_records(tokenizer):
    def prompt(system, user):
        return tokenizer.apply_chat_template(
            [{"role": "system", "content": system}, {"role": "user", "content": user}],
            tokenize=False, add_generation_prompt=True)

    ner_label = [{"text": "Paris", "type": "LOC"}]
    return [
        rec(1, "sentiment", POS, prompt("Classify the sentiment.", "a moving, funny film"), completion=POS),
        rec(2, "ner", ner_label, prompt("List the named entities.", "She flew to Paris."),
            completion=format_target("ner", ner_label)),
    ]


@pytest.fixture(scope="module")
def tiny_generator(tiny_model_dir):
    return hf_generator(tiny_model_dir, batch_size=2)


def test_hf_generator_is_deterministic_and_scores_perplexity(tiny_generator):
    records = chat_records(tiny_generator.tokenizer)
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=12)
    first = evaluate_records(records, tiny_generator, cfg, perplexity_model=tiny_generator)
    second = evaluate_records(records, tiny_generator, cfg, perplexity_model=tiny_generator)
    assert [r["output"] for r in first.table] == [r["output"] for r in second.table]
    assert all(isinstance(r["output"], str) for r in first.table)
    assert 1.0 < first.metrics["perplexity"] < float("inf")
    assert first.metrics["perplexity"] == second.metrics["perplexity"]
    # random weights: perplexity is near the vocabulary size
    assert first.metrics["perplexity"] > 1000
    assert [r["n_tokens"] for r in first.table] == [
        len(tiny_generator.tokenizer(r["completion"], add_special_tokens=False)["input_ids"]) + 1 for r in records]


def test_completion_nll_batched_equals_the_models_own_loss(tiny_generator):
    """Right padding + masking in completion_nll must give exactly HF's per-sequence label loss."""
    import torch

    gen = tiny_generator
    prompts = ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
               "<|im_start|>user\nname a city<|im_end|>\n<|im_start|>assistant\n"]
    completions = ["positive", "Paris is a city in France"]
    batched = gen.completion_nll(prompts, completions)
    for (nll, n), prompt, completion in zip(batched, prompts, completions):
        context = gen._encode(prompt)
        target = gen._encode(completion) + [gen.end_of_turn_id]
        ids = torch.tensor([context + target])
        labels = torch.tensor([[-100] * len(context) + target])
        with torch.no_grad():
            loss = gen.model(input_ids=ids, labels=labels).loss.item()
        assert n == len(target)
        assert nll == pytest.approx(loss * n, rel=1e-4)


def test_trained_model_answers_exactly_and_evaluates_perfectly(tiny_model_dir):
    """Overfit the tiny model on two answers: greedy decoding must stop at end-of-turn, the outputs
    must parse, score 1.0, and the reference perplexity must drop."""
    import torch

    gen = hf_generator(tiny_model_dir, batch_size=2)
    records = chat_records(gen.tokenizer)
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=16)
    before = evaluate_records(records, gen, cfg, perplexity_model=gen).metrics["perplexity"]

    rows = []
    for r in records:
        context, target = gen._encode(r["prompt"]), gen._encode(r["completion"]) + [gen.end_of_turn_id]
        rows.append((context + target, [-100] * len(context) + target))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([a + [gen.pad_id] * (width - len(a)) for a, _ in rows])
    labels = torch.tensor([b + [-100] * (width - len(b)) for _, b in rows])
    attention = torch.tensor([[1] * len(a) + [0] * (width - len(a)) for a, _ in rows])
    threads = torch.get_num_threads()
    # One thread: on the shared 2-core machine this tiny model trains ~3x faster than with two.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    try:
        gen.model.train()
        optim = torch.optim.Adam(gen.model.parameters(), lr=5e-3)
        for _ in range(60):
            optim.zero_grad()
            gen.model(input_ids=ids, attention_mask=attention, labels=labels).loss.backward()
            optim.step()
    finally:
        torch.set_num_threads(threads)
    gen.model.eval()

    after = evaluate_records(records, gen, cfg, perplexity_model=gen)
    assert [r["output"] for r in after.table] == [POS, "- Paris (location)"]
    assert after.metrics["sentiment_accuracy"] == 1.0 and after.metrics["ner_f1"] == 1.0
    assert after.metrics["format_compliance"] == 1.0
    assert after.metrics["perplexity"] < 1.5 < before


def read_artifacts(*keys: str) -> dict:
    """Artifacts by key, with every filter field explicit (this prefect/fastapi pair rejects nulls)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey, FlowRunFilter, TaskRunFilter

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=list(keys))),
            flow_run_filter=FlowRunFilter(), task_run_filter=TaskRunFilter(), offset=0, limit=10, sort="KEY_ASC",
        )
    return {a.key: a for a in found}


def test_evaluate_task_publishes_artifacts(prefect_harness, tiny_model_dir, tmp_path):
    from prefect import flow

    from tasks.models import load_tokenizer

    records = chat_records(load_tokenizer(tiny_model_dir))

    @flow
    def run():
        return evaluate_task(tiny_model_dir, EvaluateConfig(batch_size=2, max_new_tokens=4, engine="hf"),
                             tmp_path / "out", records=records, artifact_key="test-eval")

    out = run()
    assert out["metrics"]["n_examples"] == 2 and out["metrics"]["perplexity"] > 1
    assert len(json.loads(open(out["table_json"]).read())) == 2
    artifacts = read_artifacts("test-eval-table", "test-eval-metrics")
    table = artifacts["test-eval-table"]
    assert table.type == "table"
    assert {row["id"] for row in json.loads(table.data)} == {"sentiment-1", "ner-2"}
    assert artifacts["test-eval-metrics"].type == "markdown" and "| ner_f1 |" in artifacts["test-eval-metrics"].data


@pytest.fixture(scope="module")
def random_adapter(tiny_model_dir, tmp_path_factory) -> Path:
    """A LoRA adapter with non-zero B, so it really changes the tiny model's outputs."""
    from tests.quantize_helpers import make_adapter

    return make_adapter(tiny_model_dir, tmp_path_factory.mktemp("adapter") / "adapter", seed=1, r=8, alpha=32)


def test_merged_adapter_scores_like_the_peft_wrapper(tiny_model_dir, random_adapter):
    """Folding the LoRA weights in (the fast path evaluation uses) must not change the model's function."""
    import torch

    merged = hf_generator(tiny_model_dir, random_adapter, batch_size=2)
    wrapped = hf_generator(tiny_model_dir, random_adapter, batch_size=2, merge_adapter=False)
    base = hf_generator(tiny_model_dir, batch_size=2)
    assert not hasattr(merged.model, "peft_config") and hasattr(wrapped.model, "peft_config")
    ids = torch.tensor([merged._encode("<|im_start|>user\nname a city<|im_end|>\n<|im_start|>assistant\n")])
    with torch.no_grad():
        m, w, b = (g.model(input_ids=ids).logits[0, -1] for g in (merged, wrapped, base))
    assert torch.allclose(m, w, atol=1e-4, rtol=1e-4)
    assert (w - b).abs().max() > 1e-2  # the adapter really acts, so the equality above means something


def test_evaluation_cache_reuses_only_the_same_evaluation(tiny_model_dir, random_adapter, tmp_path, monkeypatch):
    import tasks.evaluate as E
    from tasks.evaluate import evaluate_model
    from tasks.models import load_tokenizer

    records = chat_records(load_tokenizer(tiny_model_dir))
    cfg = EvaluateConfig(batch_size=2, max_new_tokens=6, engine="hf")
    cache = tmp_path / "cache"
    first = evaluate_model(tiny_model_dir, cfg, tmp_path / "a", records=records, cache_dir=cache)
    assert first["cached"] is False and len(list(cache.iterdir())) == 1

    real_generator = E.open_generator

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached evaluation must not load or run the model")

    monkeypatch.setattr(E, "open_generator", no_generation)
    again = evaluate_model(tiny_model_dir, cfg, tmp_path / "b", records=records, cache_dir=cache)
    assert again["cached"] is True
    assert again["metrics"]["perplexity"] == first["metrics"]["perplexity"]
    # "auto" is the engine it resolves to: the quantize merge check names the engine and must reuse
    # alignment's "auto" evaluation rather than pay for it again. (Resolved as on a CUDA machine, where
    # auto means hf, the engine the cached entry used.)
    monkeypatch.setattr(E, "resolve_engine", lambda engine, device: "hf" if engine in ("auto", "hf") else engine)
    auto = evaluate_model(tiny_model_dir, cfg.model_copy(update={"engine": "auto"}), tmp_path / "auto",
                          records=records, cache_dir=cache)
    assert auto["cached"] is True
    assert json.loads(open(again["table_json"]).read()) == json.loads(open(first["table_json"]).read())

    # A different adapter, settings or record set is a different evaluation: it must run.
    monkeypatch.setattr(E, "open_generator", real_generator)
    tuned = evaluate_model(tiny_model_dir, cfg, tmp_path / "c", records=records, adapter_dir=random_adapter,
                           cache_dir=cache)
    shorter = evaluate_model(tiny_model_dir, cfg.model_copy(update={"max_new_tokens": 3}), tmp_path / "d",
                             records=records, cache_dir=cache)
    fewer = evaluate_model(tiny_model_dir, cfg, tmp_path / "e", records=records[:1], cache_dir=cache)
    assert [tuned["cached"], shorter["cached"], fewer["cached"]] == [False, False, False]
    assert len(list(cache.iterdir())) == 4
    assert tuned["metrics"]["perplexity"] != first["metrics"]["perplexity"]


def test_openvino_engine_with_runtime_lora_answers_like_hf_with_the_merged_adapter(tiny_model_dir, random_adapter,
                                                                                   tmp_path):
    """The default CPU engine (base IR + adapter at runtime, as the gateway serves) must be the same model
    as Hugging Face with the adapter merged: same greedy answers on the same prompts (computed in f32: on a
    CPU with AVX512-BF16 OpenVINO's default is bf16, and a random model's logits are full of near-ties)."""
    from tasks.evaluate import evaluate_model
    from tasks.models import load_tokenizer

    records = chat_records(load_tokenizer(tiny_model_dir)) * 3
    records = [{**r, "id": f"{r['id']}-{i}", "prompt": r["prompt"].replace("film", f"film {i}")}
               for i, r in enumerate(records)]
    outputs = {}
    for engine in ("hf", "openvino"):
        cfg = EvaluateConfig(batch_size=4, max_new_tokens=8, engine=engine, inference_precision="f32")
        out = evaluate_model(tiny_model_dir, cfg,
                             tmp_path / engine, records=records, adapter_dir=random_adapter)
        outputs[engine] = [row["output"] for row in json.loads(open(out["table_json"]).read())]
    assert outputs["openvino"] == outputs["hf"]
    assert any(outputs["hf"])  # the random adapter's model says something, so equality is not vacuous
