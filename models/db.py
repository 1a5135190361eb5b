"""Engine and session factories for SQLite and PostgreSQL."""

from __future__ import annotations

import os
import select
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, cast

import psycopg
import psycopg.abc
from psycopg.adapt import PyFormat, Transformer
from psycopg.pq import ExecStatus, TransactionStatus
from psycopg.pq.abc import PGresult
from sqlalchemy import Engine, QueuePool, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, DisconnectionError
from sqlalchemy.orm import Session, sessionmaker

READ_ONLY_OPTION = "escrowd_read_only"
# A pooled connection idle for longer than this is pinged before use.
PING_AFTER_IDLE_S = 1.0


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def make_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> Engine:
    """An engine with the settings escrowd relies on for each backend."""
    if is_sqlite(url):
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url, echo=echo, connect_args={"check_same_thread": False, "timeout": 30}
        )
        _configure_sqlite(engine)
        return engine
    engine = create_engine(url, echo=echo, pool_size=pool_size, max_overflow=pool_size)
    _ping_idle_connections(engine)
    return engine


def _ping_idle_connections(engine: Engine) -> None:
    """pool_pre_ping, but only for connections that sat idle.

    A ping per checkout is a round trip per transaction, a quarter of a ledger posting's.
    A connection handed back within the last second is used as is: if the server went away
    in that second, the first statement fails, SQLAlchemy invalidates the whole pool and
    the next transaction connects afresh."""

    def _mark(_dbapi_connection: Any, record: Any, *_args: Any) -> None:
        record.info["escrowd_idle_since"] = time.monotonic()

    event.listen(engine, "connect", _mark)
    event.listen(engine, "checkin", _mark)

    driver_error = engine.dialect.loaded_dbapi.Error

    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        idle_since = record.info.get("escrowd_idle_since", 0.0)
        if time.monotonic() - idle_since < PING_AFTER_IDLE_S:
            return
        try:
            alive = engine.dialect.do_ping(dbapi_connection)
        except driver_error as exc:
            if not engine.dialect.is_disconnect(exc, dbapi_connection, None):
                raise
            alive = False
        if not alive:
            # The pool discards this connection and checks out (or opens) another.
            raise DisconnectionError("pooled connection was closed by the server")


def _configure_sqlite(engine: Engine) -> None:
    # pysqlite's own BEGIN handling defers the write lock until the first write, which turns
    # read-then-write transactions into SQLITE_BUSY failures under concurrency. Take the
    # write lock up front instead: SQLite is single-writer, so this only makes it explicit.
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        read_only = connection.get_execution_options().get(READ_ONLY_OPTION, False)
        connection.exec_driver_sql("BEGIN DEFERRED" if read_only else "BEGIN IMMEDIATE")


def make_session_factory(engine: Engine, *, read_only: bool = False) -> sessionmaker[Session]:
    """Sessions on `engine`. Read-only ones never take SQLite's write lock, so a long
    report (audit verify, ledger check, API reads) does not hold up writers."""
    bind = engine.execution_options(**{READ_ONLY_OPTION: True}) if read_only else engine
    return sessionmaker(bind, expire_on_commit=False)


@contextmanager
def driver_cursor(session: Session) -> Iterator[psycopg.Cursor[Any]]:
    """A psycopg cursor on the session's PostgreSQL connection, in its transaction.

    For hot paths where SQLAlchemy's statement machinery costs more client CPU than the
    statement (the one-round-trip database functions, bulk appends). Driver errors come
    out as SQLAlchemy's exception types, like those of every other statement, so callers
    and the retries of escrow.uow.in_transaction see one error model."""
    driver = session.connection().connection.driver_connection
    assert driver is not None, "the session's connection is open"
    try:
        with driver.cursor() as cursor:
            yield cursor
    except psycopg.Error as exc:
        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc


def statement_rows(engine: Engine, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Run one statement (psycopg placeholders, prepared) as a transaction of its own on
    PostgreSQL, and return all its rows.

    In autocommit the server commits the statement when it completes, or rolls all of it
    back when it fails: one round trip where BEGIN, the statement and COMMIT take three.
    For operations that are one database function call from start to end."""
    connections = _statement_connections.get(engine)
    if connections is None:
        with _registry_lock:
            connections = _statement_connections.setdefault(engine, _StatementConnections(engine))
    return connections.rows(sql, params)


def statements_rows(
    engine: Engine, statements: list[tuple[str, tuple[Any, ...]]]
) -> list[list[tuple[Any, ...]]]:
    """`statement_rows` for several statements in one round trip (libpq pipeline mode):
    each statement's rows, the first failure raised. Each runs in its own implicit
    transaction (a sync point after each), so a row lock one takes (the API key's
    rate-limit count) is released before the next runs instead of being held through it:
    requests of one key would otherwise queue behind each other's reads."""
    connections = _statement_connections.get(engine)
    if connections is None:
        with _registry_lock:
            connections = _statement_connections.setdefault(engine, _StatementConnections(engine))
    return connections.rows_many(statements)


class _Held(NamedTuple):
    connection: psycopg.Connection[Any]
    # Dumps parameters and loads rows with the connection's adapters, as its cursors do.
    transformer: psycopg.abc.Transformer
    # The statements prepared on this connection: SQL -> prepared statement name.
    prepared: dict[str, bytes]
    generation: int
    idle_since: float


def _numbered(sql: str) -> bytes:
    """psycopg's %s placeholders as the server's $1, $2, ..."""
    parts = sql.split("%s")
    if any("%" in part for part in parts):
        raise ValueError(f"statement_rows takes %s placeholders and no other '%': {sql!r}")
    numbered = [f"{part}${n}" for n, part in enumerate(parts[:-1], start=1)]
    return ("".join(numbered) + parts[-1]).encode()


def _next_result(pgconn: psycopg.pq.abc.PGconn) -> PGresult | None:
    """PQgetResult, waiting for the server's answer with the interpreter lock released:
    psycopg holds it through a blocking PQgetResult, so a statement that waits for a lock
    another thread of this process holds (a racing idempotency claim) would stop every
    thread, the holder's too."""
    wait = select.poll()
    wait.register(pgconn.socket, select.POLLIN)
    while pgconn.is_busy():
        wait.poll()
        pgconn.consume_input()
    return pgconn.get_result()


def _checked(result: PGresult, connection: psycopg.Connection[Any]) -> PGresult:
    """The result, or its error raised as psycopg's exception for its SQLSTATE."""
    if result.status not in (ExecStatus.TUPLES_OK, ExecStatus.COMMAND_OK):
        raise psycopg.errors.error_from_result(result, encoding=connection.info.encoding)
    return result


class _StatementConnections:
    """An engine's connections for statement_rows: taken out of its pool once, then kept in
    autocommit. A checkout from the pool, autocommit switched on and off, the reset on
    return and a new cursor per call took 13 of the 73 us of client CPU a call cost. The
    engine's pool never sees a connection in autocommit. Like the pool: idle connections
    are pinged before use, a connection the server dropped takes every idle one with it,
    and `Engine.dispose()` closes them.

    A call is one blocking libpq call (PQexecPrepared), which lets go of the interpreter
    lock once for the whole round trip; a cursor's execute polls the socket from Python
    and takes the lock back at each step. With 16 client threads over 2 processes an
    escrow operation cost 0.17-0.21 ms of client CPU through a cursor and 0.10-0.11 ms
    this way."""

    def __init__(self, engine: Engine) -> None:
        self._engine = weakref.ref(engine)
        # As many idle as the engine's pool can hand out (make_engine's overflow is its size).
        pool = engine.pool
        self._keep = 2 * pool.size() if isinstance(pool, QueuePool) else 2
        self._lock = threading.Lock()
        self._idle: list[_Held] = []
        self._generation = 0
        self._pid = os.getpid()
        event.listen(engine, "engine_disposed", self._close_idle)

    def rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        held = self._take()
        try:
            rows = self._run(held, sql, params)
        except psycopg.Error as exc:
            self._give_back(held)
            raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
        except BaseException:
            # Interrupted mid-statement: what the connection is doing is unknown.
            held.connection.close()
            raise
        self._give_back(held)
        return rows

    def rows_many(
        self, statements: list[tuple[str, tuple[Any, ...]]]
    ) -> list[list[tuple[Any, ...]]]:
        held = self._take()
        try:
            found = self._run_many(held, statements)
        except BaseException as exc:
            # The pipeline may have been left midway: the connection goes, not back.
            held.connection.close()
            if isinstance(exc, psycopg.Error):
                raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
            raise
        self._give_back(held)
        return found

    @staticmethod
    def _prepared(held: _Held, sql: str) -> bytes:
        name = held.prepared.get(sql)
        if name is None:
            name = f"escrowd_{len(held.prepared)}".encode()
            # No parameter types: the server takes them from the statement's casts.
            _checked(held.connection.pgconn.prepare(name, _numbered(sql)), held.connection)
            held.prepared[sql] = name
        return name

    @staticmethod
    def _values(held: _Held, params: tuple[Any, ...]) -> Any:
        # Text parameters, as psycopg sends them when the server is to pick the types.
        # None is NULL here as in exec_params, whose declared type says so; this one's omits it.
        return cast(Any, held.transformer.dump_sequence(params, [PyFormat.TEXT] * len(params)))

    @classmethod
    def _run(cls, held: _Held, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        name = cls._prepared(held, sql)
        pgconn = held.connection.pgconn
        result = _checked(pgconn.exec_prepared(name, cls._values(held, params)), held.connection)
        held.transformer.set_pgresult(result)
        return held.transformer.load_rows(0, result.ntuples, tuple)

    @classmethod
    def _run_many(
        cls, held: _Held, statements: list[tuple[str, tuple[Any, ...]]]
    ) -> list[list[tuple[Any, ...]]]:
        names = [cls._prepared(held, sql) for sql, _ in statements]
        connection, pgconn = held.connection, held.connection.pgconn
        pgconn.enter_pipeline_mode()
        for name, (_, params) in zip(names, statements, strict=True):
            pgconn.send_query_prepared(name, cls._values(held, params))
            pgconn.pipeline_sync()
        # The last sync point flushes them all; the results come back in order.
        results = []
        for _ in statements:
            result = _next_result(pgconn)
            assert result is not None, "one result per query"
            results.append(result)
            assert _next_result(pgconn) is None, "one result set per query"
            sync = _next_result(pgconn)
            assert sync is not None and sync.status == ExecStatus.PIPELINE_SYNC
        pgconn.exit_pipeline_mode()
        found = []
        for result in results:
            _checked(result, connection)
            held.transformer.set_pgresult(result)
            found.append(held.transformer.load_rows(0, result.ntuples, tuple))
        return found

    def _take(self) -> _Held:
        while True:
            with self._lock:
                if self._pid != os.getpid():
                    # A forked child: the idle connections' sockets are the parent's, and
                    # closing them would end the parent's sessions.
                    self._idle, self._pid = [], os.getpid()
                held = self._idle.pop() if self._idle else None
            if held is None:
                return self._connect()
            if time.monotonic() - held.idle_since < PING_AFTER_IDLE_S or self._alive(held):
                return held
            held.connection.close()

    def _connect(self) -> _Held:
        engine = self._engine()
        assert engine is not None, "statement_rows on an engine that is gone"
        pooled = engine.raw_connection()
        driver = pooled.driver_connection
        assert isinstance(driver, psycopg.Connection), "statement_rows is for PostgreSQL"
        pooled.detach()
        driver.autocommit = True
        return _Held(driver, Transformer(driver), {}, self._generation, time.monotonic())

    def _alive(self, held: _Held) -> bool:
        try:
            self._run(held, "SELECT 1", ())
        except psycopg.Error:
            return False
        return True

    def _give_back(self, held: _Held) -> None:
        connection = held.connection
        if connection.broken:
            # The server went away or restarted: the idle ones are most likely dead too.
            self._close_idle()
        usable = (
            not connection.closed and connection.info.transaction_status == TransactionStatus.IDLE
        )
        with self._lock:
            keep = (
                usable
                and held.generation == self._generation
                and self._pid == os.getpid()
                and len(self._idle) < self._keep
            )
            if keep:
                self._idle.append(held._replace(idle_since=time.monotonic()))
        if not keep:
            connection.close()

    def _close_idle(self, *_args: Any) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
            self._generation += 1
            forked, self._pid = self._pid != os.getpid(), os.getpid()
        if not forked:
            for held in idle:
                held.connection.close()


_statement_connections: weakref.WeakKeyDictionary[Engine, _StatementConnections] = (
    weakref.WeakKeyDictionary()
)
_registry_lock = threading.Lock()


def prepared_rows(session: Session, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Run `sql` (psycopg placeholders) through `driver_cursor` as a server-side prepared
    statement and return all rows."""
    with driver_cursor(session) as cursor:
        rows: list[tuple[Any, ...]] = cursor.execute(sql, params, prepare=True).fetchall()
    return rows


class PipelinedTransaction:
    """A transaction on a statement connection (see `statement_rows`) in libpq pipeline
    mode: BEGIN goes out with the first statements, and the last ones with COMMIT, one
    round trip each.

    For a request that is one database call plus a write that depends on its answer (the
    API's idempotent escrow calls). Sent through libpq directly, as statement_rows does:
    psycopg's own pipeline cost more client CPU than the two round trips' statements cost
    the server. Driver errors come out as psycopg's."""

    def __init__(self, held: _Held) -> None:
        self._held = held
        self._begun = False

    def rows(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, commit: bool = False
    ) -> list[list[tuple[Any, ...]]]:
        """Each statement's rows, in one round trip with BEGIN before them when the
        transaction has not begun and COMMIT after them when `commit`; the first failure
        raised (the transaction is then rolled back on close)."""
        held = self._held
        names = [_StatementConnections._prepared(held, sql) for sql, _ in statements]
        pgconn = held.connection.pgconn
        pgconn.enter_pipeline_mode()
        sent = 0
        if not self._begun:
            pgconn.send_query_params(b"BEGIN", None)
            self._begun, sent = True, sent + 1
        for name, (_, params) in zip(names, statements, strict=True):
            pgconn.send_query_prepared(name, _StatementConnections._values(held, params))
        sent += len(statements)
        if commit:
            pgconn.send_query_params(b"COMMIT", None)
            sent += 1
        pgconn.pipeline_sync()
        results = []
        for _ in range(sent):
            results.append(_next_result(pgconn))
            _next_result(pgconn)
        sync = _next_result(pgconn)
        pgconn.exit_pipeline_mode()
        if sync is None or sync.status != ExecStatus.PIPELINE_SYNC:
            raise psycopg.OperationalError("pipeline ended without its sync point")
        found = []
        for result in results:
            if result is None:
                raise psycopg.OperationalError("pipeline ended early")
            _checked(result, held.connection)
            held.transformer.set_pgresult(result)
            found.append(held.transformer.load_rows(0, result.ntuples, tuple))
        # BEGIN's and COMMIT's empty results are not the caller's.
        return found[sent - len(statements) - int(commit) : sent - int(commit)]

    def rollback(self) -> None:
        _checked(self._held.connection.pgconn.exec_(b"ROLLBACK"), self._held.connection)


@contextmanager
def pipelined_transaction(engine: Engine) -> Iterator[PipelinedTransaction]:
    """A PipelinedTransaction on one of `engine`'s statement connections; rolled back when
    it ends neither committed nor rolled back, and the connection closed, not kept, when a
    driver error leaves its state in doubt."""
    connections = _statement_connections.get(engine)
    if connections is None:
        with _registry_lock:
            connections = _statement_connections.setdefault(engine, _StatementConnections(engine))
    held = connections._take()
    try:
        yield PipelinedTransaction(held)
        if held.connection.info.transaction_status != TransactionStatus.IDLE:
            _checked(held.connection.pgconn.exec_(b"ROLLBACK"), held.connection)
    except BaseException:
        held.connection.close()
        raise
    connections._give_back(held)
