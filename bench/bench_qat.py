"""Does QAT pay for itself? NNCF quantisation-aware fine-tuning vs PTQ, within a fixed time budget.

    .venv/bin/python bench/bench_qat.py --export /tmp/fresh-q/.lmforge/exports/fe19b3707c5d \\
        --bits 4 --steps 7 --lr 1e-3 --loss distill --out /tmp/qat.json
    .venv/bin/python bench/bench_qat.py --export DIR --steps 2 --no-eval      # time a few steps only

Takes an existing export (``fp32_ir/``, the PTQ twin ``int4/`` or ``int8/``, and both evaluation
tables under ``eval/``), merges base + adapter in fp32, runs ``tasks.quantize.qat.run_qat`` (NNCF
FQ_LORA: fake-quantised weights with a small absorbable LoRA, trained to match fp32's logits or on
the answer tokens) on the curated training split sampled as the quantize stage does, exports the
stripped IR and scores it on exactly the validation examples the existing tables scored, so every
comparison is paired.

Printed per task: fp32, PTQ and QAT headline metric; PTQ's and QAT's loss vs fp32 in points (with
the paired 95% bootstrap interval); QAT - PTQ with its interval; and the recovered fraction
``(PTQ loss - QAT loss) / PTQ loss`` (torchao reports ~67% for its QAT recipe). QAT's wall time
(setup = model load + NNCF compression, training loop, IR export) is checked against --budget-min.

On this 2-core machine, shared (load ~5), one step of batch 4 took 50-110 s, NNCF's compression
with LoRA initialisation ~2 min and the IR export 1-1.5 min: 7 steps is what fits ~6 min of training.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--export", type=Path, required=True,
                        help="export dir with fp32_ir/, the PTQ twin (int4/ or int8/), eval/<variant>/eval_table.json "
                             "and export.json (base_dir, adapter_dir)")
    parser.add_argument("-c", "--config", default="pipeline", help="config preset the quantize settings come from")
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4,
                        help="4: group-wise INT4 (quantize.int4_group_size, asym unless quantize.int4_sym); "
                             "8: per-channel INT8. The PTQ twin is int4/ or int8/ accordingly")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default: quantize.qat_steps)")
    parser.add_argument("--lr", type=float, default=None,
                        help="LoRA learning rate; quantiser scales get lr/10 (default: quantize.qat_learning_rate)")
    parser.add_argument("--loss", choices=("distill", "task"), default=None,
                        help="distill: KL to the fp32 model's logits on every token; task: cross-entropy on the "
                             "answer tokens (default: quantize.qat_loss)")
    parser.add_argument("--group-size", type=int, default=None,
                        help="INT4 group size (default: quantize.int4_group_size; the PTQ twin used the export's)")
    parser.add_argument("--ratio", type=float, default=None,
                        help="share of layers in INT4; the rest INT8 (default: quantize.int4_ratio)")
    parser.add_argument("--train-samples", type=int, default=None,
                        help="training texts, sampled from the curated train split with quantize.seed "
                             "(default: quantize.calibration_samples, as the stage does)")
    parser.add_argument("--budget-min", type=float, default=8.0, help="QAT wall-time budget (merge excluded)")
    parser.add_argument("--eval-per-task", type=int, default=None,
                        help="score only the first N of each task's ids in eval/fp32_ir/eval_table.json "
                             "(default: all of them, i.e. the same examples as the existing tables)")
    parser.add_argument("--data-version", default=None,
                        help="curated data version (default: <export's home>/data/LATEST)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the merged model, QAT IR and its evaluation go (default: a new temp dir, kept)")
    parser.add_argument("--no-eval", action="store_true", help="train and export only (to time steps)")
    parser.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. quantize.qat_lora_rank=16")
    return parser.parse_intermixed_args()


# --------------------------------------------------------------------------- inputs
def qat_config(args: argparse.Namespace):
    """The preset with the command line's QAT settings applied (LoadedConfig: .quantize, .evaluate)."""
    from configs.schema import load

    pairs = {"qat_steps": args.steps, "qat_learning_rate": args.lr, "qat_loss": args.loss,
             "int4_group_size": args.group_size, "int4_ratio": args.ratio, "calibration_samples": args.train_samples}
    overrides = [f"quantize.{k}={v}" for k, v in pairs.items() if v is not None]
    return load(args.config, [*overrides, *args.overrides])


def load_table(export: Path, variant: str) -> list[dict[str, Any]]:
    path = export / "eval" / variant / "eval_table.json"
    if not path.is_file():
        raise SystemExit(f"{path} is missing: the export must have scored {variant} (lmforge quantize)")
    return json.loads(path.read_text(encoding="utf-8"))


def paired_records(validation: list[dict], reference: list[dict], per_task: int | None) -> list[dict]:
    """The validation records the reference table scored, in its order (evaluate_records keeps order),
    cut to ``per_task`` per task. A prompt that differs from the table's means the data was re-rendered
    since, and the comparison would not be paired: refuse."""
    by_id = {r["id"]: r for r in validation}
    picked, counts = [], {}
    for row in reference:
        if per_task is not None and counts.get(row["task"], 0) >= per_task:
            continue
        record = by_id.get(row["id"])
        if record is None or record["prompt"] != row["prompt"]:
            raise SystemExit(f"validation record {row['id']} is missing or re-rendered in this data version; "
                             "pass the --data-version the export was scored on")
        picked.append(record)
        counts[row["task"]] = counts.get(row["task"], 0) + 1
    return picked


def training_samples(home: Path, version: str | None, count: int, seed: int) -> list[tuple[str, str]]:
    """(prompt, completion) pairs picked exactly as build_variant picks them for qat_int4/qat_int8."""
    from tasks.quantize.steps import curated_inputs

    train, _ = curated_inputs(home, version)
    random.Random(seed).shuffle(train)
    return train[: max(count, 1)]


# --------------------------------------------------------------------------- QAT
class StepClock(logging.Handler):
    """Timestamps of run_qat's per-step log lines: the training loop's time without touching qat.py."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.times: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("qat step"):
            self.times.append(record.created)


def timed_qat(merged: Path, out_dir: Path, cfg, samples: list[tuple[str, str]], bits: int,
              tokenizer_ir: Path) -> dict[str, Any]:
    """run_qat plus a wall-clock split: setup (load, NNCF compression), training loop, export."""
    from tasks.quantize.qat import run_qat

    clock = StepClock()
    qat_log = logging.getLogger("tasks.quantize.qat")
    qat_log.addHandler(clock)
    started = time.time()
    try:
        facts = run_qat(merged, out_dir, cfg, samples, bits, tokenizer_ir_from=tokenizer_ir)
    finally:
        qat_log.removeHandler(clock)
    wall = time.time() - started
    gaps = [b - a for a, b in zip(clock.times, clock.times[1:])]
    step_s = statistics.median(gaps) if gaps else None
    # The first step's start is not logged: count it as a median step (its extra warm-up lands in setup).
    train = (clock.times[-1] - clock.times[0] + step_s) if step_s else None
    export = facts.get("export_seconds")
    setup = wall - train - (export or 0) if train else None
    return {**facts, "wall_seconds": round(wall, 1), "train_seconds": round(train, 1) if train else None,
            "step_seconds_median": round(step_s, 2) if step_s else None,
            "step_seconds_max": round(max(gaps), 2) if gaps else None,
            "setup_seconds": round(setup, 1) if setup is not None else None}


# --------------------------------------------------------------------------- comparison
def compare(fp32: list[dict], ptq: list[dict], qat: list[dict]) -> dict[str, dict[str, Any]]:
    """Per task: the three metrics, each quantised model's loss vs fp32 (points, 95% paired interval),
    QAT - PTQ with its interval and the recovered share of PTQ's loss."""
    from tasks.stats import compare_tables

    ids = {r["id"] for r in qat}
    fp32, ptq = [r for r in fp32 if r["id"] in ids], [r for r in ptq if r["id"] in ids]
    vs_ptq, vs_qat, qat_minus_ptq = compare_tables(fp32, ptq), compare_tables(fp32, qat), compare_tables(ptq, qat)
    out = {}
    for task, q in vs_qat.items():
        p, d = vs_ptq[task], qat_minus_ptq[task]
        ptq_loss, qat_loss = -p.difference, -q.difference
        out[task] = {
            "metric": q.metric, "n": q.n, "fp32": q.reference, "ptq": p.candidate, "qat": q.candidate,
            "ptq_loss": ptq_loss, "ptq_loss_ci": [-p.high, -p.low],
            "qat_loss": qat_loss, "qat_loss_ci": [-q.high, -q.low],
            "qat_minus_ptq": d.difference, "qat_minus_ptq_ci": [d.low, d.high],
            # Undefined when PTQ lost nothing: there is nothing to recover.
            "recovered": round((ptq_loss - qat_loss) / ptq_loss, 3) if ptq_loss > 0 else None,
        }
    return out


def _pm(value: float, ci: list[float]) -> str:
    return f"{value:+.1f} [{ci[0]:+.1f}, {ci[1]:+.1f}]"


def print_report(result: dict[str, Any]) -> None:
    qat, tasks, s = result["qat"], result["tasks"], result["settings"]
    print(f"\nQAT INT{result['bits']} ({qat['method']}, {qat['steps']} steps x batch {s['qat_batch_size']}, "
          f"lr {s['qat_learning_rate']:g}, group {qat.get('group_size')}, rank {qat['lora_rank']}, "
          f"{qat['train_samples']} training texts) vs PTQ `{result['ptq_variant']}` of export {result['export']}")
    if tasks:
        head = ["task", "metric", "n", "fp32", "PTQ", "QAT", "PTQ loss [95%]", "QAT loss [95%]", "QAT - PTQ [95%]",
                "recovered"]
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for task, t in tasks.items():
            rec = f"{100 * t['recovered'] + 0:.0f}%" if t["recovered"] is not None else "n/a (PTQ lost nothing)"
            cells = [task, t["metric"], t["n"], f"{t['fp32']:.3f}", f"{t['ptq']:.3f}", f"{t['qat']:.3f}",
                     _pm(t["ptq_loss"], t["ptq_loss_ci"]), _pm(t["qat_loss"], t["qat_loss_ci"]),
                     _pm(t["qat_minus_ptq"], t["qat_minus_ptq_ci"]), rec]
            print("| " + " | ".join(str(c) for c in cells) + " |")
        if result.get("recovered_overall") is not None:
            print(f"\nrecovered, pooled over tasks (loss points summed): {100 * result['recovered_overall']:.0f}%")
    budget, wall = result["budget_seconds"], qat["wall_seconds"]
    print(f"QAT wall {wall:.0f} s = setup {qat.get('setup_seconds')} + training {qat.get('train_seconds')} "
          f"({qat.get('step_seconds_median')} s/step median, max {qat.get('step_seconds_max')}) + export "
          f"{qat.get('export_seconds')}; budget {budget:.0f} s: {'within' if wall <= budget else 'OVER'}")
    print(f"merge {result['merge_seconds']:.0f} s (not counted: the stage merges for fp32_ir anyway); "
          f"training loss {qat['loss_first']:.4f} -> {qat['loss_last']:.4f}; evaluation {result['eval_seconds']} s")
    print(f"load average before/after: {result['load_before']:.1f} / {result['load_after']:.1f} "
          f"on {os.cpu_count()} CPUs (the machine is shared)")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("nncf", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    cfg = qat_config(args)
    q = cfg.quantize
    export = args.export.resolve()
    meta = json.loads((export / "export.json").read_text(encoding="utf-8"))
    home = export.parents[1]  # <home>/exports/<id>
    ptq_variant = "int4" if args.bits == 4 else "int8"
    fp32_table, ptq_table = load_table(export, "fp32_ir"), load_table(export, ptq_variant)
    from tasks.quantize.steps import curated_inputs

    _, validation = curated_inputs(home, args.data_version)
    records = paired_records(validation, fp32_table, args.eval_per_task)
    samples = training_samples(home, args.data_version, q.calibration_samples, q.seed)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-qat-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work dir {work}; {len(samples)} training texts; {len(records)} paired validation records", flush=True)

    from tasks.quantize.merge import merge_adapter

    load_before = os.getloadavg()[0]
    started = time.time()
    merged = work / "merged_fp32"
    if not (merged / "config.json").is_file():
        merge_adapter(Path(meta["base_dir"]), Path(meta["adapter_dir"]), merged, "float32")
    merge_seconds = time.time() - started
    ir = work / f"qat_int{args.bits}"
    if ir.exists():
        raise SystemExit(f"{ir} exists: pass a fresh --work")
    ir.mkdir()
    facts = timed_qat(merged, ir, q, samples, args.bits, export / "fp32_ir")
    print(json.dumps({k: v for k, v in facts.items() if k != "loss_curve"}), flush=True)

    tasks: dict[str, Any] = {}
    eval_seconds = None
    if not args.no_eval:
        from tasks.quantize.report import evaluate_variant

        counts = {t: sum(r["task"] == t for r in records) for t in {r["task"] for r in records}}
        eval_cfg = cfg.evaluate.model_copy(update={"max_samples_per_task": max(counts.values())})
        started = time.time()
        evaluation = evaluate_variant(ir, records, eval_cfg, work / "eval" / ir.name)
        eval_seconds = round(time.time() - started, 1)
        qat_table = json.loads(Path(evaluation["table_json"]).read_text(encoding="utf-8"))
        tasks = compare(fp32_table, ptq_table, qat_table)
    lost = sum(t["ptq_loss"] for t in tasks.values())
    result = {
        "export": meta.get("export_id", export.name), "bits": args.bits, "ptq_variant": ptq_variant,
        "settings": {k: getattr(q, k) for k in ("qat_steps", "qat_learning_rate", "qat_loss", "qat_lora_rank",
                                                "qat_batch_size", "qat_max_seq_len", "int4_group_size", "int4_ratio",
                                                "int4_sym", "calibration_samples", "seed")},
        "qat": facts, "merge_seconds": round(merge_seconds, 1), "eval_seconds": eval_seconds,
        "budget_seconds": 60 * args.budget_min, "within_budget": facts["wall_seconds"] <= 60 * args.budget_min,
        "tasks": tasks, "qat_ir": str(ir),
        "recovered_overall": round((lost - sum(t["qat_loss"] for t in tasks.values())) / lost, 3) if lost > 0 else None,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    print_report(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
