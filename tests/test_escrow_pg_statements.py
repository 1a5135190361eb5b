"""Migration 0004 on PostgreSQL: the escrow functions that write their rows in a few
statements, and the compact enum checks of the tables they write."""

from __future__ import annotations

from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow.errors import EscrowConflict, InsufficientFunds
from escrowd.escrow.interface import EscrowService
from escrowd.migrations.runner import current_revision, downgrade_to, head_revision, upgrade_to
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import (
    PLATFORM,
    audit_actions,
    ledger_clean,
    make_settings,
    platform_fees,
    seed_agents,
)


def _service(engine: Engine, tmp_path: Path, *names: str) -> EscrowService:
    """Agents registered in the given order (so with ascending ids), 1 USDC each."""
    seed_agents(make_session_factory(engine), *names, balance=1_000_000)
    return EscrowService(engine, make_settings(tmp_path), platform=PLATFORM)


def _available(svc: EscrowService, agent: str) -> int:
    return next(b.available_base_units for b in svc.balances(agent) if b.asset == "USDC")


def _clean(engine: Engine) -> None:
    assert ledger_clean(make_session_factory(engine))


@pytest.mark.postgres
@pytest.mark.parametrize("worker_registered_first", [True, False])
def test_resolution_credits_both_agents_in_either_id_order(
    pg_engine: Engine, tmp_path: Path, worker_registered_first: bool
) -> None:
    # The function credits the agent with the lower id first; both orders must pay the same.
    names = ("worker", "buyer") if worker_registered_first else ("buyer", "worker")
    svc = _service(pg_engine, tmp_path, *names)
    svc.fund_escrow(
        job_id="split", buyer="buyer", worker="worker", asset="USDC", amount=500_001, fee_bps=333
    )

    resolved = svc.resolve_escrow("split", 300_000)

    # Fee floor(300_000 * 333 / 10_000) = 9_990 on the worker's share only.
    assert (
        resolved.worker_amount_base_units,
        resolved.fee_amount_base_units,
        resolved.refund_amount_base_units,
    ) == (
        290_010,
        9_990,
        200_001,
    )
    assert _available(svc, "buyer") == 1_000_000 - 500_001 + 200_001
    assert _available(svc, "worker") == 1_000_000 + 290_010
    assert platform_fees(make_session_factory(pg_engine)) == 9_990
    assert audit_actions(make_session_factory(pg_engine), "escrow:split") == [
        "ledger_escrow_fund",
        "escrow_funded",
        "ledger_escrow_release",
        "ledger_fee",
        "ledger_refund",
        "escrow_resolved",
    ]
    _clean(pg_engine)


@pytest.mark.postgres
def test_first_payment_opens_the_worker_account(pg_engine: Engine, tmp_path: Path) -> None:
    svc = _service(pg_engine, tmp_path, "buyer")
    svc.register_agent("newcomer")
    svc.fund_escrow(
        job_id="first", buyer="buyer", worker="newcomer", asset="USDC", amount=1_000, fee_bps=0
    )

    svc.release_escrow("first")

    assert _available(svc, "newcomer") == 1_000
    _clean(pg_engine)


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("table", "column", "row"),
    [
        (
            "ledger_accounts",
            "kind",
            "(kind, owner, asset, no_overdraft, debits_posted, credits_posted, created_at) "
            "VALUES ('bogus', 'o', 'USDC', true, 0, 0, now())",
        ),
        (
            "ledger_transfers",
            "code",
            "(idempotency_key, debit_account_id, credit_account_id, asset, amount, code, "
            "ref_type, ref_id, batch_id, created_at) "
            "VALUES ('k', 1, 2, 'USDC', 1, 'bogus', 't', 'r', 'b', now())",
        ),
    ],
)
def test_compact_enum_checks_refuse_unknown_values(
    pg_engine: Engine, table: str, column: str, row: str
) -> None:
    with pytest.raises(IntegrityError) as refused, pg_engine.begin() as conn:
        conn.execute(text(f"INSERT INTO {table} {row}"))
    assert isinstance(refused.value.orig, psycopg.errors.CheckViolation)
    assert f"ck_{table}_{column}_valid" in str(refused.value)


@pytest.mark.postgres
def test_compact_escrow_status_check_refuses_unknown_status(
    pg_engine: Engine, tmp_path: Path
) -> None:
    svc = _service(pg_engine, tmp_path, "buyer", "worker")
    svc.fund_escrow(job_id="st", buyer="buyer", worker="worker", asset="USDC", amount=10)
    with pytest.raises(IntegrityError, match="ck_escrows_status_valid"), pg_engine.begin() as c:
        c.execute(text("UPDATE escrows SET status = 'paid' WHERE job_id = 'st'"))
    assert svc.get_escrow("st").status == "funded"


def _constraint(sessions: sessionmaker[Session], name: str) -> str:
    with sessions() as s:
        definition: str = s.scalar(
            text("SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = :n"),
            {"n": name},
        )
    return definition


@pytest.mark.postgres
def test_downgrade_to_0003_and_back(pg_engine: Engine, tmp_path: Path) -> None:
    svc = _service(pg_engine, tmp_path, "buyer", "worker")
    sessions = make_session_factory(pg_engine)
    assert "ANY ('{" in _constraint(sessions, "ck_escrows_status_valid")

    downgrade_to(pg_engine, "0003")

    assert current_revision(pg_engine) == "0003"
    assert "ARRAY[" in _constraint(sessions, "ck_escrows_status_valid")
    # Revision 0003's functions are back and serve the same calls.
    svc.fund_escrow(job_id="old", buyer="buyer", worker="worker", asset="USDC", amount=1_000)
    assert svc.release_escrow("old").worker_amount_base_units == 975

    upgrade_to(pg_engine, "head")

    assert current_revision(pg_engine) == head_revision()
    assert "ANY ('{" in _constraint(sessions, "ck_escrows_status_valid")
    svc.fund_escrow(job_id="new", buyer="buyer", worker="worker", asset="USDC", amount=1_000)
    assert svc.refund_escrow("new").refund_amount_base_units == 1_000
    assert _available(svc, "buyer") == 1_000_000 - 1_000
    _clean(pg_engine)


@pytest.mark.postgres
@pytest.mark.parametrize("amount", [10, 5_000_000])
def test_second_fund_of_a_job_is_a_conflict_whatever_the_balance(
    pg_engine: Engine, tmp_path: Path, amount: int
) -> None:
    # The function debits the buyer before it inserts the escrow: a job taken already is
    # reported as the conflict it is, whether or not the buyer could cover the amount, and
    # the buyer's balance is as before.
    svc = _service(pg_engine, tmp_path, "buyer", "worker")
    svc.fund_escrow(job_id="dup", buyer="buyer", worker="worker", asset="USDC", amount=100)
    before = _available(svc, "buyer")

    with pytest.raises(EscrowConflict, match="already exists \\(funded\\)"):
        svc.fund_escrow(job_id="dup", buyer="buyer", worker="worker", asset="USDC", amount=amount)

    assert _available(svc, "buyer") == before == 1_000_000 - 100
    with pytest.raises(InsufficientFunds):
        svc.fund_escrow(job_id="new", buyer="buyer", worker="worker", asset="USDC", amount=10**12)
    assert _available(svc, "buyer") == before
    _clean(pg_engine)
