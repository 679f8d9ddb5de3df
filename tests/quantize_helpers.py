"""Helpers for the quantize tests: real PEFT adapters on the tiny model and hand-built curated records."""

from __future__ import annotations

import json
from pathlib import Path

LORA_TARGETS = ["q_proj", "v_proj", "gate_proj", "down_proj"]
REVIEWS = [
    ("a warm, funny and moving film", "positive"),
    ("dull, overlong and badly acted", "negative"),
    ("one of the best movies this year", "positive"),
    ("I wanted my two hours back", "negative"),
    ("charming from start to finish", "positive"),
    ("a mess of a script", "negative"),
]


def make_adapter(base_dir: Path, out_dir: Path, scale: float = 0.3, seed: int = 0, r: int = 4, alpha: int = 8) -> Path:
    """A LoRA adapter for ``base_dir`` with random (non-zero) B matrices, saved with PEFT's save_pretrained.

    PEFT initialises B to zero (a no-op adapter); random B makes the merged model measurably differ
    from the base so merge and runtime-LoRA parity are really tested.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    peft_model = get_peft_model(
        model, LoraConfig(r=r, lora_alpha=alpha, target_modules=LORA_TARGETS, task_type="CAUSAL_LM", lora_dropout=0.0)
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    peft_model.save_pretrained(str(out_dir))
    return Path(out_dir)


def sentiment_records(base_dir: Path) -> list[dict]:
    """Sentiment records in the curated schema, rendered with the base model's chat template."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    records = []
    for i, (text, label) in enumerate(REVIEWS):
        messages = [
            {"role": "system", "content": "Classify the sentiment of the review as positive or negative."},
            {"role": "user", "content": text},
        ]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        records.append({
            "id": f"sst2-{i}", "task": "sentiment", "source": "test", "input": text,
            "messages": [*messages, {"role": "assistant", "content": label}],
            "label": label, "prompt": prompt, "completion": label,
        })
    return records


def samples_of(records: list[dict]) -> list[tuple[str, str]]:
    """(prompt, completion) pairs, the form calibration and QAT take."""
    return [(r["prompt"], r["completion"]) for r in records]


def other_base(out_dir: Path, hidden_size: int = 32) -> Path:
    """A differently shaped Llama (same vocabulary size as the tiny model) saved as a HF model dir."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=49152, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        LlamaForCausalLM(config).save_pretrained(str(out_dir))
    return Path(out_dir)


def rewrite_json(path: Path, **changes) -> None:
    """Change keys of a JSON file in place."""
    data = json.loads(Path(path).read_text())
    data.update(changes)
    Path(path).write_text(json.dumps(data))
