"""Task evaluation: generate on curated records with the shared decoding spec and score the outputs exactly.

Every stage (SFT, alignment, quantisation, promotion) calls :func:`evaluate_records` with a
:data:`~tasks.generators.Generator`; :func:`open_generator` gives the configured engine: OpenVINO
(the serving engine: the base IR with the adapter applied at runtime) or Hugging Face.

Metrics come from the task registry (:mod:`configs.tasks`): each task reports its kind's metrics as
``<task>_<metric>`` (fractions in 0..1), only for tasks present in the records:

=====================  ===================================================================
``n_examples``         examples scored; ``n_<task>`` per task (0 when the task is absent)
label tasks            ``_accuracy``, ``_macro_f1`` (unparseable = wrong)
entity tasks           ``_precision``, ``_recall``, ``_f1``: micro, exact (text, type) matches
text tasks             ``_rougeL``: mean ROUGE-L F against the reference
``format_compliance``  share of outputs with ``format_ok`` (:func:`tasks.parsing.parse_completion`);
                       ``format_compliance_<task>`` per task
``perplexity``         corpus perplexity of the reference completions (+ end-of-turn token)
                       given the prompts; only when a scorer is passed (Hugging Face engine)
``eval_seconds``       wall time of generation + scoring
=====================  ===================================================================

The per-example table keeps what paired comparisons need (``score``; for entity tasks the
``matched``/``n_pred``/``n_gold`` counts), see :mod:`tasks.stats`.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import logging
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from prefect import task

from configs.schema import EvaluateConfig
from configs.tasks import get_task, task_names
from tasks import metrics as M
from tasks.files import atomic_write_text, sha256_dir
from tasks.generators import Generator, HFGenerator, OpenVINOGenerator, hf_generator, stop_token_ids
from tasks.parsing import answer_pattern, coerce_label, format_target, parse_completion

log = logging.getLogger(__name__)

__all__ = [
    "CompletionScorer", "EvalResult", "Generator", "HFGenerator", "OpenVINOGenerator", "aggregate", "evaluate_model",
    "evaluate_records", "evaluate_task", "hf_generator", "open_generator", "stop_token_ids", "write_results",
]

REQUIRED_KEYS = ("id", "task", "prompt", "label")


class CompletionScorer(Protocol):
    """Anything that can score reference completions: per example (summed NLL in nats, tokens)."""

    def completion_nll(self, prompts: list[str], completions: list[str]) -> list[tuple[float, int]]: ...


@dataclasses.dataclass
class EvalResult:
    """Metrics plus the per-example table (one dict per scored record)."""

    metrics: dict[str, float]
    table: list[dict[str, Any]]

    def to_dataframe(self):
        """The per-example table as a pandas DataFrame."""
        import pandas as pd

        return pd.DataFrame(self.table)


# --------------------------------------------------------------------------- scoring
def evaluate_records(
    records: Iterable[dict[str, Any]],
    generate: Generator,
    cfg: EvaluateConfig,
    perplexity_model: CompletionScorer | None = None,
) -> EvalResult:
    """Generate for up to ``cfg.max_samples_per_task`` records per task and score the outputs.

    Args:
        records: curated records (schema in the project brief); a ``datasets.Dataset`` works too.
            The first ``max_samples_per_task`` of each task are used, in the given order.
        generate: the model under test; called with at most ``cfg.batch_size`` prompts at a time.
        cfg: the ``evaluate`` config section.
        perplexity_model: optional scorer of reference completions (e.g. an :class:`HFGenerator`).

    Returns:
        :class:`EvalResult` with the metrics dict (see module docstring) and per-example table
        (id, task, input, prompt, output, label, parsed, format_ok, score[, nll, n_tokens]).

    Raises:
        ValueError: a record misses a required key, names an unknown task, or the generator
            returned the wrong number of completions.
    """
    started = time.perf_counter()
    selected = _select(records, cfg.max_samples_per_task)
    outputs = _generate_all(generate, selected, cfg)

    table = []
    for record, output in zip(selected, outputs, strict=True):
        parsed, format_ok = parse_completion(record["task"], output)
        row = {
            "id": record["id"], "task": record["task"], "input": record.get("input", ""),
            "prompt": record["prompt"], "output": output, "label": record["label"], "parsed": parsed,
            "format_ok": format_ok, "score": _example_score(record["task"], record["label"], parsed),
        }
        if get_task(record["task"]).output == "entities":
            row["matched"], row["n_pred"], row["n_gold"] = M.entity_counts(record["label"], parsed)
        table.append(row)
    metrics = aggregate(table)

    if perplexity_model is not None and selected:
        prompts = [r["prompt"] for r in selected]
        completions = [_reference_completion(r) for r in selected]
        nlls = perplexity_model.completion_nll(prompts, completions)
        for row, (nll, n) in zip(table, nlls, strict=True):
            row["nll"], row["n_tokens"] = nll, n
        metrics["perplexity"] = M.perplexity(nlls)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    return EvalResult(metrics=metrics, table=table)


def aggregate(table: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Metrics from per-example rows that carry ``task``, ``label``, ``parsed`` and ``format_ok``."""
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in task_names()}
    for row in table:
        by_task.setdefault(row["task"], []).append(row)
    out: dict[str, float] = {"n_examples": len(table)}
    for name, rows in by_task.items():
        out[f"n_{name}"] = len(rows)
    for name, rows in by_task.items():
        if not rows:
            continue
        spec = get_task(name)
        gold, parsed = [r["label"] for r in rows], [r["parsed"] for r in rows]
        if spec.output == "label":
            scores = M.label_scores(gold, parsed, spec.labels)
        elif spec.output == "entities":
            scores = M.entity_scores(gold, parsed)
        else:
            scores = {"rougeL": M.mean_rouge_l(gold, parsed)}
        out.update({f"{name}_{metric}": value for metric, value in scores.items()})
    out["format_compliance"] = M.compliance_rate([r["format_ok"] for r in table])
    for name, rows in by_task.items():
        if rows:
            out[f"format_compliance_{name}"] = M.compliance_rate([r["format_ok"] for r in rows])
    return out


def _example_score(task_name: str, label: Any, parsed: Any) -> float:
    """Per-example score shown in the table: correct (0/1), entity F1, or ROUGE-L F."""
    kind = get_task(task_name).output
    if kind == "label":
        return float(parsed == label)
    if kind == "entities":
        return M.prf(*M.entity_counts(label, parsed))["f1"]
    return M.rouge_l(label, parsed)


def _select(records: Iterable[dict[str, Any]], per_task: int) -> list[dict[str, Any]]:
    counts: dict[str, int] = {}
    selected = []
    for index, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"record #{index} ({record.get('id', '?')}): missing key(s) {', '.join(missing)}")
        name = record["task"]
        try:
            get_task(name)
        except KeyError:
            raise ValueError(f"record {record['id']}: unknown task {name!r} (expected one of "
                             f"{', '.join(task_names())})") from None
        if counts.get(name, 0) >= per_task:
            continue
        counts[name] = counts.get(name, 0) + 1
        try:
            label = coerce_label(name, record["label"])
        except ValueError as err:
            raise ValueError(f"record {record['id']}: {err}") from None
        selected.append({**record, "label": label})
    return selected


def max_new_tokens(task_name: str, cfg: EvaluateConfig) -> int:
    """Answer length limit for a task: ``evaluate.max_new_tokens`` when set, else the task's own."""
    return cfg.max_new_tokens or get_task(task_name).max_new_tokens


def _generate_all(generate: Generator, selected: list[dict[str, Any]], cfg: EvaluateConfig) -> list[str]:
    # One call per task (each has its own length limit); within a task, similar prompt lengths share
    # a batch so padding wastes little compute. Order is restored after.
    from tqdm.auto import tqdm

    outputs: list[str | None] = [None] * len(selected)
    # A bar per evaluation (stderr): a 300-per-task evaluation takes minutes, and a pipeline run holds
    # several. Redrawn at most every 5 s when stderr is a log file, not a terminal.
    with tqdm(total=len(selected), desc="evaluate", unit="ex", mininterval=0.5 if sys.stderr.isatty() else 5,
              disable=not selected) as bar:
        for name in dict.fromkeys(r["task"] for r in selected):
            bar.set_postfix_str(name)
            order = sorted((i for i, r in enumerate(selected) if r["task"] == name),
                           key=lambda i: len(selected[i]["prompt"]))
            for start in range(0, len(order), cfg.batch_size):
                chunk = order[start : start + cfg.batch_size]
                prompts = [selected[i]["prompt"] for i in chunk]
                pattern = answer_pattern(name) if cfg.constrained else None
                result = list(generate(prompts, max_new_tokens(name, cfg), pattern=pattern) if pattern
                              else generate(prompts, max_new_tokens(name, cfg)))
                if len(result) != len(chunk):
                    raise ValueError(f"generator returned {len(result)} completions for {len(chunk)} prompts")
                for i, text in zip(chunk, result, strict=True):
                    outputs[i] = text
                bar.update(len(chunk))
    return [o or "" for o in outputs]


def _reference_completion(record: dict[str, Any]) -> str:
    return record["completion"] if "completion" in record else format_target(record["task"], record["label"])


# --------------------------------------------------------------------------- artifacts + task
def write_results(result: EvalResult, out_dir: str | Path) -> dict[str, str]:
    """Write ``metrics.json``, ``eval_table.json`` and ``eval_table.csv`` atomically into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "metrics_json": out_dir / "metrics.json",
        "table_json": out_dir / "eval_table.json",
        "table_csv": out_dir / "eval_table.csv",
    }
    atomic_write_text(paths["metrics_json"], json.dumps(_finite(result.metrics), indent=2))
    atomic_write_text(paths["table_json"], json.dumps(result.table, ensure_ascii=False, indent=1))
    buffer = io.StringIO(newline="")
    columns = list(result.table[0]) if result.table else ["id"]
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in result.table:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    atomic_write_text(paths["table_csv"], buffer.getvalue())
    return {k: str(v) for k, v in paths.items()}


def evaluate_model(
    model_dir: str | Path,
    cfg: EvaluateConfig,
    out_dir: str | Path,
    *,
    records: Sequence[dict[str, Any]] | None = None,
    data_home: str | Path | None = None,
    data_version: str | None = None,
    split: str = "validation",
    adapter_dir: str | Path | None = None,
    max_length: int = 2048,
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate an imported model (+ adapter) on curated records and write the results to ``out_dir``.

    The engine is ``cfg.engine`` (:func:`open_generator`): on OpenVINO the model's IR with the adapter
    applied at runtime, as the gateway serves it; on Hugging Face the merged weights (and perplexity).

    Records are ``records`` when given, else ``split`` of ``tasks.data.load_curated(data_home,
    data_version)``. With ``cache_dir``, results are stored there by content (model, adapter,
    scored records, settings) and reused when the same evaluation is asked for again: the base
    model's evaluation is then paid once per data version, and alignment's "before" is the SFT
    stage's "after" when the settings match. Returns ``{"metrics": ..., "metrics_json": path,
    "table_json": path, "table_csv": path, "cached": bool}``.
    """
    if records is None:
        if data_home is None:
            raise ValueError("evaluate_model needs records or data_home (the lmforge home with curated data)")
        from tasks.data import load_curated

        dataset = load_curated(Path(data_home), data_version)
        if split not in dataset:
            raise ValueError(f"curated data has no split {split!r} (splits: {', '.join(dataset)})")
        records = dataset[split]
    selected = _select(records, cfg.max_samples_per_task)
    entry = None
    if cache_dir is not None:
        entry = Path(cache_dir) / _cache_key(model_dir, adapter_dir, selected, cfg, max_length)
        cached = _read_cached(entry)
        if cached is not None:
            log.info("evaluation of %s (adapter %s) reused from %s", model_dir, adapter_dir, entry)
            return {"metrics": cached.metrics, **write_results(cached, out_dir), "cached": True}
    with tempfile.TemporaryDirectory(prefix="lmforge-eval-") as scratch:
        generator = open_generator(cfg, model_dir, adapter_dir, max_length, Path(scratch))
        scorer = generator if isinstance(generator, HFGenerator) else None
        result = evaluate_records(selected, generator, cfg, perplexity_model=scorer)
    paths = write_results(result, out_dir)
    if entry is not None:
        _write_cached(entry, result)
    log.info("evaluated %s on %d examples in %.1fs", model_dir, result.metrics["n_examples"],
             result.metrics["eval_seconds"])
    return {"metrics": result.metrics, **paths, "cached": False}


# Bump when decoding or scoring changes, so cached evaluations are not reused across recipes.
EVAL_RECIPE = "per-task-max-tokens-v2"


def resolve_engine(engine: str, device: str = "auto") -> str:
    """``auto`` -> Hugging Face when the evaluation device is a GPU (``device`` asks for one, or is
    ``auto`` on a CUDA machine), else OpenVINO (the engine that serves on CPUs)."""
    if engine != "auto":
        return engine
    from tasks.runtime import torch_device

    return "hf" if torch_device(device).startswith("cuda") else "openvino"


def open_generator(cfg: EvaluateConfig, model_dir: str | Path, adapter_dir: str | Path | None = None,
                   max_length: int = 2048, scratch: Path | None = None) -> Generator:
    """The configured engine as a :data:`Generator` over an imported model and an optional PEFT adapter.

    OpenVINO: the model's fp32 IR (exported once, :func:`tasks.models.openvino_ir`) with the adapter
    converted for runtime LoRA into ``scratch``; Hugging Face: the weights with the adapter merged.
    """
    engine = resolve_engine(cfg.engine, cfg.device)
    if engine == "hf" and cfg.constrained:
        raise ValueError("evaluate.constrained needs the openvino engine; engine "
                         f"{cfg.engine!r} resolved to hf here (set evaluate.engine=openvino or constrained=false)")
    if engine == "hf":
        return hf_generator(model_dir, adapter_dir, cfg.batch_size, max_length, device=cfg.device)
    from tasks.models import openvino_ir

    adapter_file = None
    if adapter_dir is not None:
        from tasks.quantize.merge import write_genai_adapter
        from tasks.quantize.validate import validate_adapter

        info = validate_adapter(Path(adapter_dir), Path(model_dir), allow_name_mismatch=True)
        adapter_file = Path(scratch or tempfile.mkdtemp(prefix="lmforge-adapter-")) / "adapter_model.safetensors"
        write_genai_adapter(info, adapter_file)
    return OpenVINOGenerator.for_evaluation(openvino_ir(Path(model_dir)), cfg, adapter_file)


def _cache_key(model_dir: str | Path, adapter_dir: str | Path | None, selected: list[dict[str, Any]],
               cfg: EvaluateConfig, max_length: int) -> str:
    payload = {
        "recipe": EVAL_RECIPE, "model": _content_fingerprint(Path(model_dir)),
        "adapter": _content_fingerprint(Path(adapter_dir)) if adapter_dir is not None else None,
        "records": [[r["id"], r["task"], r["prompt"], r["label"]] for r in selected],
        # The engine as resolved: "auto" and the engine it picks are the same evaluation (the quantize
        # merge check asks for "openvino" explicitly and must reuse alignment's "auto" result).
        "settings": cfg.model_dump(mode="json", exclude={"engine"}), "engine": resolve_engine(cfg.engine, cfg.device),
        "max_length": max_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _content_fingerprint(directory: Path) -> str:
    """Hash of a model/adapter directory: its import manifest when it has one, else every file."""
    return sha256_dir(directory, ["manifest.json"] if (directory / "manifest.json").is_file() else None)


def _read_cached(entry: Path) -> EvalResult | None:
    try:
        metrics = json.loads((entry / "metrics.json").read_text(encoding="utf-8"))
        table = json.loads((entry / "eval_table.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    metrics = {k: (math.nan if v is None else v) for k, v in metrics.items()}
    return EvalResult(metrics=metrics, table=table)


def _write_cached(entry: Path, result: EvalResult) -> None:
    # Written whole into a temp dir and renamed: a half-written entry is never read as a hit.
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        write_results(result, tmp)
        os.replace(tmp, entry)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)  # another process stored the same entry first


@task(name="evaluate")
def evaluate_task(
    model_dir: str | Path,
    cfg: EvaluateConfig,
    out_dir: str | Path,
    *,
    records: Sequence[dict[str, Any]] | None = None,
    data_home: str | Path | None = None,
    data_version: str | None = None,
    split: str = "validation",
    adapter_dir: str | Path | None = None,
    max_length: int = 2048,
    artifact_key: str = "eval",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Prefect wrapper of :func:`evaluate_model` that also publishes table + metrics artifacts."""
    from prefect.artifacts import create_markdown_artifact, create_table_artifact

    out = evaluate_model(
        model_dir, cfg, out_dir, records=records, data_home=data_home, data_version=data_version,
        split=split, adapter_dir=adapter_dir, max_length=max_length, cache_dir=cache_dir,
    )
    table = json.loads(Path(out["table_json"]).read_text(encoding="utf-8"))
    create_table_artifact(
        key=f"{artifact_key}-table",
        table=[{k: _cell(v, limit=300) for k, v in row.items()} for row in table],
        description=f"Per-example evaluation of {model_dir} (full table: {out['table_json']})",
    )
    lines = ["| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in out["metrics"].items()]
    create_markdown_artifact(key=f"{artifact_key}-metrics", markdown="\n".join(lines),
                             description=f"Evaluation metrics of {model_dir}")
    return out


def _cell(value: Any, limit: int | None = None) -> Any:
    if isinstance(value, (list, dict)):
        value = json.dumps(value, ensure_ascii=False)
    if limit is not None and isinstance(value, str) and len(value) > limit:
        value = value[: limit - 1] + "…"
    return value


def _finite(metrics: dict[str, float]) -> dict[str, float | None]:
    # JSON has no NaN; a missing perplexity is written as null rather than an invalid token.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
