"""The webhook fan-out reads only the outbox's backlog (migration 0018): events already
fanned out are not in its path, however many there are, on both databases."""

from __future__ import annotations

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import service, webhooks
from escrowd.models import Agent, WebhookEvent
from tests.escrow_fixtures import seed_agents
from tests.query_plans import explained


def _fund(sessions: sessionmaker[Session], ids: dict[str, int], jobs: range) -> None:
    with sessions() as s, s.begin():
        buyer, worker = s.get_one(Agent, ids["buyer"]), s.get_one(Agent, ids["worker"])
        for n in jobs:
            service.fund_escrow(
                s, job_id=f"j{n}", buyer=buyer, worker=worker, asset="USDC", amount=10, fee_bps=0
            )


def test_fan_out_reads_the_backlog_through_its_partial_index(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    ids = seed_agents(sessions, "buyer", "worker", balance=10_000)
    _fund(sessions, ids, range(40))
    with sessions() as s, s.begin():
        assert webhooks.fan_out(s, 100) == 40
    _fund(sessions, ids, range(40, 43))
    with sessions() as s:
        waiting = list(s.scalars(select(WebhookEvent.id).where(WebhookEvent.fanned_out.is_(False))))
    assert len(waiting) == 3

    fanned: list[int] = []
    plans = explained(
        engine, sessions, "webhook_events", lambda s: fanned.append(webhooks.fan_out(s, 2))
    )
    assert fanned == [2]
    for plan in plans:
        assert "ix_webhook_events_to_fan_out" in plan, plan

    with sessions() as s, s.begin():
        assert webhooks.fan_out(s, 100) == 1
        assert webhooks.fan_out(s, 100) == 0
        flags = dict(s.execute(select(WebhookEvent.id, WebhookEvent.fanned_out)).all())
    assert all(flags[event_id] for event_id in waiting)
    assert len(flags) == 43
