"""Set-based recording of a window's deposits (models.bulk, indexer.store.record_deposits,
LedgerDepositSink.recorded_many) on SQLite and PostgreSQL: each key stored once, audit
rows and events for exactly the new ones, orphaned deposits revived."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import audit
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.store import FoundDeposit, WatchedAddresses, record_deposits
from escrowd.models import (
    Agent,
    AuditLog,
    Chain,
    Deposit,
    DepositAddress,
    DepositStatus,
    WebhookEvent,
    bulk,
    utcnow,
)
from escrowd.models.registry import ensure_asset

CHAIN = "testevm"


@pytest.fixture(autouse=True)
def small_statements(monkeypatch: pytest.MonkeyPatch) -> None:
    # Batches of a few rows span several statements, as a big window's do.
    monkeypatch.setattr(bulk, "MAX_ROWS_PER_STATEMENT", 3)


def _found(sessions: sessionmaker[Session], count: int) -> list[FoundDeposit]:
    """``count`` transfers into two watched addresses, three logs per transaction."""
    with sessions() as session, session.begin():
        asset_id = ensure_asset(
            session, chain=CHAIN, symbol="USDC", decimals=6, token_address=None
        ).id
        for i in range(2):
            agent = Agent(external_id=f"agent-{i}")
            session.add(agent)
            session.flush()
            session.add(
                DepositAddress(
                    agent_id=agent.id,
                    chain=Chain.EVM,
                    address=f"0x{i + 1:040x}",
                    derivation_index=i,
                )
            )
    watched = WatchedAddresses(Chain.EVM, normalize=True)
    with sessions() as session:
        watched.refresh(session)
    out = []
    for n in range(count):
        entry = watched.get(f"0x{n % 2 + 1:040x}")
        assert entry is not None
        out.append(
            FoundDeposit(
                tx_hash=f"0x{n // 3:064x}",
                log_index=n % 3,
                asset_id=asset_id,
                watched=entry,
                from_address="0x" + "ab" * 20,
                amount=1_000 + n,
                block_number=100 + n // 3,
                block_hash=f"0x{100 + n // 3:064x}",
            )
        )
    return out


def _record(sessions: sessionmaker[Session], found: list[FoundDeposit]) -> int:
    with sessions() as session, session.begin():
        return record_deposits(session, CHAIN, found, LedgerDepositSink())


def _seen(session: Session) -> list[dict[str, object]]:
    rows = session.scalars(
        select(AuditLog.details)
        .where(AuditLog.stream == f"deposits-seen:{CHAIN}")
        .order_by(AuditLog.seq)
    )
    return [json.loads(details) for details in rows]


def _pending_events(session: Session) -> list[dict[str, object]]:
    rows = session.scalars(
        select(WebhookEvent.payload)
        .where(WebhookEvent.type == "deposit.pending")
        .order_by(WebhookEvent.id)
    )
    return [json.loads(payload)["data"] for payload in rows]


def test_new_keys_are_stored_once_with_one_audit_row_and_event_each(
    sessions: sessionmaker[Session],
) -> None:
    found = _found(sessions, 10)
    # The same log twice in one window (a node repeating itself) is one deposit.
    assert _record(sessions, [*found[:7], found[3]]) == 7
    # A rescan overlapping stored keys stores only the new ones.
    assert _record(sessions, found) == 3
    assert _record(sessions, found) == 0

    with sessions() as session:
        stored = list(session.scalars(select(Deposit).order_by(Deposit.id)))
        assert [(d.tx_hash, d.log_index, d.amount) for d in stored] == [
            (f.tx_hash, f.log_index, f.amount) for f in found
        ]
        assert {d.status for d in stored} == {DepositStatus.PENDING}
        assert {d.agent_id for d in stored} == {f.watched.agent_id for f in found}
        ids = [d.id for d in stored]
        # In chain order, each naming the stored row it reports.
        assert [row["deposit_id"] for row in _seen(session)] == ids
        events = _pending_events(session)
        assert [e["deposit_id"] for e in events] == ids
        assert [e["amount_base_units"] for e in events] == [str(f.amount) for f in found]
        report = audit.verify(session)
        assert report.ok, report.first_problem


def test_orphaned_deposit_seen_again_is_revived_in_its_new_block(
    sessions: sessionmaker[Session],
) -> None:
    found = _found(sessions, 4)
    assert _record(sessions, found) == 4
    with sessions() as session, session.begin():
        victim = session.scalars(select(Deposit).where(Deposit.log_index == 1)).first()
        assert victim is not None
        victim.status = DepositStatus.ORPHANED
        victim_id = victim.id

    remined = [
        FoundDeposit(
            tx_hash=f.tx_hash,
            log_index=f.log_index,
            asset_id=f.asset_id,
            watched=f.watched,
            from_address=f.from_address,
            amount=f.amount,
            block_number=f.block_number + 1,
            block_hash="0x" + "ee" * 32,
        )
        for f in found
    ]
    assert _record(sessions, remined) == 1
    with sessions() as session:
        revived = session.get_one(Deposit, victim_id)
        assert revived.status == DepositStatus.PENDING
        assert revived.block_hash == "0x" + "ee" * 32
        others = session.scalars(select(Deposit).where(Deposit.id != victim_id)).all()
        assert len(others) == 3 and all(d.block_hash != "0x" + "ee" * 32 for d in others)
        assert [row["deposit_id"] for row in _seen(session)][-1] == victim_id
        assert audit.verify(session).ok


def test_insert_rows_keeps_identical_rows_and_their_order(
    sessions: sessionmaker[Session],
) -> None:
    now = utcnow()
    payloads = ['{"n":1}', '{"n":2}', '{"n":1}', '{"n":3}', '{"n":3}', '{"n":3}', '{"n":4}']
    table = WebhookEvent.metadata.tables[WebhookEvent.__tablename__]
    with sessions() as session, session.begin():
        # Every column but the payload is the same in each row; the second chunk of three
        # rows is all alike.
        inserted = bulk.insert_rows(
            session,
            table,
            [
                {
                    "type": "deposit.pending",
                    "api_version": "v",
                    "payload": p,
                    "fanned_out": False,
                    "created_at": now,
                }
                for p in payloads
            ],
            returning=("payload",),
        )
        assert sorted(inserted) == sorted((p,) for p in payloads)
    with sessions() as session:
        rows = session.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
        assert [r.payload for r in rows] == payloads
        assert {(r.type, r.api_version, r.fanned_out, r.created_at) for r in rows} == {
            ("deposit.pending", "v", False, now)
        }
