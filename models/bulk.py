"""Set-based inserts for batches of thousands of rows (an indexer window's deposits, their
audit rows and events), in the caller's transaction.

PostgreSQL gets one ``INSERT ... SELECT FROM unnest(arrays)`` per chunk, with the arrays
sent in binary: the statement text stays the same whatever the batch size, where a
multi-row VALUES list is a new, huge statement the driver has to parse each time (that
parse cost more than the database's work). Plain appends (no conflicts to skip, nothing
returned) go through COPY instead, whose rows the driver formats in C: about a third of
the client CPU of building the arrays. SQLite, local and in-process, gets an executemany
of the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from psycopg import sql
from sqlalchemy import Table, bindparam, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session

from escrowd.models.db import driver_cursor

# Bound on the rows one statement carries (a few MB of parameters at most).
MAX_ROWS_PER_STATEMENT = 10_000


def insert_rows(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    *,
    skip_conflicts_on: Sequence[str] = (),
    returning: Sequence[str] = (),
) -> list[tuple[Any, ...]]:
    """Insert ``rows`` (dicts with the same keys, values as the driver takes them: plain
    str for enums, aware datetimes); returns the ``returning`` columns of the inserted rows.

    With ``skip_conflicts_on`` (the columns of a unique constraint) a row whose key is
    already stored is skipped and not returned; callers match returned rows by key, since
    their order is not guaranteed."""
    if not rows:
        return []
    # Objects the session holds back go first: these rows may refer to them, and ids keep
    # the order in which the caller produced the rows.
    session.flush()
    names = list(rows[0])
    assert all(len(row) == len(names) for row in rows), "every row needs the same columns"
    on_postgresql = session.get_bind().dialect.name == "postgresql"
    if on_postgresql and not skip_conflicts_on and not returning:
        _copy_rows(session, table, names, rows)
        return []
    insert = _insert_unnest if on_postgresql else _insert_executemany
    out: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
        chunk = rows[start : start + MAX_ROWS_PER_STATEMENT]
        out.extend(insert(session, table, chunk, skip_conflicts_on, returning))
    return out


def _copy_rows(
    session: Session, table: Table, names: Sequence[str], rows: Sequence[Mapping[str, Any]]
) -> None:
    statement = sql.SQL("COPY {table} ({columns}) FROM STDIN").format(
        table=sql.Identifier(table.name), columns=sql.SQL(", ").join(map(sql.Identifier, names))
    )
    # The session's own connection, so the rows belong to the caller's transaction. Lines are
    # formatted here and written in blocks: the driver's write_row costs ~5 us a row in
    # Python, a third of crediting a deposit.
    with driver_cursor(session) as cursor, cursor.copy(statement) as copy:
        lines: list[str] = []
        text_of = _CopyText()
        for row in rows:
            lines.append("\t".join([text_of(row[name]) for name in names]))
            if len(lines) >= 2_000:
                copy.write("\n".join(lines) + "\n")
                lines.clear()
        if lines:
            copy.write("\n".join(lines) + "\n")


class _CopyText:
    """A value in COPY's text format: NULL is \\N; backslash, newline, carriage return and
    tab are backslash-escaped; booleans t/f; timestamps in ISO 8601 with their offset."""

    _ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})

    def __init__(self) -> None:
        # Rows of one batch share their timestamp object.
        self._last_datetime: datetime | None = None
        self._last_text = ""

    def __call__(self, value: Any) -> str:
        if value is None:
            return "\\N"
        if isinstance(value, str):
            if "\\" in value or "\n" in value or "\r" in value or "\t" in value:
                return value.translate(self._ESCAPES)
            return str(value)
        if isinstance(value, bool):
            return "t" if value else "f"
        if isinstance(value, int):
            return str(value)
        if isinstance(value, datetime):
            if value is not self._last_datetime:
                assert value.tzinfo is not None, "timestamps are stored with their offset"
                self._last_datetime, self._last_text = value, value.isoformat()
            return self._last_text
        raise TypeError(f"no COPY text form for {type(value).__name__}: {value!r}")


def _insert_unnest(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    skip_conflicts_on: Sequence[str],
    returning: Sequence[str],
) -> list[tuple[Any, ...]]:
    dialect = session.get_bind().dialect
    names = list(rows[0])
    columns = [[row[name] for row in rows] for name in names]
    # A column with one value for every row (the chain, a status, a timestamp) goes as
    # one parameter, not an array; the first stays an array so unnest yields every row.
    same = [i > 0 and values.count(values[0]) == len(values) for i, values in enumerate(columns)]
    selected, arrays, aliases = [], [], []
    scalar_params: list[Any] = []
    array_params: list[list[Any]] = []
    for name, values, is_same in zip(names, columns, same, strict=True):
        sql_type = sql.SQL(table.c[name].type.compile(dialect=dialect))  # our own models
        if is_same:
            selected.append(sql.SQL("%b::{}").format(sql_type))
            scalar_params.append(values[0])
        else:
            selected.append(sql.SQL("u.{}").format(sql.Identifier(name)))
            arrays.append(sql.SQL("%b::{}[]").format(sql_type))
            aliases.append(sql.Identifier(name))
            array_params.append(values)
    query = sql.SQL(
        "INSERT INTO {table} ({columns}) SELECT {selected} FROM unnest({arrays}) AS u({aliases})"
    ).format(
        table=sql.Identifier(table.name),
        columns=sql.SQL(", ").join(map(sql.Identifier, names)),
        selected=sql.SQL(", ").join(selected),
        arrays=sql.SQL(", ").join(arrays),
        aliases=sql.SQL(", ").join(aliases),
    )
    if skip_conflicts_on:
        query += sql.SQL(" ON CONFLICT ({}) DO NOTHING").format(
            sql.SQL(", ").join(map(sql.Identifier, skip_conflicts_on))
        )
    if returning:
        query += sql.SQL(" RETURNING {}").format(sql.SQL(", ").join(map(sql.Identifier, returning)))
    # The session's own connection, so the rows belong to the caller's transaction.
    with driver_cursor(session) as cursor:
        # The select list's scalars come before unnest's arrays in the statement text.
        cursor.execute(query, [*scalar_params, *array_params])
        return [tuple(r) for r in cursor.fetchall()] if returning else []


def _insert_executemany(
    session: Session,
    table: Table,
    rows: Sequence[Mapping[str, Any]],
    skip_conflicts_on: Sequence[str],
    returning: Sequence[str],
) -> list[tuple[Any, ...]]:
    statement = sqlite.insert(table)
    if skip_conflicts_on:
        statement = statement.on_conflict_do_nothing(index_elements=list(skip_conflicts_on))
    if not returning:
        session.connection().execute(statement, list(rows))
        return []
    result = session.connection().execute(
        statement.returning(*(table.c[name] for name in returning)), list(rows)
    )
    return [tuple(r) for r in result]


def update_rows(
    session: Session, table: Table, rows: Sequence[Mapping[str, Any]], *, key: str = "id"
) -> None:
    """Set columns of many rows, each found by its ``key`` column (every row gives the same
    columns), in the caller's transaction: PostgreSQL gets one ``UPDATE ... FROM unnest``
    per chunk, SQLite an executemany."""
    if not rows:
        return
    session.flush()
    names = [name for name in rows[0] if name != key]
    assert all(len(row) == len(names) + 1 for row in rows), "every row needs the same columns"
    if session.get_bind().dialect.name != "postgresql":
        statement = (
            update(table)
            .where(table.c[key] == bindparam(f"b_{key}"))
            .values({name: bindparam(f"b_{name}") for name in names})
        )
        session.connection().execute(
            statement, [{f"b_{name}": value for name, value in row.items()} for row in rows]
        )
        return
    dialect = session.get_bind().dialect
    columns = [key, *names]
    query = sql.SQL(
        "UPDATE {table} AS t SET {assignments} FROM unnest({arrays}) AS u({aliases}) "
        "WHERE t.{key} = u.{key}"
    ).format(
        table=sql.Identifier(table.name),
        assignments=sql.SQL(", ").join(
            sql.SQL("{} = u.{}").format(sql.Identifier(name), sql.Identifier(name))
            for name in names
        ),
        arrays=sql.SQL(", ").join(
            sql.SQL("%b::{}[]").format(sql.SQL(table.c[name].type.compile(dialect=dialect)))
            for name in columns
        ),
        aliases=sql.SQL(", ").join(map(sql.Identifier, columns)),
        key=sql.Identifier(key),
    )
    with driver_cursor(session) as cursor:
        for start in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
            chunk = rows[start : start + MAX_ROWS_PER_STATEMENT]
            cursor.execute(query, [[row[name] for row in chunk] for name in columns])
