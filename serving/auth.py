"""API keys (hashed at rest) and per-key token-bucket rate limits, in memory or shared in SQL.

Keys look like ``lmf_<key_id>_<secret>``: the id finds the row, the secret is checked against its
SHA-256. A plain SHA-256 (not PBKDF2/bcrypt) is deliberate: the secret is 32 random bytes, so
there is nothing to brute-force, and a slow hash would cost milliseconds on every request. The
store never holds the key itself; it is shown once, by ``lmforge keys add``.

Keys live in the state database (serving/db.py: SQLite under ``<home>/serving`` by default, the
replicas' shared PostgreSQL at scale) and are read on every request (a primary-key lookup), so a
key revoked from the CLI stops working at once on every gateway sharing the database.

Rate limits across replicas (:class:`SqlRateLimiter`): one token-bucket row per key, refilled and
decremented by a single ``INSERT ... ON CONFLICT DO UPDATE ... RETURNING`` statement. The database
serialises concurrent updates of a row, so N replicas draw from one bucket and a key gets its
rate in total, not N times it; on PostgreSQL the refill uses the database's clock, so replica
clock skew does not matter. It costs one round trip per admitted request; without a shared
database the in-memory :class:`RateLimiter` keeps the per-process bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import math
import secrets
import time
from pathlib import Path

import sqlalchemy as sa

from serving import db


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


_KEY_COLUMNS = [db.api_keys.c[name] for name in ("key_id", "name", "priority", "rate_per_minute", "burst", "admin",
                                                 "created_at", "revoked_at")]


def _record(row) -> ApiKey:
    return ApiKey(row[0], row[1], row[2], row[3], row[4], bool(row[5]), row[6], row[7])


class KeyStore:
    """API keys in the state database, hashed."""

    def __init__(self, location: str | Path):
        """Args: location: a database URL, or the path of a SQLite file."""
        self.engine = db.engine(location)

    def add(self, name: str, priority: str = "normal", rate_per_minute: int | None = None,
            burst: int | None = None, admin: bool = False) -> tuple[str, ApiKey]:
        """Create a key; returns (the full key, shown only now; its record)."""
        if not name.strip():
            raise ValueError("a key needs a non-empty name")
        key_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)
        full = f"lmf_{key_id}_{secret}"
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(db.api_keys.insert().values(
                key_id=key_id, name=name, sha256=_digest(secret), priority=priority, rate_per_minute=rate_per_minute,
                burst=burst, admin=int(admin), created_at=now))
        return full, ApiKey(key_id, name, priority, rate_per_minute, burst, admin, now, None)

    def revoke(self, key_id_or_name: str) -> int:
        """Revoke by key id or name; returns how many keys were revoked."""
        table = db.api_keys
        with self.engine.begin() as conn:
            result = conn.execute(table.update().where(
                sa.or_(table.c.key_id == key_id_or_name, table.c.name == key_id_or_name),
                table.c.revoked_at.is_(None)).values(revoked_at=time.time()))
        return result.rowcount

    def list(self) -> list[ApiKey]:
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(*_KEY_COLUMNS).order_by(db.api_keys.c.created_at)).fetchall()
        return [_record(r) for r in rows]

    def verify(self, presented: str) -> ApiKey:
        """The key record for ``presented``, or AuthError saying why not."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != "lmf" or not parts[1] or not parts[2]:
            raise AuthError("malformed API key (expected lmf_<id>_<secret>)")
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(*_KEY_COLUMNS, db.api_keys.c.sha256)
                               .where(db.api_keys.c.key_id == parts[1])).fetchone()
        if row is None or not hmac.compare_digest(row[8], _digest(parts[2])):
            raise AuthError("invalid API key")
        if row[7] is not None:
            raise AuthError("API key has been revoked")
        return _record(row)


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class TokenBucket:
    """``capacity`` requests at once, refilled at ``rate`` per second."""

    __slots__ = ("capacity", "rate", "tokens", "stamp")

    def __init__(self, capacity: float, rate: float):
        self.capacity, self.rate = float(capacity), float(rate)
        self.tokens, self.stamp = float(capacity), time.monotonic()

    def take(self, now: float | None = None) -> float:
        """0.0 when a token was taken; else the seconds until one is available."""
        now = time.monotonic() if now is None else now
        self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


class RateLimiter:
    """One token bucket per key id (in memory, per gateway replica)."""

    def __init__(self, per_minute: int, burst: int):
        self.per_minute, self.burst = per_minute, burst
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key_id: str, per_minute: int | None = None, burst: int | None = None) -> int:
        """0 when allowed, else the Retry-After seconds (>= 1)."""
        bucket = self._buckets.get(key_id)
        if bucket is None:
            bucket = self._buckets[key_id] = TokenBucket(burst or self.burst, (per_minute or self.per_minute) / 60.0)
        wait = bucket.take()
        return 0 if wait == 0.0 else max(1, math.ceil(wait))


# One statement refills the bucket by the time since its last use, takes a token when one is there,
# and says whether it did; the row lock makes it atomic across replicas.
_TAKE = {
    "postgresql": """
INSERT INTO rate_buckets (bucket, tokens, stamp, allowed)
VALUES (:bucket, :capacity - 1, EXTRACT(EPOCH FROM clock_timestamp()), true)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = LEAST(:capacity, rate_buckets.tokens + GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp())
             - rate_buckets.stamp) * :rate)
             - CASE WHEN LEAST(:capacity, rate_buckets.tokens + GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp())
                    - rate_buckets.stamp) * :rate) >= 1 THEN 1 ELSE 0 END,
    allowed = LEAST(:capacity, rate_buckets.tokens + GREATEST(0, EXTRACT(EPOCH FROM clock_timestamp())
              - rate_buckets.stamp) * :rate) >= 1,
    stamp = EXTRACT(EPOCH FROM clock_timestamp())
RETURNING tokens, allowed""",
    "sqlite": """
INSERT INTO rate_buckets (bucket, tokens, stamp, allowed) VALUES (:bucket, :capacity - 1, :now, 1)
ON CONFLICT (bucket) DO UPDATE SET
    tokens = MIN(:capacity, tokens + MAX(0, :now - stamp) * :rate)
             - (MIN(:capacity, tokens + MAX(0, :now - stamp) * :rate) >= 1),
    allowed = MIN(:capacity, tokens + MAX(0, :now - stamp) * :rate) >= 1,
    stamp = :now
RETURNING tokens, allowed""",
}


class SqlRateLimiter:
    """Token buckets in the shared state database: one bucket per key, whichever replica serves it."""

    def __init__(self, location: str | Path, per_minute: int, burst: int):
        self.engine = db.engine(location)
        self.per_minute, self.burst = per_minute, burst
        dialect = self.engine.dialect.name
        if dialect not in _TAKE:
            raise ValueError(f"shared rate limits support PostgreSQL and SQLite, not {dialect}")
        self._take = sa.text(_TAKE[dialect])

    def check(self, key_id: str, per_minute: int | None = None, burst: int | None = None) -> int:
        """0 when allowed, else the Retry-After seconds (>= 1)."""
        capacity, rate = float(burst or self.burst), (per_minute or self.per_minute) / 60.0
        with self.engine.begin() as conn:
            tokens, allowed = conn.execute(self._take, {"bucket": key_id, "capacity": capacity, "rate": rate,
                                                        "now": time.time()}).one()
        return 0 if allowed else max(1, math.ceil((1.0 - tokens) / rate))
