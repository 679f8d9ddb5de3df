"""Task evaluation: generate on curated records with fixed decoding and score the outputs exactly.

Every later stage (SFT, alignment, quantisation, promotion) calls :func:`evaluate_records` with
its own :data:`Generator` (prompts -> completions): :func:`hf_generator` for Hugging Face weights
(+ optional PEFT adapter); an OpenVINO generator plugs in the same way.

Metrics (all fractions in 0..1 except perplexity and counts; see :mod:`tasks.metrics` for the
exact conventions):

=====================  ===================================================================
``n_examples``         examples scored; ``n_<task>`` per task (0 when the task is absent)
``sentiment_accuracy`` share of sentiment outputs whose parsed label equals the gold label
``sentiment_macro_f1`` macro-F1 over positive/negative (unparseable = wrong)
``ner_precision``      micro precision of exact (text, type) entity matches
``ner_recall``         micro recall of the same
``ner_f1``             harmonic mean of the two
``summarization_rougeL``  mean ROUGE-L F of summaries against the reference
``generation_rougeL``  mean ROUGE-L F of generation outputs against the reference text
``format_compliance``  share of outputs with ``format_ok`` (:func:`tasks.parsing.parse_completion`);
                       ``format_compliance_<task>`` per task
``perplexity``         corpus perplexity of the reference completions (+ end-of-turn token)
                       given the prompts; only when a scorer is passed
``eval_seconds``       wall time of generation + scoring
=====================  ===================================================================

Task metrics appear only for tasks present in the records.
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
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from prefect import task

from configs.schema import EvaluateConfig
from tasks import metrics as M
from tasks.files import atomic_write_text, sha256_dir
from tasks.generators import Generator, HFGenerator, hf_generator, stop_token_ids
from tasks.parsing import TASKS, coerce_label, parse_completion
from tasks.runtime import torch_device

log = logging.getLogger(__name__)

__all__ = [
    "CompletionScorer", "EvalResult", "Generator", "HFGenerator", "aggregate", "evaluate_model",
    "evaluate_records", "evaluate_task", "hf_generator", "stop_token_ids", "write_results",
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
    prompts = [r["prompt"] for r in selected]
    outputs = _generate_all(generate, prompts, cfg.batch_size)

    table = []
    for record, output in zip(selected, outputs, strict=True):
        parsed, format_ok = parse_completion(record["task"], output)
        table.append(
            {
                "id": record["id"],
                "task": record["task"],
                "input": record.get("input", ""),
                "prompt": record["prompt"],
                "output": output,
                "label": record["label"],
                "parsed": parsed,
                "format_ok": format_ok,
                "score": _example_score(record["task"], record["label"], parsed),
            }
        )
    metrics = aggregate(table)

    if perplexity_model is not None and selected:
        completions = [_reference_completion(r) for r in selected]
        nlls = perplexity_model.completion_nll(prompts, completions)
        for row, (nll, n) in zip(table, nlls, strict=True):
            row["nll"], row["n_tokens"] = nll, n
        metrics["perplexity"] = M.perplexity(nlls)
    metrics["eval_seconds"] = round(time.perf_counter() - started, 3)
    return EvalResult(metrics=metrics, table=table)


def aggregate(table: Sequence[dict[str, Any]]) -> dict[str, float]:
    """Metrics from per-example rows that carry ``task``, ``label``, ``parsed`` and ``format_ok``."""
    by_task: dict[str, list[dict[str, Any]]] = {t: [] for t in TASKS}
    for row in table:
        by_task[row["task"]].append(row)
    out: dict[str, float] = {"n_examples": len(table)}
    for name, rows in by_task.items():
        out[f"n_{name}"] = len(rows)
    if rows := by_task["sentiment"]:
        s = M.sentiment_scores([r["label"] for r in rows], [r["parsed"] for r in rows])
        out["sentiment_accuracy"], out["sentiment_macro_f1"] = s["accuracy"], s["macro_f1"]
    if rows := by_task["ner"]:
        n = M.ner_scores([r["label"] for r in rows], [r["parsed"] for r in rows])
        out["ner_precision"], out["ner_recall"], out["ner_f1"] = n["precision"], n["recall"], n["f1"]
    for name in ("summarization", "generation"):
        if rows := by_task[name]:
            out[f"{name}_rougeL"] = M.mean_rouge_l([r["label"] for r in rows], [r["parsed"] for r in rows])
    out["format_compliance"] = M.compliance_rate([r["format_ok"] for r in table])
    for name, rows in by_task.items():
        if rows:
            out[f"format_compliance_{name}"] = M.compliance_rate([r["format_ok"] for r in rows])
    return out


def _example_score(task_name: str, label: Any, parsed: Any) -> float:
    """Per-example score shown in the table: correct (0/1), entity F1, or ROUGE-L F."""
    if task_name == "sentiment":
        return float(parsed == label)
    if task_name == "ner":
        return M.prf(*M.entity_counts(label, parsed))["f1"]
    return M.rouge_l(label, parsed)


def _select(records: Iterable[dict[str, Any]], per_task: int) -> list[dict[str, Any]]:
    counts = {t: 0 for t in TASKS}
    selected = []
    for index, record in enumerate(records):
        missing = [k for k in REQUIRED_KEYS if k not in record]
        if missing:
            raise ValueError(f"record #{index} ({record.get('id', '?')}): missing key(s) {', '.join(missing)}")
        name = record["task"]
        if name not in counts:
            raise ValueError(f"record {record['id']}: unknown task {name!r} (expected one of {', '.join(TASKS)})")
        if counts[name] >= per_task:
            continue
        counts[name] += 1
        try:
            label = coerce_label(name, record["label"])
        except ValueError as err:
            raise ValueError(f"record {record['id']}: {err}") from None
        selected.append({**record, "label": label})
    return selected


def _generate_all(generate: Generator, prompts: list[str], batch_size: int) -> list[str]:
    # Similar lengths share a batch so left padding wastes little compute; order is restored after.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: list[str | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        result = list(generate([prompts[i] for i in chunk]))
        if len(result) != len(chunk):
            raise ValueError(f"generator returned {len(result)} completions for {len(chunk)} prompts")
        for i, text in zip(chunk, result, strict=True):
            outputs[i] = text
    return [o or "" for o in outputs]


def _reference_completion(record: dict[str, Any]) -> str:
    if "completion" in record:
        return record["completion"]
    label = record["label"]
    return json.dumps(label, ensure_ascii=False) if record["task"] == "ner" else str(label)


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
    """Evaluate an HF model (+ adapter) on curated records and write the results to ``out_dir``.

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
    generator = hf_generator(model_dir, adapter_dir, cfg.max_new_tokens, cfg.batch_size, max_length,
                             device=torch_device(cfg.device))
    result = evaluate_records(selected, generator, cfg, perplexity_model=generator)
    paths = write_results(result, out_dir)
    if entry is not None:
        _write_cached(entry, result)
    log.info("evaluated %s on %d examples in %.1fs", model_dir, result.metrics["n_examples"],
             result.metrics["eval_seconds"])
    return {"metrics": result.metrics, **paths, "cached": False}


# Bump when decoding or scoring changes, so cached evaluations are not reused across recipes.
EVAL_RECIPE = "hf-greedy-merged-lora-v1"


def _cache_key(model_dir: str | Path, adapter_dir: str | Path | None, selected: list[dict[str, Any]],
               cfg: EvaluateConfig, max_length: int) -> str:
    payload = {
        "recipe": EVAL_RECIPE, "model": _content_fingerprint(Path(model_dir)),
        "adapter": _content_fingerprint(Path(adapter_dir)) if adapter_dir is not None else None,
        "records": [[r["id"], r["task"], r["prompt"], r["label"]] for r in selected],
        "settings": cfg.model_dump(mode="json"), "max_length": max_length,
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
