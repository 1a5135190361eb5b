"""/healthz, /readyz and /metrics in-process; job ticks: failures, progress, locks."""

from __future__ import annotations

import threading
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import Engine
from sqlalchemy.orm import sessionmaker

from escrowd.daemon.health import ReadinessProbe, create_health_app
from escrowd.daemon.jobs import (
    Job,
    JobRunner,
    LagProbe,
    LocalLocks,
    PgAdvisoryLocks,
    PollTick,
    _evm_lag,
    advisory_key,
)
from escrowd.daemon.progress import JobProgress, LagReading, LagTracker
from escrowd.escrow import service
from escrowd.indexer.evm_poller import PollResult
from escrowd.models import (
    Deposit,
    DepositAddress,
    Payout,
    WebhookDelivery,
    WebhookEndpoint,
    WebhookEvent,
    utcnow,
)
from escrowd.models.db import make_engine
from escrowd.models.registry import ensure_asset
from tests.conftest import PG_URL_BASE
from tests.log_capture import captured_logs


def _client(
    engine: Engine, lags: LagTracker | None = None, progress: JobProgress | None = None
) -> TestClient:
    return TestClient(
        create_health_app(ReadinessProbe(engine, lags, progress, failing_after_s=50.0))
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


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
    lags = LagTracker(max_failed_polls=3, max_silence_s=120.0)
    lags.expect("base", "blocks", 200)
    lags.expect("solana", "slots", 1000)
    client = _client(engine, lags)
    problems = client.get("/readyz").json()["problems"]
    assert problems == {
        "poller:base": "no completed poll yet",
        "poller:solana": "no completed poll yet",
    }
    lags.record("base", LagReading(lag=201, head=1201))
    lags.record("solana", LagReading(lag=12))
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["problems"] == {"poller:base": "201 blocks behind head (threshold 200)"}
    lags.record("base", LagReading(lag=3, head=1203))
    assert client.get("/readyz").status_code == 200
    # One failed poll is a provider's hiccup; three in a row are an outage.
    lags.record("base", LagReading(error="RpcUnavailable: all RPC URLs failed"))
    lags.record("base", LagReading(error="RpcUnavailable: all RPC URLs failed"))
    assert client.get("/readyz").status_code == 200
    lags.record("base", LagReading(head=1210, error="RpcUnavailable: all RPC URLs failed"))
    problem = client.get("/readyz").json()["problems"]["poller:base"]
    assert problem.startswith("3 failed polls in a row; 10 blocks behind head (estimated)")
    assert "RpcUnavailable" in problem
    # Another instance holds the poller: its lag is not this instance's to judge.
    lags.polled_elsewhere("base")
    assert client.get("/readyz").status_code == 200
    lags.record("base", LagReading(lag=0, head=1210))
    assert client.get("/readyz").status_code == 200


def test_a_silent_poller_is_unready_and_alerts_once() -> None:
    clock = Clock()
    lags = LagTracker(max_failed_polls=5, max_silence_s=30.0, clock=clock)
    lags.expect("base", "blocks", 100)
    lags.record("base", LagReading(lag=1, head=500))
    with captured_logs() as logs:
        clock.now += 31
        assert lags.problems() == {"base": "no successful poll for 31 s; 1 blocks behind head"}
        clock.now += 5
        assert "base" in lags.problems()
        lags.record("base", LagReading(lag=0, head=510))
        assert lags.problems() == {}
    events = [(entry["event"], entry.get("chain")) for entry in logs]
    assert events == [("chain_unavailable", "base"), ("chain_available", "base")]


def test_the_lag_grows_at_the_observed_block_rate_while_the_node_is_down() -> None:
    clock = Clock()
    lags = LagTracker(max_failed_polls=2, max_silence_s=600.0, clock=clock)
    lags.expect("base", "blocks", 50)
    lags.record("base", LagReading(lag=2, head=100))
    clock.now += 10
    lags.record("base", LagReading(lag=2, head=120))  # 2 blocks a second
    clock.now += 30
    lags.record("base", LagReading(error="RpcUnavailable: connection refused"))
    assert REGISTRY.get_sample_value("escrowd_chain_lag", {"chain": "base", "unit": "blocks"}) == (
        2 + 60 * 0.3 + 2 * 0.7 * 30
    )
    assert REGISTRY.get_sample_value("escrowd_chain_lag_estimated", {"chain": "base"}) == 1
    assert REGISTRY.get_sample_value("escrowd_chain_failed_polls", {"chain": "base"}) == 1
    clock.now += 30
    lags.record("base", LagReading(error="RpcUnavailable: connection refused"))
    problem = lags.problems()["base"]
    assert problem.startswith("2 failed polls in a row; ")
    assert "behind head (estimated)" in problem


def test_a_poll_tick_keeps_its_lag_when_crediting_fails() -> None:
    polled = PollResult(chain="base", head=500, cursor=497, lag_blocks=3)
    assert _evm_lag(PollTick(polled)) == LagReading(lag=3, head=500)
    failed = _evm_lag(PollTick(polled, "RpcUnavailable: timeout"))
    assert failed == LagReading(lag=3, head=500, error="confirm: RpcUnavailable: timeout")
    down = PollResult(chain="base", head=None, error="RpcUnavailable: refused")
    assert _evm_lag(PollTick(down)) == LagReading(error="RpcUnavailable: refused")
    assert _evm_lag(RuntimeError("boom")) == LagReading(error="RuntimeError: boom")


def test_metrics_parse_and_include_lag_and_status_counts(engine: Engine) -> None:
    lags = LagTracker()
    lags.expect("testchain", "blocks", 10)
    lags.record("testchain", LagReading(lag=7))
    body = _client(engine, lags).get("/metrics").text
    families = {family.name: family for family in text_string_to_metric_families(body)}
    lag = [s for s in families["escrowd_chain_lag"].samples if s.labels["chain"] == "testchain"]
    assert lag[0].value == 7
    assert lag[0].labels["unit"] == "blocks"
    for name in ("escrowd_deposits", "escrowd_escrows", "escrowd_payouts"):
        assert name in families


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_failing_job_is_unready_after_its_threshold_but_not_wedged(engine: Engine) -> None:
    clock = Clock()
    progress = JobProgress(clock=clock)
    runner = JobRunner(LocalLocks(), progress, LagTracker())
    calls: list[int] = []

    def flaky() -> object:
        calls.append(1)
        if len(calls) <= 3:
            raise RuntimeError("database is down")
        return None

    job = Job(f"flaky_{uuid.uuid4().hex[:6]}", 1.0, flaky)
    runner.register(job)
    client = _client(engine, progress=progress)
    with captured_logs() as logs:
        for _ in range(3):
            clock.now += 30
            runner.tick(job)
        assert _sample("escrowd_job_failures_total", job=job.name) == 3
        assert _sample("escrowd_job_consecutive_failures", job=job.name) == 3
        # Failing ticks end: the daemon is not wedged, systemd must not restart it.
        assert progress.wedged(3.0) == []
        response = client.get("/readyz")
        assert response.status_code == 503
        assert response.json()["problems"] == {
            f"job:{job.name}": "failing for 60 s (3 ticks): RuntimeError: database is down"
        }
        metrics = client.get("/metrics").text
        assert "escrowd_ready 0.0" in metrics
        assert f'escrowd_readiness_problem{{check="job:{job.name}"}} 1.0' in metrics
        runner.tick(job)
        assert client.get("/readyz").status_code == 200
        assert "escrowd_ready 1.0" in client.get("/metrics").text
    assert [e["event"] for e in logs if e["event"] in ("job_failing", "job_recovered")] == [
        "job_failing",
        "job_recovered",
    ]


def test_a_job_is_wedged_when_its_tick_hangs_or_it_is_not_started() -> None:
    clock = Clock()
    progress = JobProgress(clock=clock)
    progress.register("checkpoint", 300.0)
    progress.register("poll", 2.0)
    progress.register("payouts", 2.0)
    clock.now += 100
    progress.started("poll")
    progress.finished("poll", "RpcUnavailable: refused")
    progress.started("payouts")
    clock.now += 100
    # poll failed but ran 100 s ago: the scheduler stopped starting it; payouts hangs.
    assert progress.wedged(120.0) == []
    clock.now += 25
    assert progress.wedged(120.0) == ["payouts", "poll"]
    clock.now += 200
    assert progress.wedged(120.0) == ["checkpoint", "payouts", "poll"]


def test_poll_results_feed_the_lag_tracker() -> None:
    lags = LagTracker()
    runner = JobRunner(LocalLocks(), JobProgress(), lags)
    probe = LagProbe("x", "blocks", 100, lambda r: LagReading(lag=int(str(r))))
    job = Job("poll_x", 1.0, lambda: 250, probe)
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


def test_backlog_gauges_show_the_oldest_open_payout_deposit_and_webhook(
    engine: Engine, sessions: sessionmaker
) -> None:
    old, recent = utcnow() - timedelta(minutes=10), utcnow() - timedelta(seconds=5)
    with sessions() as s, s.begin():
        agent = service.register_agent(s, "agent-1")
        asset = ensure_asset(s, chain="base", symbol="USDC", decimals=6, token_address=None)
        address = DepositAddress(agent_id=agent.id, chain="evm", address="0x1", derivation_index=0)
        s.add(address)
        s.flush()
        for key, status, created in (
            ("p1", "broadcast", old),
            ("p2", "broadcast", recent),
            ("p3", "requested", recent),
            ("p4", "confirmed", old),
            ("p5", "cancelled", old),
            ("p6", "failed", old),
        ):
            s.add(
                Payout(
                    idempotency_key=key,
                    chain="base",
                    asset_id=asset.id,
                    agent_id=agent.id,
                    reason="withdrawal",
                    source_address="",
                    destination="0x2",
                    amount=5,
                    status=status,
                    created_at=created,
                )
            )
        s.add(
            Deposit(
                chain="base",
                tx_hash="0xabc",
                log_index=0,
                asset_id=asset.id,
                agent_id=agent.id,
                deposit_address_id=address.id,
                amount=7,
                block_number=1,
                block_hash="0xdef",
                created_at=old,
            )
        )
        endpoint = WebhookEndpoint(url="https://example.test/hook", secret_ciphertext=b"x")
        event = WebhookEvent(type="deposit.seen", api_version="1", payload="{}", created_at=old)
        done = WebhookEvent(type="deposit.seen", api_version="1", payload="{}", fanned_out=True)
        s.add_all([endpoint, event, done])
        s.flush()
        s.add(WebhookDelivery(endpoint_id=endpoint.id, event_id=event.id, created_at=old))
    families = {
        family.name: family
        for family in text_string_to_metric_families(_client(engine).get("/metrics").text)
    }

    def value(name: str, **labels: str) -> float:
        samples = families[name].samples
        return next(
            x.value for x in samples if all(x.labels.get(k) == v for k, v in labels.items())
        )

    assert 595 < value("escrowd_payouts_oldest_age_seconds", status="broadcast") < 700
    assert 0 < value("escrowd_payouts_oldest_age_seconds", status="requested") < 100
    assert not [
        x
        for x in families["escrowd_payouts_oldest_age_seconds"].samples
        if x.labels["status"] in ("confirmed", "cancelled", "failed")
    ]
    assert 595 < value("escrowd_deposits_pending_oldest_age_seconds", chain="base") < 700
    assert value("escrowd_webhook_backlog") == 1
    assert 595 < value("escrowd_webhook_backlog_oldest_age_seconds") < 700
    assert value("escrowd_webhook_events_not_fanned_out") == 1
