"""The ``lmforge`` command line.

Every command takes ``--config PRESET`` (a YAML path or a preset name such as ``tiny``) and any
number of dotted overrides (``sft.max_steps=2 model.base=tiny``). A bad config prints one message
naming the file, line and field, and exits with code 2 before anything starts.
"""

from __future__ import annotations

import json
import logging
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False, rich_tracebacks=False)],
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), highlight=False, end="")
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


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    main()
