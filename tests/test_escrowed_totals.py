"""What a buyer has in open escrows is kept on its available account (migration 0016) by
every fund and settlement, on both databases and on both of PostgreSQL's paths (its
functions and the Python path expiry takes), and `ledger check` holds it to the escrows."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Connection, Engine, String, cast, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import ledger, service
from escrowd.escrow.errors import EscrowConflict, InsufficientFunds
from escrowd.migrations.runner import downgrade_to, head_revision, upgrade_to_head
from escrowd.models import Agent, Escrow, LedgerAccount
from escrowd.models.db import make_session_factory
from escrowd.models.escrow import OPEN_ESCROW_STATES
from tests.escrow_fixtures import ledger_clean, seed_agents, waiting_for_a_lock


def _recorded(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Each agent's recorded escrowed USDC, by external id."""
    with sessions() as s:
        rows = s.execute(
            select(Agent.external_id, LedgerAccount.escrowed)
            .join(LedgerAccount, LedgerAccount.owner == cast(Agent.id, String))
            .where(LedgerAccount.kind == "agent_available", LedgerAccount.asset == "USDC")
        ).all()
    return {name: int(held) for name, held in rows}


def _open_sums(sessions: sessionmaker[Session]) -> dict[str, int]:
    """What each agent's open escrows as buyer hold, summed from the escrows."""
    with sessions() as s:
        rows = s.execute(
            select(Agent.external_id, func.sum(Escrow.amount))
            .join(Escrow, Escrow.buyer_agent_id == Agent.id)
            .where(Escrow.status.in_([status.value for status in OPEN_ESCROW_STATES]))
            .group_by(Agent.external_id)
        ).all()
    return {name: int(total) for name, total in rows}


def _escrowed(sessions: sessionmaker[Session], name: str) -> int:
    with sessions() as s:
        [balance] = service.balances(s, service.get_agent(s, name))
    return balance.escrowed_as_buyer


def test_every_fund_and_settlement_keeps_the_buyers_escrowed_total(
    sessions: sessionmaker[Session],
) -> None:
    seed_agents(sessions, "ann", "bob", "cat", balance=100_000)
    soon = datetime.now(UTC) + timedelta(minutes=5)

    def fund(
        job: str, buyer: str, worker: str, amount: int, expires_at: datetime | None = None
    ) -> None:
        with sessions() as s, s.begin():
            service.fund_escrow(
                s,
                job_id=job,
                buyer=service.get_agent(s, buyer),
                worker=service.get_agent(s, worker),
                asset="USDC",
                amount=amount,
                fee_bps=250,
                expires_at=expires_at,
            )

    # Agents in both roles: ann buys from bob and bob from ann.
    fund("r", "ann", "bob", 1_000)
    fund("f", "ann", "cat", 2_000)
    fund("s", "bob", "ann", 4_000)
    fund("x", "ann", "bob", 8_000, soon)
    assert _recorded(sessions) == {"ann": 11_000, "bob": 4_000, "cat": 0}
    assert (_escrowed(sessions, "ann"), _escrowed(sessions, "bob")) == (11_000, 4_000)

    # Refusals change nothing: a job funded already, more than the buyer has.
    with pytest.raises(EscrowConflict), sessions() as s, s.begin():
        service.fund_escrow(
            s,
            job_id="r",
            buyer=service.get_agent(s, "ann"),
            worker=service.get_agent(s, "bob"),
            asset="USDC",
            amount=5,
            fee_bps=0,
        )
    with pytest.raises(InsufficientFunds):
        fund("big", "cat", "ann", 10**9)
    assert _recorded(sessions) == {"ann": 11_000, "bob": 4_000, "cat": 0}

    with sessions() as s, s.begin():
        service.release_escrow(s, "r")
        service.refund_escrow(s, "f")
        service.resolve_escrow(s, "s", 1_500)
    assert _recorded(sessions) == {"ann": 8_000, "bob": 0, "cat": 0}

    # Expired is still open; the expiry job's refund (the Python path on both databases)
    # takes it off.
    with sessions() as s, s.begin():
        escrow = s.scalars(select(Escrow).where(Escrow.job_id == "x")).one()
        escrow.status = "expired"
    assert _escrowed(sessions, "ann") == 8_000
    with sessions() as s, s.begin():
        escrow = s.scalars(select(Escrow).where(Escrow.job_id == "x")).one()
        escrow.status = "funded"
    with sessions() as s, s.begin():
        assert service.expire_due_escrows(s, soon + timedelta(seconds=1)) == ["x"]
    assert _recorded(sessions) == {"ann": 0, "bob": 0, "cat": 0}
    assert _open_sums(sessions) == {}
    # ann's 1,000 went to bob, her other escrows came back, and bob's escrow paid her
    # 1,500 less the 2.5 % fee (37).
    with sessions() as s:
        [ann] = service.balances(s, service.get_agent(s, "ann"))
    assert ann.available == 100_000 - 1_000 + 1_500 - 37
    assert ledger_clean(sessions)


def test_ledger_check_reports_an_escrowed_total_that_disagrees_with_the_escrows(
    sessions: sessionmaker[Session],
) -> None:
    ids = seed_agents(sessions, "ann", "bob", balance=10_000)
    with sessions() as s, s.begin():
        service.fund_escrow(
            s,
            job_id="j",
            buyer=s.get_one(Agent, ids["ann"]),
            worker=s.get_one(Agent, ids["bob"]),
            asset="USDC",
            amount=700,
            fee_bps=0,
        )
    assert ledger_clean(sessions)
    with sessions() as s, s.begin():
        s.execute(
            text("UPDATE ledger_accounts SET escrowed = 699 WHERE owner = :o AND kind = :k"),
            {"o": str(ids["ann"]), "k": "agent_available"},
        )
    with sessions() as s:
        violations = ledger.check(s)
    assert [v.check for v in violations] == ["escrowed_totals"]
    assert "records 699 in open escrows" in violations[0].message
    assert "hold 700" in violations[0].message


def test_upgrading_a_database_with_open_escrows_fills_their_totals(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = seed_agents(sessions, "ann", "bob", balance=10_000)
    with sessions() as s, s.begin():
        ann, bob = s.get_one(Agent, ids["ann"]), s.get_one(Agent, ids["bob"])
        for n, (buyer, worker) in enumerate([(ann, bob), (ann, bob), (bob, ann)]):
            service.fund_escrow(
                s,
                job_id=f"j{n}",
                buyer=buyer,
                worker=worker,
                asset="USDC",
                amount=100 * (n + 1),
                fee_bps=0,
            )
        service.release_escrow(s, "j0")
    downgrade_to(engine, "0015")
    upgrade_to_head(engine)
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == (
            head_revision()
        )
    fresh = make_session_factory(engine)
    assert _recorded(fresh) == {"ann": 200, "bob": 300}
    assert ledger_clean(fresh)


def _lock_account(connection: Connection, agent_id: int, *, nowait: bool = False) -> None:
    connection.execute(
        text(
            "SELECT id FROM ledger_accounts WHERE kind = 'agent_available' AND owner = :o "
            "FOR UPDATE" + (" NOWAIT" if nowait else "")
        ),
        {"o": str(agent_id)},
    )


@pytest.mark.postgres
@pytest.mark.parametrize("buyer", ["ann", "bob"])
def test_a_release_locks_the_lower_agent_ids_account_first(pg_engine: Engine, buyer: str) -> None:
    """A release locks the buyer's account and the worker's, lowest agent id first: two
    settlements between the same agents in opposite roles cannot each hold the row the
    other waits for. While ann's row (the lower id) is held elsewhere, a release between
    ann and bob waits for it holding nothing of bob's, whichever of them is the buyer."""
    sessions = make_session_factory(pg_engine)
    ids = seed_agents(sessions, "ann", "bob", balance=1_000_000)
    assert ids["ann"] < ids["bob"]
    worker = "bob" if buyer == "ann" else "ann"
    with sessions() as s, s.begin():
        service.fund_escrow(
            s,
            job_id="j",
            buyer=service.get_agent(s, buyer),
            worker=service.get_agent(s, worker),
            asset="USDC",
            amount=1_000,
            fee_bps=100,
        )
    errors: list[BaseException] = []

    def release() -> None:
        try:
            with sessions() as s, s.begin():
                service.release_escrow(s, "j")
        except BaseException as exc:
            errors.append(exc)

    with pg_engine.connect() as holder:
        _lock_account(holder, ids["ann"])
        releasing = threading.Thread(target=release)
        releasing.start()
        assert waiting_for_a_lock(pg_engine)
        with pg_engine.connect() as probe:
            _lock_account(probe, ids["bob"], nowait=True)
            probe.rollback()
        holder.rollback()
    releasing.join(timeout=30)
    assert errors == []
    assert _recorded(sessions) == {"ann": 0, "bob": 0}
    assert ledger_clean(sessions)


@pytest.mark.postgres
def test_account_rows_leave_room_for_their_updates(pg_engine: Engine) -> None:
    """Agents' rows are updated by every fund and settlement: the table's pages keep room
    for the new versions, so that under load those updates stay on their page (migration
    0016; the HTTP benchmark's share of such updates went from 68 % to 98 %)."""
    with pg_engine.connect() as connection:
        options = connection.scalar(
            text("SELECT reloptions FROM pg_class WHERE relname = 'ledger_accounts'")
        )
    assert options == ["fillfactor=70"]
