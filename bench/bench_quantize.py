"""Quantize SmolLM2-135M + a LoRA adapter into every variant and print the comparison table.

    LMFORGE_HOME=/work/main/.lmforge .venv/bin/python bench/bench_quantize.py [--adapter DIR] [--tasks sentiment]

Uses the base model from the store (``lmforge models import``), curated data (``lmforge curate``)
for calibration, QAT and evaluation, and the newest SFT adapter; with no SFT run yet it trains a
short LoRA on the curated sentiment examples first (``--quick-lora-steps``) so the comparison is
made on a model that actually does the task. Runs the stage's plain steps (no Prefect server) and
writes the usual ``<home>/exports/<id>/`` with report.md/png. Heavy: ~15-30 min on 2 busy cores.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

from configs.schema import load
from tasks.data import load_curated
from tasks.models import import_model
from tasks.quantize import steps
from tasks.quantize.validate import AdapterError


def quick_lora(base_dir: Path, records: list[dict], out_dir: Path, steps_: int, seed: int = 0) -> Path:
    """A short LoRA fine-tune (answer-token loss) so the bench has a task-tuned adapter to export."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                             "up_proj", "down_proj"]))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-4)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.train()
    started = time.perf_counter()
    for step in range(steps_):
        batch = [records[(step * 8 + i) % len(records)] for i in range(8)]
        rows = []
        for r in batch:
            prompt = tokenizer(r["prompt"], add_special_tokens=False)["input_ids"]
            answer = tokenizer(r["completion"], add_special_tokens=False)["input_ids"] + [end]
            rows.append((prompt + answer, [-100] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id or end)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)], labels[i, : len(y)], mask[i, : len(x)] = torch.tensor(x), torch.tensor(y), 1
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps_ - 1:
            print(f"quick-lora step {step + 1}/{steps_} loss {loss.item():.4f} ({time.perf_counter() - started:.0f}s)")
    model.save_pretrained(str(out_dir))
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--tasks", nargs="+", default=["sentiment"], help="validation tasks to score")
    parser.add_argument("--quick-lora-steps", type=int, default=60)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. quantize.qat_steps=20")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("nncf", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = load(args.config, ["quantize.variants=[int8, int4, int8_full, qat_int4]", "evaluate.max_new_tokens=8",
                             "evaluate.max_samples_per_task=150", *args.overrides])
    base = Path(import_model(cfg.model.base, cfg.home, cfg.model)["path"])
    data = load_curated(cfg.home)
    samples = [(r["prompt"], r["completion"]) for r in data["train"]]
    records = [dict(r) for r in data["validation"] if r["task"] in args.tasks]
    try:
        adapter = steps.resolve_adapter(cfg.home, args.adapter)
    except AdapterError:
        adapter = cfg.home / "bench" / "quick-lora-adapter"
        if not (adapter / "adapter_config.json").is_file():
            train = [dict(r) for r in data["train"] if r["task"] == "sentiment"]
            quick_lora(base, train, adapter, args.quick_lora_steps)
    print(f"base {base}\nadapter {adapter}\neval records {len(records)} ({', '.join(args.tasks)})")
    timings = {}
    plan, info = steps.plan_export(cfg.home, base, adapter, cfg.quantize, samples)
    for name in plan.variants:
        started = time.perf_counter()
        steps.build_variant(plan, name, cfg.quantize, samples, info)
        timings[f"build {name}"] = round(time.perf_counter() - started, 1)
        print(f"built {name} in {timings[f'build {name}']}s", flush=True)
    rows = []
    for name in plan.variants:
        started = time.perf_counter()
        rows.append(steps.measure_variant(plan, name, cfg.quantize, cfg.evaluate, records))
        timings[f"measure {name}"] = round(time.perf_counter() - started, 1)
        print(f"measured {name} in {timings[f'measure {name}']}s", flush=True)
    summary = steps.write_report(plan, rows, cfg.quantize)
    print(summary["markdown"])
    print(json.dumps(timings, indent=1))
    fp32 = next(r["ir_bytes"] for r in rows if r["variant"] == "fp32_ir")
    for r in rows:
        if r.get("ir_bytes"):
            print(f"{r['variant']:>10}: {r['ir_bytes'] / 1e6:7.1f} MB = {100 * r['ir_bytes'] / fp32:5.1f}% of fp32; "
                  f"chat answer: {r.get('chat_answer', '')[:60]!r}")
    print(f"selected: {summary['selected']} -> {summary['selected_path']}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
