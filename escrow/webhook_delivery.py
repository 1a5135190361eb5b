"""The webhook delivery job: signed POSTs, in order per endpoint, retried with backoff.

Ordering: only the oldest queued delivery of an endpoint (its "head") is ever sent, so a
later event never overtakes an earlier one. Independence: each endpoint is worked by its
own thread with a bounded request timeout, so a slow or failing endpoint only holds up its
own queue.

Retry schedule (delay after the n-th failed attempt, plus 0-25 % random jitter so a
recovering receiver is not hit by every sender at once):
    10 s, 1 min, 5 min, 15 min, 30 min, 1 h, 2 h, 3 h, 4 h, then 8 h each.
With the default 18 attempts the 17 gaps add up to about 75 h (3.1 days) before the
delivery is marked failed, the endpoint disabled with the reason, an error logged and
``escrowd_webhook_failures_total`` incremented. Its later deliveries stay queued and
resume when an operator re-enables the endpoint.

Claiming: a head is locked (FOR UPDATE SKIP LOCKED on PostgreSQL) and leased by moving
its next_attempt_at past the request timeout, then the transaction commits and the HTTP
call runs with no transaction open. A daemon that dies mid-request leaves the lease to
expire and the delivery is retried: delivery is at least once, and receivers de-duplicate
on ``webhook-id`` (the same value as ``Escrowd-Event-Id``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import partial
from typing import Literal

import httpx
import structlog
from prometheus_client import Counter
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import WebhookSettings
from escrowd.escrow.uow import in_transaction
from escrowd.escrow.webhooks import (
    EVENT_ID_HEADER,
    EVENT_TYPE_HEADER,
    SecretCipher,
    WebhookKeyError,
    fan_out,
    signature_headers,
)
from escrowd.models import (
    DeliveryStatus,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)

log = structlog.get_logger(__name__)

WEBHOOK_FAILURES = Counter(
    "escrowd_webhook_failures_total",
    "Webhook deliveries that exhausted their attempts (the endpoint was disabled).",
)
WEBHOOK_ATTEMPTS = Counter(
    "escrowd_webhook_attempts_total", "Webhook delivery attempts.", ["outcome"]
)

RETRY_DELAYS_S: tuple[int, ...] = (10, 60, 300, 900, 1800, 3600, 7200, 10800, 14400, 28800)
JITTER_FRACTION = 0.25
# Endpoints worked at the same time in one run; each holds at most one request open.
MAX_PARALLEL_ENDPOINTS = 8
# Time a claimed delivery stays reserved beyond the request timeout before another daemon
# may assume the sender died.
LEASE_MARGIN_S = 30.0
MAX_ERROR_CHARS = 500
USER_AGENT = "escrowd-webhooks/1"


def retry_delay_s(failed_attempts: int, rng: Callable[[], float] = random.random) -> float:
    """Seconds to wait after the `failed_attempts`-th failure (1-based), with jitter."""
    assert failed_attempts >= 1
    base = RETRY_DELAYS_S[min(failed_attempts, len(RETRY_DELAYS_S)) - 1]
    return base * (1 + JITTER_FRACTION * rng())


@dataclass
class DeliveryStats:
    attempted: int = 0
    delivered: int = 0
    retrying: int = 0
    failed: int = 0
    disabled_endpoint_ids: list[int] = field(default_factory=list)

    def add(self, other: DeliveryStats) -> None:
        self.attempted += other.attempted
        self.delivered += other.delivered
        self.retrying += other.retrying
        self.failed += other.failed
        self.disabled_endpoint_ids.extend(other.disabled_endpoint_ids)


@dataclass(frozen=True)
class _Claim:
    delivery_id: int
    endpoint_id: int
    event_id: int
    event_type: str
    url: str
    payload: bytes
    attempts: int
    secret_ciphertext: bytes


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None
    duration_ms: int

    @property
    def ok(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class _Result:
    kind: Literal["delivered", "retrying", "failed", "superseded"]
    attempt: int
    retry_in_s: float = 0.0


def _head_id_query(endpoint_id: int) -> Select[int]:
    return select(func.min(WebhookDelivery.id)).where(
        WebhookDelivery.endpoint_id == endpoint_id,
        WebhookDelivery.status == DeliveryStatus.PENDING,
    )


def _endpoints_with_due_heads(session: Session, now: datetime, limit: int) -> list[int]:
    head = (
        select(
            WebhookDelivery.endpoint_id.label("endpoint_id"),
            func.min(WebhookDelivery.id).label("head_id"),
        )
        .where(WebhookDelivery.status == DeliveryStatus.PENDING)
        .group_by(WebhookDelivery.endpoint_id)
        .subquery()
    )
    rows = session.execute(
        select(head.c.endpoint_id)
        .join(WebhookDelivery, WebhookDelivery.id == head.c.head_id)
        .join(WebhookEndpoint, WebhookEndpoint.id == head.c.endpoint_id)
        .where(
            WebhookEndpoint.enabled.is_(True),
            WebhookEndpoint.deleted_at.is_(None),
            WebhookDelivery.next_attempt_at <= now,
        )
        .order_by(WebhookDelivery.next_attempt_at)
        .limit(limit)
    )
    return [row[0] for row in rows]


def _claim_head(session: Session, endpoint_id: int, now: datetime, lease_s: float) -> _Claim | None:
    head_id = session.scalar(_head_id_query(endpoint_id))
    if head_id is None:
        return None
    # Lock only the head: with SKIP LOCKED on a "first pending" query a busy head would be
    # skipped and the next event sent out of order.
    delivery = session.scalar(
        select(WebhookDelivery)
        .where(WebhookDelivery.id == head_id)
        .with_for_update(skip_locked=True)
    )
    if (
        delivery is None
        or delivery.status != DeliveryStatus.PENDING
        or delivery.next_attempt_at > now
        or session.scalar(_head_id_query(endpoint_id)) != delivery.id
    ):
        return None
    endpoint = session.get(WebhookEndpoint, endpoint_id)
    event = session.get(WebhookEvent, delivery.event_id)
    assert endpoint is not None and event is not None
    if not endpoint.enabled or endpoint.deleted_at is not None:
        return None
    delivery.next_attempt_at = now + timedelta(seconds=lease_s)
    return _Claim(
        delivery_id=delivery.id,
        endpoint_id=endpoint.id,
        event_id=event.id,
        event_type=event.type,
        url=endpoint.url,
        payload=event.payload.encode(),
        attempts=delivery.attempts,
        secret_ciphertext=endpoint.secret_ciphertext,
    )


def _post(
    claim: _Claim, cipher: SecretCipher, client: httpx.Client, timeout_s: float, now: datetime
) -> _Outcome:
    started = time.monotonic()
    try:
        secret = cipher.decrypt(claim.secret_ciphertext, endpoint_id=claim.endpoint_id)
    except WebhookKeyError as exc:
        return _Outcome(status_code=None, error=exc.message, duration_ms=0)
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        EVENT_ID_HEADER: str(claim.event_id),
        EVENT_TYPE_HEADER: claim.event_type,
        **signature_headers(claim.payload, secret, claim.event_id, int(now.timestamp())),
    }
    try:
        response = client.post(claim.url, content=claim.payload, headers=headers, timeout=timeout_s)
        status_code: int | None = response.status_code
        error = None if 200 <= response.status_code < 300 else f"HTTP {response.status_code}"
    except httpx.HTTPError as exc:
        status_code = None
        error = f"{type(exc).__name__}: {exc}"
    duration_ms = int((time.monotonic() - started) * 1000)
    return _Outcome(
        status_code=status_code, error=error and error[:MAX_ERROR_CHARS], duration_ms=duration_ms
    )


def _record(
    session: Session, claim: _Claim, outcome: _Outcome, now: datetime, max_attempts: int
) -> _Result:
    """Store the attempt and the delivery's next state in one transaction."""
    attempt = claim.attempts + 1
    session.add(
        WebhookAttempt(
            delivery_id=claim.delivery_id,
            attempt=attempt,
            status_code=outcome.status_code,
            error=outcome.error,
            duration_ms=outcome.duration_ms,
            created_at=now,
        )
    )
    delivery = session.scalar(
        select(WebhookDelivery).where(WebhookDelivery.id == claim.delivery_id).with_for_update()
    )
    assert delivery is not None
    if delivery.status != DeliveryStatus.PENDING or delivery.attempts != claim.attempts:
        # Changed meanwhile (endpoint deleted, or our lease expired and was retaken).
        return _Result(kind="superseded", attempt=attempt)
    delivery.attempts = attempt
    delivery.last_status_code = outcome.status_code
    if outcome.ok:
        delivery.status = DeliveryStatus.DELIVERED
        delivery.delivered_at = now
        delivery.last_error = None
        return _Result(kind="delivered", attempt=attempt)
    delivery.last_error = outcome.error
    if attempt < max_attempts:
        delay_s = retry_delay_s(attempt)
        delivery.next_attempt_at = now + timedelta(seconds=delay_s)
        return _Result(kind="retrying", attempt=attempt, retry_in_s=delay_s)
    delivery.status = DeliveryStatus.FAILED
    endpoint = session.get(WebhookEndpoint, claim.endpoint_id)
    assert endpoint is not None
    endpoint.enabled = False
    endpoint.disabled_reason = (
        f"event {claim.event_id} failed {attempt} attempts, last: {outcome.error}"
    )[:MAX_ERROR_CHARS]
    return _Result(kind="failed", attempt=attempt)


def _report(claim: _Claim, outcome: _Outcome, result: _Result, stats: DeliveryStats) -> None:
    """Count and log a committed result (outside the transaction, so a retried
    transaction does not count twice)."""
    fields = {
        "delivery_id": claim.delivery_id,
        "endpoint_id": claim.endpoint_id,
        "event_id": claim.event_id,
        "attempt": result.attempt,
        "status_code": outcome.status_code,
        "duration_ms": outcome.duration_ms,
    }
    stats.attempted += 1
    WEBHOOK_ATTEMPTS.labels(outcome="delivered" if outcome.ok else "failed").inc()
    if result.kind == "delivered":
        stats.delivered += 1
        log.info("webhook_delivered", **fields)
    elif result.kind == "retrying":
        stats.retrying += 1
        log.warning(
            "webhook_attempt_failed",
            error=outcome.error,
            retry_in_s=int(result.retry_in_s),
            **fields,
        )
    elif result.kind == "failed":
        stats.failed += 1
        stats.disabled_endpoint_ids.append(claim.endpoint_id)
        WEBHOOK_FAILURES.inc()
        log.error("webhook_endpoint_disabled", error=outcome.error, url=claim.url, **fields)
    else:
        log.warning("webhook_result_superseded", **fields)


def _work_endpoint(
    endpoint_id: int,
    *,
    sessions: sessionmaker[Session],
    cipher: SecretCipher,
    settings: WebhookSettings,
    client: httpx.Client,
    now: datetime | None,
) -> DeliveryStats:
    """Send this endpoint's due deliveries oldest first; stop at the first failure."""
    stats = DeliveryStats()
    lease_s = settings.timeout_s + LEASE_MARGIN_S
    for _ in range(settings.batch_size):
        claim_now = now or utcnow()
        claim = in_transaction(
            sessions, partial(_claim_head, endpoint_id=endpoint_id, now=claim_now, lease_s=lease_s)
        )
        if claim is None:
            break
        outcome = _post(claim, cipher, client, settings.timeout_s, now or utcnow())
        finished_at = now or utcnow()
        result = in_transaction(
            sessions,
            partial(
                _record,
                claim=claim,
                outcome=outcome,
                now=finished_at,
                max_attempts=settings.max_attempts,
            ),
        )
        _report(claim, outcome, result, stats)
        if result.kind != "delivered":
            break
    return stats


def deliver_due(
    sessions: sessionmaker[Session],
    cipher: SecretCipher,
    settings: WebhookSettings,
    *,
    client: httpx.Client,
    now: datetime | None = None,
) -> DeliveryStats:
    """Send every due delivery: up to `settings.batch_size` endpoints, each worked in its
    own thread, up to `settings.batch_size` deliveries each. `now` fixes the clock (tests)."""
    endpoint_ids = in_transaction(
        sessions, lambda s: _endpoints_with_due_heads(s, now or utcnow(), settings.batch_size)
    )
    stats = DeliveryStats()
    if not endpoint_ids:
        return stats
    workers = min(len(endpoint_ids), MAX_PARALLEL_ENDPOINTS)
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="webhook") as pool:
        futures = [
            pool.submit(
                _work_endpoint,
                endpoint_id,
                sessions=sessions,
                cipher=cipher,
                settings=settings,
                client=client,
                now=now,
            )
            for endpoint_id in endpoint_ids
        ]
        for future in futures:
            stats.add(future.result())
    return stats


def run_webhooks(
    sessions: sessionmaker[Session],
    cipher: SecretCipher,
    settings: WebhookSettings,
    *,
    client: httpx.Client,
    now: datetime | None = None,
) -> DeliveryStats:
    """The scheduler job: fan out new outbox events (bounded), then deliver what is due."""
    for _ in range(settings.batch_size):
        if (
            in_transaction(sessions, lambda s: fan_out(s, settings.batch_size))
            < settings.batch_size
        ):
            break
    return deliver_due(sessions, cipher, settings, client=client, now=now)
