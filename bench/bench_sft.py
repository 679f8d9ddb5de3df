"""SFT throughput and quality: the default before this round's changes vs the current default, side by side.

    .venv/bin/python bench/bench_sft.py                        # SmolLM2-135M, 40 steps x 8 per variant
    .venv/bin/python bench/bench_sft.py --steps 4 --eval-per-task 4 -c tiny   # the tiny test model (seconds)

Every variant trains the same records (the preset's task mix, a seeded sample) for the same number
of optimiser steps, each in its own ``python -m tasks.sft.train`` process, in one run on one machine;
then each adapter is scored on the same validation examples (OpenVINO, runtime LoRA). Variants:

``before``   the previous default: 1 thread, LoRA dropout 0.05, fp32, long system prompts and
             instructions, entities as a JSON list (prompts frozen below as ``V1_TEMPLATES``)
``after``    the current preset's ``sft`` section and templates (threads = physical cores, no
             dropout, bf16 where native, short prompts, ``- text (type)`` entity lines)
``+packing`` ``after`` with sequence packing (to decide the packing default by measurement)
``after-1t`` ``after`` on one thread (how much of the gain is threads vs tokens)

samples/s = training examples per second of training (the first step, with its allocations,
included); the ratio column compares each variant with ``before``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

V1_NER_FORMAT = ('as a JSON list of objects with keys "text" and "type" (PER, ORG, LOC or MISC), '
                 "in order of appearance. Answer [] if there are none.")
V1_TEMPLATES = {  # the templates of the previous default, frozen here as the "before" reference
    "sentiment": ("You are a careful text classifier. Answer with exactly one word: positive or negative.", [
        "Is the sentiment of this movie review positive or negative?\n\nReview: {input}",
        "Classify the sentiment of the following text as positive or negative.\n\nText: {input}",
        "Read the review and say whether the reviewer's opinion is positive or negative.\n\n{input}",
        "Sentiment (positive or negative) of this sentence?\n\n{input}"]),
    "ner": ("You extract named entities and answer with JSON only.", [
        "List the named entities in the text " + V1_NER_FORMAT + "\n\nText: {input}",
        "Find every person (PER), organisation (ORG), location (LOC) and other named entity (MISC) in "
        "this sentence. Output them " + V1_NER_FORMAT + "\n\n{input}",
        "Extract the named entities from the sentence below " + V1_NER_FORMAT + "\n\nSentence: {input}"]),
    "summarization": ("You write short, faithful summaries.", [
        "Summarize the following conversation in one or two sentences.\n\n{input}",
        "Write a brief summary of this dialogue.\n\n{input}",
        "What happens in this conversation? Answer with a short summary.\n\n{input}"]),
}
V1_SFT = {"cpu_threads": 1, "lora_dropout": 0.05, "precision": "32-true", "packing": False}


def render_v1(records: list[dict], tokenizer) -> list[dict]:
    """The records as the previous default rendered them (long prompts, JSON entity lists)."""
    from tasks.data.records import stable_unit
    from tasks.parsing import coerce_label

    out = []
    for record in records:
        if record["task"] not in V1_TEMPLATES:  # a task the previous default did not have: as rendered today
            out.append(record)
            continue
        system, instructions = V1_TEMPLATES[record["task"]]
        index = int(stable_unit("template", 0, record["id"]) * len(instructions))
        label = coerce_label(record["task"], record["label"])
        completion = json.dumps(label, ensure_ascii=False) if isinstance(label, list) else str(label)
        messages = [{"role": "system", "content": system},
                    {"role": "user", "content": instructions[index].replace("{input}", record["input"])}]
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out.append({**record, "prompt": prompt, "completion": completion})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-c", "--config", default="pipeline", help="config preset (pipeline or tiny)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-per-task", type=int, default=100, help="validation examples per task per variant")
    parser.add_argument("--variants", default="before,after,+packing,after-1t")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sft.lora_r=16")
    args = parser.parse_intermixed_args()

    from configs.schema import load
    from tasks.data import load_curated
    from tasks.evaluate import evaluate_model
    from tasks.models import import_model, load_tokenizer
    from tasks.sft.data import select_records
    from tasks.sft.train import TrainSpec, cpu_threads, resolve_precision, run_training, write_records

    cfg = load(args.config, [f"sft.max_steps={args.steps}", f"sft.batch_size={args.batch_size}",
                             f"sft.checkpoint_every_n_steps={args.steps}", "sft.curve_points=0", *args.overrides])
    manifest = import_model(cfg.model.base, cfg.home, cfg.model)
    model_dir = Path(manifest["path"])
    tokenizer = load_tokenizer(model_dir)
    data = load_curated(cfg.home)
    records = select_records(data["train"], cfg.sft.tasks, cfg.sft.max_train_samples_per_task, cfg.sft.seed)
    random.Random(0).shuffle(records)
    records = records[: args.steps * args.batch_size]
    validation = select_records(data["validation"], cfg.sft.tasks)
    eval_cfg = cfg.evaluate.model_copy(update={"max_samples_per_task": args.eval_per_task})
    load_before = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        for variant in args.variants.split(","):
            v1 = variant == "before"
            sft = cfg.sft.model_copy(update={
                **(V1_SFT if v1 else {}), **({"packing": True} if variant == "+packing" else {}),
                **({"cpu_threads": 1} if variant == "after-1t" else {})})
            train = render_v1(records, tokenizer) if v1 else records
            run_dir = Path(tmp) / variant
            write_records(train, run_dir / "train.jsonl")
            spec = TrainSpec(run_dir=str(run_dir), model_dir=str(model_dir), sft=sft.model_dump(mode="json"),
                             max_seq_len=cfg.model.max_seq_len, records_path=str(run_dir / "train.jsonl"),
                             progress_bar=False)
            summary = run_training(spec, subprocess_mode=True)
            val = render_v1(validation, tokenizer) if v1 else validation
            scored = evaluate_model(model_dir, eval_cfg, run_dir / "eval", records=val,
                                    adapter_dir=summary["adapter_dir"], max_length=cfg.model.max_seq_len)
            tokens = sum(len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) + 1
                         for r in train) / len(train)
            rows.append({"variant": variant, "threads": cpu_threads(sft), "precision": resolve_precision(sft),
                         "packing": sft.packing, "dropout": sft.lora_dropout, "tokens_per_example": round(tokens, 1),
                         "samples_per_s": round(args.steps * args.batch_size / summary["train_seconds"], 3),
                         "tokens_per_s": summary["tokens_per_s"], "train_seconds": summary["train_seconds"],
                         "final_loss": summary["final_loss"], "metrics": scored["metrics"]})
            shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
            print(json.dumps(rows[-1]), flush=True)
    _print_table(rows, cfg, args, load_before)


def _print_table(rows: list[dict], cfg, args, load_before: float) -> None:
    from configs.tasks import get_task

    base = next((r for r in rows if r["variant"] == "before"), rows[0])
    tasks = [t for t in (cfg.sft.tasks or []) if f"n_{t}" in base["metrics"]] or sorted(
        k.removeprefix("n_") for k, v in base["metrics"].items() if k.startswith("n_") and k != "n_examples" and v)
    metrics = [get_task(t).headline_metric for t in tasks]
    print(f"\nmodel {cfg.model.base}, {args.steps} steps x {args.batch_size} examples of {', '.join(tasks)}, "
          f"{os.cpu_count()} CPUs, load average before/after {load_before:.1f} / {os.getloadavg()[0]:.1f}; "
          f"metrics on {args.eval_per_task} validation examples per task")
    head = ["variant", "threads", "precision", "packing", "tokens/example", "samples/s", "vs before", "tokens/s",
            *metrics, "format"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["variant"], r["threads"], r["precision"], r["packing"], r["tokens_per_example"],
                 f"{r['samples_per_s']:.2f}", f"{r['samples_per_s'] / base['samples_per_s']:.2f}x",
                 f"{r['tokens_per_s']:.0f}", *[f"{r['metrics'].get(m, float('nan')):.3f}" for m in metrics],
                 f"{r['metrics'].get('format_compliance', float('nan')):.3f}"]
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print("\n(before: entities answered as JSON lists, so its format column counts JSON as not obeying the "
          "current format; its task metrics parse the JSON)")


if __name__ == "__main__":
    main()
