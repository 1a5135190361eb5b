"""Tamper-evident audit trail: per-stream hash chains anchored by checkpoints.

Each row's hash covers its content and the previous row's hash in the same stream, so an
edited, deleted, inserted or reordered row breaks the chain. Streams are per business
object (an escrow, a deposit, a payout), so writers of unrelated objects never wait on one
chain head. A checkpoint row records a digest of every stream's head as of a moment when
no writer is in flight, which exposes a stream deleted whole or cut short.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy import insert as insert_rows
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from escrowd.escrow.errors import CheckpointBusy
from escrowd.models import AuditHead, AuditLog, bulk, utcnow
from escrowd.models.db import IN_LIST_BATCH, driver_cursor

GENESIS_HASH = "0" * 64
CHECKPOINT_STREAM = "checkpoint"
CHECKPOINT_LOCK_TIMEOUT_MS = 5_000
_LOCK_NOT_AVAILABLE = "55P03"
# What pg_export_snapshot returns: hexadecimal fields joined by dashes.
_SNAPSHOT_ID = re.compile(r"[0-9A-F]+(-[0-9A-F]+)+")
_VERIFY_BATCH_ROWS = 5_000


# json.dumps with these options builds this encoder on every call; one costs ~40% less.
_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def canonical_json(value: Mapping[str, Any]) -> str:
    return _CANONICAL.encode(value)


# A str in JSON form, escaped as canonical_json escapes it (the C function the encoder
# calls): hot paths that write the same keys for every row (a backfill's audit details
# and event payloads) format them from a template with it, ~4x faster than the encoder.
json_string = encode_basestring_ascii


def timestamp_text(value: datetime) -> str:
    """The form of `created_at` that row hashes cover."""
    return value.isoformat(timespec="microseconds")


def _netstring(value: str | int | None) -> str:
    if value is None:
        return "~"
    text_value = str(value)
    # Byte length of the UTF-8 form; most fields (and all canonical JSON) are ASCII.
    size = len(text_value) if text_value.isascii() else len(text_value.encode())
    return f"{size}:{text_value}"


def row_digest(
    *,
    stream: str,
    seq: int,
    actor: str,
    action: str,
    asset: str | None,
    amount: int | None,
    details: str,
    created_at: datetime,
    prev_hash: str,
) -> str:
    """sha256 over the fields as length-prefixed UTF-8 strings ("~" for NULL).

    Length prefixes keep the encoding unambiguous without any escaping, so the PostgreSQL
    posting function (escrowd_post in the migration) computes the same digest with
    octet_length, concatenation and sha256 alone; change both together."""
    return _digest(
        stream=stream,
        seq=seq,
        actor=actor,
        action=action,
        asset=asset,
        amount=amount,
        details=details,
        created_text=timestamp_text(created_at),
        prev_hash=prev_hash,
    )


def _digest(
    *,
    stream: str,
    seq: int,
    actor: str,
    action: str,
    asset: str | None,
    amount: int | None,
    details: str,
    created_text: str,
    prev_hash: str,
) -> str:
    """`row_digest` with the timestamp already in text: rows appended together share it."""
    # Written out, with character counts: this runs once per row of a backfill window,
    # tens of thousands of times. When the whole material is ASCII (canonical JSON always
    # is), every count is the field's byte length; otherwise each field is measured.
    seq_text = str(seq)
    asset_part = "~" if asset is None else f"{len(asset)}:{asset}"
    amount_text = "" if amount is None else str(amount)
    amount_part = "~" if amount is None else f"{len(amount_text)}:{amount_text}"
    material = (
        f"{len(stream)}:{stream}{len(seq_text)}:{seq_text}{len(actor)}:{actor}"
        f"{len(action)}:{action}{asset_part}{amount_part}{len(details)}:{details}"
        f"{len(created_text)}:{created_text}{len(prev_hash)}:{prev_hash}"
    )
    if not material.isascii():
        material = (
            f"{_netstring(stream)}{_netstring(seq)}{_netstring(actor)}{_netstring(action)}"
            f"{_netstring(asset)}{_netstring(amount)}{_netstring(details)}"
            f"{_netstring(created_text)}{_netstring(prev_hash)}"
        )
    return hashlib.sha256(material.encode()).hexdigest()


class Entry(NamedTuple):
    """One audit row to append: who did what, for how much, with which references. (A
    named tuple: a backfill window makes two per deposit, and a frozen dataclass took
    three times as long to build.)"""

    actor: str
    action: str
    # A str is the details already in canonical JSON (written from a template).
    details: Mapping[str, Any] | str
    asset: str | None = None
    amount: int | None = None


def _lock_head(session: Session, stream: str) -> tuple[int, str]:
    """Lock the stream's head row (creating it at genesis) and return (seq, hash).

    One statement: the upsert's DO UPDATE takes the row lock even when nothing changes,
    so concurrent appenders to the same stream queue here and nowhere else."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(AuditHead).values(stream=stream, seq=0, row_hash=GENESIS_HASH)
    # Core statements on the session's connection: the ORM's bulk machinery costs more
    # client CPU than the round trip itself on this hot path.
    row = (
        session.connection()
        .execute(
            statement.on_conflict_do_update(
                index_elements=["stream"], set_={"seq": AuditHead.seq}
            ).returning(AuditHead.seq, AuditHead.row_hash)
        )
        .one()
    )
    return int(row.seq), str(row.row_hash)


class _Now(NamedTuple):
    """The timestamp rows appended together share (as a batch's events do), with its text:
    formatting one per row was a tenth of a backfill window's audit work."""

    at: datetime
    text: str

    @classmethod
    def take(cls) -> _Now:
        at = utcnow()
        return cls(at, timestamp_text(at))


def _chained_rows(
    stream: str, seq: int, prev_hash: str, entries: Sequence[Entry], now: _Now
) -> list[dict[str, Any]]:
    """The rows following head (seq, prev_hash), each hash covering the one before."""
    created_at, created_text = now
    rows: list[dict[str, Any]] = []
    for entry in entries:
        seq += 1
        details = entry.details
        details_json = details if isinstance(details, str) else canonical_json(details)
        row_hash = _digest(
            stream=stream,
            seq=seq,
            actor=entry.actor,
            action=entry.action,
            asset=entry.asset,
            amount=entry.amount,
            details=details_json,
            created_text=created_text,
            prev_hash=prev_hash,
        )
        rows.append(
            {
                "stream": stream,
                "seq": seq,
                "actor": entry.actor,
                "action": entry.action,
                "asset": entry.asset,
                "amount": entry.amount,
                "details": details_json,
                "created_at": created_at,
                "prev_hash": prev_hash,
                "row_hash": row_hash,
            }
        )
        prev_hash = row_hash
    return rows


def _move_head(session: Session, stream: str, rows: list[dict[str, Any]]) -> None:
    # Through update_rows: a write without results, deferred like the rows' COPY.
    bulk.update_rows(
        session,
        AuditHead.metadata.tables[AuditHead.__tablename__],
        [{"stream": stream, "seq": rows[-1]["seq"], "row_hash": rows[-1]["row_hash"]}],
        key="stream",
    )


def append_many(session: Session, stream: str, entries: Sequence[Entry]) -> list[int]:
    """Append rows to `stream` in the caller's transaction; returns their ids in order."""
    assert stream, "audit stream must be named"
    assert entries, "nothing to append"
    rows = _chained_rows(stream, *_lock_head(session, stream), entries, _Now.take())
    audit_table = AuditLog.metadata.tables[AuditLog.__tablename__]
    ids = list(
        session.connection()
        .execute(
            insert_rows(audit_table).returning(audit_table.c.id, sort_by_parameter_order=True),
            rows,
        )
        .scalars()
    )
    _move_head(session, stream, rows)
    return ids


def append_bulk(session: Session, stream: str, entries: Sequence[Entry]) -> None:
    """`append_many` for large batches whose row ids nobody needs (an indexer window's
    sightings): the same rows and hashes, written with `models.bulk.insert_rows`."""
    assert stream, "audit stream must be named"
    assert entries, "nothing to append"
    rows = _chained_rows(stream, *_lock_head(session, stream), entries, _Now.take())
    bulk.insert_rows(session, AuditLog.metadata.tables[AuditLog.__tablename__], rows)
    _move_head(session, stream, rows)


def append_streams(
    session: Session,
    entries: Mapping[str, Sequence[Entry]],
    *,
    heads: Mapping[str, tuple[int, str]] | None = None,
) -> None:
    """Append rows to many streams at once (a confirmation pass's deposits, each its own
    stream), in the caller's transaction: the rows and hashes `append_many` would write
    stream by stream, in a few set-based statements whatever the number of streams.

    Existing heads are locked in stream order (code points, as `append_many` callers and
    the posting functions take them); new ones are inserted with their final values, so a
    stream created by a concurrent writer meanwhile fails this transaction rather than
    forking its chain.

    `heads`: what `lock_heads` returned for these streams earlier in the transaction (a
    caller that reads them before queuing deferred writes, which a read would wait for)."""
    streams = sorted(entries)
    if not streams:
        return
    if heads is None:
        heads = lock_heads(session, streams)
    now = _Now.take()
    rows: list[dict[str, Any]] = []
    new_heads: list[dict[str, Any]] = []
    moved_heads: list[dict[str, Any]] = []
    for stream in streams:
        assert stream and entries[stream], "audit streams are named and get rows"
        seq, prev_hash = heads.get(stream, (0, GENESIS_HASH))
        chained = _chained_rows(stream, seq, prev_hash, entries[stream], now)
        rows.extend(chained)
        head = {"stream": stream, "seq": chained[-1]["seq"], "row_hash": chained[-1]["row_hash"]}
        (moved_heads if stream in heads else new_heads).append(head)
    bulk.insert_rows(session, AuditLog.metadata.tables[AuditLog.__tablename__], rows)
    heads_table = AuditHead.metadata.tables[AuditHead.__tablename__]
    bulk.insert_rows(session, heads_table, new_heads)
    bulk.update_rows(session, heads_table, moved_heads, key="stream")


def lock_heads(session: Session, streams: Sequence[str]) -> dict[str, tuple[int, str]]:
    """(seq, hash) of the streams that have a head, each locked until the transaction ends."""
    if session.get_bind().dialect.name == "postgresql":
        with driver_cursor(session) as cursor:
            cursor.execute(
                "SELECT stream, seq, row_hash FROM audit_heads WHERE stream = ANY(%s::text[]) "
                'ORDER BY stream COLLATE "C" FOR UPDATE',
                [bulk.array_arg(streams)],
            )
            return {stream: (int(seq), str(row_hash)) for stream, seq, row_hash in cursor}
    # SQLite: the transaction already holds the database's one write lock.
    found: dict[str, tuple[int, str]] = {}
    for start in range(0, len(streams), IN_LIST_BATCH):
        for row in session.execute(
            select(AuditHead.stream, AuditHead.seq, AuditHead.row_hash).where(
                AuditHead.stream.in_(streams[start : start + IN_LIST_BATCH])
            )
        ):
            found[row.stream] = (int(row.seq), str(row.row_hash))
    return found


def append(
    session: Session,
    *,
    stream: str,
    actor: str,
    action: str,
    details: Mapping[str, Any],
    asset: str | None = None,
    amount: int | None = None,
) -> int:
    """Append one row to `stream` in the caller's transaction; returns its id."""
    entry = Entry(actor=actor, action=action, details=details, asset=asset, amount=amount)
    return append_many(session, stream, [entry])[0]


def _heads_digest(heads: Iterator[tuple[str, int, str]]) -> tuple[str, int]:
    digest = hashlib.sha256()
    count = 0
    for stream, seq, row_hash in heads:
        digest.update(f"{stream}\x1f{seq}\x1f{row_hash}\x1e".encode())
        count += 1
    return digest.hexdigest(), count


def write_checkpoint(session: Session, *, actor: str = "escrowd") -> int:
    """Anchor every stream head at a point where no writer is in flight.

    On PostgreSQL the point is fixed on connections of its own, which wait for writers to
    finish: the session must not have written audit rows in its transaction yet (the wait
    for it would end in a lock timeout)."""
    bind = session.get_bind()
    if bind.dialect.name == "postgresql":
        max_id, digest, streams = _anchored_heads(bind.engine)
    else:
        # SQLite: this transaction holds the database's one write lock.
        max_id = session.scalar(select(func.max(AuditLog.id))) or 0
        digest, streams = _heads_digest(_heads(session.connection()))
    return append(
        session,
        stream=CHECKPOINT_STREAM,
        actor=actor,
        action="audit_checkpoint",
        details={"max_id": max_id, "streams": streams, "heads_digest": digest},
    )


def _heads(connection: Connection) -> Iterator[tuple[str, int, str]]:
    rows = connection.execute(
        select(AuditHead.stream, AuditHead.seq, AuditHead.row_hash)
        .where(AuditHead.stream != CHECKPOINT_STREAM, AuditHead.seq > 0)
        .order_by(AuditHead.stream)
    )
    return ((r.stream, r.seq, r.row_hash) for r in rows)


def _anchored_heads(engine: Engine) -> tuple[int, str, int]:
    """(highest audit row id, heads digest, streams) at a point with no writer in flight.

    Writers hold a lock on audit_heads from before they number their audit rows until they
    commit; an EXCLUSIVE lock waits for them and holds new ones back. It is held only while
    the point is taken as a snapshot: the heads (one per escrow, deposit and payout ever,
    0.6 s to read at 400,000) are read in that snapshot, on a second connection, while
    writers go on (before, every audit write of the platform waited for the whole read)."""
    repeatable = {"isolation_level": "REPEATABLE READ"}
    with (
        engine.connect().execution_options(**repeatable) as fixing,
        engine.connect().execution_options(**repeatable) as reading,
    ):
        # Writers queue behind a waiting LOCK: a writer that does not finish soon (or the
        # caller's own transaction) makes this checkpoint fail, not the platform wait.
        fixing.execute(text(f"SET LOCAL lock_timeout = '{CHECKPOINT_LOCK_TIMEOUT_MS}ms'"))
        try:
            fixing.execute(text("LOCK TABLE audit_heads IN EXCLUSIVE MODE"))
        except OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != _LOCK_NOT_AVAILABLE:
                raise
            raise CheckpointBusy(
                f"audit writers did not finish within {CHECKPOINT_LOCK_TIMEOUT_MS} ms; no "
                "checkpoint was written, try again (the daemon's next one runs at its interval)"
            ) from None
        snapshot, max_id = fixing.execute(
            text("SELECT pg_export_snapshot(), coalesce(max(id), 0) FROM audit_log")
        ).one()
        if _SNAPSHOT_ID.fullmatch(snapshot) is None:
            raise RuntimeError(f"unexpected snapshot id {snapshot!r}")
        # A utility statement takes no parameters; the id was checked above.
        reading.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{snapshot}'")
        fixing.rollback()
        digest, streams = _heads_digest(_heads(reading))
        reading.rollback()
    return int(max_id), digest, streams


@dataclass
class AuditReport:
    rows_checked: int = 0
    streams_checked: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def first_problem(self) -> str | None:
        if not self.problems:
            return None
        return min(self.problems)[1]


def _iter_rows(session: Session) -> Iterator[AuditLog]:
    # Keyset pagination keeps memory flat however long the trail grows.
    last: tuple[str, int] = ("", 0)
    while True:
        batch = session.scalars(
            select(AuditLog)
            .where(
                (AuditLog.stream > last[0])
                | ((AuditLog.stream == last[0]) & (AuditLog.seq > last[1]))
            )
            .order_by(AuditLog.stream, AuditLog.seq)
            .limit(_VERIFY_BATCH_ROWS)
        ).all()
        if not batch:
            return
        yield from batch
        last = (batch[-1].stream, batch[-1].seq)
        session.expunge_all()


def verify(session: Session) -> AuditReport:
    """Walk every stream's chain, the heads table and the latest checkpoint."""
    report = AuditReport()
    heads = {h.stream: (h.seq, h.row_hash) for h in session.scalars(select(AuditHead))}
    last_seen: dict[str, tuple[int, str, int]] = {}
    latest_checkpoint: AuditLog | None = None
    stream: str | None = None
    expected_seq, expected_prev = 1, GENESIS_HASH
    for row in _iter_rows(session):
        report.rows_checked += 1
        if row.stream != stream:
            stream = row.stream
            expected_seq, expected_prev = 1, GENESIS_HASH
            report.streams_checked += 1
        where = f"audit row id={row.id} (stream {row.stream!r}, seq {row.seq})"
        if row.seq != expected_seq:
            report.problems.append(
                (row.id, f"{where}: expected seq {expected_seq}; rows are missing or moved")
            )
        if row.prev_hash != expected_prev:
            report.problems.append((row.id, f"{where}: prev_hash does not match the row before"))
        recomputed = row_digest(
            stream=row.stream,
            seq=row.seq,
            actor=row.actor,
            action=row.action,
            asset=row.asset,
            amount=row.amount,
            details=row.details,
            created_at=row.created_at,
            prev_hash=row.prev_hash,
        )
        if recomputed != row.row_hash:
            report.problems.append((row.id, f"{where}: content does not match its hash"))
        expected_seq, expected_prev = row.seq + 1, row.row_hash
        last_seen[row.stream] = (row.seq, row.row_hash, row.id)
        if row.stream == CHECKPOINT_STREAM:
            latest_checkpoint = row
    for head_stream, (seq, row_hash) in heads.items():
        seen = last_seen.get(head_stream)
        if seq == 0:
            continue
        if seen is None:
            report.problems.append((0, f"stream {head_stream!r}: all {seq} rows are missing"))
        elif (seen[0], seen[1]) != (seq, row_hash):
            report.problems.append(
                (seen[2], f"stream {head_stream!r}: ends at seq {seen[0]} but its head says {seq}")
            )
    for seen_stream, (_, _, row_id) in last_seen.items():
        if seen_stream not in heads:
            report.problems.append((row_id, f"stream {seen_stream!r} has no head: rows inserted"))
    if latest_checkpoint is not None:
        _verify_checkpoint(session, latest_checkpoint, report)
    return report


def _verify_checkpoint(session: Session, checkpoint: AuditLog, report: AuditReport) -> None:
    recorded = json.loads(checkpoint.details)
    max_id = int(recorded["max_id"])
    last_per_stream = (
        select(AuditLog.stream, func.max(AuditLog.seq).label("seq"))
        .where(AuditLog.id <= max_id, AuditLog.stream != CHECKPOINT_STREAM)
        .group_by(AuditLog.stream)
        .subquery()
    )
    rows = session.execute(
        select(AuditLog.stream, AuditLog.seq, AuditLog.row_hash)
        .join(
            last_per_stream,
            (AuditLog.stream == last_per_stream.c.stream) & (AuditLog.seq == last_per_stream.c.seq),
        )
        .order_by(AuditLog.stream)
    )
    digest, streams = _heads_digest((r.stream, r.seq, r.row_hash) for r in rows)
    if digest != recorded["heads_digest"]:
        report.problems.append(
            (
                checkpoint.id,
                f"checkpoint id={checkpoint.id}: rows up to id {max_id} differ from the "
                f"{recorded['streams']} stream heads it anchored ({streams} found)",
            )
        )
