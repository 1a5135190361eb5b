"""Engine and session factories for SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
import weakref
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
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
# Keys per IN list when many rows are looked up by key (far below SQLite's bound-parameter
# limit, and short enough for PostgreSQL to plan quickly).
IN_LIST_BATCH = 500


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
    # escrowd's statements are short: JIT compilation (tens of milliseconds) never pays
    # for itself, and a cost estimate on a table not analyzed yet can trigger it (a
    # 2 ms audit read took 80 ms).
    given = make_url(url).query.get("options", ())
    no_jit = " ".join([*([given] if isinstance(given, str) else given), "-c jit=off"])
    engine = create_engine(
        url,
        echo=echo,
        pool_size=pool_size,
        max_overflow=pool_size,
        connect_args={"options": no_jit},
    )
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
    connection = session.connection()
    _wait_for_writes(connection.info)
    driver = connection.connection.driver_connection
    assert driver is not None, "the session's connection is open"
    try:
        with driver.cursor() as cursor:
            yield cursor
    except psycopg.Error as exc:
        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc


# The connection info key of the writes a `deferred_writes` block has queued.
_DEFERRED = "escrowd_deferred_writes"


class _DeferredWrites:
    """Statements without results, run in the order given by one thread of their own."""

    def __init__(self, driver: psycopg.Connection[Any]) -> None:
        self._driver = driver
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-writes")
        self._pending: list[Future[None]] = []

    def submit(self, write: Callable[[psycopg.Connection[Any]], None]) -> None:
        self._pending.append(self._thread.submit(write, self._driver))

    def wait(self) -> None:
        """Wait for every queued write; then raise the first failure, if any."""
        pending, self._pending = self._pending, []
        error: BaseException | None = None
        for future in pending:
            try:
                future.result()
            except BaseException as exc:  # every write is waited for before raising
                error = error or exc
        if isinstance(error, psycopg.Error):
            raise DBAPIError.instance(None, None, error, psycopg.Error) from error
        if error is not None:
            raise error

    def close(self) -> None:
        self._thread.shutdown(wait=True)


def _wait_for_writes(info: dict[Any, Any]) -> None:
    writes = info.get(_DEFERRED)
    if writes is not None:
        writes.wait()


@event.listens_for(Engine, "before_cursor_execute")
def _writes_before_statement(connection: Any, *_args: Any) -> None:
    # Any statement through SQLAlchemy runs after the writes queued before it.
    _wait_for_writes(connection.info)


@event.listens_for(Engine, "commit")
def _writes_before_commit(connection: Any) -> None:
    _wait_for_writes(connection.info)


@contextmanager
def deferred_writes(session: Session) -> Iterator[None]:
    """Within the block, `defer_write` queues statements whose results nobody reads (the
    COPY appends of a crediting pass) for a thread that sends them on the session's
    PostgreSQL connection, in order, while the caller builds the next rows: the server's
    work on one table's rows overlaps the client's on the next (libpq waits without
    the GIL). Every other statement on the connection (through SQLAlchemy or
    `driver_cursor`), a commit, and the end of the block wait for the queued writes
    first, so statements run in the order issued and a failed write fails the
    transaction as it would have failed synchronously. SQLite: nothing is deferred."""
    connection = session.connection()
    driver = connection.connection.driver_connection
    if not isinstance(driver, psycopg.Connection) or _DEFERRED in connection.info:
        yield
        return
    writes = _DeferredWrites(driver)
    connection.info[_DEFERRED] = writes
    try:
        yield
        writes.wait()
    except BaseException:
        # The block's error is the one to report; the queued writes still finish first,
        # so nothing of this transaction runs after the caller rolls it back.
        with suppress(Exception):
            writes.wait()
        raise
    finally:
        del connection.info[_DEFERRED]
        writes.close()


def defer_write(session: Session, write: Callable[[psycopg.Connection[Any]], None]) -> None:
    """Queue `write` (given the psycopg connection) in the session's `deferred_writes`
    block, or run it now outside one."""
    connection = session.connection()
    writes = connection.info.get(_DEFERRED)
    if writes is not None:
        writes.submit(write)
        return
    driver = connection.connection.driver_connection
    assert isinstance(driver, psycopg.Connection), "deferred writes are for PostgreSQL"
    try:
        write(driver)
    except psycopg.Error as exc:
        raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc


def statement_rows(engine: Engine, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """Run one statement (psycopg placeholders, prepared) as a transaction of its own on
    PostgreSQL, and return all its rows.

    In autocommit the server commits the statement when it completes, or rolls all of it
    back when it fails: one round trip where BEGIN, the statement and COMMIT take three.
    For operations that are one database function call from start to end."""
    return _connections_of(engine).rows(sql, params)


def statements_rows(
    engine: Engine, statements: list[tuple[str, tuple[Any, ...]]], *, reads: bool = False
) -> list[list[tuple[Any, ...]]]:
    """`statement_rows` for several statements in one round trip (libpq pipeline mode):
    each statement's rows, the first failure raised. Each runs in its own implicit
    transaction (a sync point after each), so a row lock one takes (the API key's
    rate-limit count) is released before the next runs instead of being held through it:
    requests of one key would otherwise queue behind each other's reads. `reads`: the
    statements only read, and run in one implicit transaction (one sync point)."""
    return _connections_of(engine).rows_many(statements, sync_each=not reads)


async def statements_rows_async(
    engine: Engine, statements: list[tuple[str, tuple[Any, ...]]], *, reads_first: bool = False
) -> list[list[tuple[Any, ...]]]:
    """`statements_rows` on the running event loop: it waits for the answers there, so the
    loop serves other requests meanwhile (the API's writes, whose commits wait for the
    disk). `reads_first`: every statement but the last only reads (takes no lock), and all
    run in one implicit transaction: one sync point, so the server answers them in one
    message and the loop wakes once for them."""
    return await _connections_of(engine).rows_many_async(statements, sync_each=not reads_first)


def _connections_of(engine: Engine) -> _StatementConnections:
    connections = _statement_connections.get(engine)
    if connections is None:
        with _registry_lock:
            connections = _statement_connections.setdefault(engine, _StatementConnections(engine))
    return connections


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


# A step of a pipeline: a prepared statement's name and parameter values, or a command.
_Step = tuple[bytes, Any] | bytes
# What an exchange waits for when it yields: True to write, False to read.
_Exchange = Generator[bool, None, list[PGresult]]


def _send(pgconn: psycopg.pq.abc.PGconn, steps: list[_Step], *, sync_each: bool) -> None:
    """The steps into libpq's pipeline, with a sync point after each or after the last."""
    pgconn.enter_pipeline_mode()
    for step in steps:
        if isinstance(step, bytes):
            pgconn.send_query_params(step, None)
        else:
            pgconn.send_query_prepared(*step)
        if sync_each:
            pgconn.pipeline_sync()
    if not sync_each:
        pgconn.pipeline_sync()


def _result(pgconn: psycopg.pq.abc.PGconn) -> Generator[bool, None, PGresult | None]:
    while pgconn.is_busy():
        yield False
        pgconn.consume_input()
    return pgconn.get_result()


def _exchange(pgconn: psycopg.pq.abc.PGconn, count: int, *, sync_each: bool) -> _Exchange:
    """The results of `count` sent steps, in order, the pipeline left. It yields instead of
    blocking in libpq, for its driver to wait for the socket: a blocking PQgetResult holds
    the interpreter lock, so a statement that waits for a lock another thread of this
    process holds (a racing idempotency claim) would stop every thread, the holder's too;
    the async driver lets the event loop go on meanwhile."""
    # psycopg's connections are non-blocking: what libpq could not send yet goes first.
    while pgconn.flush():
        yield True
    results = []
    for n in range(count):
        result = yield from _result(pgconn)
        if result is None:
            raise psycopg.OperationalError("the pipeline ended before all its results")
        results.append(result)
        # The end of this step's results.
        yield from _result(pgconn)
        if sync_each or n == count - 1:
            sync = yield from _result(pgconn)
            if sync is None or sync.status != ExecStatus.PIPELINE_SYNC:
                raise psycopg.OperationalError("the pipeline ended without its sync point")
    pgconn.exit_pipeline_mode()
    return results


def _waited(pgconn: psycopg.pq.abc.PGconn, exchange: _Exchange) -> list[PGresult]:
    """Drive an exchange on this thread, waiting with the interpreter lock released."""
    try:
        while True:
            write = exchange.send(None)
            wait = select.poll()
            wait.register(pgconn.socket, select.POLLOUT if write else select.POLLIN)
            wait.poll()
    except StopIteration as done:
        results: list[PGresult] = done.value
        return results


async def _awaited(pgconn: psycopg.pq.abc.PGconn, exchange: _Exchange) -> list[PGresult]:
    """Drive an exchange on the running event loop. The socket stays registered with the
    loop for the whole exchange (for reading, or writing while libpq has more to send):
    under uvloop each registration and removal is up to seven system calls (a probe, a
    non-blocking flag, epoll_ctl), which a wait per result paid again."""
    loop = asyncio.get_running_loop()
    fd = pgconn.socket
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    watching: bool | None = None  # what the loop watches the socket for: True writing
    try:
        while True:
            write = exchange.send(None)
            if write is not watching:
                if watching is not None:
                    (loop.remove_writer if watching else loop.remove_reader)(fd)
                (loop.add_writer if write else loop.add_reader)(fd, wake)
                watching = write
            await ready
            ready = loop.create_future()
    except StopIteration as done:
        results: list[PGresult] = done.value
        return results
    finally:
        if watching is not None:
            (loop.remove_writer if watching else loop.remove_reader)(fd)


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

    @contextmanager
    def _pipelining(self) -> Iterator[_Held]:
        """A connection for one pipeline exchange; closed, not kept, when the exchange
        failed or was interrupted (it may have been left midway)."""
        held = self._take()
        try:
            yield held
        except BaseException as exc:
            self._discard(held)
            if isinstance(exc, psycopg.Error):
                raise DBAPIError.instance(None, None, exc, psycopg.Error) from exc
            raise
        self._give_back(held)

    def rows_many(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, sync_each: bool = True
    ) -> list[list[tuple[Any, ...]]]:
        with self._pipelining() as held:
            return self._run_many(held, statements, sync_each=sync_each)

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
    def _steps(cls, held: _Held, statements: list[tuple[str, tuple[Any, ...]]]) -> list[_Step]:
        return [(cls._prepared(held, sql), cls._values(held, params)) for sql, params in statements]

    @staticmethod
    def _loaded(held: _Held, results: list[PGresult]) -> list[list[tuple[Any, ...]]]:
        """Each result's rows; the first failure raised."""
        found = []
        for result in results:
            _checked(result, held.connection)
            held.transformer.set_pgresult(result)
            found.append(held.transformer.load_rows(0, result.ntuples, tuple))
        return found

    @classmethod
    def _run_many(
        cls, held: _Held, statements: list[tuple[str, tuple[Any, ...]]], *, sync_each: bool
    ) -> list[list[tuple[Any, ...]]]:
        pgconn = held.connection.pgconn
        _send(pgconn, cls._steps(held, statements), sync_each=sync_each)
        exchange = _exchange(pgconn, len(statements), sync_each=sync_each)
        return cls._loaded(held, _waited(pgconn, exchange))

    async def rows_many_async(
        self, statements: list[tuple[str, tuple[Any, ...]]], *, sync_each: bool
    ) -> list[list[tuple[Any, ...]]]:
        """`rows_many` on the running event loop."""
        with self._pipelining() as held:
            pgconn = held.connection.pgconn
            _send(pgconn, self._steps(held, statements), sync_each=sync_each)
            exchange = _exchange(pgconn, len(statements), sync_each=sync_each)
            return self._loaded(held, await _awaited(pgconn, exchange))

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

    def _discard(self, held: _Held) -> None:
        """Close a connection whose state is in doubt; when the server dropped it, the idle
        ones go too (most likely dropped with it: a restart, a proxy's idle timeout)."""
        if held.connection.broken:
            self._close_idle()
        held.connection.close()

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
