"""The gateway's shared state database: keys, rate-limit buckets, the request log and feedback.

One SQLAlchemy engine per URL and process. The embedded default is SQLite files under
``<home>/serving`` (WAL, so the CLI and a gateway can use them at once); replicas share a
PostgreSQL database given by ``serve.database_url`` / ``LMFORGE_DATABASE_URL``
(``postgresql+psycopg://user@host/db``), which every store below uses alike.
"""

from __future__ import annotations

import threading
from pathlib import Path

import sqlalchemy as sa

metadata = sa.MetaData()

api_keys = sa.Table(
    "api_keys", metadata,
    sa.Column("key_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("sha256", sa.Text, nullable=False),
    sa.Column("priority", sa.Text, nullable=False, server_default="normal"),
    sa.Column("rate_per_minute", sa.Integer),
    sa.Column("burst", sa.Integer),
    sa.Column("admin", sa.Integer, nullable=False, server_default="0"),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("revoked_at", sa.Float),
)

rate_buckets = sa.Table(
    "rate_buckets", metadata,
    sa.Column("bucket", sa.Text, primary_key=True),
    sa.Column("tokens", sa.Float, nullable=False),
    sa.Column("stamp", sa.Float, nullable=False),
    sa.Column("allowed", sa.Boolean, nullable=False),
)

requests_log = sa.Table(
    "requests", metadata,
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("variant", sa.Text, nullable=False),
    sa.Column("version", sa.Text),
    sa.Column("user", sa.Text),
    sa.Column("key_id", sa.Text),
    sa.Column("route", sa.Text),
    sa.Column("status", sa.Integer),
    sa.Column("latency_s", sa.Float),
    sa.Column("created_at", sa.Float, nullable=False),
)

feedback = sa.Table(
    "feedback", metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("created_at", sa.Float, nullable=False),
)
sa.Index("feedback_request", feedback.c.request_id)

_engines: dict[str, sa.Engine] = {}
_lock = threading.Lock()


def state_locations(database_url: str | None, home: Path) -> tuple[str | Path, str | Path]:
    """Where (keys, request log + feedback) live: the shared database, or the embedded SQLite files."""
    if database_url:
        return database_url, database_url
    return Path(home) / "serving" / "keys.sqlite", Path(home) / "serving" / "feedback.sqlite"


def to_url(location: str | Path) -> str:
    """A database URL: URLs pass through, a path becomes ``sqlite:///path``."""
    text = str(location)
    return text if "://" in text else f"sqlite:///{Path(text).expanduser().resolve()}"


def engine(location: str | Path) -> sa.Engine:
    """The process-wide engine for ``location`` (URL or SQLite path), tables created on first use."""
    url = to_url(location)
    with _lock:
        found = _engines.get(url)
        if found is not None:
            return found
        if url.startswith("sqlite"):
            path = sa.engine.make_url(url).database
            if path:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            created = sa.create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})
            sa.event.listen(created, "connect", _sqlite_pragmas)
        else:
            # pool_pre_ping: a replica outlives a database restart without failing the first requests.
            created = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        _create_tables(created)
        _engines[url] = created
        return created


def _create_tables(created: sa.Engine) -> None:
    # Replicas starting together race to create the tables; the loser sees a duplicate and retries.
    for attempt in range(3):
        try:
            metadata.create_all(created, checkfirst=True)
            return
        except (sa.exc.IntegrityError, sa.exc.ProgrammingError, sa.exc.OperationalError):
            if attempt == 2:
                raise


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    dbapi_conn.execute("PRAGMA journal_mode=WAL")
    dbapi_conn.execute("PRAGMA synchronous=NORMAL")


def dispose_all() -> None:
    """Close every pooled connection (tests, shutdown)."""
    with _lock:
        for created in _engines.values():
            created.dispose()
        _engines.clear()
