"""One API call described once, sent by the sync and the async client alike.

A `Call` is what to send and how to read the answer. `Attempts` decides, for both
clients, what happens after each try: a changing POST carries one Idempotency-Key for
all its tries, so a retry after a lost answer gets the stored answer of the first try
instead of doing the work twice. Retried: no answer (refused, reset, dropped, timed out),
5xx, and 429 (after its Retry-After). Anything else is final.
"""

from __future__ import annotations

import json
import logging
import random
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, Generic, TypeVar

import httpx

from escrowd.client.errors import ConnectionFailed, EscrowdError, ServerError, error_for

log = logging.getLogger("escrowd.client")

T = TypeVar("T")
IDEMPOTENCY_HEADER = "Idempotency-Key"
REPLAY_HEADER = "Idempotent-Replayed"
# Failures before any answer: the request may or may not have reached escrowd.
RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """`keyed`: a POST that changes something, sent with an Idempotency-Key."""

    method: str
    path: str
    read: Callable[[Any], T]
    body: Mapping[str, Any] | None = None
    params: Mapping[str, str | int] | None = None
    keyed: bool = False


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How often and how long to try one logical call.

    Backoff before try n+1: `backoff_base_s` * 2**(n-1), at most `backoff_max_s`, with
    -50..0 % jitter; a 429's Retry-After is waited as given, unless it exceeds
    `retry_after_max_s`, which makes that 429 final."""

    max_attempts: int = 4
    backoff_base_s: float = 0.25
    backoff_max_s: float = 4.0
    retry_after_max_s: float = 30.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def backoff_s(self, attempt: int) -> float:
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling * (0.5 + random.random() / 2)


def retry_after_s(value: str | None, now: datetime | None = None) -> float | None:
    """Retry-After as seconds to wait (delta-seconds or an HTTP date), None if absent or
    unreadable."""
    if value is None:
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class Attempts:
    """The tries of one logical call: its headers (one Idempotency-Key for every try) and
    the wait before the next try, or the final outcome."""

    policy: RetryPolicy
    call: Call[Any]
    idempotency_key: str | None = None
    number: int = 0
    headers: dict[str, str] = field(init=False)

    def __post_init__(self) -> None:
        self.headers = {}
        if self.call.keyed:
            self.headers[IDEMPOTENCY_HEADER] = self.idempotency_key or str(uuid.uuid4())

    def start(self) -> None:
        self.number += 1

    def after_failure(self, exc: Exception) -> float:
        """The wait before trying again after no answer; ConnectionFailed when spent."""
        if self.number >= self.policy.max_attempts:
            raise ConnectionFailed(
                f"no answer from escrowd for {self.call.method} {self.call.path} after "
                f"{self.number} attempts ({type(exc).__name__}); it may or may not have "
                "been done: retry with the same idempotency_key to find out"
            ) from exc
        delay_s = self.policy.backoff_s(self.number)
        self._log(type(exc).__name__, delay_s)
        return delay_s

    def after_answer(self, status: int, retry_after: str | None) -> float | None:
        """The wait before trying again after this answer, or None: it is final."""
        if self.number >= self.policy.max_attempts or not (status == 429 or status >= 500):
            return None
        asked_s = retry_after_s(retry_after)
        if asked_s is not None and asked_s > self.policy.retry_after_max_s:
            return None
        delay_s = asked_s if asked_s is not None else self.policy.backoff_s(self.number)
        self._log(f"status {status}", delay_s)
        return delay_s

    def _log(self, reason: str, delay_s: float) -> None:
        log.info(
            "request_retry method=%s path=%s attempt=%d delay_s=%.3f reason=%s",
            self.call.method,
            self.call.path,
            self.number,
            delay_s,
            reason,
        )


def outcome(call: Call[T], status: int, content: bytes) -> T:
    """The value of a final answer, or its typed error raised."""
    if 200 <= status < 300:
        try:
            body = json.loads(content)
        except ValueError:
            raise ServerError(f"escrowd answered {status} with a body that is not JSON") from None
        return call.read(body)
    raise _error(call, status, content)


def _error(call: Call[Any], status: int, content: bytes) -> EscrowdError:
    error_type: str | None = None
    message = f"HTTP {status}: {content[:200].decode(errors='replace')}"
    try:
        detail = json.loads(content)["error"]
        error_type, message = str(detail["type"]), str(detail["message"])
    except (ValueError, KeyError, TypeError):
        pass
    exc = error_for(status, error_type, message)
    exc.add_note(f"{call.method} {call.path} answered {status}")
    return exc
