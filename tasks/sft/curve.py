"""Learning curves: validation metrics of the adapter snapshots vs optimiser step and training time.

Training saves the adapter at evenly spaced steps (:class:`tasks.sft.module.AdapterSnapshots`).
After training, every snapshot is scored on the same first ``curve_samples_per_task`` validation
examples per task; the base model (step 0) and the final adapter are read off their full evaluations
restricted to those examples, so every point of the curve is scored on the same examples.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.schema import EvaluateConfig
from configs.tasks import get_task
from tasks.evaluate import aggregate, evaluate_model
from tasks.files import atomic_save_figure, atomic_write_text

log = logging.getLogger(__name__)

CURVE_FILE = "curve.json"


def first_per_task(rows: Sequence[dict[str, Any]], per_task: int) -> list[dict[str, Any]]:
    """The first ``per_task`` rows of each task, in order."""
    counts: dict[str, int] = {}
    kept = []
    for row in rows:
        if counts.get(row["task"], 0) < per_task:
            counts[row["task"]] = counts.get(row["task"], 0) + 1
            kept.append(row)
    return kept


def score_curve(run_dir: Path, model_dir: Path, records: Sequence[dict[str, Any]], eval_cfg: EvaluateConfig,
                per_task: int, base_table: Sequence[dict] | None, final_table: Sequence[dict] | None,
                final_step: int, final_seconds: float, max_length: int) -> list[dict[str, Any]]:
    """Score every snapshot under ``<run_dir>/curve`` and assemble the curve (written to curve/curve.json).

    Returns:
        Points ``{"step", "train_seconds", "metrics"}`` ordered by step: the base model at step 0 (when
        ``base_table`` is given), each snapshot, and the final adapter (when ``final_table`` is given).
    """
    run_dir = Path(run_dir)
    index = run_dir / "curve" / CURVE_FILE
    snapshots = json.loads(index.read_text())["points"] if index.is_file() else []
    subset = first_per_task(records, per_task)
    settings = eval_cfg.model_copy(update={"max_samples_per_task": per_task})
    points: list[dict[str, Any]] = []
    if base_table is not None:
        points.append({"step": 0, "train_seconds": 0.0, "metrics": _restricted(base_table, subset)})
    for snap in snapshots:
        if snap["step"] >= final_step:
            continue
        out = evaluate_model(model_dir, settings, Path(snap["adapter_dir"]) / "eval", records=subset,
                             adapter_dir=snap["adapter_dir"], max_length=max_length)
        points.append({"step": snap["step"], "train_seconds": snap["train_seconds"], "metrics": out["metrics"]})
        log.info("learning curve: step %d scored", snap["step"])
    if final_table is not None:
        points.append({"step": final_step, "train_seconds": round(final_seconds, 2),
                       "metrics": _restricted(final_table, subset)})
    atomic_write_text(run_dir / "curve" / "points.json", json.dumps(points, indent=1))
    return points


def _restricted(table: Sequence[dict[str, Any]], subset: Sequence[dict[str, Any]]) -> dict[str, float]:
    ids = {r["id"] for r in subset}
    return aggregate([row for row in table if row["id"] in ids])


def headline(points: Sequence[dict[str, Any]]) -> list[str]:
    """The headline metric of every task the curve scored, plus per-task format compliance."""
    names: list[str] = []
    for point in points[:1]:
        tasks = [k.removeprefix("n_") for k, v in point["metrics"].items() if k.startswith("n_") and k != "n_examples"
                 and v]
        for task in tasks:
            names.append(get_task(task).headline_metric)
    return names


def plot_curve(points: Sequence[dict[str, Any]], out_png: Path) -> Path:
    """PNG: each task's headline metric vs optimiser step (left) and vs training seconds (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = headline(points)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name in names:
        xs = [(p["step"], p["train_seconds"], p["metrics"].get(name))
              for p in points if p["metrics"].get(name) is not None]
        axes[0].plot([x[0] for x in xs], [x[2] for x in xs], marker="o", label=name)
        axes[1].plot([x[1] for x in xs], [x[2] for x in xs], marker="o", label=name)
    axes[0].set_xlabel("optimiser step")
    axes[1].set_xlabel("training seconds")
    axes[0].set_ylabel("validation metric")
    axes[0].set_ylim(0, 1)
    axes[0].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("SFT learning curve (validation)")
    fig.tight_layout()
    return atomic_save_figure(fig, out_png, dpi=110)


def curve_markdown(points: Sequence[dict[str, Any]]) -> str:
    """The curve as a markdown table (step, seconds, headline metrics)."""
    names = headline(points)
    lines = ["| step | train s | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
    for p in points:
        cells = [f"{p['metrics'][n]:.3f}" if isinstance(p["metrics"].get(n), (int, float)) else "-" for n in names]
        lines.append(f"| {p['step']} | {p['train_seconds']:.0f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
