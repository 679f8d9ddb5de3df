"""API keys (hashed at rest, SQLite) and per-caller token-bucket rate limits counted in generations.

Keys look like ``lmf_<key_id>_<secret>``: the id finds the row, the secret is checked against its
SHA-256. A plain SHA-256 (not PBKDF2/bcrypt) is deliberate: the secret is 32 random bytes, so
there is nothing to brute-force, and a slow hash would cost milliseconds on every request. The
store never holds the key itself; it is shown once, by ``lmforge keys add``.

The database lives under ``<home>/serving/keys.sqlite`` and is read on every request (a primary-key
lookup, ~20 us), so a key revoked from the CLI stops working at once on every gateway sharing it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import secrets
import sqlite3
import threading
import time
from pathlib import Path

_SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    key_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    priority TEXT NOT NULL DEFAULT 'normal',
    rate_per_minute INTEGER,
    burst INTEGER,
    admin INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    revoked_at REAL
)
"""


class AuthError(Exception):
    """Missing, malformed, unknown or revoked key."""


@dataclasses.dataclass(frozen=True)
class ApiKey:
    """A stored key's public facts."""

    key_id: str
    name: str
    priority: str
    rate_per_minute: int | None
    burst: int | None
    admin: bool
    created_at: float
    revoked_at: float | None


class KeyStore:
    """API keys in SQLite, hashed."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.execute(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=5, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def add(self, name: str, priority: str = "normal", rate_per_minute: int | None = None,
            burst: int | None = None, admin: bool = False) -> tuple[str, ApiKey]:
        """Create a key; returns (the full key, shown only now; its record)."""
        if not name.strip():
            raise ValueError("a key needs a non-empty name")
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        full = f"lmf_{key_id}_{secret}"
        now = time.time()
        self._conn().execute(
            "INSERT INTO api_keys (key_id, name, sha256, priority, rate_per_minute, burst, admin, created_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key_id, name, _digest(secret), priority, rate_per_minute, burst, int(admin), now),
        )
        return full, ApiKey(key_id, name, priority, rate_per_minute, burst, admin, now, None)

    def revoke(self, key_id_or_name: str) -> int:
        """Revoke by key id or name; returns how many keys were revoked."""
        cur = self._conn().execute(
            "UPDATE api_keys SET revoked_at = ? WHERE (key_id = ? OR name = ?) AND revoked_at IS NULL",
            (time.time(), key_id_or_name, key_id_or_name),
        )
        return cur.rowcount

    def list(self) -> list[ApiKey]:
        rows = self._conn().execute(
            "SELECT key_id, name, priority, rate_per_minute, burst, admin, created_at, revoked_at"
            " FROM api_keys ORDER BY created_at"
        ).fetchall()
        return [ApiKey(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6], r[7]) for r in rows]

    def verify(self, presented: str) -> ApiKey:
        """The key record for ``presented``, or AuthError saying why not."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != "lmf" or not parts[1] or not parts[2]:
            raise AuthError("malformed API key (expected lmf_<id>_<secret>)")
        row = self._conn().execute(
            "SELECT key_id, name, priority, rate_per_minute, burst, admin, created_at, revoked_at, sha256"
            " FROM api_keys WHERE key_id = ?", (parts[1],),
        ).fetchone()
        if row is None or not hmac.compare_digest(row[8], _digest(parts[2])):
            raise AuthError("invalid API key")
        if row[7] is not None:
            raise AuthError("API key has been revoked")
        return ApiKey(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenBucket:
    """``capacity`` tokens at once, refilled at ``rate`` per second; a request costs one token per generation."""

    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float):
        self.capacity, self.rate = float(capacity), float(rate)
        self.tokens, self.stamp = float(capacity), time.monotonic()

    def refill(self, now: float) -> None:
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def take(self, cost: int = 1, now: float | None = None) -> float:
        """0.0 when ``cost`` tokens were taken; else the seconds until the request would be allowed.

        A request costing more than the whole bucket is allowed on a full bucket and leaves it in
        debt, so a batch larger than the burst still runs and the long-run rate still holds.
        """
        self.refill(time.monotonic() if now is None else now)
        needed = min(float(cost), self.capacity)
        if self.tokens >= needed:
            self.tokens -= cost
            return 0.0
        return (needed - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per caller (an API key id, or a client address when auth is off), in memory per
    gateway replica. A request costs the generations it asks for (a 64-call JSON-RPC batch: 64)."""

    MAX_IDLE_BUCKETS = 10_000

    def __init__(self, per_minute: int, burst: int):
        self.per_minute, self.burst = per_minute, burst
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, caller: str, cost: int = 1, per_minute: int | None = None, burst: int | None = None) -> int:
        """0 when ``caller`` may spend ``cost``, else the Retry-After seconds (>= 1)."""
        bucket = self._buckets.get(caller)
        if bucket is None:
            if len(self._buckets) >= self.MAX_IDLE_BUCKETS:
                self._forget_full()
            bucket = self._buckets[caller] = TokenBucket(burst or self.burst, (per_minute or self.per_minute) / 60.0)
        wait = bucket.take(cost)
        return 0 if wait == 0.0 else max(1, math.ceil(wait))

    def _forget_full(self) -> None:
        """Drop buckets that have refilled: a new bucket is full too, so nothing changes for their callers
        (without auth every client address gets a bucket; this keeps them from piling up)."""
        now = time.monotonic()
        for caller, bucket in list(self._buckets.items()):
            bucket.refill(now)
            if bucket.tokens >= bucket.capacity:
                del self._buckets[caller]
