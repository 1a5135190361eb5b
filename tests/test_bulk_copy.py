"""COPY appends (models.bulk on PostgreSQL) store every value exactly as given: text with
the characters COPY's text format escapes, non-ASCII, NULL, booleans and timestamps; and
inside `deferred_writes`, sent by a thread, in order, failing the transaction as they
would have failed at once."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from escrowd.models import AuditHead, AuditLog, WebhookEvent, bulk
from escrowd.models.db import deferred_writes

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


def _audit_rows(count: int, details: list[str], at: datetime) -> list[dict[str, object]]:
    return [
        {
            "stream": "deferred",
            "seq": n + 1,
            "actor": "test",
            "action": "copy_test",
            "asset": "USDC",
            "amount": n,
            "details": details[n % len(details)],
            "created_at": at,
            "prev_hash": "0" * 64,
            "row_hash": f"{n:064x}",
        }
        for n in range(count)
    ]


def test_whole_column_fast_paths_store_each_value_as_given(pg_engine: Engine) -> None:
    """One timestamp shared by every row, text with nothing to escape but in one row, no
    NULL: the columns formatted in one go store what the row-by-row form stores."""
    audit = AuditLog.metadata.tables[AuditLog.__tablename__]
    rows = _audit_rows(5, ['{"a":1}', '{"b":"x"}', "last\tone\\"], MOMENTS[1])
    with Session(pg_engine) as session, session.begin():
        bulk.insert_rows(session, audit, rows)
    with Session(pg_engine) as session:
        stored = session.execute(
            select(*(audit.c[name] for name in rows[0])).order_by(audit.c.id)
        ).all()
    assert [tuple(row) for row in stored] == [tuple(r.values()) for r in rows]


def test_deferred_writes_run_in_order_before_the_next_statement(pg_engine: Engine) -> None:
    audit = AuditLog.metadata.tables[AuditLog.__tablename__]
    heads = AuditHead.metadata.tables[AuditHead.__tablename__]
    with Session(pg_engine) as session, session.begin(), deferred_writes(session):
        bulk.insert_rows(session, audit, _audit_rows(3, ["{}"], MOMENTS[0]))
        bulk.insert_rows(session, heads, [{"stream": "deferred", "seq": 3, "row_hash": "0" * 64}])
        bulk.update_rows(
            session, heads, [{"stream": "deferred", "seq": 3, "row_hash": "f" * 64}], key="stream"
        )
        # A read waits for the writes queued before it.
        assert session.scalar(select(func.count()).select_from(audit)) == 3
        bulk.insert_rows(session, audit, _audit_rows(4, ["{}"], MOMENTS[0])[3:])
    with Session(pg_engine) as session:
        assert session.scalar(select(func.count()).select_from(audit)) == 4
        assert session.scalar(select(heads.c.row_hash)) == "f" * 64


@pytest.mark.parametrize("then_read", [True, False])
def test_a_failed_deferred_write_fails_the_transaction(pg_engine: Engine, then_read: bool) -> None:
    """The write's error comes out of the next statement, or of the block's end, as the
    statement's own error would have; nothing of the transaction is stored."""
    audit = AuditLog.metadata.tables[AuditLog.__tablename__]
    session = Session(pg_engine)
    queued = False
    with pytest.raises(IntegrityError), session, session.begin(), deferred_writes(session):
        bulk.insert_rows(session, audit, _audit_rows(2, ["{}"], MOMENTS[0]))
        # The same (stream, seq) again: a unique violation, seen only by the writer.
        bulk.insert_rows(session, audit, _audit_rows(1, ["{}"], MOMENTS[0]))
        queued = True
        if then_read:
            session.scalar(select(func.count()).select_from(audit))
    assert queued
    with Session(pg_engine) as session:
        assert session.scalar(select(func.count()).select_from(audit)) == 0


@pytest.mark.parametrize("awkward", [False, True])
def test_unnest_inserts_and_updates_store_each_value_as_given(
    pg_engine: Engine, awkward: bool
) -> None:
    # Plain integers and strings go as array literals, the rest in binary: both forms, and
    # a column of each kind mixed with quotes, backslashes and NULLs.
    audit = AuditLog.metadata.tables[AuditLog.__tablename__]
    texts = AWKWARD if awkward else ["plain", "with space", "{brace},comma", "NULL", ""]
    rows = [
        {
            "stream": f"u-{awkward}-{n}",
            "seq": n + 1,
            "actor": text[:100],
            "action": "unnest_test",
            "asset": None if awkward and n % 2 else "USDC",
            "amount": 2**62 + n,
            "details": text,
            "created_at": MOMENTS[n % 2],
            "prev_hash": "0" * 64,
            "row_hash": f"{n:064x}",
        }
        for n, text in enumerate(texts)
    ]
    with Session(pg_engine) as session, session.begin():
        ids = bulk.insert_rows(
            session, audit, rows, skip_conflicts_on=("stream", "seq"), returning=("id",)
        )
        # Already stored: skipped, not returned.
        assert (
            bulk.insert_rows(
                session, audit, rows[:1], skip_conflicts_on=("stream", "seq"), returning=("id",)
            )
            == []
        )
    with Session(pg_engine) as session:
        stored = session.execute(
            select(*(audit.c[name] for name in rows[0]))
            .where(audit.c.id.in_([i for (i,) in ids]))
            .order_by(audit.c.id)
        ).all()
    assert [tuple(row) for row in stored] == [tuple(r.values()) for r in rows]
    # Updates found by a text key, with awkward keys and values.
    heads = AuditHead.metadata.tables[AuditHead.__tablename__]
    head_rows = [
        {"stream": f"h-{awkward}-{text}", "seq": 1, "row_hash": "0" * 64} for text in texts
    ]
    changes = [
        {"stream": row["stream"], "seq": 100 + n, "row_hash": text[:64]}
        for n, (row, text) in enumerate(zip(head_rows, reversed(texts), strict=True))
    ]
    with Session(pg_engine) as session, session.begin():
        bulk.insert_rows(session, heads, head_rows)
        bulk.update_rows(session, heads, changes, key="stream")
    with Session(pg_engine) as session:
        updated = session.execute(
            select(heads.c.stream, heads.c.seq, heads.c.row_hash)
            .where(heads.c.stream.in_([row["stream"] for row in head_rows]))
            .order_by(heads.c.seq)
        ).all()
    assert [tuple(row) for row in updated] == [tuple(c.values()) for c in changes]


@pytest.mark.postgres
def test_array_arguments_reach_the_server_as_given(pg_engine: Engine) -> None:
    """Keys looked up by array (audit heads, accounts): as one literal when nothing needs
    escaping, else as a list; either way the server sees the values given."""
    texts = [
        ["deposit:base:1", "deposit:base:2", "a,b", "{x}", "sp ace", "é"],
        ['quo"te', "back\\slash", "plain"],
        ["deposit:base:1", None],
        [],
    ]
    numbers: list[list[int | None]] = [[1, 2, 3], [2**62, -5, 0], [7, None]]
    with pg_engine.connect() as conn:
        cursor = conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        for values in texts:
            row = cursor.execute("SELECT %s::text[]", [bulk.array_arg(values)]).fetchone()
            assert row is not None and row[0] == values
        for ints in numbers:
            row = cursor.execute("SELECT %s::bigint[]", [bulk.array_arg(ints)]).fetchone()
            assert row is not None and row[0] == ints
    assert bulk.array_arg(["a", "b"]) == '{"a","b"}' and bulk.array_arg([1, 2]) == "{1,2}"
