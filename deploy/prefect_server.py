"""The ``prefect`` command with one compatibility fix, for the Prefect server this stack runs.

Prefect 3.8.8's scheduler bulk-inserts flow runs with a ``state`` key, which is a hybrid property
on its ``FlowRun`` model. SQLAlchemy 2.0 ignored such keys; SQLAlchemy 2.1 (the version this
environment resolves, for MLflow) raises "Can't evaluate bulk DML statement" instead, so the
scheduler service never creates a run and cron deployments never fire. Giving the hybrid a
``bulk_dml`` hook that leaves the row alone restores 2.0's behaviour (Prefect inserts the state
rows itself right after). Drop this module once Prefect or a SQLAlchemy 2.0 pin makes it moot.

    python -m deploy.prefect_server server start --host 127.0.0.1 --port 4200
"""

from __future__ import annotations

import sys


def patch_scheduler_bulk_insert() -> bool:
    """Install the no-op ``bulk_dml`` hook on ``FlowRun.state``/``TaskRun.state``; True when needed."""
    from sqlalchemy.ext.hybrid import hybrid_property

    if not hasattr(hybrid_property, "bulk_dml"):  # SQLAlchemy 2.0: nothing to fix
        return False
    from prefect.server.database import orm_models

    for model in (orm_models.FlowRun, orm_models.TaskRun):
        prop = model.__dict__["state"]
        if prop.bulk_dml_setter is None:
            prop.bulk_dml_setter = _leave_mapping_alone
    return True


def _leave_mapping_alone(cls, mapping, value) -> None:  # noqa: ARG001 - SQLAlchemy's hook signature
    """Keep the key: the scheduler reads each run's ``state`` after the insert."""


def main() -> None:
    patch_scheduler_bulk_insert()
    from prefect.cli import app

    sys.argv[0] = "prefect"
    sys.exit(app())


if __name__ == "__main__":
    main()
