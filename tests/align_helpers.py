"""Hand-made curated data and SFT runs for the alignment tests (the real on-disk contracts, built in
milliseconds instead of running curation and SFT)."""

from __future__ import annotations

import json
from pathlib import Path

REVIEWS = [("a gripping, beautifully acted film", "positive"), ("dull and far too long", "negative"),
           ("the best thing I saw this year", "positive"), ("a clumsy, lifeless mess", "negative")]
SENTENCES = [("John Smith flew to Paris .", [{"text": "John Smith", "type": "PER"}, {"text": "Paris", "type": "LOC"}]),
             ("Shares of Acme fell on Monday .", [{"text": "Acme", "type": "ORG"}]),
             ("It rained all day .", [])]
ARTICLES = [("The council approved a new park in the city centre after a long debate about costs.",
             "Council approves new city-centre park."),
            ("Researchers found that the bridge needs repairs before winter, officials said on Tuesday.",
             "Bridge needs repairs before winter.")]
STORIES = [("Write one sentence about the sea.", "The sea was calm and silver at dawn."),
           ("Write one sentence about a cat.", "The cat slept in the warm window.")]
SYSTEM = {"sentiment": "Answer with exactly one word: positive or negative.",
          "ner": 'List the named entities as a JSON list of {"text", "type"} objects (PER, ORG, LOC, MISC).',
          "summarization": "Summarise the text in one short sentence.",
          "generation": "Follow the instruction."}


def record(tokenizer, task: str, number: int, text: str, label) -> dict:
    """One record of the curated schema (prompt rendered with the tokenizer's chat template)."""
    messages = [{"role": "system", "content": SYSTEM[task]}, {"role": "user", "content": text}]
    completion = json.dumps(label, ensure_ascii=False) if task == "ner" else label
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return {"id": f"{task}-{number}", "task": task, "source": "test", "input": text,
            "messages": [*messages, {"role": "assistant", "content": completion}], "label": label,
            "prompt": prompt, "completion": completion, "n_tokens": len(tokenizer(prompt)["input_ids"]),
            "template": 0}


def records(tokenizer, tasks: tuple[str, ...] = ("sentiment", "ner", "summarization", "generation"),
            copies: int = 2) -> list[dict]:
    """A few records of each task (``copies`` times over with distinct ids)."""
    sources = {"sentiment": REVIEWS, "ner": SENTENCES, "summarization": ARTICLES, "generation": STORIES}
    out, number = [], 0
    for _ in range(copies):
        for task in tasks:
            for text, label in sources[task]:
                number += 1
                out.append(record(tokenizer, task, number, text, label))
    return out


def write_curated(home: Path, tokenizer, version: str = "testdata0001") -> str:
    """A complete curated version under ``<home>/data`` (LATEST points at it)."""
    from tasks.data.store import write_version

    rows = {"train": records(tokenizer, copies=3), "validation": records(tokenizer, copies=1),
            "test": records(tokenizer, copies=1)}
    lengths = {t: [r["n_tokens"] for r in rows["train"] if r["task"] == t] for t in SYSTEM}
    write_version(home, version, rows, [], {"version": version}, f"# test data {version}\n", lengths)
    return version


def make_adapter(model_dir: Path, target: Path, seed: int = 0) -> Path:
    """A LoRA adapter for ``model_dir`` with small non-zero B (as after SFT), saved with the tokenizer."""
    from tasks.models import load_tokenizer
    from tests.quantize_helpers import make_adapter as random_lora

    random_lora(model_dir, target, scale=0.02, seed=seed)
    load_tokenizer(model_dir).save_pretrained(str(target))
    return target


def make_sft_run(home: Path, model_dir: Path, version: str, method: str = "lora",
                 name: str = "sft-20260101-000000-1") -> Path:
    """An SFT run directory as ``lmforge finetune`` leaves it (adapter/, run.json, LATEST)."""
    run_dir = Path(home) / "runs" / "sft" / name
    make_adapter(model_dir, run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({
        "name": name, "run_dir": str(run_dir), "data_version": version, "mlflow_run_id": None,
        "sft": {"method": method}}))
    (run_dir.parent / "LATEST").write_text(name + "\n")
    return run_dir / "adapter"
