"""/healthz, /readyz and /metrics: a router the API app mounts, or a small app of its own.

/healthz answers 200 while the process serves HTTP. /readyz answers 200 only when the
database is reachable, its schema is at the migrations' head, every poller this instance
runs is healthy (within its lag threshold, not failing poll after poll, not silent) and
no job has been failing every tick for longer than its threshold; otherwise 503 with a
JSON body naming each problem. /metrics is the prometheus_client default registry (the
pollers, deposits and webhooks modules register their own series there) plus, computed
at scrape time, the readiness problems and the database's backlog: row counts by status,
the age of the oldest payout in each open state, of the oldest pending deposit and of
the oldest undelivered webhook.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime

import structlog
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from escrowd.daemon.progress import JobProgress, LagTracker
from escrowd.migrations.runner import current_revision, head_revision
from escrowd.models import (
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

log = structlog.get_logger(__name__)


# Payout states a payout leaves no more; every other state gets an age gauge, so a state
# added later is watched without a change here.
SETTLED_PAYOUT_STATES = frozenset({PayoutStatus.CONFIRMED.value, PayoutStatus.FAILED.value})


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


class _StatusCounts(Collector):
    """Deposits, escrows and payouts by status, counted from the database at scrape time."""

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def collect(self) -> Iterator[GaugeMetricFamily]:
        engine = self.engine
        if engine is None:
            return
        families = (
            ("escrowd_deposits", "Deposits by chain and status.", Deposit, ["chain", "status"]),
            ("escrowd_escrows", "Escrows by status.", Escrow, ["status"]),
            ("escrowd_payouts", "Payouts by chain and status.", Payout, ["chain", "status"]),
        )
        try:
            with engine.connect() as connection:
                for name, doc, model, labels in families:
                    columns = [getattr(model, label) for label in labels]
                    rows = connection.execute(
                        select(*columns, func.count()).group_by(*columns)
                    ).all()
                    family = GaugeMetricFamily(name, doc, labels=labels)
                    for row in rows:
                        family.add_metric([str(value) for value in row[:-1]], int(row[-1]))
                    yield family
                yield from self._backlog(connection)
        except SQLAlchemyError as exc:
            # A scrape must not fail because the database is down; /readyz reports that.
            log.warning("metrics_db_unavailable", error=type(exc).__name__)

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
            .where(Payout.status.not_in(SETTLED_PAYOUT_STATES))
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
