"""Replicas share state through one SQL database: keys, revocation, rate-limit buckets, the request
log and feedback. Each store is opened twice (as two replicas would) on real PostgreSQL, and the
rate limiter also on the embedded SQLite default."""

from __future__ import annotations

import threading
import time

import pytest
import sqlalchemy as sa

from serving import db
from serving.auth import AuthError, KeyStore, SqlRateLimiter
from serving.feedback import DuplicateFeedbackError, FeedbackStore, ForeignRequestError, UnknownRequestError, ab_report


@pytest.fixture(params=["postgresql", "sqlite"])
def state_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite'}"
    return request.getfixturevalue("postgres_url")


def test_a_key_revoked_once_is_refused_by_every_replica(postgres_url):
    replica_a, replica_b = KeyStore(postgres_url), KeyStore(postgres_url)
    key, record = replica_a.add(f"alice-{time.time_ns()}", priority="high", rate_per_minute=30, burst=3)
    assert replica_b.verify(key).key_id == record.key_id
    assert replica_b.verify(key).priority == "high"
    assert replica_a.revoke(record.key_id) == 1
    for replica in (replica_a, replica_b):
        with pytest.raises(AuthError, match="revoked"):
            replica.verify(key)
    with pytest.raises(AuthError, match="invalid"):
        replica_b.verify(key[:-1] + ("A" if key[-1] != "A" else "B"))


def test_a_keys_rate_limit_holds_across_replicas(state_url):
    replica_a, replica_b = SqlRateLimiter(state_url, 600, 60), SqlRateLimiter(state_url, 600, 60)
    key = f"k-{time.time_ns()}"
    # Burst 4 at 1 request/minute: four requests in total get through, whichever replica serves them.
    outcomes = [(replica_a if i % 2 else replica_b).check(key, per_minute=1, burst=4) for i in range(8)]
    assert outcomes[:4] == [0, 0, 0, 0]
    assert all(wait >= 1 for wait in outcomes[4:]), outcomes
    assert 30 <= outcomes[-1] <= 60  # about one token's refill time at 1/minute
    # Another key has its own bucket.
    assert replica_a.check(f"{key}-other", per_minute=1, burst=1) == 0


def test_concurrent_replicas_never_overdraw_a_bucket(state_url):
    limiters = [SqlRateLimiter(state_url, 600, 60) for _ in range(2)]
    key, allowed, lock = f"race-{time.time_ns()}", [], threading.Lock()

    def hammer(limiter):
        for _ in range(25):
            ok = limiter.check(key, per_minute=1, burst=10) == 0
            with lock:
                allowed.append(ok)

    threads = [threading.Thread(target=hammer, args=(limiters[i % 2],)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(allowed) == 100
    assert sum(allowed) == 10  # the bucket's size, not 10 per replica or per thread


def test_the_bucket_refills_with_time(state_url):
    limiter = SqlRateLimiter(state_url, 600, 60)
    key = f"refill-{time.time_ns()}"
    # 1 token/s: the second check must come within 1 s of the first, which holds on a loaded machine too
    # (at 10/s, a 0.1 s stall between the two checks refilled the bucket and the test failed).
    assert limiter.check(key, per_minute=60, burst=1) == 0
    assert limiter.check(key, per_minute=60, burst=1) >= 1  # empty right after one request
    time.sleep(1.2)
    assert limiter.check(key, per_minute=60, burst=1) == 0


def test_a_request_costs_its_generations_in_the_shared_bucket(state_url):
    limiter = SqlRateLimiter(state_url, 600, 60)
    key = f"cost-{time.time_ns()}"
    assert limiter.check(key, cost=3, per_minute=1, burst=4) == 0
    assert limiter.check(key, cost=2, per_minute=1, burst=4) >= 1  # 1 token left, 2 asked
    assert limiter.check(key, cost=1, per_minute=1, burst=4) == 0
    # A batch larger than the whole bucket runs on a full bucket (and leaves it in debt), like TokenBucket.
    big = f"{key}-big"
    assert limiter.check(big, cost=10, per_minute=1, burst=4) == 0
    assert limiter.check(big, cost=1, per_minute=1, burst=4) >= 60  # 6 tokens of debt + 1, at 1/min


def test_feedback_reaches_a_request_logged_by_another_replica(postgres_url):
    replica_a, replica_b = FeedbackStore(postgres_url), FeedbackStore(postgres_url)
    request_id = f"chatcmpl-{time.time_ns()}"
    replica_a.log_request(request_id, "challenger-x", "3", "u1", None, "chat", 200, 0.1)
    replica_a.flush()
    assert replica_b.add_feedback(request_id, 1.0, "good") == "challenger-x"
    report = ab_report(postgres_url)
    row = next(r for r in report["variants"] if r["variant"] == "challenger-x")
    assert row["requests"] == 1 and row["feedback"] == 1 and row["success_rate"] == 1.0


def test_feedback_is_taken_once_and_only_from_the_requests_key(state_url):
    replica_a, replica_b = FeedbackStore(state_url), FeedbackStore(state_url)
    request_id = f"chatcmpl-once-{time.time_ns()}"
    replica_a.log_request(request_id, "champion", "1", None, "key-a", "chat", 200, 0.1, "hash")
    replica_a.flush()
    with pytest.raises(UnknownRequestError):
        replica_b.add_feedback(f"{request_id}-never-served", 1.0, key_id="key-a")
    with pytest.raises(ForeignRequestError):
        replica_b.add_feedback(request_id, 1.0, key_id="key-b")
    # Both replicas score the request at once: exactly one score is stored.
    outcomes: list[str] = []

    def score(store: FeedbackStore) -> None:
        try:
            store.add_feedback(request_id, 1.0, key_id="key-a")
            outcomes.append("stored")
        except DuplicateFeedbackError:
            outcomes.append("duplicate")

    threads = [threading.Thread(target=score, args=(store,)) for store in (replica_a, replica_b) * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["duplicate"] * 5 + ["stored"]
    # A replayed request id keeps its first row (and key): the log ignores the duplicate.
    replica_b.log_request(request_id, "challenger", "2", None, "key-b", "chat", 200, 0.1, "pin")
    replica_b.flush()
    with replica_a.engine.connect() as conn:
        logged = conn.execute(sa.select(db.requests_log.c.variant, db.requests_log.c.key_id,
                                        db.requests_log.c.chosen_by)
                              .where(db.requests_log.c.request_id == request_id)).one()
    assert tuple(logged) == ("champion", "key-a", "hash")


def test_a_request_log_from_before_chosen_by_gets_the_column(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as conn:  # the request log as it was before chosen_by existed
        conn.execute("CREATE TABLE requests (request_id TEXT PRIMARY KEY, variant TEXT NOT NULL, version TEXT, "
                     "user TEXT, key_id TEXT, route TEXT, status INTEGER, latency_s REAL, created_at REAL NOT NULL)")
        conn.execute("INSERT INTO requests VALUES ('old', 'champion', '1', NULL, NULL, 'chat', 200, 0.1, 1.0)")
    store = FeedbackStore(path)
    store.log_request("new", "champion", "1", None, None, "chat", 200, 0.1, "route")
    store.flush()
    with sqlite3.connect(path) as conn:
        rows = dict(conn.execute("SELECT request_id, chosen_by FROM requests").fetchall())
    assert rows == {"old": None, "new": "route"}
