"""/healthz, /readyz and /metrics in-process; job ticks: failures, progress, locks."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine

from escrowd.daemon.health import ReadinessProbe, create_health_app
from escrowd.daemon.jobs import (
    Job,
    JobProgress,
    JobRunner,
    LagProbe,
    LagTracker,
    LocalLocks,
    PgAdvisoryLocks,
    advisory_key,
)
from escrowd.models.db import make_engine
from tests.conftest import PG_URL_BASE


def _client(engine: Engine, lags: LagTracker | None = None) -> TestClient:
    return TestClient(create_health_app(ReadinessProbe(engine, lags)))


def test_ready_on_a_migrated_database(engine: Engine) -> None:
    client = _client(engine, LagTracker())
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


@pytest.mark.postgres
def test_not_ready_when_the_database_is_gone(pg_template: str) -> None:
    engine = make_engine(f"{PG_URL_BASE}/escrowd_dropped_{uuid.uuid4().hex[:8]}")
    client = _client(engine)
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["problems"]["database"].startswith("unreachable")
    # A scrape still works while the database is down.
    assert client.get("/metrics").status_code == 200
    engine.dispose()


def test_not_ready_when_migrations_are_behind(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    response = _client(engine).get("/readyz")
    assert response.status_code == 503
    assert "escrowd migrate" in response.json()["problems"]["migrations"]
    engine.dispose()


def test_not_ready_while_a_poller_lags_or_has_not_polled(engine: Engine) -> None:
    lags = LagTracker()
    lags.expect("base", "blocks", 200)
    lags.expect("solana", "slots", 1000)
    client = _client(engine, lags)
    problems = client.get("/readyz").json()["problems"]
    assert problems == {
        "poller:base": "no completed poll yet",
        "poller:solana": "no completed poll yet",
    }
    lags.record("base", 201)
    lags.record("solana", 12)
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["problems"] == {"poller:base": "201 blocks behind head (threshold 200)"}
    lags.record("base", 3)
    assert client.get("/readyz").status_code == 200
    lags.record("base", "RpcUnavailable: all RPC URLs failed")
    assert "RpcUnavailable" in client.get("/readyz").json()["problems"]["poller:base"]
    # Another instance holds the poller: its lag is not this instance's to judge.
    lags.polled_elsewhere("base")
    assert client.get("/readyz").status_code == 200


def test_metrics_parse_and_include_lag_and_status_counts(engine: Engine) -> None:
    lags = LagTracker()
    lags.expect("testchain", "blocks", 10)
    lags.record("testchain", 7)
    body = _client(engine, lags).get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(body)}
    lag = [s for s in families["escrowd_chain_lag"].samples if s.labels["chain"] == "testchain"]
    assert lag[0].value == 7
    assert lag[0].labels["unit"] == "blocks"
    for name in ("escrowd_deposits", "escrowd_escrows", "escrowd_payouts"):
        assert name in families


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_failing_job_is_counted_and_does_not_count_as_progress() -> None:
    clock = [100.0]
    progress = JobProgress(clock=lambda: clock[0])
    runner = JobRunner(LocalLocks(), progress, LagTracker())
    calls: list[int] = []

    def flaky() -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("rpc down")
        return None

    job = Job(f"flaky_{uuid.uuid4().hex[:6]}", 1.0, flaky)
    runner.register(job)
    clock[0] = 105.0
    runner.tick(job)
    assert _sample("escrowd_job_failures_total", job=job.name) == 1
    assert progress.stale(3.0) == [job.name]
    runner.tick(job)
    assert len(calls) == 2
    assert progress.stale(3.0) == []
    assert _sample("escrowd_job_runs_total", job=job.name, outcome="ok") == 1


def test_a_job_is_stale_only_past_its_own_interval() -> None:
    clock = [0.0]
    progress = JobProgress(clock=lambda: clock[0])
    progress.register("checkpoint", 300.0)
    progress.register("poll", 2.0)
    clock[0] = 200.0
    assert progress.stale(120.0) == ["poll"]
    clock[0] = 421.0
    assert progress.stale(120.0) == ["checkpoint", "poll"]


def test_poll_results_feed_the_lag_tracker() -> None:
    lags = LagTracker()
    runner = JobRunner(LocalLocks(), JobProgress(), lags)
    job = Job("poll_x", 1.0, lambda: 250, LagProbe("x", "blocks", 100, lambda r: int(str(r))))
    runner.register(job)
    runner.tick(job)
    assert lags.problems() == {"x": "250 blocks behind head (threshold 100)"}


def test_advisory_keys_are_stable_and_distinct() -> None:
    assert advisory_key("webhooks") == advisory_key("webhooks")
    assert advisory_key("webhooks") != advisory_key("escrow_expiry")
    assert -(2**63) <= advisory_key("evm_poll:base") < 2**63


@pytest.mark.postgres
def test_pg_advisory_lock_admits_one_holder(pg_engine: Engine) -> None:
    first, second = PgAdvisoryLocks(pg_engine, 2), PgAdvisoryLocks(pg_engine, 2)
    inside = threading.Event()
    release = threading.Event()
    outcomes: list[bool] = []

    def hold() -> None:
        with first.hold("job_a") as acquired:
            outcomes.append(acquired)
            inside.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert inside.wait(10)
    with second.hold("job_a") as acquired:
        assert acquired is False
    with second.hold("job_b") as acquired:
        assert acquired is True
    release.set()
    holder.join(10)
    with second.hold("job_a") as acquired:
        assert acquired is True
    assert outcomes == [True]
    first.close()
    second.close()
