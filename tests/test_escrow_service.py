"""Escrow use cases on SQLite and PostgreSQL: balances, states, audit rows, events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import EscrowService, service
from escrowd.escrow.errors import EscrowConflict, EscrowNotFound, InsufficientFunds, InvalidAmount
from escrowd.escrow.payouts import request_payout
from escrowd.models import (
    Agent,
    Chain,
    DepositAddress,
    Escrow,
    LedgerTransfer,
    Payout,
    PayoutReason,
    WebhookEvent,
)
from escrowd.wallets.errors import InvalidAddress
from tests.escrow_fixtures import (
    CHAIN,
    PLATFORM,
    audit_actions,
    available,
    credit,
    ledger_clean,
    make_settings,
    platform_fees,
    seed_agents,
    seed_asset,
)

DEST = "0x" + "12" * 20


@pytest.mark.parametrize(
    ("amount", "fee_bps", "fee"),
    [
        (1, 250, 0),  # 0.025 base units rounds down: the worker keeps the unit
        (39, 250, 0),
        (40, 250, 1),
        (999_999, 333, 33_299),  # 33299.9667 -> 33299, worker 966700
        (10_000_000, 250, 250_000),
        (7, 10_000, 7),
        (7, 0, 0),
    ],
)
def test_fee_is_floor_of_amount_times_bps_remainder_to_worker(
    amount: int, fee_bps: int, fee: int
) -> None:
    assert service.fee_for(amount, fee_bps) == fee


def _fund(
    s: Session, job: str, ids: dict[str, int], amount: int, bps: int = 250, **kw: object
) -> Escrow:
    return service.fund_escrow(
        s,
        job_id=job,
        buyer=s.get_one(Agent, ids["buyer"]),
        worker=s.get_one(Agent, ids["worker"]),
        asset="USDC",
        amount=amount,
        fee_bps=bps,
        **kw,  # type: ignore[arg-type]
    )


def test_fund_release_moves_money_and_records_everything(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=5_000_000)
    with sessions() as s, s.begin():
        _fund(s, "job-1", ids, 999_999, bps=333)
    assert available(sessions, ids["buyer"]) == 5_000_000 - 999_999
    with sessions() as s, s.begin():
        escrow = service.release_escrow(s, "job-1")
        assert (escrow.status, escrow.worker_amount, escrow.fee_amount) == (
            "released",
            966_700,
            33_299,
        )
    assert available(sessions, ids["worker"]) == 5_000_000 + 966_700
    assert platform_fees(sessions) == 33_299
    assert audit_actions(sessions, "escrow:job-1") == [
        "ledger_escrow_fund",
        "escrow_funded",
        "ledger_escrow_release",
        "ledger_fee",
        "escrow_released",
    ]
    with sessions() as s:
        types = s.scalars(select(WebhookEvent.type).order_by(WebhookEvent.id)).all()
    assert types == ["escrow.funded", "escrow.released"]
    assert ledger_clean(sessions)


def test_zero_fee_leg_is_skipped(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=10)
    with sessions() as s, s.begin():
        _fund(s, "job-tiny", ids, 1, bps=250)
        service.release_escrow(s, "job-tiny")
    assert available(sessions, ids["worker"]) == 11
    assert platform_fees(sessions) == 0
    with sessions() as s:
        codes = s.scalars(
            select(LedgerTransfer.code).where(LedgerTransfer.ref_id == "job-tiny")
        ).all()
    assert sorted(codes) == ["escrow_fund", "escrow_release"]
    assert ledger_clean(sessions)


def test_resolve_splits_with_fee_on_worker_part_only(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=1_000_000)
    with sessions() as s, s.begin():
        _fund(s, "job-d", ids, 1_000_000, bps=250)
        escrow = service.resolve_escrow(s, "job-d", 600_001)
        assert (escrow.worker_amount, escrow.fee_amount, escrow.refund_amount) == (
            585_001,
            15_000,
            399_999,
        )
    assert available(sessions, ids["worker"]) == 1_000_000 + 585_001
    assert available(sessions, ids["buyer"]) == 399_999
    assert platform_fees(sessions) == 15_000
    with sessions() as s, s.begin(), pytest.raises(EscrowConflict, match="already resolved"):
        service.release_escrow(s, "job-d")
    assert ledger_clean(sessions)


def test_resolve_bounds_and_all_to_one_side(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=100)
    with sessions() as s, s.begin():
        _fund(s, "job-a", ids, 50)
        _fund(s, "job-b", ids, 50)
    with sessions() as s, s.begin(), pytest.raises(InvalidAmount):
        service.resolve_escrow(s, "job-a", 51)
    with sessions() as s, s.begin():
        assert service.resolve_escrow(s, "job-a", 0).refund_amount == 50
        assert service.resolve_escrow(s, "job-b", 50).worker_amount == 49
    assert available(sessions, ids["buyer"]) == 50
    assert available(sessions, ids["worker"]) == 100 + 49
    assert ledger_clean(sessions)


def test_insufficient_funds_and_duplicate_job_change_nothing(
    sessions: sessionmaker[Session],
) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=100)
    with pytest.raises(InsufficientFunds, match="buyer"), sessions() as s, s.begin():
        _fund(s, "job-x", ids, 101)
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Escrow)) == 0
    with sessions() as s, s.begin():
        _fund(s, "job-x", ids, 60)
    with pytest.raises(EscrowConflict, match="already exists"), sessions() as s, s.begin():
        _fund(s, "job-x", ids, 10)
    assert available(sessions, ids["buyer"]) == 40
    with sessions() as s, s.begin():
        service.refund_escrow(s, "job-x")
        with pytest.raises(EscrowConflict, match="job-x is already refunded"):
            service.refund_escrow(s, "job-x")
    with sessions() as s, pytest.raises(EscrowNotFound):
        service.release_escrow(s, "job-missing")
    assert available(sessions, ids["buyer"]) == 100
    assert ledger_clean(sessions)


def test_expiry_refunds_due_escrows_only(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=300)
    now = datetime(2026, 11, 23, 12, tzinfo=UTC)
    with sessions() as s, s.begin():
        _fund(s, "job-due", ids, 100, expires_at=now - timedelta(seconds=1))
        _fund(s, "job-later", ids, 100, expires_at=now + timedelta(hours=1))
        _fund(s, "job-never", ids, 100)
    with sessions() as s, s.begin():
        assert service.expire_due_escrows(s, now) == ["job-due"]
    with sessions() as s, s.begin():
        assert service.expire_due_escrows(s, now) == []
        assert service.get_escrow(s, "job-due").status == "refunded"
        assert service.get_escrow(s, "job-later").status == "funded"
    assert available(sessions, ids["buyer"]) == 100
    assert audit_actions(sessions, "escrow:job-due")[-3:] == [
        "escrow_expired",
        "ledger_refund",
        "escrow_refunded",
    ]
    with sessions() as s:
        types = s.scalars(select(WebhookEvent.type).order_by(WebhookEvent.id)).all()
    assert types[-2:] == ["escrow.expired", "escrow.refunded"]
    assert ledger_clean(sessions)


def test_request_payout_holds_funds_and_refuses_bad_requests(
    sessions: sessionmaker[Session],
) -> None:
    ids = seed_agents(sessions, "worker", balance=50_000)
    with sessions() as s, s.begin():
        s.add(
            DepositAddress(
                agent_id=ids["worker"],
                chain=Chain.EVM,
                address="0x" + "34" * 20,
                derivation_index=0,
            )
        )

    def request(s: Session, destination: str, amount: int, key: str) -> Payout:
        return request_payout(
            s,
            chain=CHAIN,
            family="evm",
            asset_symbol="USDC",
            agent_id=ids["worker"],
            destination=destination,
            amount=amount,
            reason=PayoutReason.WITHDRAWAL,
            reference="test",
            idempotency_key=key,
            min_amount_base_units=10_000,
            platform=PLATFORM,
        )

    refusals = [
        ("0x" + "00" * 20, 20_000, InvalidAddress),  # burns funds
        ("0x1234", 20_000, InvalidAddress),
        ("0x" + "34" * 20, 20_000, InvalidAddress),  # our own deposit address
        (DEST, 9_999, InvalidAmount),  # dust
        (DEST, 60_000, InsufficientFunds),
    ]
    for destination, amount, error in refusals:
        with pytest.raises(error), sessions() as s, s.begin():
            request(s, destination, amount, f"k-{destination}-{amount}")
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Payout)) == 0
    assert available(sessions, ids["worker"]) == 50_000

    with sessions() as s, s.begin():
        payout = request(s, DEST.upper().replace("0X", "0x"), 20_000, "w-1")
        assert (payout.status, payout.destination, payout.source_address) == ("requested", DEST, "")
    with sessions() as s, s.begin():
        assert request(s, DEST, 20_000, "w-1").id == payout.id  # same key, same request
    assert available(sessions, ids["worker"]) == 30_000
    assert audit_actions(sessions, f"payout:{payout.id}") == [
        "ledger_payout_hold",
        "payout_requested",
    ]
    assert ledger_clean(sessions)


def test_escrow_service_in_process(engine: Engine, tmp_path: Path) -> None:
    url = engine.url.render_as_string(hide_password=False)
    svc = EscrowService.from_url(url, make_settings(tmp_path), platform=PLATFORM)
    try:
        svc.register_agent("buyer")
        svc.register_agent("worker")
        assert svc.register_agent("buyer").id == svc.get_agent("buyer").id
        with svc._sessions() as s, s.begin():
            seed_asset(s)
            credit(s, service.get_agent(s, "buyer").id, 1_000_000)
        escrow = svc.fund_escrow(
            job_id="job-py", buyer="buyer", worker="worker", asset="USDC", amount=400_000
        )
        assert escrow.fee_bps == 250
        [balance] = svc.balances("buyer")
        assert (balance.available_base_units, balance.escrowed_as_buyer_base_units) == (
            600_000,
            400_000,
        )
        assert svc.release_escrow("job-py").worker_amount_base_units == 390_000
        with pytest.raises(EscrowConflict):
            svc.refund_escrow("job-py")
        payout = svc.withdraw(
            agent="worker",
            asset="USDC",
            chain=CHAIN,
            to_address=DEST,
            amount=100_000,
            idempotency_key="w1",
        )
        assert payout.amount_base_units == 100_000
        [worker_balance] = svc.balances("worker")
        assert worker_balance.available_base_units == 290_000
    finally:
        svc.close()
