"""``lmforge run`` and ``lmforge deploy``: the whole pipeline, now or on a schedule."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli import ConfigOption, Overrides, app, console, fail, load_or_exit


@app.command("run")
def run_cmd(config: ConfigOption = None, overrides: Overrides = None) -> None:
    """Run the whole pipeline: curate, finetune, align, quantize, evaluate, register, gate.

    Finished stages whose inputs did not change are reused, so re-running after a failure resumes
    at the failed stage. The first version that passes the gates becomes champion; later ones
    become challenger.
    """
    from flows.pipeline import pipeline_flow

    cfg = load_or_exit(config, overrides)
    result = pipeline_flow(cfg)
    console.print(result["report"], highlight=False, markup=False)


@app.command("deploy")
def deploy_cmd(
    cron: Annotated[str, typer.Option("--cron", help='Cron schedule, e.g. "0 2 * * *" (02:00 daily).')],
    name: Annotated[str, typer.Option("--name", help="Deployment name.")] = "nightly",
    stage: Annotated[str, typer.Option("--stage", help="What to run: pipeline or curate.")] = "pipeline",
    config: ConfigOption = None,
    overrides: Overrides = None,
) -> None:
    """Register the pipeline as a Prefect deployment with a cron schedule and serve it.

    This process stays up and executes scheduled runs, and runs started from the Prefect UI or
    `prefect deployment run 'scheduled-pipeline/NAME'`. Set PREFECT_API_URL to use a real server.
    """
    from datetime import datetime

    from cronsim import CronSim, CronSimError  # the cron parser Prefect itself uses

    from flows.deploy import build_deployment

    if stage not in ("pipeline", "curate"):
        fail(f"--stage must be 'pipeline' or 'curate', got {stage!r}", code=2)
    try:
        CronSim(cron, datetime.now())
    except CronSimError:
        fail(f"--cron {cron!r} is not a valid cron expression (e.g. '0 2 * * *')", code=2)
    load_or_exit(config, overrides)  # a bad config fails now, not at 02:00
    config_path = str(Path(config).resolve()) if config and Path(config).exists() else config
    deployment = build_deployment(name, cron, config_path, list(overrides or []), stage)  # type: ignore[arg-type]
    from prefect import serve

    console.print(f"serving deployment scheduled-pipeline/{name} on cron {cron!r}; Ctrl-C to stop")
    serve(deployment)
