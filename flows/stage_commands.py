"""``lmforge curate``, ``quantize``, ``finetune`` and ``align``: one pipeline stage each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from flows.cli import ConfigOption, Overrides, app, console, fail, load_or_exit


@app.command("curate")
def curate(
    config: ConfigOption = None,
    overrides: Overrides = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even when this data version exists.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON only.")] = False,
) -> None:
    """Curate the raw sources into a versioned instruction data set and print its data card.

    Writes <home>/data/<version>/ (DatasetDict, JSONL, data card). The version is a content hash
    of the raw files, the data config and the chat template, so unchanged inputs reuse it.
    """
    from rich.markdown import Markdown

    from tasks.data.records import DataError, check_sources

    cfg = load_or_exit(config, overrides)
    try:
        check_sources(cfg.data.sources, cfg.data.raw_dir)
    except DataError as err:
        fail(str(err), code=2)
    from flows.curate import curate_flow

    try:
        summary = curate_flow(cfg, force=force)
    except DataError as err:
        fail(str(err))
    if as_json:
        console.print_json(json.dumps(summary.as_json()))
        return
    console.print(Markdown(summary.card_md.read_text(encoding="utf-8")))
    status = "reused" if summary.reused else "built"
    console.print(f"data version {summary.version} ({status}): {summary.path}  "
                  f"mlflow run {summary.mlflow_run_id}", highlight=False)


@app.command("quantize")
def quantize(
    config: ConfigOption = None,
    overrides: Overrides = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="PEFT adapter dir; default: the newest aligned adapter "
                                  "(runs/align/LATEST), else the newest SFT run's.")
    ] = None,
    data_version: Annotated[
        str | None,
        typer.Option("--data-version", help="Curated data version for calibration/QAT/eval; default LATEST."),
    ] = None,
    no_mlflow: Annotated[bool, typer.Option("--no-mlflow", help="Do not record the export in MLflow.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON only.")] = False,
) -> None:
    """Export base + adapter as deployable variants (merged HF, OpenVINO INT8/INT4/QAT IR, base IR +
    adapter), compare size/memory/speed/metrics, and select one by the configured policy.

    Output: <home>/exports/<export_id>/<variant>/ with variant.json, plus report.md, report.png and
    export.json; <home>/exports/LATEST names the newest export.
    """
    from rich.markdown import Markdown

    from tasks.quantize.export import ExportError
    from tasks.quantize.validate import AdapterError

    cfg = load_or_exit(config, overrides)
    if adapter is not None and not adapter.is_dir():
        fail(f"adapter directory not found: {adapter}", code=2)
    from flows.quantize import quantize_flow
    from tasks.data import DataError

    try:
        summary = quantize_flow(cfg, adapter_dir=adapter, data_version=data_version, log_mlflow=not no_mlflow)
    except AdapterError as err:
        fail(str(err), code=2)
    except (DataError, ExportError) as err:
        fail(str(err))
    if as_json:
        console.print_json(json.dumps({k: v for k, v in summary.as_json().items() if k != "markdown"}))
        return
    console.print(Markdown(summary.markdown))
    console.print(f"export {summary.export_id}: {summary.root}  selected {summary.selected} "
                  f"({summary.selected_path})  mlflow run {summary.mlflow_run_id}", highlight=False)


@app.command("finetune")
def finetune(
    config: ConfigOption = None,
    overrides: Overrides = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the newest SFT run from its last valid checkpoint.")
    ] = False,
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Curated data version; default: <home>/data/LATEST.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON only.")] = False,
) -> None:
    """QLoRA/LoRA fine-tune the base model on curated data (PyTorch Lightning), evaluate, log to MLflow.

    Output: <home>/runs/sft/<run>/ with adapter/, checkpoints/, metrics.json; <home>/runs/sft/LATEST.
    SIGTERM writes a checkpoint and exits 143; --resume continues from it.
    """
    from flows.finetune import finetune_flow
    from tasks.data import DataError
    from tasks.models import ModelImportError
    from tasks.sft.data import SFTDataError
    from tasks.sft.qlora import SFTModelError
    from tasks.sft.run import SFTRunError
    from tasks.sft.train import EXIT_SIGTERM, SFTInterrupted

    cfg = load_or_exit(config, overrides)
    try:
        summary = finetune_flow(cfg, resume=resume, data_version=data_version, progress_bar=not as_json)
    except SFTInterrupted as err:
        fail(str(err), code=EXIT_SIGTERM)
    except (SFTDataError, SFTModelError, SFTRunError, DataError, ModelImportError) as err:
        fail(str(err), code=2)
    if as_json:
        console.print_json(json.dumps(summary.as_json()))
        return
    train = summary.train
    table = Table(title=f"finetune {summary.run_name} ({train['method']}, data {summary.data_version})")
    for column in ("metric", "base", "tuned"):
        table.add_column(column)
    for name in sorted(set(summary.base) | set(summary.tuned)):
        if name.endswith(("accuracy", "f1", "rougeL", "compliance", "perplexity")):
            cells = [summary.base.get(name), summary.tuned.get(name)]
            table.add_row(name, *(f"{v:.4f}" if isinstance(v, float) else "-" for v in cells))
    if table.row_count:
        console.print(table)
    loss = f"{train['final_loss']:.4f}" if train["final_loss"] is not None else "-"
    console.print(
        f"steps {train['steps']}  final loss {loss}  {train['tokens_per_s']:.0f} tokens/s  "
        f"peak RSS {train['peak_rss_mb']:.0f} MB  {train['train_seconds']:.0f}s\n"
        f"adapter {summary.adapter_dir}\nmlflow run {summary.mlflow_run_id}",
        highlight=False,
    )


@app.command("align")
def align_cmd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    sft_run: Annotated[
        str | None, typer.Option("--sft-run", help="SFT run name under <home>/runs/sft; default: LATEST.")
    ] = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="SFT adapter directory (instead of --sft-run).")
    ] = None,
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Curated data version; default: the SFT run's version.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the run summary as JSON only.")] = False,
) -> None:
    """Align the SFT adapter with GRPO in reward stages (PPO clipped objective, group baseline; TRL 1.16
    has no PPOTrainer): stage 1 instruction quality (judge), stage 2 weighted task rewards.

    Output: <home>/runs/align/<run>/ with adapter/, stages/<i>-<name>/, eval/; <home>/runs/align/LATEST.
    Per-step rewards, KL, clip ratio and completion length and the before/after evaluation go to MLflow.
    """
    from tasks.align.data import AlignDataError
    from tasks.align.run import AlignRunError
    from tasks.align.trainer import AlignModelError
    from tasks.data import DataError
    from tasks.models import ModelImportError

    cfg = load_or_exit(config, overrides)
    if adapter is not None and not (adapter / "adapter_config.json").is_file():
        fail(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)", code=2)
    from flows.align import align_flow

    try:
        summary = align_flow(cfg, sft_adapter=adapter, sft_run=sft_run, data_version=data_version)
    except (AlignRunError, AlignDataError, AlignModelError, DataError, ModelImportError) as err:
        fail(str(err), code=2)
    if as_json:
        console.print_json(json.dumps(summary.as_json()))
        return
    table = Table(title=f"align {summary.run_name} ({summary.method}, data {summary.data_version})")
    for column in ("metric", "SFT (before)", "aligned (after)", "delta"):
        table.add_column(column)
    for name, row in (summary.compare or {}).items():
        cells = [(row["before"], ".4f"), (row["after"], ".4f"), (row["delta"], "+.4f")]
        table.add_row(name, *("-" if v is None else format(v, spec) for v, spec in cells))
    if table.row_count:
        console.print(table)
    for stage in summary.stages:
        weights = ", ".join(f"{k}={v:.2f}" for k, v in stage["weights_final"].items())
        console.print(f"stage {stage['name']}: {stage['steps']} steps in {stage['seconds']:.0f}s on "
                      f"{', '.join(stage['tasks'])}; final weights {weights}", highlight=False)
    console.print(f"adapter {summary.adapter_dir}\nmlflow run {summary.mlflow_run_id}  "
                  f"({summary.stage_seconds or 0:.0f}s)", highlight=False)
