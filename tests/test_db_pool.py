"""Pooled PostgreSQL connections the server dropped: pinged when idle, replaced otherwise."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Engine, text
from sqlalchemy.exc import DBAPIError, OperationalError

from escrowd.models import db as models_db
from escrowd.models.db import make_engine
from tests.conftest import _admin


def _backend_pid(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.scalar(text("SELECT pg_backend_pid()")) or 0)


def _terminate(pid: int) -> None:
    _admin(f"SELECT pg_terminate_backend({pid})")


def test_idle_connection_dropped_by_the_server_is_replaced_unseen(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = make_engine(pg_url, pool_size=1)
    try:
        dropped = _backend_pid(engine)
        _terminate(dropped)
        # Every pooled connection counts as idle: the checkout pings and reconnects.
        monkeypatch.setattr(models_db, "PING_AFTER_IDLE_S", 0.0)
        with engine.connect() as conn:
            assert conn.scalar(text("SELECT 1")) == 1
            assert conn.scalar(text("SELECT pg_backend_pid()")) != dropped
    finally:
        engine.dispose()


def test_recently_used_connection_fails_once_then_the_pool_recovers(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(models_db, "PING_AFTER_IDLE_S", 3600.0)
    engine = make_engine(pg_url, pool_size=1)
    try:
        dropped = _backend_pid(engine)
        _terminate(dropped)
        # Handed back recently, so not pinged: one failure, then a fresh connection.
        with pytest.raises(OperationalError), engine.connect() as conn:
            conn.scalar(text("SELECT 1"))
        assert _backend_pid(engine) != dropped
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_statements_in_one_round_trip_each_in_its_own_transaction_and_failures_raise(
    pg_engine: Engine,
) -> None:
    first, second = models_db.statements_rows(
        pg_engine, [("SELECT %s::int + 1", (1,)), ("SELECT %s::text || 'b'", ("a",))]
    )
    assert (first, second) == ([(2,)], [("ab",)])
    # A lock the first takes is not held through the second.
    one, two = models_db.statements_rows(pg_engine, [("SELECT txid_current() + %s::int", (0,))] * 2)
    assert one != two
    with pytest.raises(DBAPIError, match="division by zero"):
        models_db.statements_rows(
            pg_engine, [("SELECT 1 / %s::int", (0,)), ("SELECT %s::int", (5,))]
        )
    # The next call (on the same idle list) works, with statements prepared before.
    assert models_db.statements_rows(pg_engine, [("SELECT %s::int + 1", (41,))]) == [[(42,)]]
    assert models_db.statement_rows(pg_engine, "SELECT %s::int + 1", (1,)) == [(2,)]


@pytest.mark.postgres
def test_awaited_statements_share_a_transaction_only_when_asked_and_leave_the_loop_clean(
    pg_engine: Engine,
) -> None:
    """On the event loop: a sync point after each statement, or one for a read followed by
    a write; answers larger than a socket buffer (several waits) arrive whole, a failure
    raises, and the connection's socket is no longer watched by the loop afterwards."""
    xid = ("SELECT txid_current() + %s::int", (0,))

    async def exchanges() -> None:
        loop = asyncio.get_running_loop()
        one, two = await models_db.statements_rows_async(pg_engine, [xid, xid])
        assert one != two
        one, two = await models_db.statements_rows_async(pg_engine, [xid, xid], reads_first=True)
        assert one == two
        [big] = await models_db.statements_rows_async(
            pg_engine, [("SELECT repeat('x', %s::int)", (8_000_000,))]
        )
        assert big == [("x" * 8_000_000,)]
        with pytest.raises(DBAPIError, match="division by zero"):
            await models_db.statements_rows_async(
                pg_engine,
                [("SELECT %s::int", (1,)), ("SELECT 1 / %s::int", (0,))],
                reads_first=True,
            )
        # Nothing of this module is left registered on the loop's selector.
        selector = getattr(loop, "_selector")
        assert selector is not None and len(selector.get_map()) == 1  # the loop's self-pipe
        assert await models_db.statements_rows_async(pg_engine, [("SELECT %s::int", (7,))]) == [
            [(7,)]
        ]

    asyncio.run(exchanges())


@pytest.mark.postgres
def test_connections_never_jit_compile_and_keep_the_urls_own_options(pg_url: str) -> None:
    """A statement costed high on a table not analyzed yet would be JIT-compiled first
    (an 80 ms wait for a 2 ms read); escrowd's connections turn JIT off, keeping options
    the URL sets."""
    for url, search_path in (
        (pg_url, '"$user", public'),
        (f"{pg_url}?options=-c%20search_path%3Dpublic", "public"),
    ):
        engine = make_engine(url, pool_size=1)
        try:
            with engine.connect() as conn:
                assert conn.scalar(text("SHOW jit")) == "off"
                assert conn.scalar(text("SHOW search_path")) == search_path
        finally:
            engine.dispose()
