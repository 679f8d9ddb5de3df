"""QLoRA vs plain LoRA on the same SFT config: tokens/s, peak RSS and weight footprint.

    .venv/bin/python bench/bench_sft.py                     # SmolLM2-135M, 12 steps each
    .venv/bin/python bench/bench_sft.py --steps 4 tiny      # the tiny test model (seconds)
    .venv/bin/python bench/bench_sft.py pipeline sft.cpu_threads=2   # any config override

Each method trains in its own ``python -m tasks.sft.train`` process so peak RSS is per method.
Records: the curated train split (sentiment) when one exists under LMFORGE_HOME, else SST-2 rows
from data/raw rendered with the model's chat template. The first step is excluded from tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))


def _records(home: Path, tokenizer, n: int) -> tuple[list[dict], str]:
    try:
        from tasks.data import load_curated
        from tasks.sft.data import select_records

        train = load_curated(home)["train"]
        return select_records(train, ["sentiment"], n, seed=0), "curated"
    except Exception:  # noqa: BLE001 - no curated data yet: fall back to the raw sample
        from sft_helpers import sst2_records

        return sst2_records(tokenizer, n), "data/raw/sst2"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("preset", nargs="?", default="pipeline", help="config preset (pipeline or tiny)")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--methods", default="qlora,lora")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. sft.cpu_threads=1")
    args = parser.parse_intermixed_args()

    from configs.schema import load
    from tasks.models import import_model, load_tokenizer
    from tasks.sft.train import TrainSpec, run_training, write_records

    cfg = load(args.preset, [f"sft.max_steps={args.steps}", f"sft.batch_size={args.batch_size}",
                             f"sft.checkpoint_every_n_steps={args.steps}", *args.overrides])
    manifest = import_model(cfg.model.base, cfg.home, cfg.model)
    tokenizer = load_tokenizer(Path(manifest["path"]))
    records, source = _records(cfg.home, tokenizer, args.steps * args.batch_size * 2)
    rows = []
    load_before = f"{os.getloadavg()[0]:.1f}"  # this box is shared: say how busy it was
    with tempfile.TemporaryDirectory(prefix="bench-sft-") as tmp:
        write_records(records, Path(tmp) / "train.jsonl")
        for method in args.methods.split(","):
            sft = cfg.sft.model_copy(update={"method": method})
            spec = TrainSpec(run_dir=str(Path(tmp) / method), model_dir=manifest["path"],
                             sft=sft.model_dump(mode="json"), max_seq_len=cfg.model.max_seq_len,
                             records_path=str(Path(tmp) / "train.jsonl"), progress_bar=False)
            started = time.perf_counter()
            summary = run_training(spec, subprocess_mode=True)
            rows.append({"method": method, "wall_s": round(time.perf_counter() - started, 1), **summary})
            shutil.rmtree(Path(tmp) / method / "checkpoints", ignore_errors=True)

    print(f"\nmodel {cfg.model.base}, {args.steps} steps x batch {args.batch_size}, records from {source}, "
          f"{os.cpu_count()} CPUs, torch threads per trainer {rows[0]['cpu_threads']}, "
          f"load average before/after {load_before} / {os.getloadavg()[0]:.1f}")
    print(f"{'method':8} {'tokens/s':>9} {'peak RSS MB':>12} {'weights MB':>11} {'train s':>8} {'wall s':>7} "
          f"{'final loss':>10}")
    for r in rows:
        print(f"{r['method']:8} {r['tokens_per_s']:9.1f} {r['peak_rss_mb']:12.0f} {r['model_footprint_mb']:11.0f} "
              f"{r['train_seconds']:8.1f} {r['wall_s']:7.1f} {r['final_loss']:10.4f}")
    if len(rows) == 2:
        q, l = rows
        print(f"\nratio {q['method']}/{l['method']}: peak RSS {q['peak_rss_mb'] / l['peak_rss_mb']:.2f}, "
              f"weights {q['model_footprint_mb'] / l['model_footprint_mb']:.2f}, "
              f"tokens/s {q['tokens_per_s'] / l['tokens_per_s']:.2f}")
        print("(reference from the seeds: 24 GB -> 7.2 GB = 0.30 for QLoRA on a 6B model, where weights dominate;"
              " at 135M the fp32 embeddings and activations dominate instead)")
    print(json.dumps([{k: r[k] for k in ("method", "tokens_per_s", "peak_rss_mb", "model_footprint_mb",
                                          "train_seconds")} for r in rows]))


if __name__ == "__main__":
    main()
