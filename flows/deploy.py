"""Scheduled pipeline runs: a Prefect deployment with a cron schedule, served by a long-lived process.

``lmforge deploy --cron "0 2 * * *"`` registers the deployment and runs ``prefect.serve``: the
process polls the Prefect API and executes each scheduled run (and runs triggered from the
Prefect UI's "Run" button or ``prefect deployment run``) in a subprocess. Point it at a real
server with ``PREFECT_API_URL``; without one Prefect starts its temporary local server.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from configs.schema import load

DeployableStage = Literal["pipeline", "curate"]


@flow(name="scheduled-pipeline")
def scheduled_pipeline(config: str | None = None, overrides: list[str] | None = None,
                       stage: DeployableStage = "pipeline") -> dict[str, Any]:
    """Entry point of deployments: parameters are JSON (a preset and overrides), not a config object."""
    from flows.curate import curate_flow
    from flows.pipeline import pipeline_flow

    cfg = load(config, overrides or [])
    result = curate_flow(cfg) if stage == "curate" else pipeline_flow(cfg)
    return {"stage": stage, "version": result.get("version"), "register": result.get("register")}


def build_deployment(name: str, cron: str, config: str | None, overrides: list[str], stage: DeployableStage = "pipeline"):
    """A ``RunnerDeployment`` of :func:`scheduled_pipeline` with a cron schedule (validated by Prefect)."""
    return scheduled_pipeline.to_deployment(
        name=name, cron=cron, parameters={"config": config, "overrides": overrides, "stage": stage},
        description=f"lmforge {stage} on preset {config or 'defaults'} ({' '.join(overrides) or 'no overrides'})",
        tags=["lmforge", stage],
    )
