"""The escrow queries that must not grow with history read no escrows or the partial index
of due escrows (migration 0005), on both databases: the statements the service really runs
are captured and explained."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import service
from escrowd.models import Agent
from escrowd.models.db import make_session_factory, statement_rows
from tests.escrow_fixtures import seed_agents
from tests.query_plans import explained, statements


def test_balances_read_no_escrows_and_due_escrows_read_their_index(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=10_000)
    soon = datetime.now(UTC) + timedelta(hours=1)
    with sessions() as s, s.begin():
        buyer, worker = (
            s.get_one(Agent, ids["buyer"]),
            s.get_one(Agent, ids["worker"]),
        )
        for n in range(4):
            service.fund_escrow(
                s, job_id=f"j{n}", buyer=buyer, worker=worker, asset="USDC", amount=100, fee_bps=0
            )
        service.fund_escrow(
            s,
            job_id="due",
            buyer=buyer,
            worker=worker,
            asset="USDC",
            amount=100,
            fee_bps=0,
            expires_at=soon,
        )
        service.release_escrow(s, "j0")

    with statements(engine, "escrows") as seen, sessions() as s:
        balances = service.balances(s, s.get_one(Agent, ids["buyer"]))
    assert [(b.asset, b.escrowed_as_buyer) for b in balances] == [("USDC", 400)]
    assert seen == []

    def expire_now(s: Session) -> None:
        assert service.expire_due_escrows(s, datetime.now(UTC)) == []

    for plan in explained(engine, sessions, "escrows", expire_now):
        assert "ix_escrows_due" in plan, plan

    with sessions() as s, s.begin():
        assert service.expire_due_escrows(s, soon + timedelta(seconds=1)) == ["due"]
    with sessions() as s:
        balances = service.balances(s, s.get_one(Agent, ids["buyer"]))
    assert [(b.asset, b.escrowed_as_buyer, b.available) for b in balances] == [("USDC", 300, 9_600)]


@pytest.mark.postgres
def test_the_fast_fronts_balances_read_no_escrows(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    ids = seed_agents(sessions, "buyer", "worker", balance=10_000)
    with sessions() as s, s.begin():
        buyer, worker = s.get_one(Agent, ids["buyer"]), s.get_one(Agent, ids["worker"])
        for n in range(20):
            service.fund_escrow(
                s, job_id=f"j{n}", buyer=buyer, worker=worker, asset="USDC", amount=100, fee_bps=0
            )
    with pg_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        sql = service.PG_BALANCES.replace("%s", "'buyer'")
        plan = "\n".join(row[0] for row in connection.exec_driver_sql("EXPLAIN " + sql))
    assert " escrows" not in plan, plan
    rows = statement_rows(pg_engine, service.PG_BALANCES, ("buyer",))
    [(escrowed, available)] = [(held, amount) for kind, _, held, amount in rows[1:]]
    assert (escrowed, available) == (2_000, 8_000)
