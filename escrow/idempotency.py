"""Idempotency records: one stored response per (principal, key), kept in the database.

`begin` runs inside the transaction that makes the change and claims the key with a
placeholder row; `finish` stores the response in that same transaction, so a change and
its record commit together or not at all. A concurrent request with the same key waits
on the unique index until the first commits, then replays its stored response (or, if
the first failed and rolled back, claims the key and runs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from escrowd.config.errors import IdempotencyConflict, ValidationFailed
from escrowd.models import IdempotencyKey, utcnow

MAX_KEY_LENGTH = 255
# A claimed key whose change has not committed yet (never visible to other transactions).
PENDING_STATUS = 0
_TABLE = IdempotencyKey.metadata.tables[IdempotencyKey.__tablename__]


@dataclass(frozen=True)
class StoredResponse:
    status: int
    body: str


def request_hash(method: str, path: str, canonical_body: str) -> str:
    material = "\n".join([method.upper(), path, canonical_body])
    return hashlib.sha256(material.encode()).hexdigest()


def check_key(key: str | None) -> str:
    if not key:
        raise ValidationFailed(
            "the Idempotency-Key header is required on this POST: send a unique value "
            "(e.g. a UUID) per operation and reuse it only to retry that operation"
        )
    if len(key) > MAX_KEY_LENGTH:
        raise ValidationFailed(f"Idempotency-Key must be at most {MAX_KEY_LENGTH} characters")
    return key


def _stored(row: IdempotencyKey, digest: str) -> StoredResponse:
    return stored_response(
        key=row.key,
        method=row.method,
        path=row.path,
        request_hash=row.request_hash,
        status=row.response_status,
        body=row.response_body,
        digest=digest,
    )


def stored_response(
    *, key: str, method: str, path: str, request_hash: str, status: int, body: str, digest: str
) -> StoredResponse:
    """The response stored for an earlier request with this key, if that request was the
    same as this one (`digest`); IdempotencyConflict if it was another."""
    if request_hash != digest:
        raise IdempotencyConflict(
            f"Idempotency-Key {key!r} was already used for a different request "
            f"({method} {path}); use a new key for a new operation"
        )
    assert status != PENDING_STATUS, "a pending claim is never visible"
    return StoredResponse(status=status, body=body)


def begin(
    session: Session, *, principal: str, key: str, method: str, path: str, digest: str
) -> StoredResponse | int:
    """The stored response of an earlier identical request, or the id of a new claim to
    fill with `finish`. Raises IdempotencyConflict when the key was used for another
    request. One statement in the common case: the claim's INSERT ... ON CONFLICT DO
    NOTHING waits for a concurrent claim of the same key to commit, then inserts nothing."""
    dialect = session.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    # Core statements on the table: nothing of this row lives in the session, and the ORM's
    # bulk insert and update layers cost more client CPU than the two statements' round trips.
    claim_id = session.scalar(
        insert(_TABLE)
        .values(
            principal=principal,
            key=key,
            method=method.upper(),
            path=path[:500],
            request_hash=digest,
            response_status=PENDING_STATUS,
            response_body="",
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["principal", "key"])
        .returning(_TABLE.c.id)
    )
    if claim_id is not None:
        return int(claim_id)
    row = session.scalars(
        select(IdempotencyKey)
        .where(IdempotencyKey.principal == principal, IdempotencyKey.key == key)
        .execution_options(populate_existing=True)
    ).one()
    return _stored(row, digest)


def finish(session: Session, claim_id: int, status: int, body: str) -> None:
    assert status != PENDING_STATUS
    session.execute(
        update(_TABLE)
        .where(_TABLE.c.id == claim_id)
        .values(response_status=status, response_body=body)
    )
