"""Transaction boundaries with bounded retries on serialization failures and deadlocks."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import structlog
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

log = structlog.get_logger(__name__)

T = TypeVar("T")
# PostgreSQL: serialization_failure, deadlock_detected.
RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
DEFAULT_MAX_ATTEMPTS = 8


def _retryable(exc: DBAPIError) -> bool:
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate in RETRYABLE_SQLSTATES:
        return True
    # SQLite reports lock contention as OperationalError "database is locked".
    return isinstance(exc, OperationalError) and "database is locked" in str(exc.orig)


def with_retries(attempt: Callable[[], T], *, max_attempts: int = DEFAULT_MAX_ATTEMPTS) -> T:
    """Run `attempt` (one whole transaction) again when the database aborted it to break a
    deadlock or a serialization conflict (bounded, with jitter)."""
    assert max_attempts >= 1
    for number in range(1, max_attempts + 1):
        try:
            return attempt()
        except DBAPIError as exc:
            if not _retryable(exc) or number == max_attempts:
                raise
            delay_s = min(0.5, 0.005 * 2**number) * (0.5 + random.random())
            log.warning("transaction_retry", attempt=number, delay_s=round(delay_s, 4))
            time.sleep(delay_s)
    raise AssertionError("unreachable: the loop returns or raises")


def in_transaction(
    sessions: sessionmaker[Session],
    work: Callable[[Session], T],
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
) -> T:
    """Run `work` in one transaction and commit it, with `with_retries`."""

    def attempt() -> T:
        with sessions() as session, session.begin():
            return work(session)

    return with_retries(attempt, max_attempts=max_attempts)
