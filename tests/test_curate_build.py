"""A curation run end to end (plain functions, real tokenizer): schema, round trip, dedup, versions."""

from __future__ import annotations

import itertools
import json
import random
import shutil
from pathlib import Path

import pytest

from configs.data_schema import TASKS, DataConfig, SourceConfig
from tasks.data import load_curated, read_latest
from tasks.data.build import allocate, build_dataset
from tasks.data.dedup import exact_key, jaccard, shingles
from tasks.data.store import SPLITS, compute_version, tokenizer_fingerprint
from tasks.models import load_tokenizer
from tasks.parsing import format_target, parse_completion

REPO = Path(__file__).resolve().parents[1]


def _rows(path: Path) -> dict[str, list[dict]]:
    return {s: [json.loads(line) for line in (path / f"{s}.jsonl").read_text().splitlines()] for s in SPLITS}


@pytest.fixture(scope="module")
def shipped(tiny_config, tiny_model_dir, tmp_path_factory):
    """The tiny preset curated from the shipped raw data (one build for the module)."""
    home = tmp_path_factory.mktemp("curate-home")
    summary = build_dataset(tiny_config.data, home, tiny_model_dir)
    return summary, home, _rows(Path(summary["path"]))


def test_shipped_sizes_and_files(shipped, tiny_config):
    summary, home, rows = shipped
    data = tiny_config.data
    assert summary["reused"] is False and read_latest(home) == summary["version"]
    assert len(rows["train"]) == data.train_examples
    for split in ("validation", "test"):
        per_task = {t: sum(r["task"] == t for r in rows[split]) for t in TASKS}
        assert per_task == dict.fromkeys(TASKS, data.eval_examples_per_task)
    assert {r["task"] for r in rows["train"]} == set(TASKS)
    path = Path(summary["path"])
    card = json.loads((path / "card.json").read_text())
    assert (path / "lengths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len((path / "quarantine.jsonl").read_text().splitlines()) == card["quarantined"] > 0
    assert "## Cleaning rules" in (path / "card.md").read_text()
    assert card["rules"]["detok_contractions"]["hits"] > 0 and card["rules"]["phone_international"]["hits"] > 0
    assert card["dedup"]["exact_cross"] > 0  # the shipped files do repeat sentences across splits


def test_record_schema_and_rendering(shipped, tiny_model_dir):
    _, _, rows = shipped
    tokenizer = load_tokenizer(tiny_model_dir)
    templates = DataConfig().templates
    for row in itertools.chain(*rows.values()):
        assert {"id", "task", "source", "input", "messages", "label", "prompt", "completion"} <= set(row)
        system, user, assistant = row["messages"]
        assert [m["role"] for m in row["messages"]] == ["system", "user", "assistant"]
        assert system["content"] == templates[row["task"]].system
        assert row["input"] in user["content"]
        assert assistant["content"] == row["completion"]
        assert row["prompt"] == tokenizer.apply_chat_template(row["messages"][:2], tokenize=False,
                                                              add_generation_prompt=True)
        expected = format_target(row["task"], row["label"])
        assert row["completion"] == expected
        assert "<|im_end|>" not in row["completion"]
    # Several paraphrases are in use per task, not one phrasing.
    for task in TASKS:
        used = {r["template"] for r in itertools.chain(*rows.values()) if r["task"] == task}
        assert len(used) >= 2


def test_every_rendered_example_parses_back_to_its_label(shipped):
    _, _, rows = shipped
    for row in itertools.chain(*rows.values()):
        label, format_ok = parse_completion(row["task"], row["completion"])
        assert format_ok, row["id"]
        assert label == row["label"], row["id"]


def test_no_exact_or_near_duplicate_crosses_splits(shipped, tiny_config):
    _, _, rows = shipped
    dedup = tiny_config.data.dedup
    items = [(split, r["task"], r["input"]) for split in SPLITS for r in rows[split]]
    grams = [shingles(text, dedup.shingle_size) for _, _, text in items]
    keys = [exact_key(text) for _, _, text in items]
    for i, j in itertools.combinations(range(len(items)), 2):
        same_split_other_task = items[i][0] == items[j][0] and items[i][1] != items[j][1]
        if same_split_other_task:
            continue  # one dialogue may feed summarization and generation in the same split
        assert keys[i] != keys[j], (items[i], items[j])
        assert jaccard(grams[i], grams[j]) < dedup.threshold, (items[i], items[j])


def test_labels_load_back_structured(shipped):
    summary, home, rows = shipped
    splits = load_curated(home)
    assert set(splits) == set(SPLITS)
    for split in SPLITS:
        assert splits[split].to_list() == rows[split]
    ner = next(r for r in splits["train"] if r["task"] == "ner" and r["label"])
    assert isinstance(ner["label"], list) and set(ner["label"][0]) == {"text", "type"}


def test_dialogue_groups_stay_in_one_split(tiny_config, tiny_model_dir, tmp_path):
    data = tiny_config.data.model_copy(update={"train_examples": 400, "eval_examples_per_task": 40, "sources": [
        s for s in tiny_config.data.sources if s.format == "dialogsum"]})
    summary = build_dataset(data, tmp_path, tiny_model_dir)
    split_of = {r["id"]: split for split, rs in _rows(Path(summary["path"])).items() for r in rs}
    pairs = [(i, i.replace("dialogsum-reply-", "dialogsum-")) for i in split_of if i.startswith("dialogsum-reply-")]
    shared = [(a, b) for a, b in pairs if b in split_of]
    assert len(shared) > 50
    assert all(split_of[a] == split_of[b] for a, b in shared)
    assert {split_of[a] for a, _ in shared} == set(SPLITS)


# --------------------------------------------------------------------------- crafted data
def _crafted(tmp_path: Path) -> DataConfig:
    raw = tmp_path / "raw"
    raw.mkdir()
    rng = random.Random(0)
    words = [f"{a}{b}" for a in ("bra", "cle", "dro", "fen", "glu", "hor", "ist", "jam")
             for b in ("ve", "ck", "mp", "nt", "sh")]
    sentences = [" ".join(rng.sample(words, 9)) for _ in range(71)]
    train = [f"{text}\t{i % 2}" for i, text in enumerate(sentences[:60])]
    dev = [
        f"{sentences[3]}\t1",  # exact copy of a training line
        f"{sentences[5].upper()} , !\t1",  # the same after normalisation
        f"{sentences[8]} too\t0",  # near copy
    ] + [f"{text}\t{i % 2}" for i, text in enumerate(sentences[60:68])]
    (raw / "train.tsv").write_text("\n".join(train) + "\n")
    (raw / "dev.tsv").write_text("\n".join(dev) + "\n")
    return DataConfig(raw_dir=raw, train_examples=60, eval_examples_per_task=20, sources=[
        SourceConfig(name="tr", task="sentiment", format="sst2", path=Path("train.tsv"), split="train"),
        SourceConfig(name="dv", task="sentiment", format="sst2", path=Path("dev.tsv"), split="eval"),
    ])


def test_planted_duplicates_are_removed_from_training(tmp_path, tiny_model_dir):
    cfg = _crafted(tmp_path)
    summary = build_dataset(cfg, tmp_path / "home", tiny_model_dir)
    rows = _rows(Path(summary["path"]))
    train_inputs = {r["input"] for r in rows["train"]}
    assert len(rows["validation"]) + len(rows["test"]) == 11  # every held-out line kept
    assert not {f"tr-{i + 1:06d}" for i in (3, 5, 8)} & {r["id"] for r in rows["train"]}
    assert all(not text.endswith(" too") for text in train_inputs)
    assert len(rows["train"]) == 57
    card = json.loads((Path(summary["path"]) / "card.json").read_text())
    assert card["dedup"]["exact_cross"] == 2 and card["dedup"]["near_cross"] == 1


def test_same_inputs_same_version_and_bytes_changes_give_new_versions(tmp_path, tiny_model_dir):
    cfg = _crafted(tmp_path)
    fingerprint = tokenizer_fingerprint(tiny_model_dir)
    version = compute_version(cfg, fingerprint)
    assert compute_version(_crafted_copy(cfg), fingerprint) == version

    first = build_dataset(cfg, tmp_path / "a", tiny_model_dir)
    again = build_dataset(cfg, tmp_path / "a", tiny_model_dir)
    other_home = build_dataset(cfg, tmp_path / "b", tiny_model_dir, force=True)
    assert first["version"] == again["version"] == other_home["version"] == version
    assert again["reused"] is True and first["reused"] is False
    for name in ("train.jsonl", "validation.jsonl", "test.jsonl", "quarantine.jsonl", "lengths.png"):
        assert (Path(first["path"]) / name).read_bytes() == (Path(other_home["path"]) / name).read_bytes(), name

    # Changed input bytes, changed config, changed chat template: each a new version.
    with open(cfg.raw_dir / "dev.tsv", "a") as handle:
        handle.write("one more held out line for the dev file\t1\n")
    changed_input = compute_version(cfg, fingerprint)
    assert changed_input != version
    assert compute_version(cfg.model_copy(update={"seed": 1}), fingerprint) not in (version, changed_input)
    model_copy = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_copy)
    template = model_copy / "chat_template.jinja"
    template.write_text(template.read_text().replace("<|im_start|>", "<|im_start|> "))
    assert compute_version(cfg, tokenizer_fingerprint(model_copy)) not in (version, changed_input)
    # Where the raw files live is not part of the version, only their bytes.
    moved = tmp_path / "moved"
    shutil.copytree(cfg.raw_dir, moved)
    assert compute_version(cfg.model_copy(update={"raw_dir": moved}), fingerprint) == changed_input


def _crafted_copy(cfg: DataConfig) -> DataConfig:
    return DataConfig.model_validate(cfg.model_dump(mode="json"))


def test_allocate_shares_by_weight_and_refills_from_the_rest():
    assert allocate(100, {"a": 1, "b": 1}, {"a": 1000, "b": 1000}) == {"a": 50, "b": 50}
    assert allocate(100, {"a": 3, "b": 1}, {"a": 1000, "b": 10}) == {"a": 90, "b": 10}
    assert allocate(10, {"a": 1, "b": 1, "c": 1}, {"a": 100, "b": 100, "c": 100}) == {"a": 4, "b": 3, "c": 3}
    assert allocate(100, {"a": 1, "b": 0}, {"a": 30, "b": 100}) == {"a": 30, "b": 0}
    assert sum(allocate(7, {"x": 0.4, "y": 0.35, "z": 0.25}, {"x": 9, "y": 9, "z": 9}).values()) == 7
