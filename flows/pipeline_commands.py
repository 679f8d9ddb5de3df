"""``lmforge run`` and ``lmforge deploy``: the whole pipeline, now or on a schedule."""

from __future__ import annotations

import atexit
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from flows.cli import ConfigOption, Overrides, app, console, err_console, fail, load_or_exit

if TYPE_CHECKING:
    from tasks.results import RegistrationResult


@app.command("run")
def run_cmd(
    config: ConfigOption = None,
    overrides: Overrides = None,
    serve: Annotated[bool, typer.Option("--serve", help="Then start the gateway on the registry aliases "
                                        "(what `make run` does); stop it with Ctrl-C.")] = False,
) -> None:
    """Run the whole pipeline: curate, finetune, align, quantize, evaluate, register, gate.

    Finished stages whose inputs did not change are reused, so re-running after a failure resumes
    at the failed stage. The first version that passes the gates becomes champion; later ones
    become challenger.
    """
    from flows.pipeline import pipeline_flow

    cfg = load_or_exit(config, overrides)
    result = pipeline_flow(cfg)
    console.print(result.report, highlight=False, markup=False)
    if serve:
        _serve_after_run(cfg, result.register, config, overrides or [])


def _serve_after_run(cfg, registered: RegistrationResult, config: str | None, overrides: list[str]) -> None:
    from serving.auth import KeyStore
    from serving.db import state_locations

    # Asked of the registry, not the run's (possibly reused) result: aliases move after registration.
    if not _any_champion(cfg):
        why = ("failed its gates" if registered.gate_reasons else "passed its gates") + \
            f" and {cfg.registry.model_name} has no champion to serve"
        fail(f"{registered.name} v{registered.version} {why}; see the report above, or "
             f"`lmforge promote {registered.version}{' --force' if registered.gate_reasons else ''}`")
    if cfg.serve.auth:
        store = KeyStore(state_locations(cfg.serve.database_url, cfg.home)[0])
        if not any(k.revoked_at is None for k in store.list()):
            # A first run has no keys yet: make one so the gateway is usable right away (shown once).
            key, record = store.add("make-run", admin=True)
            err_console.print(f"created API key {record.key_id} (make-run, admin); shown once, store it now:")
            console.print(key, highlight=False)
    # The gateway gets a fresh process (same PID, so Ctrl-C and SIGTERM reach it): this one holds
    # torch, training threads and the temporary Prefect server, and after a full pipeline its
    # interpreter teardown could crash on SIGTERM and leave that server orphaned. Exit handlers run
    # first (they stop the Prefect server and flush MLflow); exec then skips native teardown.
    argv = [sys.executable, "-m", "flows.cli", "serve", *(["--config", config] if config else []), *overrides]
    err_console.print("pipeline done; starting the gateway (Ctrl-C stops it)")
    atexit._run_exitfuncs()
    sys.stdout.flush()  # whoever reads stdout needs the key now; exec drops unflushed buffers
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _any_champion(cfg) -> bool:
    from tasks.registry import aliases

    return "champion" in aliases(cfg.registry.model_name)  # the pipeline flow set the tracking URI


@app.command("deploy")
def deploy_cmd(
    cron: Annotated[str, typer.Option("--cron", help='Cron schedule, e.g. "0 2 * * *" (02:00 daily).')],
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "nightly",
    stage: Annotated[str, typer.Option("--stage", help="What to run: pipeline or curate.")] = "pipeline",
    pool: Annotated[str, typer.Option("--pool", help="Process work pool (created when missing).")] = "lmforge",
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Register the pipeline as a cron deployment on a Prefect server's process work pool.

    Needs PREFECT_API_URL pointing at a real Prefect server (its scheduler creates the runs) and a
    worker of the pool to execute them: `prefect worker start --pool lmforge --type process`
    (`lmforge stack up` starts both). Runs can also be started from the Prefect UI or with
    `prefect deployment run 'scheduled-pipeline/NAME'`.
    """
    from datetime import datetime

    from cronsim import CronSim, CronSimError  # the cron parser Prefect itself uses

    from flows.deploy import NoPrefectServer, deploy_scheduled, prefect_api_url

    if stage not in ("pipeline", "curate"):
        fail(f"--stage must be 'pipeline' or 'curate', got {stage!r}", code=2)
    try:
        CronSim(cron, datetime.now())
    except CronSimError:
        fail(f"--cron {cron!r} is not a valid cron expression (e.g. '0 2 * * *')", code=2)
    load_or_exit(config, overrides)  # a bad config fails now, not at 02:00
    try:
        prefect_api_url()
    except NoPrefectServer as err:
        fail(str(err), code=2)
    config_path = str(Path(config).resolve()) if config and Path(config).exists() else config
    try:
        deployment_id = deploy_scheduled(name, cron, config_path, list(overrides or []), stage, pool)  # type: ignore[arg-type]
    except NoPrefectServer as err:
        fail(str(err))
    console.print(f"deployment scheduled-pipeline/{name} ({deployment_id}) on cron {cron!r}, work pool {pool!r}; "
                  f"runs execute on its workers: prefect worker start --pool {pool} --type process")
