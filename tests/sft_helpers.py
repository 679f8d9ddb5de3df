"""Curated-schema records for the SFT tests, built from a few rows of the shipped SST-2 sample."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO / "data" / "raw" / "sst2" / "train.tsv"
SYSTEM = "Classify the sentiment of the movie review. Answer with one word: positive or negative."


def sst2_records(tokenizer, n: int, offset: int = 0) -> list[dict]:
    """``n`` sentiment records (id, task, source, input, messages, label, prompt, completion)."""
    rows = SST2.read_text(encoding="utf-8").splitlines()[offset : offset + n]
    records = []
    for number, row in enumerate(rows, start=offset + 1):
        text, raw = row.rsplit("\t", 1)
        label = "positive" if raw.strip() == "1" else "negative"
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": text}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        records.append({
            "id": f"sst2-{number}", "task": "sentiment", "source": "sst2", "input": text,
            "messages": [*messages, {"role": "assistant", "content": label}],
            "label": label, "prompt": prompt, "completion": label,
        })
    return records
