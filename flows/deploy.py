"""Scheduled pipeline runs: a Prefect deployment with a cron schedule on a process work pool.

``lmforge deploy --cron "0 2 * * *"`` registers the deployment on the Prefect server named by
``PREFECT_API_URL``; the server's scheduler creates a run at each cron time and a worker of the
pool (``prefect worker start --pool lmforge``) executes it in a subprocess, as it does runs started
from the Prefect UI's "Run" button or ``prefect deployment run``. Prefect's temporary local server
runs no scheduler, so the command refuses it (exit 2) instead of registering a schedule that never fires.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow

from configs.schema import load

DeployableStage = Literal["pipeline", "curate"]
DEFAULT_POOL = "lmforge"


@flow(name="scheduled-pipeline")
def scheduled_pipeline(config: str | None = None, overrides: list[str] | None = None,
                       stage: DeployableStage = "pipeline") -> dict[str, Any]:
    """Entry point of deployments: parameters are JSON (a preset and overrides), not a config object."""
    from flows.curate import curate_flow
    from flows.pipeline import pipeline_flow

    cfg = load(config, overrides or [])
    if stage == "curate":
        return {"stage": stage, "version": curate_flow(cfg).version, "register": None}
    result = pipeline_flow(cfg)
    return {"stage": stage, "version": result.data.version, "register": result.register.as_json()}


class NoPrefectServer(RuntimeError):
    """No Prefect server to deploy to (unset PREFECT_API_URL, or it does not answer)."""


def prefect_api_url() -> str:
    """The configured Prefect API, or :class:`NoPrefectServer` saying what to start."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise NoPrefectServer(
            "PREFECT_API_URL is not set, so Prefect would use its temporary local server, which runs no "
            "scheduler: a cron deployment there never fires. Start a real server and a worker, then point "
            "lmforge at it:\n"
            "  prefect server start\n"
            f"  prefect worker start --pool {DEFAULT_POOL} --type process\n"
            "  export PREFECT_API_URL=http://127.0.0.1:4200/api\n"
            "or run `lmforge stack up`, which starts both (see docs/DEPLOYMENT.md).")
    return url


def deploy_scheduled(name: str, cron: str, config: str | None, overrides: list[str],
                     stage: DeployableStage = "pipeline", pool: str = DEFAULT_POOL) -> str:
    """Create (or update) the cron deployment on the server's process work pool ``pool``; returns its id.

    The pool is created when missing. The deployment references the flow by module path
    (``flows.deploy.scheduled_pipeline``), so a worker needs lmforge importable, nothing uploaded;
    ``concurrency_limit=1`` keeps a slow run from overlapping the next cron tick.
    """
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.deployments.runner import EntrypointType
    from prefect.exceptions import ObjectNotFound

    url = prefect_api_url()

    async def ensure_pool() -> None:
        async with get_client() as client:
            error = await client.api_healthcheck()
            if error is not None:
                raise NoPrefectServer(f"the Prefect server at {url} does not answer: {error}")
            try:
                await client.read_work_pool(pool)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=pool, type="process"))

    deployment = scheduled_pipeline.to_deployment(
        name=name, cron=cron, work_pool_name=pool, entrypoint_type=EntrypointType.MODULE_PATH, concurrency_limit=1,
        parameters={"config": config, "overrides": overrides, "stage": stage},
        description=f"lmforge {stage} on preset {config or 'defaults'} ({' '.join(overrides) or 'no overrides'})",
        tags=["lmforge", stage],
    )

    async def register() -> str:
        await ensure_pool()
        # RunnerDeployment.apply, not Flow.deploy: the latter lists the pool's workers with null paging
        # fields, which Prefect 3.8's server rejects on this fastapi (422).
        return str(await deployment.apply(work_pool_name=pool))

    return asyncio.run(register())
