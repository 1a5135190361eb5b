"""/healthz, /readyz and /metrics: a router the API app mounts, or a small app of its own.

/healthz answers 200 while the process serves HTTP. /readyz answers 200 only when the
database is reachable, its schema is at the migrations' head and every poller this
instance runs is within its lag threshold; otherwise 503 with a JSON body naming each
problem. /metrics is the prometheus_client default registry (the pollers, deposits and
webhooks modules register their own series there) plus row counts by status.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import structlog
from fastapi import APIRouter, FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import SQLAlchemyError

from escrowd.daemon.jobs import LagTracker
from escrowd.migrations.runner import current_revision, head_revision
from escrowd.models import Deposit, Escrow, Payout

log = structlog.get_logger(__name__)


class ReadinessProbe:
    """What /readyz checks. `lags` is None for a process that runs no pollers."""

    def __init__(self, engine: Engine, lags: LagTracker | None = None) -> None:
        self.engine = engine
        self.lags = lags

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
        return found


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
        except SQLAlchemyError as exc:
            # A scrape must not fail because the database is down; /readyz reports that.
            log.warning("metrics_db_unavailable", error=type(exc).__name__)


_status_counts = _StatusCounts()
_registered = threading.Lock()
_is_registered = False


def _install_status_counts(engine: Engine) -> None:
    global _is_registered  # noqa: PLW0603 - one collector per process registry
    with _registered:
        _status_counts.engine = engine
        if not _is_registered:
            REGISTRY.register(_status_counts)
            _is_registered = True


def health_router(probe: ReadinessProbe) -> APIRouter:
    """Routes /healthz, /readyz, /metrics (no API key: they carry no secrets; bind the
    API to a private interface or filter these paths at the proxy)."""
    _install_status_counts(probe.engine)
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
