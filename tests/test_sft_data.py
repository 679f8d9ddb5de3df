"""SFT data: assistant-only labels, deterministic resumable batches, packing, bad inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sft_helpers import sst2_records
from tasks.sft.data import (
    IGNORE_INDEX,
    BatchStream,
    SFTDataError,
    collate,
    encode_records,
    end_of_turn_id,
    select_records,
)


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path):
    from tasks.models import load_tokenizer

    return load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def records(tokenizer) -> list[dict]:
    return sst2_records(tokenizer, 40)


def test_labels_cover_only_the_assistant_answer_and_end_of_turn(tokenizer, records):
    examples, report = encode_records(records, tokenizer, max_seq_len=256)
    assert report.kept == len(records) == 40 and report.dropped_too_long == 0
    eot = end_of_turn_id(tokenizer)
    for example, record in zip(examples, records, strict=True):
        labelled = [t for t in example.labels if t != IGNORE_INDEX]
        # The labelled tail is exactly the completion plus the chat template's end-of-turn token.
        assert tokenizer.decode(labelled[:-1]) == record["completion"]
        assert labelled[-1] == eot and tokenizer.convert_ids_to_tokens(eot) == "<|im_end|>"
        first = next(i for i, t in enumerate(example.labels) if t != IGNORE_INDEX)
        assert tokenizer.decode(example.input_ids[:first]) == record["prompt"]
        assert example.labels[first:] == example.input_ids[first:]


def test_overlong_records_are_dropped_and_counted(tokenizer, records):
    long = dict(records[0], id="long", completion="positive " * 400)
    examples, report = encode_records([long, *records[:5]], tokenizer, max_seq_len=256)
    assert (report.total, report.kept, report.dropped_too_long) == (6, 5, 1)
    assert all(len(e) <= 256 for e in examples)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda recs: [], "training set is empty"),
        (lambda recs: [dict(recs[0], completion="positive " * 400)], "all 1 records are longer than model.max_seq_len"),
        (lambda recs: [{"id": "x", "task": "sentiment", "prompt": "hi"}], "record 'x' has no 'prompt'/'completion'"),
    ],
)
def test_bad_data_gives_clear_errors(tokenizer, records, make, message):
    with pytest.raises(SFTDataError, match=message):
        encode_records(make(records), tokenizer, max_seq_len=256)


def test_max_seq_len_beyond_the_model_context_is_an_error(tokenizer, records):
    with pytest.raises(SFTDataError, match=r"model.max_seq_len=4096 is longer than the model's context \(2048"):
        encode_records(records, tokenizer, max_seq_len=4096, context_length=2048)
    big = dict(records[0], id="huge", completion="word " * 3000)
    with pytest.raises(SFTDataError, match=r"record 'huge' is \d+ tokens, longer than the model's context \(2048\)"):
        encode_records([big], tokenizer, max_seq_len=2048, context_length=2048)


def test_select_records_filters_tasks_and_caps_per_task_deterministically(records):
    mixed = records[:10] + [dict(r, task="ner", id=f"n{i}") for i, r in enumerate(records[10:20])]
    picked = select_records(mixed, ["sentiment", "ner"], max_per_task=3, seed=1)
    assert sorted(r["task"] for r in picked) == ["ner"] * 3 + ["sentiment"] * 3
    assert [r["id"] for r in picked] == [r["id"] for r in select_records(mixed, None, 3, seed=1)]
    assert [r["id"] for r in select_records(mixed, ["ner"])] == [f"n{i}" for i in range(10)]
    weighted = select_records(mixed, None, {"sentiment": 2}, seed=1)  # unnamed tasks are not capped
    assert sorted(r["task"] for r in weighted) == ["ner"] * 10 + ["sentiment"] * 2


@pytest.mark.parametrize("packing", [False, True])
def test_stream_is_deterministic_and_resumes_at_any_batch(tokenizer, records, packing):
    examples, _ = encode_records(records, tokenizer, max_seq_len=256)
    full = BatchStream(examples, batch_size=4, seed=3, packing=packing, max_seq_len=256, pad_id=2)
    first = [b for _, b in zip(range(12), iter(full))]  # crosses at least one epoch boundary
    assert full.batches_per_epoch < 12
    resumed = BatchStream(examples, batch_size=4, seed=3, packing=packing, max_seq_len=256, pad_id=2, start=7)
    for expected, got in zip(first[7:], iter(resumed)):
        assert torch.equal(expected["input_ids"], got["input_ids"])
        assert torch.equal(expected["labels"], got["labels"])
    other_seed = BatchStream(examples, batch_size=4, seed=4, packing=packing, max_seq_len=256, pad_id=2)
    assert [b["input_ids"].tolist() for b in first[:3]] != [
        b["input_ids"].tolist() for _, b in zip(range(3), iter(other_seed))
    ]


def test_ranks_get_disjoint_slices_of_each_global_batch(tokenizer, records):
    examples, _ = encode_records(records, tokenizer, max_seq_len=256)
    streams = [BatchStream(examples, 4, world_size=2, rank=r, seed=0, pad_id=2) for r in (0, 1)]
    layout = streams[0].epoch_layout(0)
    assert streams[0].batches_per_epoch == 5  # 40 examples / (4 x 2 ranks)
    seen = [i for batch in layout for row in batch for i in row]
    assert sorted(seen) == list(range(40))  # one epoch covers every example exactly once
    for rank, stream in enumerate(streams):
        mine = layout[0][rank * 4 : (rank + 1) * 4]
        expected = collate([[examples[i] for i in row] for row in mine], pad_id=2, packing=False)
        assert torch.equal(next(iter(stream))["input_ids"], expected["input_ids"])
    assert not {i for row in layout[0][:4] for i in row} & {i for row in layout[0][4:] for i in row}


def test_length_bucketing_reduces_padding(tokenizer, records):
    examples, _ = encode_records(records * 3, tokenizer, max_seq_len=256)
    stream = BatchStream(examples, batch_size=4, seed=0, pad_id=2)
    bucketed = sum(int(b["input_ids"].numel()) for _, b in zip(range(stream.batches_per_epoch), iter(stream)))
    generator = torch.Generator().manual_seed(0)
    order = torch.randperm(len(examples), generator=generator).tolist()
    random_batches = [order[i : i + 4] for i in range(0, len(order) - len(order) % 4, 4)]
    unbucketed = sum(len(b) * max(len(examples[i]) for i in b) for b in random_batches)
    assert bucketed < unbucketed


def test_packed_rows_fit_and_restart_positions(tokenizer, records):
    examples, _ = encode_records(records, tokenizer, max_seq_len=256)
    stream = BatchStream(examples, batch_size=2, seed=0, packing=True, max_seq_len=256, pad_id=2)
    rows = [i for row in stream._rows for i in row]
    assert sorted(rows) == list(range(40)) and len(stream._rows) < 40
    assert all(sum(len(examples[i]) for i in row) <= 256 for row in stream._rows)
    batch = collate([[examples[0], examples[1]]], pad_id=2, packing=True)
    n0 = len(examples[0])
    assert "attention_mask" not in batch
    assert batch["position_ids"][0, n0].item() == 0 and batch["position_ids"][0, n0 - 1].item() == n0 - 1
    assert int(batch["n_tokens"]) == n0 + len(examples[1])


def test_packed_loss_equals_padded_loss(tiny_model_dir, tokenizer, records):
    """Packed examples must not attend to each other: same loss as padding them separately."""
    from configs.schema import SFTConfig
    from tasks.sft.module import SFTModule
    from tasks.sft.qlora import build_peft_model

    cfg = SFTConfig(method="lora", lora_dropout=0.0)
    torch.manual_seed(0)
    module = SFTModule(build_peft_model(tiny_model_dir, cfg), cfg).eval()
    examples, _ = encode_records(records[:3], tokenizer, max_seq_len=256)
    packed = collate([examples], pad_id=2, packing=True)
    padded = collate([[e] for e in examples], pad_id=2, packing=False)
    with torch.no_grad():
        assert torch.allclose(module.loss(packed), module.loss(padded), atol=1e-5)
        # And the selective LM head equals the model's own shifted cross-entropy on padded batches.
        reference = module.model(input_ids=padded["input_ids"], attention_mask=padded["attention_mask"],
                                 labels=padded["labels"]).loss
        assert torch.allclose(module.loss(padded), reference, atol=1e-5)
