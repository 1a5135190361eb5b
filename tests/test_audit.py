"""Audit trail: tampering in SQL is caught, and PostgreSQL refuses edits outright."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from escrowd.escrow import audit
from escrowd.models import AuditLog
from escrowd.models.db import make_session_factory


def _trail(session: Session) -> list[AuditLog]:
    for n in range(3):
        for stream in ("escrow:job-a", "escrow:job-b"):
            audit.append(
                session,
                stream=stream,
                actor="test",
                action="ledger_escrow_fund",
                asset="USDC",
                amount=100 + n,
                details={"n": n},
            )
    # A checkpoint anchors what writers committed (on PostgreSQL it waits for them).
    session.commit()
    audit.write_checkpoint(session)
    audit.append(session, stream="escrow:job-a", actor="test", action="late", details={})
    session.commit()
    rows = list(session.scalars(select(AuditLog).order_by(AuditLog.id)))
    assert audit.verify(session).ok
    session.commit()
    return rows


def _tamper(engine: Engine, sql: str, params: dict[str, object]) -> None:
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            # An attacker with superuser rights can switch the trigger off; verify must still see.
            conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        conn.execute(text(sql), params)
        if conn.dialect.name == "postgresql":
            conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))


def _verify(engine: Engine) -> audit.AuditReport:
    with make_session_factory(engine)() as session:
        return audit.verify(session)


def test_edit_is_caught(engine: Engine, session: Session) -> None:
    rows = _trail(session)
    victim = rows[2]
    _tamper(engine, "UPDATE audit_log SET amount = 999999 WHERE id = :id", {"id": victim.id})
    report = _verify(engine)
    assert not report.ok
    assert f"id={victim.id}" in (report.first_problem or "")


def test_delete_in_the_middle_is_caught(engine: Engine, session: Session) -> None:
    rows = _trail(session)
    victim = rows[2]
    _tamper(engine, "DELETE FROM audit_log WHERE id = :id", {"id": victim.id})
    report = _verify(engine)
    assert not report.ok
    assert "missing" in " ".join(p for _, p in report.problems)


def test_delete_of_a_stream_tail_is_caught(engine: Engine, session: Session) -> None:
    rows = _trail(session)
    last_b = max((r for r in rows if r.stream == "escrow:job-b"), key=lambda r: r.seq)
    _tamper(engine, "DELETE FROM audit_log WHERE id = :id", {"id": last_b.id})
    # Even with the heads table "fixed" by the attacker, the checkpoint still disagrees.
    _tamper(
        engine,
        "UPDATE audit_heads SET seq = seq - 1, row_hash = :h WHERE stream = 'escrow:job-b'",
        {"h": last_b.prev_hash},
    )
    report = _verify(engine)
    assert not report.ok
    assert "checkpoint" in (report.first_problem or "")


def test_insert_is_caught(engine: Engine, session: Session) -> None:
    rows = _trail(session)
    model = rows[1]
    _tamper(
        engine,
        "INSERT INTO audit_log (stream, seq, actor, action, asset, amount, details, created_at,"
        " prev_hash, row_hash) VALUES (:stream, :seq, 'mallory', 'ledger_refund', 'USDC', 5,"
        " '{}', :created_at, :prev, :hash)",
        {
            "stream": model.stream,
            "seq": 99,
            "created_at": model.created_at,
            "prev": model.row_hash,
            "hash": model.row_hash,
        },
    )
    report = _verify(engine)
    assert not report.ok
    assert "seq 99" in (report.first_problem or "") or "seq 99" in str(report.problems)


def test_swapped_rows_are_caught(engine: Engine, session: Session) -> None:
    rows = _trail(session)
    a, b = rows[0], rows[2]
    assert a.stream == b.stream
    _tamper(engine, "UPDATE audit_log SET seq = -1 WHERE id = :id", {"id": a.id})
    _tamper(engine, "UPDATE audit_log SET seq = :s WHERE id = :id", {"s": a.seq, "id": b.id})
    _tamper(engine, "UPDATE audit_log SET seq = :s WHERE id = :id", {"s": b.seq, "id": a.id})
    report = _verify(engine)
    assert not report.ok
    assert report.first_problem is not None


@pytest.mark.postgres
def test_postgres_refuses_update_delete_truncate(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions() as session:
        _trail(session)
    for statement in (
        "UPDATE audit_log SET amount = 1",
        "DELETE FROM audit_log",
        "TRUNCATE audit_log",
    ):
        with pytest.raises(DBAPIError, match="append-only"), pg_engine.begin() as conn:
            conn.execute(text(statement))
    with sessions() as session:
        assert audit.verify(session).ok
        assert session.scalar(text("SELECT count(*) FROM audit_log")) == 8
