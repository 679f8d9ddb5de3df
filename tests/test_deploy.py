"""Scheduled runs: a cron deployment is registered on a real Prefect API and a run of it executes.

TODO(issue 23): this does not show that the *scheduler* creates the 02:00 run: Prefect's temporary
test server runs no scheduler service, so the run below is created by hand in the state the
scheduler would give it. Proving the schedule fires needs a real `prefect server start` with its
scheduler (issue 23 owns that test).
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone

from flows.deploy import build_deployment
from tests.conftest import REPO


def test_cron_deployment_is_registered_and_a_run_of_it_executes(prefect_harness, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.runner import Runner
    from prefect.states import Scheduled

    home = tmp_path / "home"
    deployment = build_deployment("nightly-test", "0 2 * * *", str(REPO / "configs" / "tiny.yaml"),
                                  [f"home={home}"], stage="curate")

    async def scenario():
        runner = Runner(name="lmforge-test-runner", query_seconds=1)
        deployment_id = await runner.add_deployment(deployment)
        async with get_client() as client:
            stored = await client.read_deployment(deployment_id)
            crons = [s.schedule.cron for s in stored.schedules]
            # What Prefect's scheduler would create at 02:00, made by hand (see the TODO above).
            run = await client.create_flow_run_from_deployment(
                deployment_id, state=Scheduled(scheduled_time=datetime.now(timezone.utc)))
            await runner.start(run_once=True)
            finished = await client.read_flow_run(run.id)
        return stored, crons, finished

    stored, crons, finished = asyncio.run(scenario())
    assert stored.name == "nightly-test"
    assert crons == ["0 2 * * *"]
    assert stored.parameters["stage"] == "curate"
    assert finished.state.is_completed(), finished.state
    # The scheduled run did real work: the curated data set exists in the configured home.
    assert (home / "data" / "LATEST").is_file()
