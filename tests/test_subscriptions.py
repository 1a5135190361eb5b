"""Recurring charges in-process (EscrowService) and under the scheduler, on SQLite and
PostgreSQL: periods, catch-up, failures, pause, resume, cancel, and no period charged
twice by two runners, two daemons or a restart."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import ValidationFailed
from escrowd.config.settings import Settings, SubscriptionSettings
from escrowd.daemon.jobs import (
    JobContext,
    JobProgress,
    JobRunner,
    LagTracker,
    PgAdvisoryLocks,
    subscription_jobs,
)
from escrowd.escrow import ledger, subscriptions
from escrowd.escrow.errors import InsufficientFunds
from escrowd.escrow.interface import EscrowService
from escrowd.escrow.subscriptions import SubscriptionConflict, period_at, period_start
from escrowd.models import (
    LedgerTransfer,
    Subscription,
    SubscriptionCharge,
    TransferCode,
    WebhookEvent,
    utcnow,
)
from escrowd.models.db import make_engine, make_session_factory
from tests.escrow_fixtures import (
    available,
    credit,
    ledger_clean,
    make_settings,
    platform_fees,
    row_id,
    seed_agents,
)
from tests.subscription_helpers import age

USDC = 1_000_000
DAY = timedelta(days=1)


def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path).model_copy(
        update={
            "subscriptions": SubscriptionSettings(
                retry_after_s=3600, max_charge_attempts=3, max_catch_up_periods=3
            )
        }
    )


@pytest.fixture
def svc(engine: Engine, tmp_path: Path) -> Iterator[EscrowService]:
    service = EscrowService(engine, settings(tmp_path))
    seed_agents(service._sessions, "alice", "bob")
    yield service


def fund(svc: EscrowService, agent: str, amount: int) -> None:
    with svc._sessions() as s, s.begin():
        credit(s, row_id(svc._sessions, agent), amount)


def last_error(svc: EscrowService, external_id: str) -> str | None:
    """The unexpected error a scheduled charge last hit (the operator's view, not the API's)."""
    with svc._sessions() as s:
        return s.scalars(
            select(Subscription.last_error).where(Subscription.external_id == external_id)
        ).one()


def subscription_row_id(svc: EscrowService, external_id: str) -> int:
    with svc._sessions() as s:
        return s.scalars(
            select(Subscription.id).where(Subscription.external_id == external_id)
        ).one()


def charged_periods(sessions: sessionmaker[Session], external_id: str) -> list[int]:
    """Periods with a ledger charge, from the ledger itself (one per transfer)."""
    with sessions() as s:
        keys = s.scalars(
            select(LedgerTransfer.idempotency_key).where(
                LedgerTransfer.code == TransferCode.SUBSCRIPTION_CHARGE,
                LedgerTransfer.ref_id == external_id,
            )
        ).all()
    return sorted(int(key.split(":")[2]) for key in keys)


def event_types(sessions: sessionmaker[Session], external_id: str) -> list[str]:
    with sessions() as s:
        rows = s.execute(
            select(WebhookEvent.type, WebhookEvent.payload)
            .where(WebhookEvent.type.like("subscription.%"))
            .order_by(WebhookEvent.id)
        ).all()
    return [
        t for t, payload in rows if json.loads(payload)["data"]["subscription_id"] == external_id
    ]


def test_periods_follow_the_anchor_and_month_ends() -> None:
    monthly = Subscription(
        interval="month", interval_count=1, anchor_at=datetime(2027, 1, 31, 9, tzinfo=UTC)
    )
    starts = [period_start(monthly, k).date().isoformat() for k in range(4)]
    assert starts == ["2027-01-31", "2027-02-28", "2027-03-31", "2027-04-30"]
    assert period_at(monthly, datetime(2027, 1, 31, 8, 59, tzinfo=UTC)) == -1
    assert period_at(monthly, datetime(2027, 2, 28, 8, 59, tzinfo=UTC)) == 0
    assert period_at(monthly, datetime(2027, 2, 28, 9, tzinfo=UTC)) == 1
    assert period_at(monthly, datetime(2028, 2, 29, 9, tzinfo=UTC)) == 13
    quarterly = Subscription(
        interval="month", interval_count=3, anchor_at=datetime(2027, 11, 30, tzinfo=UTC)
    )
    assert period_start(quarterly, 1) == datetime(2028, 2, 29, tzinfo=UTC)
    assert period_at(quarterly, datetime(2028, 2, 28, tzinfo=UTC)) == 0
    fortnightly = Subscription(
        interval="week", interval_count=2, anchor_at=datetime(2027, 1, 1, tzinfo=UTC)
    )
    assert period_at(fortnightly, datetime(2027, 1, 29, tzinfo=UTC)) == 2
    assert period_at(fortnightly, datetime(2027, 1, 28, 23, tzinfo=UTC)) == 1


def test_charges_each_period_once_with_bounded_catch_up(
    svc: EscrowService, engine: Engine, tmp_path: Path
) -> None:
    fund(svc, "alice", 100 * USDC)
    ids = {name: row_id(svc._sessions, name) for name in ("alice", "bob")}
    before = utcnow()
    sub = svc.create_subscription(
        subscription_id="sub-1", buyer="alice", worker="bob", asset="USDC",
        amount=10 * USDC, interval="day", fee_bps=250,
    )  # fmt: skip
    # Starting now charges period 0 at once: 10 USDC, 0.25 of it the platform's fee.
    assert (sub.status, sub.next_period_index) == ("active", 1)
    assert before + DAY <= sub.next_charge_at <= utcnow() + DAY
    assert available(svc._sessions, ids["alice"]) == 90 * USDC
    assert available(svc._sessions, ids["bob"]) == 9_750_000
    assert platform_fees(svc._sessions) == 250_000

    # Nothing is due before period 1 starts; at its start it is charged once, however
    # often the scheduler runs, and after a restart (a new service on the same database).
    anchor = sub.starts_at
    assert svc.charge_due_subscriptions(anchor + DAY - timedelta(seconds=1)).charged == 0
    assert svc.charge_due_subscriptions(anchor + DAY).charged == 1
    assert svc.charge_due_subscriptions(anchor + DAY + timedelta(hours=1)).charged == 0
    restarted = EscrowService(make_engine(engine.url.render_as_string(hide_password=False)),
                              settings(tmp_path))  # fmt: skip
    try:
        assert restarted.charge_due_subscriptions(anchor + DAY + timedelta(hours=2)).charged == 0
    finally:
        restarted.close()
    assert charged_periods(svc._sessions, "sub-1") == [0, 1]

    # Down for a week: of periods 2..8 the latest three are charged, in order; 2..5 are
    # skipped for good and said so.
    run = svc.charge_due_subscriptions(anchor + 8 * DAY + timedelta(hours=3))
    assert (run.charged, run.failed, run.errors) == (3, 0, [])
    assert charged_periods(svc._sessions, "sub-1") == [0, 1, 6, 7, 8]
    assert available(svc._sessions, ids["alice"]) == 50 * USDC
    current = svc.get_subscription("sub-1")
    assert (current.next_period_index, current.next_charge_at) == (9, anchor + 9 * DAY)
    assert [c.period_index for c in svc.subscription_charges("sub-1")] == [0, 1, 6, 7, 8]
    assert event_types(svc._sessions, "sub-1") == [
        "subscription.created",
        *["subscription.charged"] * 2,
        "subscription.periods_skipped",
        *["subscription.charged"] * 3,
    ]
    with svc._sessions() as s:
        skipped = s.scalars(
            select(WebhookEvent.payload).where(WebhookEvent.type == "subscription.periods_skipped")
        ).one()
    data = json.loads(skipped)["data"]
    assert (data["skipped_from_period"], data["skipped_to_period"], data["reason"]) == (
        2,
        5,
        "catch_up_limit",
    )
    assert (data["buyer"], data["worker"], data["payee"]) == ("alice", "bob", "worker")
    assert ledger_clean(svc._sessions)


def test_failed_charges_retry_then_pause_resume_and_cancel(svc: EscrowService) -> None:
    fund(svc, "alice", 25 * USDC)
    alice = row_id(svc._sessions, "alice")
    svc.create_subscription(
        subscription_id="sub-2", buyer="alice", worker="bob", asset="USDC",
        amount=10 * USDC, interval="week", fee_bps=0,
    )  # fmt: skip
    week = timedelta(weeks=1)
    # Two weeks and an hour later: period 1 is charged, period 2 finds 5 USDC and fails;
    # it is retried an hour later (not sooner), and after its third failed attempt the
    # subscription pauses.
    age(svc._sessions, "sub-2", 2 * week + timedelta(hours=1))
    run = svc.charge_due_subscriptions()
    assert (run.charged, run.failed) == (1, 1)
    retry_at = svc.get_subscription("sub-2").next_charge_at
    assert utcnow() < retry_at <= utcnow() + timedelta(hours=1)
    assert svc.charge_due_subscriptions(retry_at - timedelta(seconds=1)).failed == 0
    assert svc.charge_due_subscriptions(retry_at).failed == 1
    assert svc.get_subscription("sub-2").status == "active"
    assert svc.charge_due_subscriptions(retry_at + timedelta(hours=1)).failed == 1
    paused = svc.get_subscription("sub-2")
    assert (paused.status, paused.next_period_index) == ("paused", 2)
    [*_, failing] = svc.subscription_charges("sub-2")
    assert (failing.period_index, failing.status, failing.attempts) == (2, "failed", 3)
    assert failing.error == "buyer alice had less than 10000000 base units of USDC available"
    assert available(svc._sessions, alice) == 5 * USDC
    assert svc.charge_due_subscriptions(utcnow() + 5 * week).charged == 0  # paused: untouched
    types = event_types(svc._sessions, "sub-2")
    assert types[-4:] == [
        "subscription.charge_failed",
        "subscription.charge_failed",
        "subscription.charge_failed",
        "subscription.paused",
    ]

    # Two more weeks pass. Resuming while the buyer still cannot pay is refused and
    # changes nothing; once it can, the period running now (4) is charged and the ones
    # that passed while paused (2, the failed one, and 3) never are.
    age(svc._sessions, "sub-2", 2 * week)
    with pytest.raises(InsufficientFunds, match="deposit more"):
        svc.resume_subscription("sub-2")
    assert svc.get_subscription("sub-2").status == "paused"
    assert event_types(svc._sessions, "sub-2") == types
    fund(svc, "alice", 20 * USDC)
    resumed = svc.resume_subscription("sub-2")
    assert (resumed.status, resumed.paused_at, resumed.next_period_index) == ("active", None, 5)
    assert charged_periods(svc._sessions, "sub-2") == [0, 1, 4]
    assert available(svc._sessions, alice) == 15 * USDC
    assert event_types(svc._sessions, "sub-2")[len(types) :] == [
        "subscription.periods_skipped",
        "subscription.resumed",
        "subscription.charged",
    ]
    with pytest.raises(SubscriptionConflict, match="only a paused one resumes"):
        svc.resume_subscription("sub-2")

    canceled = svc.cancel_subscription("sub-2", requested_by="buyer")
    assert (canceled.status, canceled.canceled_by) == ("canceled", "buyer")
    with pytest.raises(SubscriptionConflict, match="already canceled"):
        svc.cancel_subscription("sub-2")
    assert svc.charge_due_subscriptions(utcnow() + 9 * week).charged == 0
    assert available(svc._sessions, alice) == 15 * USDC
    assert event_types(svc._sessions, "sub-2")[-1] == "subscription.canceled"
    assert ledger_clean(svc._sessions)


def test_platform_payee_future_start_and_refusals(svc: EscrowService) -> None:
    fund(svc, "alice", 30 * USDC)
    alice = row_id(svc._sessions, "alice")
    start = utcnow() + timedelta(days=3)
    sub = svc.create_subscription(
        subscription_id="plan-1", buyer="alice", asset="USDC", amount=12 * USDC,
        interval="month", starts_at=start,
    )  # fmt: skip
    # Paying the platform: no fee, and a future start charges nothing yet.
    assert (sub.worker, sub.fee_bps, sub.next_charge_at) == (None, 0, start)
    assert available(svc._sessions, alice) == 30 * USDC
    assert svc.charge_due_subscriptions(start).charged == 1
    assert platform_fees(svc._sessions) == 12 * USDC
    monthly = Subscription(interval=sub.interval, interval_count=1, anchor_at=sub.starts_at)
    assert svc.get_subscription("plan-1").next_charge_at.date() == period_start(monthly, 1).date()
    assert [s.id for s in svc.list_subscriptions(buyer="alice", status="active")] == ["plan-1"]
    assert svc.list_subscriptions(status="paused") == []

    refused = [
        ({"worker": None, "fee_bps": 100}, ValidationFailed, "platform has no fee"),
        ({"starts_at": utcnow() - timedelta(hours=1)}, ValidationFailed, "in the past"),
        ({"interval_count": 0}, ValidationFailed, "between 1 and 365"),
        ({"interval": "hour"}, ValidationFailed, "day, week, month"),
        ({"worker": "alice"}, ValidationFailed, "different agents"),
        ({"amount": 0}, ValidationFailed, "positive integer"),
        ({"amount": 31 * USDC}, InsufficientFunds, "had less than 31000000"),
        ({"subscription_id": "plan-1"}, SubscriptionConflict, "already exists"),
    ]
    for change, error, message in refused:
        request = {
            "subscription_id": "plan-2", "buyer": "alice", "worker": "bob", "asset": "USDC",
            "amount": 1 * USDC, "interval": "day", **change,
        }  # fmt: skip
        with pytest.raises(error, match=message):
            svc.create_subscription(**request)  # type: ignore[arg-type]
    with svc._sessions() as s:
        assert s.scalar(select(func.count()).select_from(Subscription)) == 1
    assert available(svc._sessions, alice) == 18 * USDC
    assert ledger_clean(svc._sessions)


def _run_together(count: int, work: object) -> list[BaseException]:
    """Start `count` threads running `work` at the same moment; their errors."""
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            work()  # type: ignore[operator]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return errors


def test_two_runners_never_charge_a_period_twice(svc: EscrowService, engine: Engine) -> None:
    fund(svc, "alice", 1_000 * USDC)
    alice = row_id(svc._sessions, "alice")
    anchors = []
    for n in range(12):
        sub = svc.create_subscription(
            subscription_id=f"race-{n}", buyer="alice", worker="bob", asset="USDC",
            amount=1 * USDC, interval="day",
        )  # fmt: skip
        anchors.append(sub.starts_at)
    # Two runners without the advisory lock (as if one lost it mid-tick), both charging
    # periods 1 and 2 of every subscription at once.
    when = max(anchors) + 2 * DAY
    policy = subscriptions.ChargePolicy()
    sessions = make_session_factory(engine)
    runs: list[subscriptions.ChargeRun] = []
    errors = _run_together(2, lambda: runs.append(subscriptions.charge_due(sessions, when, policy)))
    assert errors == []
    assert sum(run.charged for run in runs) == 24
    for n in range(12):
        assert charged_periods(sessions, f"race-{n}") == [0, 1, 2]
    assert available(sessions, alice) == (1_000 - 36) * USDC

    # The database itself refuses a second charge row for a period, and the ledger
    # answers a repeated period key with the original transfer instead of moving money.
    sub_id = subscription_row_id(svc, "race-0")
    with sessions() as s, pytest.raises(IntegrityError):
        s.add(
            SubscriptionCharge(
                subscription_id=sub_id, period_index=1, period_start=when, amount=1,
                status="succeeded", attempts=1,
            )
        )  # fmt: skip
        s.flush()
    with sessions() as s, s.begin():
        key = f"subscription:{sub_id}:1:payee"
        row = s.scalars(select(LedgerTransfer).where(LedgerTransfer.idempotency_key == key)).one()
        spec = ledger.TransferSpec(
            idempotency_key=key, debit_account_id=row.debit_account_id,
            credit_account_id=row.credit_account_id, amount=row.amount,
            code=TransferCode.SUBSCRIPTION_CHARGE, ref_type=row.ref_type, ref_id=row.ref_id,
        )  # fmt: skip
        [again] = ledger.post(s, [spec], actor="test")
        assert again.id == row.id
    assert available(sessions, alice) == (1_000 - 36) * USDC
    assert ledger_clean(sessions)


@pytest.mark.postgres
def test_subscription_job_runs_in_one_daemon_at_a_time(pg_engine: Engine, tmp_path: Path) -> None:
    # Batches of 2: one tick charges batch after batch until none is due.
    config = settings(tmp_path)
    config = config.model_copy(
        update={"subscriptions": config.subscriptions.model_copy(update={"batch_size": 2})}
    )
    svc = EscrowService(pg_engine, config)
    seed_agents(svc._sessions, "alice", "bob")
    fund(svc, "alice", 100 * USDC)
    for n in range(5):
        svc.create_subscription(
            subscription_id=f"job-{n}", buyer="alice", worker="bob", asset="USDC",
            amount=2 * USDC, interval="day",
        )  # fmt: skip
    # A day passes: every anchor moves one day back, so period 1 is due now.
    with svc._sessions() as s, s.begin():
        for sub in s.scalars(select(Subscription)):
            sub.anchor_at -= DAY
            sub.next_charge_at -= DAY
    # Two daemons' runners, each with its own advisory-lock connections.
    runners, jobs = [], []
    for _ in range(2):
        ctx = JobContext(settings=svc.settings, engine=pg_engine, sessions=svc._sessions)
        [job] = subscription_jobs(ctx)
        runner = JobRunner(PgAdvisoryLocks(pg_engine, 2), JobProgress(), LagTracker())
        runner.register(job)
        jobs.append(job)
        runners.append(runner)
    skipped = {"job": "subscriptions", "outcome": "skipped_locked"}
    skipped_before = REGISTRY.get_sample_value("escrowd_job_runs_total", skipped) or 0
    try:
        assert jobs[0].name == "subscriptions"
        # While another daemon holds the job, this one's tick does nothing.
        with runners[1].locks.hold("subscriptions") as held:
            assert held
            runners[0].tick(jobs[0])
        assert REGISTRY.get_sample_value("escrowd_job_runs_total", skipped) == skipped_before + 1
        assert charged_periods(svc._sessions, "job-0") == [0]
        pairs = list(zip(runners, jobs, strict=True))
        errors = _run_together(2, lambda: pairs.pop()[0].tick(jobs[0]))
        assert errors == []
    finally:
        for runner in runners:
            runner.locks.close()
    for n in range(5):
        assert charged_periods(svc._sessions, f"job-{n}") == [0, 1]
    assert available(svc._sessions, row_id(svc._sessions, "alice")) == 80 * USDC
    assert ledger_clean(svc._sessions)


def test_an_unexpected_error_on_one_subscription_holds_up_no_other(
    sqlite_url: str, tmp_path: Path
) -> None:
    svc = EscrowService.from_url(sqlite_url, settings(tmp_path))
    try:
        seed_agents(svc._sessions, "alice", "bob")
        fund(svc, "alice", 100 * USDC)
        for n in range(3):
            svc.create_subscription(
                subscription_id=f"iso-{n}", buyer="alice", worker="bob", asset="USDC",
                amount=1 * USDC, interval="day",
            )  # fmt: skip
        broken = subscription_row_id(svc, "iso-1")
        # The database refuses this one subscription's next charge row (a fault injected
        # below our code, as a failing disk or a bad migration would).
        with svc.engine.begin() as connection:
            connection.exec_driver_sql(
                "CREATE TRIGGER inject_fault BEFORE INSERT ON subscription_charges "
                f"WHEN NEW.subscription_id = {broken} AND NEW.period_index = 1 "
                "BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
            )
        errors_before = REGISTRY.get_sample_value("escrowd_subscription_errors_total") or 0
        when = svc.get_subscription("iso-2").starts_at + DAY
        run = svc.charge_due_subscriptions(when)
        assert (run.charged, len(run.errors)) == (2, 1) and "injected fault" in run.errors[0]
        assert REGISTRY.get_sample_value("escrowd_subscription_errors_total") == errors_before + 1
        failing = svc.get_subscription("iso-1")
        error = last_error(svc, "iso-1")
        assert error is not None and "injected fault" in error
        # Looked at again only after retry_after_s, so it cannot crowd out the others.
        assert failing.next_charge_at == when + timedelta(hours=1)
        assert charged_periods(svc._sessions, "iso-0") == [0, 1]
        assert charged_periods(svc._sessions, "iso-1") == [0]
        with svc.engine.begin() as connection:
            connection.exec_driver_sql("DROP TRIGGER inject_fault")
        assert svc.charge_due_subscriptions(when + timedelta(hours=1)).charged == 1
        assert charged_periods(svc._sessions, "iso-1") == [0, 1]
        assert last_error(svc, "iso-1") is None
        assert ledger_clean(svc._sessions)
    finally:
        svc.close()
