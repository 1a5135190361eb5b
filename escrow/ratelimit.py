"""Requests per API key per fixed window, counted in the database in claims.

Authentication (daemon/api_deps.ApiState.authenticate) asks `Leases.key_read` what to send.
A claim (`PG_ADMIT` on PostgreSQL, `admit_sqlite` on SQLite) reads the key and, when the
presented secret's hash matches an active key, takes requests from its row of
`api_rate_windows`: one statement, an atomic capped increment, so whatever every API
process and host on one PostgreSQL claims together never passes the limit. Only a matching
hash counts, so a caller who knows a key's public prefix but not its secret cannot use up
the key's window.

A claim may take several requests at once (`lease_size`: one for limits under 128, up to
`LEASE_MAX` for high ones, fewer as the window runs out); the process hands the rest out
itself (`Leases.take`) while the request only reads the key (`PG_KEY`: revoked keys and
scopes still hold at once), so a key's requests stop queueing on its row and a read stays
a read. The cost: at a window's end a process may hold back requests it claimed and did not
use, at most `LEASE_MAX` per process and fewer the closer the window is to its limit. With
limits under 128 every request is counted where all processes see it.

Windows are fixed (start = a multiple of the length, on the database's clock) and one row
per key holds the current one, so the table never grows beyond the keys. A refused claim
counts one past the limit, and the first (count == limit + 1, one request only) is the one
that writes the `rate_limit_exceeded` audit row.
"""

from __future__ import annotations

import hmac
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import text
from sqlalchemy.orm import Session

from escrowd.config.errors import EscrowdError
from escrowd.config.rate_limit import RateLimit


class RateLimited(EscrowdError):
    type = "rate_limited"
    http_status = 429


@dataclass(frozen=True)
class Quota:
    """One request's place in its key's window: what the RateLimit-* headers say."""

    limit: int
    count: int
    reset_s: int

    @property
    def remaining(self) -> int:
        return max(0, self.limit - self.count)

    @property
    def refused(self) -> bool:
        return self.count > self.limit

    @property
    def first_refused(self) -> bool:
        return self.count == self.limit + 1


def quota(limit: int, window_s: int, window_start: int, count: int, now_s: float) -> Quota:
    # At least 1 s: a Retry-After of 0 invites an immediate retry into the same window.
    reset_s = max(1, math.ceil(window_start + window_s - now_s))
    return Quota(limit=limit, count=count, reset_s=reset_s)


# The most requests one claim takes: what a process may hold back at a window's end.
LEASE_MAX = 100


def lease_size(limit: int) -> int:
    """Requests a claim asks for: a share of the limit small enough that processes holding
    unused ones at the window's end leave little of it unserved."""
    return max(1, min(LEASE_MAX, limit // 64))


# The key's columns as apikeys.KeyRow, its limit, window and the database's clock, then the
# claim: the window, the count after it and what it was granted (NULL when the hash did
# not match an active key; apikeys.check decides). The claim is `claimed`'s, in SQL. A
# request whose clock reading falls in an older window than the stored one (a race at the
# boundary) counts in the newer one. 100 is LEASE_MAX (tests/test_api_rate_limits.py
# checks the two agree).
PG_ADMIT = """
WITH key AS (
    SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL AS revoked,
           COALESCE(rate_limit_requests, %s::integer) AS limit_requests,
           COALESCE(rate_limit_window_s, %s::integer) AS window_s,
           extract(epoch FROM clock_timestamp())::float8 AS now_s
    FROM api_keys WHERE prefix = %s
), claim AS (
    SELECT key.*, LEAST(100, GREATEST(1, limit_requests / 64)) AS lease_size
    FROM key
), counted AS (
    INSERT INTO api_rate_windows AS w (api_key_id, window_start, request_count, granted)
    SELECT id, (floor(now_s / window_s) * window_s)::bigint,
           LEAST(lease_size, GREATEST(1, limit_requests / 8)),
           LEAST(lease_size, GREATEST(1, limit_requests / 8))
    FROM claim WHERE key_hash = %s AND NOT revoked
    ON CONFLICT (api_key_id) DO UPDATE SET
        window_start = GREATEST(w.window_start, excluded.window_start),
        request_count = CASE
            WHEN excluded.window_start > w.window_start THEN excluded.request_count
            WHEN w.request_count >= (SELECT limit_requests FROM claim) THEN w.request_count + 1
            ELSE w.request_count + LEAST(
                (SELECT lease_size FROM claim),
                GREATEST(1, ((SELECT limit_requests FROM claim) - w.request_count) / 8))
        END,
        granted = CASE
            WHEN excluded.window_start > w.window_start THEN excluded.granted
            WHEN w.request_count >= (SELECT limit_requests FROM claim) THEN 0
            ELSE LEAST(
                (SELECT lease_size FROM claim),
                GREATEST(1, ((SELECT limit_requests FROM claim) - w.request_count) / 8))
        END
    RETURNING window_start, request_count, granted
)
SELECT key.id, key.prefix, key.key_hash, key.scope, key.revoked,
       key.limit_requests, key.window_s, key.now_s,
       counted.window_start, counted.request_count, counted.granted
FROM key LEFT JOIN counted ON true
"""

# PG_ADMIT's columns for a request the process counts itself: the key only.
PG_KEY = """
SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL,
       COALESCE(rate_limit_requests, %s::integer), COALESCE(rate_limit_window_s, %s::integer),
       extract(epoch FROM clock_timestamp())::float8, NULL::bigint, NULL::bigint, NULL::bigint
FROM api_keys WHERE prefix = %s
"""

_SQLITE_KEY = text(
    "SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL, "
    "COALESCE(rate_limit_requests, :requests), COALESCE(rate_limit_window_s, :window_s) "
    "FROM api_keys WHERE prefix = :prefix"
)
_SQLITE_WINDOW = text(
    "SELECT window_start, request_count FROM api_rate_windows WHERE api_key_id = :key_id"
)
_SQLITE_COUNT = text(
    "INSERT INTO api_rate_windows AS w (api_key_id, window_start, request_count, granted) "
    "VALUES (:key_id, :window_start, :count, :granted) "
    "ON CONFLICT (api_key_id) DO UPDATE SET window_start = excluded.window_start, "
    "request_count = excluded.request_count, granted = excluded.granted"
)


def claimed(limit: int, stored: tuple[int, int] | None, start: int) -> tuple[int, int, int]:
    """What a claim at window `start` makes of the stored (window_start, count): the window,
    the count after it and the requests granted (0: refused). A claim takes its lease size,
    at most an eighth of what is left (at least one), never past the limit; past it, it
    counts one refused request. PG_ADMIT is the same in SQL."""
    if stored is None or start > stored[0]:
        granted = min(lease_size(limit), max(1, limit // 8))
        return start, granted, granted
    window_start, count = stored
    if count >= limit:
        return window_start, count + 1, 0
    granted = min(lease_size(limit), max(1, (limit - count) // 8))
    return window_start, count + granted, granted


def admit_sqlite(session: Session, read: KeyRead, default: RateLimit) -> list[tuple[Any, ...]]:
    """PG_ADMIT (or PG_KEY for a leased request) for SQLite, in the caller's transaction (a
    write one for a claim): the same row, or none when no key has the prefix."""
    row = session.execute(
        _SQLITE_KEY,
        {"requests": default.requests, "window_s": default.window_s, "prefix": read.prefix},
    ).one_or_none()
    if row is None:
        return []
    key_id, _, stored_hash, _, revoked, requests, window_s = row
    now_s = time.time()
    if read.leased is not None or stored_hash != read.candidate or revoked:
        return [(*row, now_s, None, None, None)]
    start = int(now_s // window_s) * window_s
    stored = session.execute(_SQLITE_WINDOW, {"key_id": key_id}).one_or_none()
    window_start, count, granted = claimed(
        requests, None if stored is None else (stored[0], stored[1]), start
    )
    session.execute(
        _SQLITE_COUNT,
        {"key_id": key_id, "window_start": window_start, "count": count, "granted": granted},
    )
    return [(*row, now_s, window_start, count, granted)]


@dataclass(frozen=True)
class KeyRead:
    """How to read a presented key: the statement and its parameters, and, when the
    process hands this request one it claimed before, its quota (the statement then only
    reads the key)."""

    prefix: str
    candidate: str
    sql: str
    params: tuple[Any, ...]
    leased: Quota | None
    # The lease's window length (its limit is the quota's): what the key's row must still
    # say for the request to count under it.
    leased_window_s: int = 0


@dataclass
class _Lease:
    key_hash: str
    limit: int
    window_s: int
    window_start: int
    # The window's count after this process's last claim, and its requests not handed out.
    count: int
    left: int
    ends_at: float


class Leases:
    """A process's claimed and not yet used requests, per key prefix (thread-safe: the
    API's writes run on threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, _Lease] = {}

    def key_read(self, prefix: str, candidate: str, default: RateLimit) -> KeyRead:
        """A request from the lease when the process holds one of the key's window (only
        for the secret that claimed it), else a claim of the key's lease size."""
        taken = self._take(prefix, candidate)
        if taken is not None:
            leased, window_s = taken
            params: tuple[Any, ...] = (default.requests, default.window_s, prefix)
            return KeyRead(prefix, candidate, PG_KEY, params, leased, window_s)
        params = (default.requests, default.window_s, prefix, candidate)
        return KeyRead(prefix, candidate, PG_ADMIT, params, None)

    def _take(self, prefix: str, candidate: str) -> tuple[Quota, int] | None:
        now = time.monotonic()
        with self._lock:
            lease = self._held.get(prefix)
            if lease is None or lease.left == 0 or now >= lease.ends_at:
                return None
            if not hmac.compare_digest(lease.key_hash, candidate):
                return None
            lease.left -= 1
            quota = Quota(
                limit=lease.limit,
                count=lease.count - lease.left,
                reset_s=max(1, math.ceil(lease.ends_at - now)),
            )
            return quota, lease.window_s

    def admitted(
        self, read: KeyRead, rows: list[tuple[Any, ...]]
    ) -> tuple[tuple[int, str, str, str, bool] | None, Quota | None]:
        """The key's columns (None if no key has the prefix) and the request's quota, from
        `read`'s answer; a claim's surplus kept for the next requests. No quota when the
        hash did not match an active key, or when a leased request finds the key's limit
        changed (it must claim under the new one)."""
        if not rows:
            return None, None
        row = rows[0]
        key = (row[0], row[1], row[2], row[3], bool(row[4]))
        limit, window_s, now_s, window_start, count, granted = row[5:]
        if read.leased is not None:
            with self._lock:
                lease = self._held.get(read.prefix)
                if lease is None or (lease.limit, lease.window_s) == (limit, window_s):
                    return key, read.leased
                # The key's limit changed: this request claims under the new one.
                del self._held[read.prefix]
            return key, None
        if granted is None:
            return key, None
        found = quota(limit, window_s, window_start, count, now_s)
        if granted > 0:
            self._keep(read, row[5:])
            return key, Quota(limit=limit, count=count - granted + 1, reset_s=found.reset_s)
        return key, found

    def _keep(self, read: KeyRead, claim: tuple[Any, ...]) -> None:
        """Keep a claim's surplus; claims of one window made at once by several threads
        add up rather than replace each other."""
        limit, window_s, now_s, window_start, count, granted = claim
        # On this process's clock, so the lease ends with the window whatever the offset.
        ends_at = time.monotonic() + (window_start + window_s - now_s)
        with self._lock:
            lease = self._held.get(read.prefix)
            if (
                lease is not None
                and lease.window_start == window_start
                and lease.limit == limit
                and lease.key_hash == read.candidate
            ):
                lease.count = max(lease.count, count)
                lease.left += granted - 1
                return
            self._held[read.prefix] = _Lease(
                key_hash=read.candidate,
                limit=limit,
                window_s=window_s,
                window_start=window_start,
                count=count,
                left=granted - 1,
                ends_at=ends_at,
            )
