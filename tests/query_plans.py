"""The plans of the statements a piece of work really runs, on either database: for tests
that queries which must not grow with history are served by their indexes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker


@contextmanager
def statements(engine: Engine, table: str) -> Iterator[list[tuple[str, Any]]]:
    """The SELECTs on `table` run on `engine` inside the block, with their parameters."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, sql: str, params: Any, *_: Any) -> None:
        if sql.lstrip().upper().startswith("SELECT") and f"FROM {table}" in sql:
            seen.append((sql, params))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def plan(session: Session, sql: str, params: Any) -> str:
    connection = session.connection()
    driver = connection.connection.driver_connection
    assert driver is not None
    cursor = driver.cursor()
    if connection.dialect.name == "postgresql":
        # A handful of rows reads faster in a scan; the question is whether the index can
        # serve the query at all (a condition it cannot prove leaves only the scan).
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute(f"EXPLAIN {sql}", params)
    else:
        cursor.execute(f"EXPLAIN QUERY PLAN {sql}", params)
    return "\n".join(str(row) for row in cursor.fetchall())


def explained(
    engine: Engine, sessions: sessionmaker[Session], table: str, work: Callable[[Session], Any]
) -> list[str]:
    """The plans of the SELECTs on `table` that `work` runs (in a transaction of its own)."""
    with statements(engine, table) as seen, sessions() as s, s.begin():
        work(s)
    assert seen, f"the work ran no SELECT on {table}"
    with sessions() as s, s.begin():
        return [plan(s, sql, params) for sql, params in seen]
