"""A PostgreSQL cluster in a directory of its own: initdb with a password, and the server's argv.

PostgreSQL refuses to run as root; as root, its data directory goes where the ``postgres`` user can
reach it (``/var/tmp/lmforge-pg-<hash of the owner dir>``) and it runs as that user.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

SUPERUSER = "lmforge"


def data_dir(owner: Path) -> Path:
    """The data directory for a cluster that belongs to ``owner`` (a stack root, a test's tmp dir)."""
    if os.geteuid() != 0:
        return owner / "pg"
    digest = hashlib.sha256(str(owner.resolve()).encode()).hexdigest()[:12]
    return Path("/var/tmp") / f"lmforge-pg-{digest}"


def run_as() -> list[str]:
    """Command prefix that runs PostgreSQL's programs as a non-root user."""
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def init_cluster(data: Path, password: str) -> None:
    """``initdb`` with superuser ``lmforge`` / ``password`` and SCRAM authentication; no-op if initialised."""
    if (data / "PG_VERSION").is_file():
        return
    data.mkdir(parents=True, exist_ok=True)
    pwfile = data.parent / f".{data.name}.pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(data, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    data.chmod(0o700)
    pwfile.chmod(0o600)
    try:
        result = subprocess.run([*run_as(), shutil.which("initdb") or "initdb", "-D", str(data), "-U", SUPERUSER,
                                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "-E", "UTF8"],
                                capture_output=True, text=True)
    finally:
        pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed: {result.stderr.strip()[-2000:]}")


def server_argv(data: Path, port: int) -> list[str]:
    """The server on 127.0.0.1:``port``, its socket in the data directory."""
    return [shutil.which("postgres") or "postgres", "-D", str(data), "-p", str(port), "-k", str(data),
            "-c", "listen_addresses=127.0.0.1"]


def create_databases(dsn: str, names: tuple[str, ...]) -> None:
    """Create each database in ``names`` that does not exist yet (``dsn``: a libpq URL to ``postgres``)."""
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        existing = {row[0] for row in conn.execute("SELECT datname FROM pg_database")}
        for name in names:
            if name not in existing:
                conn.execute(f'CREATE DATABASE "{name}"')


def ready(dsn: str) -> bool:
    import psycopg

    try:
        with psycopg.connect(dsn, connect_timeout=2):
            return True
    except psycopg.OperationalError:
        return False
