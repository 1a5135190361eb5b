"""Requests per API key per fixed window, counted where the key is read.

Authentication (daemon/api_deps.ApiState.authenticate) runs `PG_ADMIT` or
`admit_sqlite`: on PostgreSQL one statement reads the key and, when the presented secret's
hash matches an active key, upserts-and-increments its row of `api_rate_windows`; on
SQLite a transaction does the same. The count lives in the database, so every API process
and host on one PostgreSQL shares it, and the atomic increment gives each request its own
number: of N racing requests, exactly `limit` get a number within it. Only a matching
hash counts, so a caller who knows a key's public prefix but not its secret cannot use up
the key's window.

Windows are fixed (start = a multiple of the length, on the database's clock) and one row
per key holds the current one, so the table never grows beyond the keys. A refused request
is counted too; the first refused one of a window (count == limit + 1, one request only)
is the one that writes the `rate_limit_exceeded` audit row.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

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


# The key's columns as apikeys.KeyRow, then its limit, the window and the count. The
# increment's WHERE checks the secret's hash and the key's state; apikeys.check decides.
# A request whose clock reading falls in an older window than the stored one (a race at
# the boundary) counts in the newer one, so the boundary never grants extra requests.
PG_ADMIT = """
WITH key AS (
    SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL AS revoked,
           COALESCE(rate_limit_requests, %s::integer) AS limit_requests,
           COALESCE(rate_limit_window_s, %s::integer) AS window_s,
           extract(epoch FROM clock_timestamp())::float8 AS now_s
    FROM api_keys WHERE prefix = %s
), counted AS (
    INSERT INTO api_rate_windows AS w (api_key_id, window_start, request_count)
    SELECT id, (floor(now_s / window_s) * window_s)::bigint, 1 FROM key
    WHERE key_hash = %s AND NOT revoked
    ON CONFLICT (api_key_id) DO UPDATE SET
        window_start = GREATEST(w.window_start, excluded.window_start),
        request_count = CASE WHEN excluded.window_start > w.window_start THEN 1
                             ELSE w.request_count + 1 END
    RETURNING window_start, request_count
)
SELECT key.id, key.prefix, key.key_hash, key.scope, key.revoked,
       key.limit_requests, key.window_s, key.now_s,
       counted.window_start, counted.request_count
FROM key LEFT JOIN counted ON true
"""

_SQLITE_KEY = text(
    "SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL, "
    "COALESCE(rate_limit_requests, :requests), COALESCE(rate_limit_window_s, :window_s) "
    "FROM api_keys WHERE prefix = :prefix"
)
_SQLITE_COUNT = text(
    "INSERT INTO api_rate_windows AS w (api_key_id, window_start, request_count) "
    "VALUES (:key_id, :window_start, 1) "
    "ON CONFLICT (api_key_id) DO UPDATE SET "
    "window_start = max(w.window_start, excluded.window_start), "
    "request_count = CASE WHEN excluded.window_start > w.window_start THEN 1 "
    "ELSE w.request_count + 1 END "
    "RETURNING window_start, request_count"
)


@dataclass(frozen=True)
class Admission:
    """What `admit_sqlite` read: the key's columns (None if no key has the prefix) and,
    when the hash matched an active key, its quota."""

    key: tuple[int, str, str, str, bool] | None
    quota: Quota | None


def admit_sqlite(session: Session, prefix: str, key_hash: str, default: RateLimit) -> Admission:
    """PG_ADMIT for SQLite, in the caller's (write) transaction."""
    row = session.execute(
        _SQLITE_KEY,
        {"requests": default.requests, "window_s": default.window_s, "prefix": prefix},
    ).one_or_none()
    if row is None:
        return Admission(key=None, quota=None)
    key_id, found_prefix, stored_hash, scope, revoked, requests, window_s = row
    key = (key_id, found_prefix, stored_hash, scope, bool(revoked))
    if stored_hash != key_hash or revoked:
        return Admission(key=key, quota=None)
    now_s = time.time()
    start = int(now_s // window_s) * window_s
    window_start, count = session.execute(
        _SQLITE_COUNT, {"key_id": key_id, "window_start": start}
    ).one()
    return Admission(key=key, quota=quota(requests, window_s, window_start, count, now_s))
