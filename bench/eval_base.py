"""Evaluate an imported model (default: SmolLM2-135M base, no adapter) on curated validation data.

    LMFORGE_HOME=.lmforge .venv/bin/python bench/eval_base.py --per-task 16 --batch-size 8

Prints the metrics, generation throughput, and the first outputs per task. This is the
reference the SFT/alignment/quantisation stages should beat (or stay close to).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from configs.schema import EvaluateConfig
from tasks.data import load_curated
from tasks.evaluate import evaluate_records, hf_generator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("LMFORGE_HOME", ".lmforge"))
    parser.add_argument("--model", default="smollm2-135m", help="store name under <home>/models")
    parser.add_argument("--adapter", default=None, help="PEFT adapter directory")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--per-task", type=int, default=16)
    parser.add_argument("--tasks", nargs="*", default=None, help="only these tasks (default: all)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--show", type=int, default=2, help="outputs shown per task")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (1 is faster on a busy machine)")
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)

    home = Path(args.home)
    records = load_curated(home)[args.split]
    if args.tasks:
        records = [r for r in records if r["task"] in args.tasks]
    cfg = EvaluateConfig(max_samples_per_task=args.per_task, batch_size=args.batch_size,
                         max_new_tokens=args.max_new_tokens)
    generator = hf_generator(home / "models" / args.model, args.adapter, cfg.max_new_tokens, cfg.batch_size)

    counted = _CountingGenerator(generator)
    started = time.perf_counter()
    result = evaluate_records(records, counted, cfg, perplexity_model=generator)
    elapsed = time.perf_counter() - started

    print(f"model {args.model} adapter {args.adapter} split {args.split}: {result.metrics['n_examples']} examples")
    for key, value in result.metrics.items():
        print(f"  {key:28s} {value:.4f}" if isinstance(value, float) else f"  {key:28s} {value}")
    print(f"generation: {counted.new_tokens} new tokens in {counted.seconds:.1f}s "
          f"({counted.new_tokens / max(counted.seconds, 1e-9):.1f} tok/s, batch {cfg.batch_size}); "
          f"total {elapsed:.1f}s")
    shown: dict[str, int] = {}
    for row in result.table:
        if shown.get(row["task"], 0) < args.show:
            shown[row["task"]] = shown.get(row["task"], 0) + 1
            print(f"[{row['task']}] label={json.dumps(row['label'], ensure_ascii=False)[:80]} "
                  f"output={row['output'][:120]!r} ok={row['format_ok']} score={row['score']:.2f}")


class _CountingGenerator:
    """Wraps a generator to count new tokens and time spent generating."""

    def __init__(self, generator):
        self.generator = generator
        self.new_tokens = 0
        self.seconds = 0.0

    def __call__(self, prompts: list[str]) -> list[str]:
        started = time.perf_counter()
        outputs = self.generator(prompts)
        self.seconds += time.perf_counter() - started
        tokenizer = self.generator.tokenizer
        self.new_tokens += sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) + 1 for o in outputs)
        return outputs


if __name__ == "__main__":
    main()
