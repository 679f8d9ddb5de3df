"""The ``lmforge`` command line.

Every command takes ``--config PRESET`` (a YAML path or a preset name such as ``tiny``) and any
number of dotted overrides (``sft.max_steps=2 model.base=tiny``). A bad config prints one message
naming the file, line and field, and exits with code 2 before anything starts.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from configs.schema import ConfigError, LmforgeConfig, load

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

app = typer.Typer(
    name="lmforge",
    help="Curate, fine-tune, align, quantize, register and serve a language model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
models_app = typer.Typer(help="Import and inspect base models.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(config_app, name="config")

ConfigOption = Annotated[
    str | None,
    typer.Option("--config", "-c", help="Preset YAML path or name (pipeline, tiny, gpu). Default: built-in defaults."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Dotted overrides, e.g. sft.max_steps=2 model.base=tiny (values parsed as YAML)."),
]


@app.callback()
def _main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False) -> None:
    # Libraries log at WARNING (datasets/dill even dump bytecode at INFO); our packages at INFO.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )
    for ours in ("configs", "flows", "tasks", "serving"):
        logging.getLogger(ours).setLevel(logging.DEBUG if verbose else logging.INFO)
    # The closed network makes Prefect's telemetry ping fail loudly on every temporary server.
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def load_or_exit(config: str | None, overrides: list[str] | None) -> LmforgeConfig:
    """Load the config; on any problem print it plainly and exit 2 (a usage error)."""
    try:
        return load(config, overrides or [])
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> None:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Validate a preset with overrides applied and print the full resolved config as YAML."""
    cfg = load_or_exit(config, overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    err_console.print(f"config fingerprint: {cfg.fingerprint()}")


# --------------------------------------------------------------------------- models
@models_app.command("import")
def models_import(
    config: ConfigOption = None,
    overrides: Overrides = None,
    model: Annotated[
        str | None, typer.Option("--model", "-m", help="Model spec; default: model.base from the config.")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Re-import even when the source hash matches.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest as JSON only.")] = False,
) -> None:
    """Import a base model (smollm2-135m, tiny, a local HF dir or a hub id) into the model store.

    The model is saved once as safetensors + tokenizer + chat template under
    <home>/models/<name>/ with a manifest; re-importing the same source is skipped.
    """
    from tasks.models import ModelImportError, import_model, resolve_spec

    cfg = load_or_exit(config, overrides)
    spec = model or cfg.model.base
    try:
        resolve_spec(spec)
    except ModelImportError as err:
        fail(str(err), code=2)
    try:
        manifest = import_model(spec, cfg.home, cfg.model, force=force)
    except ModelImportError as err:
        fail(str(err))
    if as_json:
        console.print_json(json.dumps(manifest))
        return
    _print_manifest(manifest)


@models_app.command("list")
def models_list(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """List the models in the store with their manifests' key facts."""
    from tasks.models import read_manifest

    cfg = load_or_exit(config, overrides)
    root = cfg.home / "models"
    table = Table("name", "kind", "params", "dtype", "source sha256", "path")
    for path in sorted(root.glob("*")) if root.is_dir() else []:
        manifest = read_manifest(path)
        if manifest and not path.name.startswith("."):
            table.add_row(
                manifest["name"], manifest["kind"], f"{manifest['param_count']:,}", manifest["dtype"],
                manifest["source_sha256"][:16], str(path),
            )
    if not table.row_count:
        err_console.print(f"no models in {root}; run: lmforge models import")
        return
    console.print(table)


def _print_manifest(manifest: dict) -> None:
    status = "reused (source sha256 matches)" if manifest.get("skipped") else "imported"
    table = Table(title=f"{manifest['name']}: {status}", show_header=False)
    for key in ("path", "kind", "source", "source_sha256", "architecture", "param_count", "dtype",
                "num_layers", "hidden_size", "vocab_size", "context_length", "chat_template", "created_at"):
        value = manifest.get(key)
        table.add_row(key, f"{value:,}" if key == "param_count" else str(value))
    console.print(table)


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

    from tasks.data.loaders import DataError, check_sources

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
        console.print_json(json.dumps(summary))
        return
    console.print(Markdown(Path(summary["card_md"]).read_text(encoding="utf-8")))
    status = "reused" if summary["reused"] else "built"
    console.print(f"data version {summary['version']} ({status}): {summary['path']}  "
                  f"mlflow run {summary['mlflow_run_id']}", highlight=False)


@app.command("quantize")
def quantize(
    config: ConfigOption = None,
    overrides: Overrides = None,
    adapter: Annotated[
        Path | None, typer.Option("--adapter", "-a", help="PEFT adapter dir; default: the newest SFT run's adapter.")
    ] = None,
    data_version: Annotated[
        str | None, typer.Option("--data-version", help="Curated data version for calibration/QAT/eval; default LATEST.")
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
        console.print_json(json.dumps({k: v for k, v in summary.items() if k != "markdown"}, default=str))
        return
    console.print(Markdown(summary["markdown"]))
    console.print(f"export {summary['export_id']}: {summary['root']}  selected {summary['selected']} "
                  f"({summary['selected_path']})  mlflow run {summary['mlflow_run_id']}", highlight=False)


@app.command("finetune")
def finetune(
    config: ConfigOption = None,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the newest SFT run from its last valid checkpoint.")] = False,
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
        console.print_json(json.dumps(summary, default=str))
        return
    train = summary["train"]
    table = Table(title=f"finetune {summary['run_name']} ({train['method']}, data {summary['data_version']})")
    for column in ("metric", "base", "tuned"):
        table.add_column(column)
    for name in sorted(set(summary["base"]) | set(summary["tuned"])):
        if name.endswith(("accuracy", "f1", "rougeL", "compliance", "perplexity")):
            cells = [summary[k].get(name) for k in ("base", "tuned")]
            table.add_row(name, *(f"{v:.4f}" if isinstance(v, float) else "-" for v in cells))
    if table.row_count:
        console.print(table)
    loss = f"{train['final_loss']:.4f}" if train["final_loss"] is not None else "-"
    console.print(
        f"steps {train['steps']}  final loss {loss}  {train['tokens_per_s']:.0f} tokens/s  "
        f"peak RSS {train['peak_rss_mb']:.0f} MB  {train['train_seconds']:.0f}s\n"
        f"adapter {summary['adapter_dir']}\nmlflow run {summary['mlflow_run_id']}",
        highlight=False,
    )


# --------------------------------------------------------------------------- serving
@app.command("serve")
def serve_cmd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    backend: Annotated[str | None, typer.Option("--backend", help="openvino, vllm or hf (default: serve.backend).")] = None,
) -> None:
    """Run the serving gateway (OpenAI API, JSON-RPC, A/B split, hot swap) until SIGTERM.

    Variants come from serve.variants (registry aliases or local IR dirs); keys from `lmforge keys`.
    """
    from serving.app import serve

    cfg = load_or_exit(config, overrides)
    if backend not in (None, "openvino", "vllm", "hf"):
        fail(f"unknown backend {backend!r}: use openvino, vllm or hf", code=2)
    err_console.print(f"gateway on http://{cfg.serve.host}:{cfg.serve.port}  variants: "
                      + ", ".join(f"{v.name}={v.model_uri} ({v.weight:g})" for v in cfg.serve.variants))
    serve(cfg.serve, cfg.home, cfg.tracking_uri(), cfg.data.templates, backend)


@app.command("keys")
def keys_cmd(
    action: Annotated[str, typer.Argument(help="add | revoke | list")],
    target: Annotated[str | None, typer.Argument(help="add: key name; revoke: key id or name.")] = None,
    config: ConfigOption = None,
    priority: Annotated[str, typer.Option(help="Priority class of a new key (serve.priority_shares).")] = "normal",
    rate: Annotated[int | None, typer.Option(help="Requests per minute for a new key (default: serve config).")] = None,
    burst: Annotated[int | None, typer.Option(help="Bucket size for a new key (default: serve config).")] = None,
    admin: Annotated[bool, typer.Option(help="May use the /admin API.")] = False,
) -> None:
    """Manage gateway API keys (stored hashed in <home>/serving/keys.sqlite).

    lmforge keys add alice [--priority high] [--rate 120] [--admin]; lmforge keys revoke <id|name>; lmforge keys list
    """
    import time

    from serving.auth import KeyStore

    cfg = load_or_exit(config, None)
    store = KeyStore(cfg.home / "serving" / "keys.sqlite")
    if action == "add":
        if not target:
            fail("keys add needs a name: lmforge keys add <name>", code=2)
        if priority not in cfg.serve.priority_shares:
            fail(f"unknown priority {priority!r}; classes: {', '.join(cfg.serve.priority_shares)}", code=2)
        key, record = store.add(target, priority=priority, rate_per_minute=rate, burst=burst, admin=admin)
        err_console.print(f"key {record.key_id} ({record.name}, {record.priority}); shown once, store it now:")
        console.print(key, highlight=False)
    elif action == "revoke":
        if not target:
            fail("keys revoke needs a key id or name", code=2)
        count = store.revoke(target)
        if not count:
            fail(f"no active key with id or name {target!r}")
        console.print(f"revoked {count} key(s)")
    elif action == "list":
        table = Table("id", "name", "priority", "rate/min", "burst", "admin", "created", "revoked")
        for k in store.list():
            stamp = lambda t: time.strftime("%Y-%m-%d %H:%M", time.localtime(t)) if t else ""  # noqa: E731
            table.add_row(k.key_id, k.name, k.priority, str(k.rate_per_minute or cfg.serve.rate_limit_per_minute),
                          str(k.burst or cfg.serve.rate_limit_burst), "yes" if k.admin else "", stamp(k.created_at),
                          stamp(k.revoked_at))
        console.print(table)
    else:
        fail(f"unknown action {action!r}: use add, revoke or list", code=2)


@app.command("ab")
def ab_cmd(
    action: Annotated[str, typer.Argument(help="report")],
    config: ConfigOption = None,
    reference: Annotated[str | None, typer.Option(help="Variant to compare against (default: most traffic).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON only.")] = False,
) -> None:
    """Per-variant outcomes from gateway feedback, with significance tests (`lmforge ab report`).

    Success = feedback score > 0. Each variant is compared with the reference by a two-proportion
    z-test (Fisher's exact test when a cell has < 5), plus Mann-Whitney U on the raw scores.
    """
    from serving.feedback import ab_report

    if action != "report":
        fail(f"unknown action {action!r}: use report", code=2)
    cfg = load_or_exit(config, None)
    db = cfg.home / "serving" / "feedback.sqlite"
    if not db.is_file():
        fail(f"no feedback database at {db}: serve traffic and POST /v1/feedback first")
    report = ab_report(db, reference)
    if as_json:
        console.print_json(json.dumps(report))
        return
    table = Table("variant", "requests", "feedback", "success rate", "mean score", title="A/B outcomes")
    for row in report["variants"]:
        rate = "" if row["success_rate"] is None else f"{row['success_rate']:.1%}"
        mean = "" if row["mean_score"] is None else f"{row['mean_score']:.3f}"
        table.add_row(row["variant"], str(row["requests"]), str(row["feedback"]), rate, mean)
    console.print(table)
    for test in report["tests"]:
        if test["p_value"] is None:
            console.print(f"{test['variant']} vs {test['against']}: {test.get('note', 'not enough data')}")
            continue
        verdict = "significant" if test["significant"] else "not significant"
        console.print(f"{test['variant']} vs {test['against']}: difference {test['difference']:+.1%}, "
                      f"{test['test']} p={test['p_value']:.4f} ({verdict} at 0.05)"
                      + (f", Mann-Whitney p={test['mann_whitney_p']:.4f}" if test["mann_whitney_p"] is not None else ""))


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
        console.print_json(json.dumps(summary, default=str))
        return
    table = Table(title=f"align {summary['run_name']} ({summary['method']}, data {summary['data_version']})")
    for column in ("metric", "SFT (before)", "aligned (after)", "delta"):
        table.add_column(column)
    for name, row in summary["compare"].items():
        cells = [(row["before"], ".4f"), (row["after"], ".4f"), (row["delta"], "+.4f")]
        table.add_row(name, *("-" if v is None else format(v, spec) for v, spec in cells))
    if table.row_count:
        console.print(table)
    for stage in summary["stages"]:
        weights = ", ".join(f"{k}={v:.2f}" for k, v in stage["weights_final"].items())
        console.print(f"stage {stage['name']}: {stage['steps']} steps in {stage['seconds']:.0f}s on "
                      f"{', '.join(stage['tasks'])}; final weights {weights}", highlight=False)
    console.print(f"adapter {summary['adapter_dir']}\nmlflow run {summary['mlflow_run_id']}  "
                  f"({summary['stage_seconds']:.0f}s)", highlight=False)


def main() -> None:
    """Console-script entry point."""
    import flows.pipeline_commands  # noqa: F401 - registers run/deploy on `app`
    import flows.registry_commands  # noqa: F401 - registers promote/rollback/versions/ui on `app`

    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    # Run the importable module, not this __main__ copy, so command modules register on one `app`.
    from flows.cli import main as _main

    _main()
