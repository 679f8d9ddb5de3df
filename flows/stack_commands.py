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


StackDir = Annotated[Path, typer.Option("--dir", help="Stack directory (files, logs, secrets, data).")]
_DEFAULT_DIR = Path(".lmforge/stack")


@stack_app.command("up")
def up_cmd(
    config: Annotated[str, typer.Option("--config", "-c", help="Preset the gateways and pipeline use.")] = "pipeline",
    replicas: Annotated[int, typer.Option(help="Gateway replicas behind nginx.", min=1, max=16)] = 2,
    stack_dir: StackDir = _DEFAULT_DIR,
    overrides: Annotated[list[str] | None, typer.Argument(help="Dotted overrides for the gateways.")] = None,
) -> None:
    """Bring the whole production stack up on this machine (supervisord keeps it running).

    PostgreSQL, MLflow (basic auth), a Prefect server + process worker, gateway replicas, nginx with
    TLS from a generated CA, Prometheus. Installs nginx and Prometheus with apt-get when missing.
    Stop it with `lmforge stack down`.
    """
    from deploy.programs import StackPorts, StackSpec
    from deploy.stack import Stack, StackError
    from flows.cli import load_or_exit

    load_or_exit(config, overrides)
    root = stack_dir.resolve()
    if (root / "stack.json").is_file():
        spec = StackSpec.load(root)
        if spec.replicas != replicas or spec.config != config or spec.overrides != list(overrides or []):
            fail(f"{root} holds a stack with {spec.replicas} replicas on -c {spec.config} "
                 f"{' '.join(spec.overrides)}; `lmforge stack down` and remove it, or use --dir", code=2)
    else:
        spec = StackSpec(root=root, ports=StackPorts.defaults(replicas), config=config, overrides=list(overrides or []))
    try:
        Stack(spec).up()
    except StackError as err:
        fail(str(err))
    _print_summary(spec)


def _print_summary(spec) -> None:
    ports = spec.ports
    console.print(f"""stack up in {spec.root} (logs in logs/, passwords in secrets/, CA in certs/ca.crt)
  API (OpenAI + JSON-RPC)  {spec.public_url}/v1   (plain http://localhost:{ports.http} redirects)
  MLflow (basic auth)      https://localhost:{ports.mlflow_tls}   user admin, password secrets/mlflow_admin.txt
  Prefect UI (basic auth)  https://localhost:{ports.prefect_tls}  user admin, password secrets/prefect_admin.txt
  Prometheus               http://127.0.0.1:{ports.prometheus}
  replicas                 {', '.join(f'127.0.0.1:{p}' for p in ports.gateways)}
next: eval "$(lmforge stack env --dir {spec.root})"; lmforge keys add me --admin
      lmforge deploy --cron "0 2 * * *" -c {spec.config} registry.tracking_uri=$MLFLOW_TRACKING_URI""", highlight=False)


@stack_app.command("down")
def down_cmd(stack_dir: StackDir = _DEFAULT_DIR) -> None:
    """Stop every program of the stack and its supervisord (data stays for the next `up`)."""
    from deploy.programs import StackSpec
    from deploy.stack import Stack

    Stack(StackSpec.load(stack_dir.resolve())).down()
    console.print("stack stopped")


@stack_app.command("status")
def status_cmd(stack_dir: StackDir = _DEFAULT_DIR) -> None:
    """supervisord's view of every program."""
    from deploy.programs import StackSpec
    from deploy.stack import Stack

    console.print(Stack(StackSpec.load(stack_dir.resolve())).ctl("status", check=False), highlight=False)


@stack_app.command("env")
def env_cmd(stack_dir: StackDir = _DEFAULT_DIR) -> None:
    """Shell exports for an operator: Prefect API + auth, MLflow as admin, the shared key database."""
    import shlex

    from deploy.programs import StackSpec

    spec = StackSpec.load(stack_dir.resolve())
    for key, value in spec.admin_env().items():
        print(f"export {key}={shlex.quote(value)}")
    print(f"export SSL_CERT_FILE={shlex.quote(str(spec.certs_dir / 'ca.crt'))}")
