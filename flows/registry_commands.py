"""``lmforge promote``, ``rollback``, ``versions`` and ``ui``: the registry side of the CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Annotated

import typer
from rich.table import Table

from flows.cli import ConfigOption, Overrides, app, console, err_console, fail, load_or_exit


def _registry(config: str | None, overrides: list[str] | None):
    from tasks.tracking import use_mlflow

    cfg = load_or_exit(config, overrides)
    use_mlflow(cfg.tracking_uri(), cfg.registry.experiment, cfg.artifact_root())
    return cfg


@app.command("promote")
def promote_cmd(
    version: Annotated[str, typer.Argument(help="Model version number to promote.")],
    to: Annotated[str, typer.Option("--to", help="Alias to move: champion or challenger.")] = "champion",
    force: Annotated[bool, typer.Option("--force", help="Promote even if gates failed or artifacts are missing.")] = False,
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Point an alias (default champion) at VERSION; the old champion becomes previous-champion.

    Moving an alias changes what the gateway serves (it watches the registry). Setting the
    alias in the MLflow UI does the same, without the gate and artifact checks.
    """
    from tasks.registry import RegistryError, promote

    if to not in ("champion", "challenger"):
        fail(f"--to must be 'champion' or 'challenger', got {to!r}", code=2)
    cfg = _registry(config, overrides)
    try:
        result = promote(cfg.registry, version, alias=to, force=force)
    except RegistryError as err:
        fail(str(err))
    console.print(f"{cfg.registry.model_name}: " + ", ".join(f"{a} -> v{v}" for a, v in sorted(result.items())))


@app.command("rollback")
def rollback_cmd(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Swap champion and previous-champion (run twice to undo)."""
    from tasks.registry import RegistryError, rollback

    cfg = _registry(config, overrides)
    try:
        result = rollback(cfg.registry)
    except RegistryError as err:
        fail(str(err))
    console.print(f"{cfg.registry.model_name}: " + ", ".join(f"{a} -> v{v}" for a, v in sorted(result.items())))


@app.command("versions")
def versions_cmd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List registered versions with their aliases, gate status and key metrics."""
    import mlflow

    from tasks.registry import aliases

    cfg = _registry(config, overrides)
    name = cfg.registry.model_name
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases(name).items():
        by_version.setdefault(version, []).append(alias)
    rows = []
    for mv in mlflow.MlflowClient().search_model_versions(f"name='{name}'"):
        tags = mv.tags
        rows.append({
            "version": str(mv.version), "aliases": sorted(by_version.get(str(mv.version), [])),
            "gate": tags.get("gate_status", "-"), "data": tags.get("data_version", "-"),
            "quant": tags.get("quant_format", "-"),
            "metrics": {k[7:]: float(v) for k, v in tags.items() if k.startswith("metric.")},
        })
    rows.sort(key=lambda r: int(r["version"]))
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not rows:
        err_console.print(f"no versions of {name} yet; run: lmforge run")
        return
    metric_names = sorted({m for r in rows for m in r["metrics"]})
    table = Table("version", "aliases", "gate", "data", "quant", *metric_names, title=name)
    for r in rows:
        table.add_row(r["version"], ", ".join(r["aliases"]), r["gate"], r["data"][:10], r["quant"],
                      *(f"{r['metrics'][m]:.3f}" if m in r["metrics"] else "-" for m in metric_names))
    console.print(table)


@app.command("ui")
def ui_cmd(
    port: Annotated[int, typer.Option("--port", help="Port of the MLflow UI.")] = 5000,
    host: Annotated[str, typer.Option("--host", help="Bind address.")] = "127.0.0.1",
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Start the MLflow UI on the embedded store (and print how to open the Prefect UI)."""
    cfg = load_or_exit(config, overrides)
    uri = cfg.tracking_uri()
    if not uri.startswith("sqlite:"):
        fail(f"registry.tracking_uri is {uri}: open that server's UI instead", code=2)
    mlflow_bin = shutil.which("mlflow", path=str(__import__("pathlib").Path(sys.executable).parent)) or "mlflow"
    console.print(f"MLflow UI: http://{host}:{port}  (store {uri})")
    console.print("Prefect UI: run `prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api "
                  "before `lmforge run`, so flow runs appear there.")
    cfg.home.mkdir(parents=True, exist_ok=True)
    command = [mlflow_bin, "server", "--backend-store-uri", uri, "--default-artifact-root",
               cfg.artifact_root().resolve().as_uri(), "--host", host, "--port", str(port)]
    raise typer.Exit(_run_until_signalled(command))


def _run_until_signalled(command: list[str], grace_s: float = 10.0) -> int:
    """Run ``command`` in its own process group and stop the whole group when this process is told to
    stop (SIGTERM, SIGINT) or the command ends: ``mlflow server`` starts a web server with worker
    processes, which a plain ``subprocess.call`` would leave running after a SIGTERM to this process."""
    proc = subprocess.Popen(command, start_new_session=True)
    stopped: list[int] = []

    def on_signal(signum, _frame) -> None:
        stopped.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = proc.wait()
    finally:
        _stop_group(proc, grace_s)  # workers may outlive the server's own process
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 128 + stopped[0] if stopped else code


def _stop_group(proc: subprocess.Popen, grace_s: float) -> None:
    """SIGTERM every process in ``proc``'s group, SIGKILL whatever is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + grace_s
        try:
            os.killpg(proc.pid, sig)
            while time.monotonic() < deadline:
                proc.poll()  # reap the leader: a zombie still counts as a member of its group
                os.killpg(proc.pid, 0)
                time.sleep(0.1)
        except ProcessLookupError:
            return
