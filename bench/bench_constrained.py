"""Constrained vs free decoding of the label and entity tasks, on the validation split, paired per example.

    .venv/bin/python bench/bench_constrained.py                       # the served champion's IR (registry)
    .venv/bin/python bench/bench_constrained.py --ir .lmforge/exports/<id>/int8 --per-task 300

The same OpenVINO IR answers the same validation examples twice: freely, and constrained to the task's
answer format (``tasks.parsing.answer_pattern``, what the gateway's JSON-RPC methods apply with
``serve.constrain_tasks``). Prints, per task, the headline metric and format compliance of each, the
paired difference with its 95% bootstrap interval, and the wall time; ``serve.constrain_tasks`` and
``evaluate.constrained`` should follow what wins.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs.schema import EvaluateConfig  # noqa: E402
from configs.tasks import get_task, structured_tasks  # noqa: E402
from tasks.evaluate import OpenVINOGenerator, evaluate_records  # noqa: E402
from tasks.stats import compare_tables  # noqa: E402


def champion_ir(home: Path) -> Path:
    """The OpenVINO IR the registry's champion alias serves (downloaded by the gateway's resolver)."""
    from configs.schema import load
    from serving.registry import resolve_model_dir

    cfg = load("pipeline", [f"home={home}"])
    path, _ = resolve_model_dir(f"models:/{cfg.registry.model_name}@champion", cfg.tracking_uri(),
                                home / "cache" / "bench-models")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--home", default=os.environ.get("LMFORGE_HOME", ".lmforge"))
    parser.add_argument("--ir", default=None, help="OpenVINO IR directory (default: the registry's champion)")
    parser.add_argument("--per-task", type=int, default=300, help="validation examples per task")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    from tasks.data import load_curated

    home = Path(args.home)
    ir = Path(args.ir) if args.ir else champion_ir(home)
    tasks = structured_tasks()
    records = [r for r in load_curated(home)["validation"] if r["task"] in tasks]
    generator = OpenVINOGenerator(ir, batch_size=args.batch_size)
    results = {}
    for constrained in (False, True):
        cfg = EvaluateConfig(engine="openvino", max_samples_per_task=args.per_task, batch_size=args.batch_size,
                             constrained=constrained)
        results[constrained] = evaluate_records(records, generator, cfg)
    free, constrained = results[False], results[True]
    diffs = compare_tables(free.table, constrained.table)
    print(f"IR {ir}: {free.metrics['n_examples']} validation examples, free vs constrained decoding\n")
    print("| task | metric | free | constrained | difference (95% CI), points | compliance free -> constrained |")
    print("|---|---|---|---|---|---|")
    for task in tasks:
        if task not in diffs:
            continue
        d, metric = diffs[task], get_task(task).headline_metric
        compliance = f"format_compliance_{task}"
        print(f"| {task} (n={d.n}) | {metric} | {free.metrics[metric]:.3f} | {constrained.metrics[metric]:.3f} | "
              f"{d.difference:+.1f} ({d.low:+.1f}, {d.high:+.1f}) | "
              f"{free.metrics[compliance]:.3f} -> {constrained.metrics[compliance]:.3f} |")
    print(f"\nwall: free {free.metrics['eval_seconds']:.0f} s, constrained {constrained.metrics['eval_seconds']:.0f} s")


if __name__ == "__main__":
    main()
