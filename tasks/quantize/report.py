"""Compare exported variants (size, memory, speed, task metrics), pick one by policy, render the report."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from configs.schema import EvaluateConfig, QuantizeConfig
from tasks.files import atomic_save_figure
from tasks.quantize.variants import IR_VARIANTS, ir_size_bytes, read_variant

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- measuring
def probe_variant(ir_dir: Path, cfg: QuantizeConfig, adapter: Path | None = None,
                  timeout_s: float = 900) -> dict[str, Any]:
    """Peak RSS, load time, a chat answer, tokens/s and single-request latency (P50/P95) of one IR,
    measured in a fresh subprocess."""
    command = [sys.executable, "-m", "tasks.quantize.probe", str(ir_dir),
               "--max-new-tokens", str(cfg.bench_max_new_tokens), "--cache-gb", str(cfg.bench_cache_gb),
               "--latency-requests", str(cfg.bench_latency_requests), "--concurrency", *map(str, cfg.bench_concurrency)]
    if adapter:
        command += ["--adapter", str(adapter)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=str(REPO_ROOT))
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise RuntimeError(f"probing {ir_dir} failed (exit {done.returncode}):\n{tail}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def evaluate_variant(ir_dir: Path, records: Sequence[dict], eval_cfg: EvaluateConfig, out_dir: Path,
                     adapter: Path | None = None) -> dict[str, Any]:
    """Score one IR variant on ``records`` (tasks.evaluate) and keep its per-example table in ``out_dir``.

    Returns ``{"metrics": ..., "table_json": path}``: the table is what paired comparisons need.
    """
    from tasks.evaluate import evaluate_records, write_results
    from tasks.generators import OpenVINOGenerator

    generate = OpenVINOGenerator.for_evaluation(ir_dir, eval_cfg, adapter)
    result = evaluate_records(list(records), generate, eval_cfg)
    paths = write_results(result, out_dir)
    return {"metrics": dict(result.metrics), "table_json": paths["table_json"]}


def variant_row(variant_dir: Path, probe: dict[str, Any] | None, evaluation: dict[str, Any] | None) -> dict[str, Any]:
    """One report row: identity, sizes (IR alone and whole directory), probe results, metrics, eval table."""
    meta = read_variant(variant_dir) or {}
    row: dict[str, Any] = {"variant": variant_dir.name, "path": str(variant_dir), "dir_bytes": meta.get("size_bytes")}
    for key in ("build_seconds", "method", "steps", "logits_weight_group_size"):
        if key in meta:
            row[key] = meta[key]
    if (variant_dir / "openvino_model.xml").is_file():
        row["ir_bytes"] = ir_size_bytes(variant_dir)
    row |= {k: v for k, v in (probe or {}).items() if k != "tokens_per_s"}
    for n, rate in (probe or {}).get("tokens_per_s", {}).items():
        row[f"tok_s_{n}"] = rate
    row["metrics"] = dict((evaluation or {}).get("metrics") or {})
    if evaluation and evaluation.get("table_json"):
        row["eval_table"] = evaluation["table_json"]
    return row


# --------------------------------------------------------------------------- selection
def load_table(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The per-example evaluation table of a report row, or None when the variant was not scored."""
    path = row.get("eval_table")
    return json.loads(Path(path).read_text(encoding="utf-8")) if path and Path(path).is_file() else None


def compare_to_reference(rows: list[dict[str, Any]], reference: str = "fp32_ir",
                         confidence: float = 0.95) -> dict[str, dict[str, dict[str, Any]]]:
    """Variant -> task -> paired difference to the reference on the task's headline metric, in points.

    Each entry holds ``difference`` (candidate - reference), the two-sided interval (``low``/``high``)
    and ``drop_upper`` = the one-sided upper confidence bound of the drop (reference - candidate),
    from :func:`tasks.stats.paired_difference` (paired bootstrap over the same examples).
    """
    from tasks.stats import compare_tables

    by_name = {r["variant"]: r for r in rows}
    ref_table = load_table(by_name[reference]) if reference in by_name else None
    if ref_table is None:
        return {}
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for row in rows:
        table = load_table(row)
        if table is None or row["variant"] == reference:
            continue
        two_sided = compare_tables(ref_table, table, confidence)
        one_sided = compare_tables(ref_table, table, confidence, alternative="greater")
        out[row["variant"]] = {
            task: {"metric": d.metric, "reference": d.reference, "candidate": d.candidate, "n": d.n,
                   "difference": d.difference, "low": d.low, "high": d.high,
                   "drop_upper": round(-one_sided[task].low, 3)}
            for task, d in two_sided.items()
        }
    return out


def certainly_worse(reference_table: Path, candidate_table: Path, max_drop: float,
                    confidence: float = 0.95) -> str | None:
    """Why the candidate already loses more than ``max_drop`` points on some task (the one-sided lower
    bound of its drop exceeds it), or None while it may still pass."""
    from tasks.stats import compare_tables

    reference = json.loads(Path(reference_table).read_text(encoding="utf-8"))
    candidate = json.loads(Path(candidate_table).read_text(encoding="utf-8"))
    for task, d in compare_tables(reference, candidate, confidence, alternative="less").items():
        if -d.high > max_drop:
            return (f"{task}: drop >= {-d.high:.1f} points at {100 * confidence:.0f}% confidence "
                    f"on {d.n} examples (limit {max_drop:g})")
    return None


def select_variant(rows: list[dict[str, Any]], cfg: QuantizeConfig, reference: str = "fp32_ir") -> dict[str, Any]:
    """Apply the selection policy: among IR variants whose drop on every task's headline metric has a
    one-sided 95% upper bound <= ``cfg.max_metric_drop`` points below ``reference`` (paired bootstrap
    over the same validation examples), the smallest IR (or the fastest at the highest concurrency).

    Returns ``{"variant", "policy", "reason", "eligible", "compare"}``; the reference itself is always
    eligible, so a choice always exists. Variants without an evaluation are not eligible.
    """
    by_name = {r["variant"]: r for r in rows}
    if reference not in by_name:
        raise ValueError(f"selection needs the {reference} row; have {', '.join(by_name)}")
    compare = compare_to_reference(rows, reference)
    scored = load_table(by_name[reference]) is not None
    eligible = [reference]
    for name in (r["variant"] for r in rows if r["variant"] in IR_VARIANTS and r["variant"] != reference):
        bounds = [c["drop_upper"] for c in compare.get(name, {}).values()]
        if not scored or (bounds and all(b <= cfg.max_metric_drop + 1e-9 for b in bounds)):
            eligible.append(name)
    if cfg.selection == "fastest":
        top = f"tok_s_{max(cfg.bench_concurrency)}"
        key = lambda name: (-(by_name[name].get(top) or 0.0), by_name[name].get("ir_bytes") or 0)  # noqa: E731
        basis = f"highest {top.replace('tok_s_', 'tokens/s at ')} concurrent"
    else:
        key = lambda name: (by_name[name].get("ir_bytes") or math.inf, name)  # noqa: E731
        basis = "smallest IR on disk"
    choice = sorted(eligible, key=key)[0]
    if not scored:
        reason = f"{basis}; no task metrics were available, so no quality gate was applied"
    else:
        reason = (f"{basis} among variants whose drop below {reference} has a one-sided 95% upper bound "
                  f"<= {cfg.max_metric_drop:g} point(s) on every task (paired bootstrap over the validation split)")
    return {"variant": choice, "policy": cfg.selection, "reason": reason, "eligible": sorted(eligible, key=key),
            "compare": compare}


# --------------------------------------------------------------------------- rendering
def _mb(value: Any) -> str:
    return f"{value / 1e6:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def render_markdown(rows: list[dict[str, Any]], selection: dict[str, Any], cfg: QuantizeConfig,
                    title: str = "Quantisation report", notes: Sequence[str] = ()) -> str:
    """Markdown: a table of size, memory and speed; a table of per-task metrics with paired intervals
    against fp32; then the choice and its reason, and ``notes`` (QAT, merge check, what the base is)."""
    fp32 = next((r.get("ir_bytes") for r in rows if r["variant"] == "fp32_ir"), None)
    rates = [f"tok_s_{n}" for n in cfg.bench_concurrency]
    head = ["variant", "IR MB", "% of fp32", "peak RSS MB", *[f"tok/s @{r.removeprefix('tok_s_')}" for r in rates],
            "P95 ms", "build s"]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        size = row.get("ir_bytes")
        share = f"{100 * size / fp32:.1f}%" if size and fp32 else "-"
        mark = " **(selected)**" if row["variant"] == selection.get("variant") else ""
        cells = [f"{row['variant']}{mark}", _mb(size if size else row.get("dir_bytes")), share,
                 _num(row.get("peak_rss_mb")), *[_num(row.get(r)) for r in rates], _num(row.get("latency_p95_ms")),
                 _num(row.get("build_seconds"))]
        lines.append("| " + " | ".join(cells) + " |")
    compare = selection.get("compare", {})
    tasks = sorted({t for c in compare.values() for t in c}) or sorted(
        {m.removeprefix("format_compliance_") for r in rows for m in r.get("metrics", {})
         if m.startswith("format_compliance_")})
    if tasks:
        lines += ["", "Per task: the headline metric, its change vs fp32_ir in points with the paired 95% interval, "
                  "and the one-sided 95% upper bound of the drop (the selection criterion); format compliance.", ""]
        thead = ["variant", *[f"{t}" for t in tasks], *[f"format {t}" for t in tasks]]
        lines += ["| " + " | ".join(thead) + " |", "|" + "---|" * len(thead)]
        for row in rows:
            if not row.get("metrics"):
                continue
            cells = [row["variant"] + (" (screened out)" if row.get("screened_out") else "")]
            for task in tasks:
                c = compare.get(row["variant"], {}).get(task)
                value = next((v for k, v in row["metrics"].items() if k == _headline(task)), None)
                text = _num(value, 3)
                if c:
                    text += (f" ({c['difference']:+.1f} [{c['low']:+.1f}, {c['high']:+.1f}]; "
                             f"drop <= {round(c['drop_upper'], 1) + 0.0:.1f}; n {c['n']})")  # no '-0.0'
                cells.append(text)
            cells += [_num(row["metrics"].get(f"format_compliance_{t}"), 3) for t in tasks]
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Selected:** `{selection.get('variant')}` ({selection.get('policy')}): {selection.get('reason')}."]
    lines += ["", *[f"- {note}" for note in notes]] if notes else []
    lines += ["", "Sizes are openvino_model.xml + .bin (merged_hf/adapter: whole directory). Peak RSS is the probe "
              "process after loading the model and answering one chat prompt. tokens/s: greedy, "
              f"{cfg.bench_max_new_tokens} new tokens per request, ContinuousBatchingPipeline; P95: single-request "
              "latency. Metrics: the validation split, the same examples for every variant."]
    return "\n".join(lines) + "\n"


def _headline(task: str) -> str:
    from configs.tasks import get_task

    return get_task(task).headline_metric


def render_chart(rows: list[dict[str, Any]], cfg: QuantizeConfig, out_png: Path,
                 compare: dict[str, dict[str, dict[str, Any]]] | None = None) -> Path:
    """PNG with three panels: IR size, tokens/s per concurrency, and each task's change vs fp32 with its
    paired 95% interval (the selection threshold drawn as a dashed line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ir_rows = [r for r in rows if r.get("ir_bytes")]
    names = [r["variant"] for r in ir_rows]
    compare = compare or {}
    panels = 3 if compare else 2
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4))
    axes[0].bar(names, [r["ir_bytes"] / 1e6 for r in ir_rows], color="#4C72B0")
    axes[0].set_title("IR size (MB)")
    width = 0.8 / max(1, len(cfg.bench_concurrency))
    for i, n in enumerate(cfg.bench_concurrency):
        xs = [j + (i - (len(cfg.bench_concurrency) - 1) / 2) * width for j in range(len(names))]
        axes[1].bar(xs, [r.get(f"tok_s_{n}") or 0 for r in ir_rows], width=width, label=f"{n} concurrent")
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_title("greedy tokens/s")
    axes[1].legend()
    if compare:
        variants = [n for n in names if n in compare]
        tasks = sorted({t for c in compare.values() for t in c})
        width = 0.8 / max(1, len(tasks))
        for i, task in enumerate(tasks):
            xs = [j + (i - (len(tasks) - 1) / 2) * width for j in range(len(variants))]
            diffs = [compare[v].get(task, {}).get("difference", math.nan) for v in variants]
            lows = [d - compare[v].get(task, {}).get("low", d) for v, d in zip(variants, diffs, strict=True)]
            highs = [compare[v].get(task, {}).get("high", d) - d for v, d in zip(variants, diffs, strict=True)]
            axes[2].bar(xs, diffs, width=width, yerr=[lows, highs], capsize=3, label=task)
        axes[2].axhline(-cfg.max_metric_drop, color="grey", linestyle="--", linewidth=1)
        axes[2].axhline(0, color="black", linewidth=0.5)
        axes[2].set_xticks(range(len(variants)), variants)
        axes[2].set_title("change vs fp32_ir (points, 95% CI)")
        axes[2].legend(fontsize=8)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return atomic_save_figure(fig, out_png, dpi=110)
