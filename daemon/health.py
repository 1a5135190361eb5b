"""/healthz, /readyz and /metrics: a router the API app mounts, or a small app of its own.

/healthz answers 200 while the process serves HTTP. /readyz answers 200 only when the
database is reachable, its schema is at the migrations' head, every poller this instance
runs is healthy (within its lag threshold, not failing poll after poll, not silent) and
no job has been failing every tick for longer than its threshold; otherwise 503 with a
JSON body naming each problem. /metrics is the prometheus_client default registry (the
pollers, deposits and webhooks modules register their own series there) plus, computed
at scrape time, the readiness problems and the database's backlog: row counts by status
(those of final states, which grow with history, refreshed every few minutes), the age of
the oldest payout in each open state, of the oldest pending deposit and of the oldest
undelivered webhook.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, Row, func, select, text
from sqlalchemy.exc import SQLAlchemyError

from escrowd.daemon.progress import JobProgress, LagTracker
from escrowd.escrow.service import PAYOUT_FINAL_STATES
from escrowd.migrations.runner import current_revision, head_revision
from escrowd.models import (
    Base,
    DeliveryStatus,
    Deposit,
    DepositStatus,
    Escrow,
    Payout,
    PayoutStatus,
    WebhookDelivery,
    WebhookEvent,
    utcnow,
)
from escrowd.models.base import check_in
from escrowd.models.chain import PENDING_DEPOSIT_SQL
from escrowd.models.escrow import OPEN_ESCROW_SQL

log = structlog.get_logger(__name__)


# Every payout state but the final ones gets an age gauge, so a state added later is
# watched without a change here.
OPEN_PAYOUT_STATES = tuple(
    status.value for status in PayoutStatus if status not in PAYOUT_FINAL_STATES
)
# How long the counts of rows in their final states are reused by later scrapes.
SETTLED_COUNTS_MAX_AGE_S = 300.0


class ReadinessProbe:
    """What /readyz checks. `lags` and `progress` are None for a process without jobs."""

    def __init__(
        self,
        engine: Engine,
        lags: LagTracker | None = None,
        progress: JobProgress | None = None,
        *,
        failing_after_s: float = 300.0,
    ) -> None:
        self.engine = engine
        self.lags = lags
        self.progress = progress
        self.failing_after_s = failing_after_s

    def problems(self) -> dict[str, str]:
        found: dict[str, str] = {}
        try:
            revision = current_revision(self.engine)
        except SQLAlchemyError as exc:
            found["database"] = f"unreachable: {type(getattr(exc, 'orig', None) or exc).__name__}"
        else:
            head = head_revision()
            if revision != head:
                found["migrations"] = (
                    f"schema at {revision or 'nothing'}, expected {head}: run `escrowd migrate`"
                )
        if self.lags is not None:
            for chain, problem in self.lags.problems().items():
                found[f"poller:{chain}"] = problem
        if self.progress is not None:
            for failing in self.progress.failing(self.failing_after_s):
                found.setdefault(f"job:{failing.job}", failing.describe())
        return found


class _Readiness(Collector):
    """escrowd_ready and one escrowd_readiness_problem series per problem, at scrape time."""

    def __init__(self) -> None:
        self.probe: ReadinessProbe | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        probe = self.probe
        if probe is None:
            return
        problems = probe.problems()
        ready = GaugeMetricFamily("escrowd_ready", "1 when /readyz answers 200, else 0.")
        ready.add_metric([], 0 if problems else 1)
        yield ready
        family = GaugeMetricFamily(
            "escrowd_readiness_problem",
            "1 for each check that makes /readyz answer 503 (database, migrations, "
            "poller:<chain>, job:<name>); the reason is in /readyz's body.",
            labels=["check"],
        )
        for check in sorted(problems):
            family.add_metric([check], 1)
        yield family


def _age_s(oldest: datetime | None, now: datetime) -> float:
    return 0.0 if oldest is None else max(0.0, (now - oldest).total_seconds())


@dataclass(frozen=True)
class _Counted:
    name: str
    doc: str
    model: type[Base]
    labels: tuple[str, ...]
    # SQL text of the states rows leave (counted at every scrape through an index); the
    # partial index of open escrows serves only this condition as written.
    live: str

    def count(self, connection: Connection, condition: str) -> list[Row[Any]]:
        """Rows meeting `condition` (SQL text), counted by the labels."""
        columns = [getattr(self.model, label) for label in self.labels]
        query = select(*columns, func.count()).where(text(condition)).group_by(*columns)
        return list(connection.execute(query))


_COUNTED = (
    _Counted(
        "escrowd_deposits",
        "Deposits by chain and status: pending at scrape time; confirmed and orphaned "
        f"refreshed every {SETTLED_COUNTS_MAX_AGE_S:.0f} s.",
        Deposit,
        ("chain", "status"),
        PENDING_DEPOSIT_SQL,
    ),
    _Counted(
        "escrowd_escrows",
        "Escrows by status: funded and expired at scrape time; released, refunded and "
        f"resolved refreshed every {SETTLED_COUNTS_MAX_AGE_S:.0f} s.",
        Escrow,
        ("status",),
        OPEN_ESCROW_SQL,
    ),
    _Counted(
        "escrowd_payouts",
        "Payouts by chain and status: open states at scrape time; confirmed, failed and "
        f"cancelled refreshed every {SETTLED_COUNTS_MAX_AGE_S:.0f} s.",
        Payout,
        ("chain", "status"),
        check_in("status", OPEN_PAYOUT_STATES),
    ),
)


class _StatusCounts(Collector):
    """Deposits, escrows and payouts by status, counted from the database: rows in a
    state they can leave at every scrape, the settled history at most every
    `settled_max_age_s` (counting it reads whole tables)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.engine: Engine | None = None
        self.clock = clock
        self.settled_max_age_s = SETTLED_COUNTS_MAX_AGE_S
        # The settled counts, the engine they were read from and when (by `clock`).
        self._settled: dict[str, list[Row[Any]]] = {}
        self._settled_from: tuple[Engine, float] | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        if engine is None:
            return
        try:
            with engine.connect() as connection:
                settled = self._settled_counts(engine, connection)
                for counted in _COUNTED:
                    rows = counted.count(connection, counted.live)
                    family = GaugeMetricFamily(counted.name, counted.doc, labels=counted.labels)
                    for row in [*rows, *settled[counted.name]]:
                        *labels, count = tuple(row)
                        family.add_metric([str(value) for value in labels], int(count))
                    yield family
                yield from self._backlog(connection)
        except SQLAlchemyError as exc:
            # A scrape must not fail because the database is down; /readyz reports that.
            log.warning("metrics_db_unavailable", error=type(exc).__name__)

    def _settled_counts(self, engine: Engine, connection: Connection) -> dict[str, list[Row[Any]]]:
        now = self.clock()
        read = self._settled_from
        if read is not None and read[0] is engine and now - read[1] < self.settled_max_age_s:
            return self._settled
        counts: dict[str, list[Row[Any]]] = {}
        for counted in _COUNTED:
            counts[counted.name] = counted.count(connection, f"NOT ({counted.live})")
        self._settled, self._settled_from = counts, (engine, now)
        return counts

    @staticmethod
    def _backlog(connection: Connection) -> Iterator[GaugeMetricFamily]:
        now = utcnow()
        payouts = GaugeMetricFamily(
            "escrowd_payouts_oldest_age_seconds",
            "Age (since requested) of the oldest payout in each state not yet settled.",
            labels=["chain", "status"],
        )
        for chain, status, oldest in connection.execute(
            select(Payout.chain, Payout.status, func.min(Payout.created_at))
            .where(Payout.status.in_(OPEN_PAYOUT_STATES))
            .group_by(Payout.chain, Payout.status)
        ):
            payouts.add_metric([chain, status], _age_s(oldest, now))
        yield payouts
        deposits = GaugeMetricFamily(
            "escrowd_deposits_pending_oldest_age_seconds",
            "Age (since seen) of the oldest deposit not yet confirmed, per chain.",
            labels=["chain"],
        )
        for chain, oldest in connection.execute(
            select(Deposit.chain, func.min(Deposit.created_at))
            .where(Deposit.status == DepositStatus.PENDING.value)
            .group_by(Deposit.chain)
        ):
            deposits.add_metric([chain], _age_s(oldest, now))
        yield deposits
        count, oldest = connection.execute(
            select(func.count(), func.min(WebhookDelivery.created_at)).where(
                WebhookDelivery.status == DeliveryStatus.PENDING.value
            )
        ).one()
        backlog = GaugeMetricFamily(
            "escrowd_webhook_backlog", "Webhook deliveries not yet delivered (pending)."
        )
        backlog.add_metric([], int(count))
        yield backlog
        backlog_age = GaugeMetricFamily(
            "escrowd_webhook_backlog_oldest_age_seconds",
            "Age of the oldest webhook delivery not yet delivered.",
        )
        backlog_age.add_metric([], _age_s(oldest, now))
        yield backlog_age
        unfanned = GaugeMetricFamily(
            "escrowd_webhook_events_not_fanned_out",
            "Webhook events written but not yet turned into deliveries.",
        )
        # Counted from the partial index of the backlog (migration 0018), not the outbox.
        unfanned.add_metric(
            [],
            int(
                connection.execute(
                    select(func.count()).where(~WebhookEvent.fanned_out)
                ).scalar_one()
            ),
        )
        yield unfanned


_status_counts = _StatusCounts()
_readiness = _Readiness()
_registered = threading.Lock()
_is_registered = False


def _install_collectors(probe: ReadinessProbe) -> None:
    global _is_registered  # noqa: PLW0603 - one collector per process registry
    with _registered:
        _status_counts.engine = probe.engine
        _readiness.probe = probe
        if not _is_registered:
            REGISTRY.register(_status_counts)
            REGISTRY.register(_readiness)
            _is_registered = True


def health_router(probe: ReadinessProbe) -> APIRouter:
    """Routes /healthz, /readyz, /metrics (no API key: they carry no secrets; bind the
    API to a private interface or filter these paths at the proxy)."""
    _install_collectors(probe)
    router = APIRouter(tags=["operations"])

    @router.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @router.get(
        "/readyz",
        responses={
            200: {"description": "Ready: serve traffic to this instance."},
            503: {
                "description": "Not ready: `problems` names each check that failed.",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {
                                "status": {"const": "not_ready"},
                                "problems": {
                                    "type": "object",
                                    "additionalProperties": {"type": "string"},
                                },
                            },
                        }
                    }
                },
            },
        },
    )
    def readyz() -> JSONResponse:
        problems = probe.problems()
        if problems:
            return JSONResponse({"status": "not_ready", "problems": problems}, status_code=503)
        return JSONResponse({"status": "ready"})

    @router.get(
        "/metrics",
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format.",
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
            }
        },
    )
    def metrics() -> Response:
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)

    return router


def mount_health(app: FastAPI, probe: ReadinessProbe) -> FastAPI:
    app.include_router(health_router(probe))
    return app


def create_health_app(probe: ReadinessProbe) -> FastAPI:
    """The health endpoints alone (for a process without the API)."""
    return mount_health(FastAPI(title="escrowd health", docs_url=None, redoc_url=None), probe)
