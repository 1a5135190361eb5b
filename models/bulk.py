"""Set-based inserts for batches of thousands of rows (an indexer window's deposits, their
audit rows and events), in the caller's transaction.

PostgreSQL gets one ``INSERT ... SELECT FROM unnest(arrays)`` per chunk: the statement
text stays the same whatever the batch size, where a multi-row VALUES list is a new, huge
statement the driver has to parse each time (that parse cost more than the database's
work). An array of integers, or of strings with no quote or backslash, goes as one array
literal joined at C speed: the driver's binary array dumper loops in Python over every
element (~0.3 s of a 25,000-deposit backfill); other arrays go in binary. Plain appends
(no conflicts to skip, nothing returned) go through COPY instead, whose rows are formatted
a column at a time. SQLite, local and in-process, gets an executemany of the same rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg import sql
from sqlalchemy import Table, TypeDecorator, bindparam, update
from sqlalchemy.dialects import sqlite
from sqlalchemy.orm import Session
from sqlalchemy.types import TypeEngine

from escrowd.models.db import defer_write, driver_cursor

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
    # The text is formatted here a column at a time and written in blocks of lines: 1.2 us
    # a row of audit_log against 2.0 us for the driver's write_row (a confirmation pass
    # writes five rows per deposit).
    blocks = []
    for start in range(0, len(rows), _COPY_BLOCK_ROWS):
        block = rows[start : start + _COPY_BLOCK_ROWS]
        columns = [_copy_text(table.c[name].type, [row[name] for row in block]) for name in names]
        blocks.append("\n".join(map("\t".join, zip(*columns, strict=True))) + "\n")

    def send(connection: psycopg.Connection[Any]) -> None:
        with connection.cursor() as cursor, cursor.copy(statement) as copy:
            for text in blocks:
                copy.write(text)

    # The session's own connection, so the rows belong to the caller's transaction; sent
    # by the writer thread inside a `deferred_writes` block.
    defer_write(session, send)


_COPY_BLOCK_ROWS = 2_000
# COPY's text format escapes backslash, newline, carriage return and tab; NULL is \N.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"})
_COPY_SPECIALS = ("\\", "\n", "\r", "\t")


def _copy_text(column_type: TypeEngine[Any], values: list[Any]) -> list[str]:
    """One column's values in COPY's text form, chosen by the column's type."""
    if isinstance(column_type, TypeDecorator):
        column_type = column_type.impl_instance
    python_type = column_type.python_type
    if python_type is bool:
        return ["\\N" if v is None else ("t" if v else "f") for v in values]
    if python_type in (int, Decimal):
        return ["\\N" if v is None else str(v) for v in values]
    # Fast paths at C speed for whole columns: text with nothing to escape (hashes, names,
    # canonical JSON), one timestamp shared by every row.
    if python_type is str:
        if None not in values:
            joined = "".join(values)
            if not any(special in joined for special in _COPY_SPECIALS):
                return list(values)
        # isprintable() is False for newline, carriage return and tab; backslash is checked.
        return [
            "\\N"
            if v is None
            else (v if v.isprintable() and "\\" not in v else v.translate(_COPY_ESCAPES))
            for v in values
        ]
    if python_type is datetime:
        first = values[0] if values else None
        if first is not None and len(set(map(id, values))) == 1:
            assert first.tzinfo is not None, "timestamps are stored with their offset"
            return [first.isoformat()] * len(values)
        texts: dict[int, str] = {}
        out = []
        for v in values:
            if v is None:
                out.append("\\N")
                continue
            # Rows of one batch share their timestamp object: format it once.
            text = texts.get(id(v))
            if text is None:
                assert v.tzinfo is not None, "timestamps are stored with their offset"
                text = texts[id(v)] = v.isoformat()
            out.append(text)
        return out
    raise TypeError(f"no COPY text form for a {column_type} column")


def array_arg(values: Sequence[Any]) -> Any:
    """A list as one %s array parameter (the SQL casts it): a text array literal for
    integers or plain strings without NULLs, else the list. psycopg dumps a list's
    elements one by one in Python; the literal is one string built at C speed (a backfill
    window sends thousands of keys)."""
    if None not in values:
        kinds = set(map(type, values))
        if kinds == {int}:
            return "{" + ",".join(map(str, values)) + "}"
        if kinds == {str}:
            joined = '","'.join(values)
            # No quote in the values (the separators hold all of them), no backslash.
            if joined.count('"') == 2 * (len(values) - 1) and "\\" not in joined:
                return '{"' + joined + '"}'
    return list(values)


def _array_param(column_type: TypeEngine[Any], values: list[Any]) -> tuple[str, Any]:
    """(placeholder, parameter) for one column's values as an unnest array: `array_arg`
    for the column types it writes as literals, else the list in binary."""
    if isinstance(column_type, TypeDecorator):
        column_type = column_type.impl_instance
    if column_type.python_type in (int, Decimal, str):
        return "%s", array_arg(values)
    return "%b", values


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
    array_params: list[Any] = []
    for name, values, is_same in zip(names, columns, same, strict=True):
        sql_type = sql.SQL(table.c[name].type.compile(dialect=dialect))  # our own models
        if is_same:
            selected.append(sql.SQL("%b::{}").format(sql_type))
            scalar_params.append(values[0])
        else:
            selected.append(sql.SQL("u.{}").format(sql.Identifier(name)))
            placeholder, param = _array_param(table.c[name].type, values)
            arrays.append(sql.SQL(placeholder + "::{}[]").format(sql_type))
            aliases.append(sql.Identifier(name))
            array_params.append(param)
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
    statements = []
    for start in range(0, len(rows), MAX_ROWS_PER_STATEMENT):
        chunk = rows[start : start + MAX_ROWS_PER_STATEMENT]
        arrays, params = [], []
        for name in columns:
            placeholder, param = _array_param(table.c[name].type, [row[name] for row in chunk])
            sql_type = sql.SQL(table.c[name].type.compile(dialect=dialect))  # our own models
            arrays.append(sql.SQL(placeholder + "::{}[]").format(sql_type))
            params.append(param)
        query = sql.SQL(
            "UPDATE {table} AS t SET {assignments} FROM unnest({arrays}) AS u({aliases}) "
            "WHERE t.{key} = u.{key}"
        ).format(
            table=sql.Identifier(table.name),
            assignments=sql.SQL(", ").join(
                sql.SQL("{} = u.{}").format(sql.Identifier(name), sql.Identifier(name))
                for name in names
            ),
            arrays=sql.SQL(", ").join(arrays),
            aliases=sql.SQL(", ").join(map(sql.Identifier, columns)),
            key=sql.Identifier(key),
        )
        statements.append((query, params))

    def send(connection: psycopg.Connection[Any]) -> None:
        with connection.cursor() as cursor:
            for query, params in statements:
                cursor.execute(query, params)

    defer_write(session, send)
