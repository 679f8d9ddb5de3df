"""Users of MLflow's basic-auth app, managed through its REST API as the admin."""

from __future__ import annotations


def ensure_user(url: str, username: str, password: str) -> bool:
    """Create ``username`` on the MLflow server at ``url``, or set its password; True when created.

    Authenticates as MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD (the admin).
    """
    from mlflow.exceptions import RestException
    from mlflow.server.auth.client import AuthServiceClient

    client = AuthServiceClient(url)
    try:
        client.create_user(username, password)
        return True
    except RestException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    client.update_user_password(username, password)
    return False
