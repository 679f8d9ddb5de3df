"""Seconds per GRPO step of each alignment stage on SmolLM2-135M (or the tiny model), to size the
``align`` preset so the whole stage (training + before/after evaluation) fits its time budget.

    LMFORGE_HOME=.lmforge .venv/bin/python bench/bench_align.py                  # qlora, 3 steps/stage
    LMFORGE_HOME=.lmforge .venv/bin/python bench/bench_align.py --steps 2 --threads 2 align.batch_size=2

Starts from ``--adapter`` (default: the newest SFT run's adapter, else a fresh LoRA adapter) with
the preset's ``align`` section and overrides, on the curated train split. Prints, per stage, the
mean seconds per step (first step excluded when there are more than one), completion length,
reward means and peak RSS; then a projection for the configured ``max_steps``.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _fresh_adapter(model_dir: Path, target: Path, sft) -> Path:
    from peft import LoraConfig, get_peft_model

    from tasks.models import load_model, load_tokenizer

    model = get_peft_model(load_model(model_dir), LoraConfig(
        r=sft.lora_r, lora_alpha=sft.lora_alpha, target_modules=list(sft.target_modules), task_type="CAUSAL_LM"))
    model.save_pretrained(str(target))
    load_tokenizer(model_dir).save_pretrained(str(target))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. align.batch_size=2")
    parser.add_argument("--config", default="pipeline")
    parser.add_argument("--steps", type=int, default=3, help="steps measured per stage")
    parser.add_argument("--adapter", type=Path, default=None)
    parser.add_argument("--method", default=None, help="qlora | lora (default: sft.method)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()

    import torch

    from configs.schema import load
    from tasks.align.data import prompt_rows, stage_tasks
    from tasks.align.run import resolve_sft
    from tasks.align.trainer import run_stage
    from tasks.data import load_curated
    from tasks.models import import_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load(args.config, args.overrides)
    model_dir = Path(import_model(cfg.model.base, cfg.home, cfg.model)["path"])
    method = args.method or cfg.sft.method
    train = load_curated(cfg.home)["train"]
    with tempfile.TemporaryDirectory(prefix="bench-align-") as tmp:
        adapter = args.adapter
        if adapter is None:
            try:
                adapter = Path(resolve_sft(cfg.home)["adapter_dir"])
            except Exception:  # noqa: BLE001 - no SFT run yet: time a fresh adapter of the same shape
                adapter = _fresh_adapter(model_dir, Path(tmp) / "fresh", cfg.sft)
        print(f"model {cfg.model.base} ({method}), adapter {adapter}, torch threads {torch.get_num_threads()}")
        print(f"align: batch {cfg.align.batch_size} prompts x {cfg.align.num_generations} generations, "
              f"max_completion_length {cfg.align.max_completion_length}, kl_beta {cfg.align.kl_beta}")
        projected = 0.0
        for index, stage in enumerate(cfg.align.stages):
            measured = stage.model_copy(update={"max_steps": args.steps})
            rows = prompt_rows(train, stage_tasks(stage), limit=args.steps * cfg.align.batch_size, seed=index)
            started = time.perf_counter()
            summary = run_stage(model_dir, adapter, Path(tmp) / f"s{index}" / "adapter", rows, cfg.align, measured,
                                method, stage_index=index)
            wall = time.perf_counter() - started
            steps = [h for h in summary["history"] if "step_time" in h]
            times = [h["step_time"] for h in steps]
            per_step = statistics.mean(times[1:] if len(times) > 1 else times)
            projected += per_step * stage.max_steps
            rewards = {k.split("/")[1]: round(statistics.mean(h[k] for h in steps if h.get(k) is not None), 3)
                       for k in steps[0] if k.startswith("rewards/") and k.endswith("/mean")}
            print(f"stage {stage.name}: {per_step:.1f} s/step (steps {', '.join(f'{t:.1f}' for t in times)}; "
                  f"wall {wall:.0f}s incl. load), completion length "
                  f"{statistics.mean(h['completions/mean_length'] for h in steps):.1f}, rewards {rewards}, "
                  f"tasks {', '.join(stage_tasks(stage))}")
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"peak RSS {rss:.0f} MB; projected training time for the configured steps "
              f"({', '.join(f'{s.name}={s.max_steps}' for s in cfg.align.stages)}): {projected / 60:.1f} min")


if __name__ == "__main__":
    main()
