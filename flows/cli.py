"""The ``lmforge`` command line.

Every command takes ``--config PRESET`` (a YAML path or a preset name such as ``tiny``) and any
number of dotted overrides (``sft.max_steps=2 model.base=tiny``). A bad config prints one message
naming the file, line and field, and exits with code 2 before anything starts.

This module holds the app, the options and error handling every command shares, and the small
commands; the others live in ``flows/*_commands.py`` and register themselves on :data:`app`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated, NoReturn

import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler

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
    typer.Option("--config", "-c", help="Preset YAML path or name (pipeline, tiny, gpu). Default: pipeline."),
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


# What `lmforge <command>` uses without --config: the preset sized for this class of machine.
DEFAULT_PRESET = "pipeline"


def load_or_exit(config: str | None, overrides: list[str] | None) -> LmforgeConfig:
    """Load the config (the ``pipeline`` preset when none is named); on any problem print it plainly and exit 2."""
    try:
        return load(config or DEFAULT_PRESET, overrides or [])
    except ConfigError as err:
        err_console.print(f"[bold red]error:[/] {err}", highlight=False)
        raise typer.Exit(2) from None


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- config
@config_app.command("show")
def config_show(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Validate a preset with overrides applied and print the full resolved config as YAML."""
    cfg = load_or_exit(config, overrides)
    print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), end="")
    err_console.print(f"config fingerprint: {cfg.fingerprint()}")


def main() -> None:
    """Console-script entry point."""
    try:
        app()
    except KeyboardInterrupt:
        err_console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":  # pragma: no cover
    # Run the importable module, not this __main__ copy, so command modules register on one `app`.
    from flows.cli import main as entry_point

    entry_point()
else:
    import importlib

    # Imported last, as each command module imports the shared pieces above and registers its
    # commands on `app`; `lmforge --help` lists them in this order.
    for _module in ("stage_commands", "serving_commands", "pipeline_commands", "registry_commands", "models_commands",
                    "stack_commands"):
        importlib.import_module(f"flows.{_module}")
