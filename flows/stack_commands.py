"""``lmforge stack``: the production stack's helpers (certificates, MLflow users) and the loopback stack."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from flows.cli import app, console, err_console, fail

stack_app = typer.Typer(help="The production stack: TLS certificates, MLflow users, the loopback stack.",
                        no_args_is_help=True)
app.add_typer(stack_app, name="stack")


@stack_app.command("certs")
def certs_cmd(
    out: Annotated[Path, typer.Argument(help="Directory for ca.crt, server.crt and server.key.")],
    name: Annotated[list[str] | None, typer.Option("--name", help="DNS name or IP of the server (repeatable).")] = None,
) -> None:
    """Generate a private CA and a server certificate (nginx's TLS in compose and the loopback stack)."""
    from deploy.certs import make_certs

    files = make_certs(out, tuple(name or ["localhost", "127.0.0.1"]))
    console.print(f"CA {files.ca} (give it to clients), certificate {files.cert}, key {files.key}")


@stack_app.command("mlflow-user")
def mlflow_user_cmd(
    username: Annotated[str, typer.Argument(help="User to create (or whose password to set).")],
    url: Annotated[str, typer.Option("--url", help="MLflow server URL.")],
) -> None:
    """Create an MLflow basic-auth user (default permission: READ), e.g. the gateways' reader.

    As the admin from MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD; the new user's password comes
    from LMFORGE_NEW_USER_PASSWORD (never a command-line argument, which `ps` would show).
    """
    from deploy.mlflow_auth import ensure_user

    password = os.environ.get("LMFORGE_NEW_USER_PASSWORD")
    if not password:
        fail("set LMFORGE_NEW_USER_PASSWORD to the new user's password", code=2)
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        fail("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to the MLflow admin's credentials", code=2)
    created = ensure_user(url, username, password)
    err_console.print(f"MLflow user {username!r} {'created' if created else 'existed; password updated'}")
