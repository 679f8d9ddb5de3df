"""A/B assignment: sticky, stateless, identical on every replica and across restarts.

A user id is hashed with SHA-256 (not Python's ``hash``, which is salted per process) into a
number in [0, 1) and compared with the cumulative variant weights. No state is stored, so N
gateway replicas agree without talking to each other, and a restart changes nothing. Requests
without a user (no ``user`` field, no X-User-Id) are assigned by their caller: the API key, or the
client address when auth is off, so one client's burst stays on one variant.

Changing weights moves only the users whose point falls in the shifted range (cumulative order is
the configured variant order), so a ramp-up from 10% to 20% keeps the first 10% where they were.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable

OVERRIDE_HEADER = "x-lmforge-variant"
USER_HEADER = "x-user-id"
VARIANT_HEADER = "X-Lmforge-Variant"


def user_point(user: str, salt: str = "") -> float:
    """Stable position of ``user`` in [0, 1): the first 8 bytes of sha256(salt + user)."""
    digest = hashlib.sha256(f"{salt}\x00{user}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class ABRouter:
    """Weighted, sticky variant assignment."""

    def __init__(self, weights: Iterable[tuple[str, float]], salt: str = "lmforge-ab"):
        self.salt = salt
        self.set_weights(weights)

    def set_weights(self, weights: Iterable[tuple[str, float]]) -> None:
        """Replace the split; weights are relative (normalised here)."""
        pairs = [(name, float(w)) for name, w in weights]
        total = sum(w for _, w in pairs)
        if not pairs or total <= 0:
            raise ValueError("A/B weights need at least one variant with a positive weight")
        self.names = [name for name, _ in pairs]
        self.weights = {name: w / total for name, w in pairs}
        cumulative, bounds = 0.0, []
        for name, w in pairs:
            cumulative += w / total
            bounds.append((cumulative, name))
        self._bounds = bounds

    def assign(self, user: str | None, available: set[str] | None = None) -> str:
        """Variant for ``user`` (random when None); ``available`` restricts to serving variants.

        When the assigned variant is not available the user is re-hashed among the available
        ones, so a down variant's users spread by weight and come back when it returns.
        """
        point = user_point(user, self.salt) if user else secrets.randbelow(2**53) / 2**53
        name = self._pick(point, self._bounds)
        if available is None or name in available:
            return name
        live = [(n, self.weights[n]) for n in self.names if n in available and self.weights[n] > 0]
        if not live:
            live = [(n, 1.0) for n in self.names if n in available]
        if not live:
            return name
        total, cumulative, bounds = sum(w for _, w in live), 0.0, []
        for n, w in live:
            cumulative += w / total
            bounds.append((cumulative, n))
        return self._pick(point, bounds)

    @staticmethod
    def _pick(point: float, bounds: list[tuple[float, str]]) -> str:
        for bound, name in bounds:
            if point < bound:
                return name
        return bounds[-1][1]
