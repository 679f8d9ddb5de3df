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
from tasks.quantize.variants import IR_VARIANTS, ir_size_bytes, read_variant

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- generation
class OpenVINOGenerator:
    """``tasks.evaluate.Generator`` over an OpenVINO IR: prompts (chat template applied) -> completions.

    Uses ``ContinuousBatchingPipeline`` so a batch of prompts is decoded together, greedy, stopping
    at the chat template's end-of-turn token or eos and stripping whitespace, the same rules as
    ``tasks.generators.HFGenerator``.
    """

    def __init__(self, ir_dir: Path, max_new_tokens: int = 64, batch_size: int = 8,
                 adapter: Path | None = None, cache_gb: float = 1.0):
        import openvino_genai as og
        from transformers import AutoTokenizer

        from tasks.generators import stop_token_ids

        self.ir_dir = Path(ir_dir)
        self.batch_size = batch_size
        scheduler = og.SchedulerConfig()
        scheduler.cache_size = max(1, round(cache_gb))
        self._adapters = og.AdapterConfig(og.Adapter(str(adapter))) if adapter else None
        properties = {"adapters": self._adapters} if self._adapters else {}
        self._pipe = og.ContinuousBatchingPipeline(str(self.ir_dir), scheduler, "CPU", properties)
        self._tokenizer = self._pipe.get_tokenizer()
        self._config = og.GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False)
        self._config.stop_token_ids = set(stop_token_ids(AutoTokenizer.from_pretrained(str(self.ir_dir))))
        if self._adapters:
            self._config.adapters = self._adapters

    def __call__(self, prompts: list[str]) -> list[str]:
        outputs: list[str] = []
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            # Prompts already carry the chat template: encode them verbatim, no extra BOS or template.
            inputs = [self._tokenizer.encode(p, add_special_tokens=False).input_ids for p in chunk]
            results = self._pipe.generate(inputs, [self._config] * len(chunk))
            # Stripped like the HF generator's output, so both score identically.
            outputs.extend(self._tokenizer.decode(r.m_generation_ids[0], skip_special_tokens=True).strip()
                           for r in results)
        return outputs


def openvino_generator(ir_dir: Path, max_new_tokens: int = 64, batch_size: int = 8,
                       adapter: Path | None = None, cache_gb: float = 1.0) -> OpenVINOGenerator:
    """An OpenVINO ``Generator`` for ``tasks.evaluate.evaluate_records`` (adapter: genai LoRA safetensors)."""
    return OpenVINOGenerator(ir_dir, max_new_tokens, batch_size, adapter, cache_gb)


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


def evaluate_variant(ir_dir: Path, records: Sequence[dict], eval_cfg: EvaluateConfig, cfg: QuantizeConfig,
                     adapter: Path | None = None) -> dict[str, float]:
    """Task metrics of one IR variant on ``records`` (tasks.evaluate), 0..1 fractions."""
    from tasks.evaluate import evaluate_records

    generate = openvino_generator(ir_dir, eval_cfg.max_new_tokens, eval_cfg.batch_size, adapter, cfg.bench_cache_gb)
    return dict(evaluate_records(list(records), generate, eval_cfg).metrics)


def variant_row(variant_dir: Path, probe: dict[str, Any] | None, metrics: dict[str, float] | None) -> dict[str, Any]:
    """One report row: identity, sizes (IR alone and whole directory), probe results, metrics."""
    meta = read_variant(variant_dir) or {}
    row: dict[str, Any] = {"variant": variant_dir.name, "path": str(variant_dir), "dir_bytes": meta.get("size_bytes")}
    if (variant_dir / "openvino_model.xml").is_file():
        row["ir_bytes"] = ir_size_bytes(variant_dir)
    row |= {k: v for k, v in (probe or {}).items() if k != "tokens_per_s"}
    for n, rate in (probe or {}).get("tokens_per_s", {}).items():
        row[f"tok_s_{n}"] = rate
    row["metrics"] = dict(metrics or {})
    return row


# --------------------------------------------------------------------------- selection
def metric_drops(row: dict[str, Any], reference: dict[str, Any], names: list[str]) -> dict[str, float]:
    """Points (0..100) each selection metric lost against the reference row; missing metrics are skipped."""
    drops = {}
    for name in names:
        ref, got = reference.get("metrics", {}).get(name), row.get("metrics", {}).get(name)
        numbers = isinstance(ref, (int, float)) and isinstance(got, (int, float))
        if numbers and math.isfinite(ref) and math.isfinite(got):
            drops[name] = round(100.0 * (ref - got), 3)
    return drops


def select_variant(rows: list[dict[str, Any]], cfg: QuantizeConfig, reference: str = "fp32_ir") -> dict[str, Any]:
    """Apply the selection policy: among IR variants whose drops all stay within ``cfg.max_metric_drop``
    points of ``reference``, the smallest IR (or the fastest at the highest concurrency).

    Returns ``{"variant", "policy", "reason", "eligible", "drops"}``; the reference itself is always
    eligible, so a choice always exists.
    """
    by_name = {r["variant"]: r for r in rows}
    if reference not in by_name:
        raise ValueError(f"selection needs the {reference} row; have {', '.join(by_name)}")
    ref = by_name[reference]
    drops = {r["variant"]: metric_drops(r, ref, cfg.selection_metrics) for r in rows if r["variant"] in IR_VARIANTS}
    compared = any(drops.values())
    eligible = [name for name, d in drops.items() if all(v <= cfg.max_metric_drop + 1e-9 for v in d.values())]
    if cfg.selection == "fastest":
        top = f"tok_s_{max(cfg.bench_concurrency)}"
        key = lambda name: (-(by_name[name].get(top) or 0.0), by_name[name].get("ir_bytes") or 0)  # noqa: E731
        basis = f"highest {top.replace('tok_s_', 'tokens/s at ')} concurrent"
    else:
        key = lambda name: (by_name[name].get("ir_bytes") or math.inf, name)  # noqa: E731
        basis = "smallest IR on disk"
    choice = sorted(eligible, key=key)[0]
    if not compared:
        reason = f"{basis}; no task metrics were available, so no quality gate was applied"
    else:
        reason = f"{basis} among variants within {cfg.max_metric_drop:g} point(s) of {reference} on " + ", ".join(
            sorted({m for d in drops.values() for m in d})
        )
    return {"variant": choice, "policy": cfg.selection, "reason": reason, "eligible": sorted(eligible, key=key),
            "drops": drops}


# --------------------------------------------------------------------------- rendering
def _mb(value: Any) -> str:
    return f"{value / 1e6:.1f}" if isinstance(value, (int, float)) else "-"


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def render_markdown(rows: list[dict[str, Any]], selection: dict[str, Any], cfg: QuantizeConfig,
                    title: str = "Quantisation report") -> str:
    """Markdown table: size (and % of fp32), peak RSS, tokens/s per concurrency, metrics; then the choice."""
    fp32 = next((r.get("ir_bytes") for r in rows if r["variant"] == "fp32_ir"), None)
    metric_names = sorted({m for r in rows for m in r.get("metrics", {}) if not m.startswith(("n_", "eval_"))})
    rates = [f"tok_s_{n}" for n in cfg.bench_concurrency]
    head = ["variant", "IR MB", "% of fp32", "peak RSS MB", "model RSS MB",
            *[f"tok/s @{r.removeprefix('tok_s_')}" for r in rates], *metric_names]
    lines = [f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        size = row.get("ir_bytes")
        share = f"{100 * size / fp32:.1f}%" if size and fp32 else "-"
        mark = " **(selected)**" if row["variant"] == selection.get("variant") else ""
        cells = [f"{row['variant']}{mark}", _mb(size if size else row.get("dir_bytes")), share,
                 _num(row.get("peak_rss_mb")), _num(row.get("model_rss_mb")), *[_num(row.get(r)) for r in rates],
                 *[_num(row.get("metrics", {}).get(m), 3) for m in metric_names]]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"**Selected:** `{selection.get('variant')}` ({selection.get('policy')}): {selection.get('reason')}."]
    drops = {k: v for k, v in selection.get("drops", {}).items() if v and k != "fp32_ir"}
    if drops:
        lines.append("")
        lines.append("Change vs fp32 in points (negative = worse): " + "; ".join(
            f"{name}: " + ", ".join(f"{m} {-d:+.1f}" for m, d in sorted(d.items())) for name, d in drops.items()))
    lines += ["", "Sizes are openvino_model.xml + .bin (merged_hf/adapter: whole directory). Peak RSS is "
              "the probe process after loading the model and answering one chat prompt; model RSS subtracts "
              "the interpreter and runtime baseline. tokens/s: greedy, "
              f"{cfg.bench_max_new_tokens} new tokens per request, ContinuousBatchingPipeline."]
    return "\n".join(lines) + "\n"


def render_chart(rows: list[dict[str, Any]], cfg: QuantizeConfig, out_png: Path,
                 metric: str | None = None) -> Path:
    """PNG with three panels: IR size, tokens/s per concurrency, and one task metric (if any)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ir_rows = [r for r in rows if r.get("ir_bytes")]
    names = [r["variant"] for r in ir_rows]
    metric = metric or next((m for m in cfg.selection_metrics if any(m in r.get("metrics", {}) for r in ir_rows)), None)
    panels = 3 if metric else 2
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
    if metric:
        axes[2].bar(names, [r.get("metrics", {}).get(metric, float("nan")) for r in ir_rows], color="#55A868")
        axes[2].set_title(metric)
        axes[2].set_ylim(0, 1)
    for ax in axes:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    out_png = Path(out_png)
    tmp = out_png.with_name(f".tmp-{out_png.name}")
    fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    os.replace(tmp, out_png)
    return out_png

