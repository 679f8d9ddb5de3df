"""``lmforge models import`` and ``models list``: the base-model store."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from flows.cli import ConfigOption, Overrides, console, err_console, fail, load_or_exit, models_app


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
