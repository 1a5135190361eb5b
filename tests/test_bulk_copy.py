"""COPY appends (models.bulk on PostgreSQL) store every value exactly as given: text with
the characters COPY's text format escapes, non-ASCII, NULL, booleans and timestamps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from escrowd.models import AuditLog, WebhookEvent, bulk

pytestmark = pytest.mark.postgres

AWKWARD = [
    "plain",
    "tab\tnew\nline\rreturn",
    "back\\slash \\N \\\\t",
    '{"k":"\\u00fc \\"quoted\\""}',
    "ünïcødé \U0001f600",
    "\\",
    "",
]
MOMENTS = [
    datetime(2026, 11, 24, 12, tzinfo=UTC),
    datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=-5))),
]


def test_copy_appends_store_each_value_as_given(pg_engine: Engine) -> None:
    audit = AuditLog.metadata.tables[AuditLog.__tablename__]
    events = WebhookEvent.metadata.tables[WebhookEvent.__tablename__]
    audit_rows = [
        {
            "stream": f"s-{n}",
            "seq": 1,
            "actor": text[:100],
            "action": "copy_test",
            "asset": None if n % 2 else "USDC",
            "amount": None if n % 3 else 2**62 + n,
            "details": text * 3,
            "created_at": MOMENTS[n % 2],
            "prev_hash": "0" * 64,
            "row_hash": f"{n:064x}",
        }
        for n, text in enumerate(AWKWARD)
    ]
    event_rows = [
        {
            "type": "deposit.pending",
            "api_version": "2026-11-01",
            "payload": text,
            "fanned_out": n % 2 == 0,
            "created_at": MOMENTS[n % 2],
        }
        for n, text in enumerate(AWKWARD)
    ]
    with Session(pg_engine) as session, session.begin():
        bulk.insert_rows(session, audit, audit_rows)
        bulk.insert_rows(session, events, event_rows)
    with Session(pg_engine) as session:
        stored_audit = session.execute(
            select(*(audit.c[name] for name in audit_rows[0])).order_by(audit.c.id)
        ).all()
        stored_events = session.execute(
            select(*(events.c[name] for name in event_rows[0])).order_by(events.c.id)
        ).all()
    assert [tuple(row) for row in stored_audit] == [tuple(r.values()) for r in audit_rows]
    assert [tuple(row) for row in stored_events] == [tuple(r.values()) for r in event_rows]
