"""Double-entry ledger postings, balances and invariant checks.

Every posting runs in the caller's transaction. A batch of transfers is linked: all legs
are written or none. No-overdraft accounts are checked and updated in one conditional
UPDATE per account, taken in account-id order so concurrent postings never deadlock on
them. Accounts without that flag are never updated (their balance is the sum of their
transfers), so platform fees and custody never turn unrelated postings into a queue.

On PostgreSQL a posting is one call of the escrowd_post function (created by the
migration), which does the same checks and writes server-side in one round trip; the
Python path below serves SQLite. tests/test_ledger_pg_fastpath.py holds them to the same
outcomes, rows and audit hashes.
"""

from __future__ import annotations

import json
import os
import uuid
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, bindparam, func, insert, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, aliased

from escrowd.config.errors import EscrowdError
from escrowd.config.settings import LEDGER_DECIMALS
from escrowd.escrow import audit
from escrowd.escrow.errors import (
    AssetMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    UnknownAccount,
)
from escrowd.escrow.money import to_ledger_units
from escrowd.escrow.uow import in_transaction, with_retries
from escrowd.models import (
    AccountKind,
    Asset,
    Deposit,
    DepositCreditState,
    DepositStatus,
    Escrow,
    LedgerAccount,
    LedgerTransfer,
    TransferCode,
    bulk,
)
from escrowd.models.base import utcnow
from escrowd.models.db import (
    IN_LIST_BATCH,
    driver_cursor,
    make_session_factory,
    prepared_rows,
    statement_rows,
)
from escrowd.models.escrow import OPEN_ESCROW_STATES

# Kinds whose balance must never go below zero.
NO_OVERDRAFT_KINDS = frozenset({AccountKind.AGENT_AVAILABLE, AccountKind.ESCROW})
MAX_TRANSFERS_PER_BATCH = 64
# Base units are stored in signed 64-bit columns.
MAX_AMOUNT = 2**63 - 1


@dataclass(frozen=True)
class TransferSpec:
    idempotency_key: str
    debit_account_id: int
    credit_account_id: int
    amount: int
    code: TransferCode
    ref_type: str
    ref_id: str

    def matches(self, row: LedgerTransfer) -> bool:
        return (
            row.debit_account_id == self.debit_account_id
            and row.credit_account_id == self.credit_account_id
            and row.amount == self.amount
            and row.code == self.code
            and row.ref_type == self.ref_type
            and row.ref_id == self.ref_id
        )


@dataclass(frozen=True)
class Posted:
    """A transfer as stored."""

    id: int
    idempotency_key: str
    debit_account_id: int
    credit_account_id: int
    asset: str
    amount: int
    code: str
    ref_type: str
    ref_id: str
    batch_id: str

    @classmethod
    def of(cls, row: LedgerTransfer) -> Posted:
        return cls(
            id=row.id,
            idempotency_key=row.idempotency_key,
            debit_account_id=row.debit_account_id,
            credit_account_id=row.credit_account_id,
            asset=row.asset,
            amount=row.amount,
            code=row.code,
            ref_type=row.ref_type,
            ref_id=row.ref_id,
            batch_id=row.batch_id,
        )


def _insert_for(session: Session) -> type[postgresql.Insert] | type[sqlite.Insert]:
    return postgresql.Insert if session.get_bind().dialect.name == "postgresql" else sqlite.Insert


def get_or_create_account(
    session: Session,
    kind: AccountKind,
    owner: str,
    asset: str,
    *,
    no_overdraft: bool | None = None,
) -> LedgerAccount:
    """The account for (kind, owner, asset), created on first use; safe under races."""
    flag = kind in NO_OVERDRAFT_KINDS if no_overdraft is None else no_overdraft
    insert = _insert_for(session)(LedgerAccount).values(
        kind=kind.value,
        owner=owner,
        asset=asset,
        no_overdraft=flag,
        debits_posted=0,
        credits_posted=0,
        created_at=utcnow(),
    )
    session.execute(insert.on_conflict_do_nothing(index_elements=["kind", "owner", "asset"]))
    account = session.scalars(
        select(LedgerAccount).where(
            LedgerAccount.kind == kind.value,
            LedgerAccount.owner == owner,
            LedgerAccount.asset == asset,
        )
    ).one()
    return account


def find_account(
    session: Session, kind: AccountKind, owner: str, asset: str
) -> LedgerAccount | None:
    return session.scalars(
        select(LedgerAccount).where(
            LedgerAccount.kind == kind.value,
            LedgerAccount.owner == owner,
            LedgerAccount.asset == asset,
        )
    ).one_or_none()


def _validate(specs: Sequence[TransferSpec]) -> None:
    if not specs:
        raise InvalidAmount("a posting needs at least one transfer")
    if len(specs) > MAX_TRANSFERS_PER_BATCH:
        raise InvalidAmount(f"at most {MAX_TRANSFERS_PER_BATCH} transfers can be linked")
    keys = [spec.idempotency_key for spec in specs]
    if len(set(keys)) != len(keys):
        raise IdempotencyConflict("each transfer in a batch needs its own idempotency key")
    for spec in specs:
        if not spec.idempotency_key:
            raise InvalidAmount("every transfer needs an idempotency key")
        if isinstance(spec.amount, bool) or not isinstance(spec.amount, int):
            raise InvalidAmount(f"amount must be an integer in base units, got {spec.amount!r}")
        if spec.amount <= 0:
            raise InvalidAmount(f"amount must be greater than zero, got {spec.amount}")
        if spec.amount > MAX_AMOUNT:
            raise InvalidAmount(f"amount {spec.amount} exceeds the largest storable amount")
        # Checked here so an oversized value is a typed error that leaves the caller's
        # transaction usable, rather than a column-limit failure inside the database.
        if len(spec.idempotency_key) > 160 or len(spec.ref_type) > 32 or len(spec.ref_id) > 128:
            raise InvalidAmount(
                "idempotency key (160), ref type (32) or ref id (128 characters) is too long"
            )
        if spec.debit_account_id == spec.credit_account_id:
            raise InvalidAmount("a transfer needs two different accounts")


def _existing(session: Session, specs: Sequence[TransferSpec]) -> list[Posted] | None:
    """The original transfers if this batch was posted before; None if it is new."""
    keys = [spec.idempotency_key for spec in specs]
    found = {
        row.idempotency_key: row
        for row in session.scalars(
            select(LedgerTransfer).where(LedgerTransfer.idempotency_key.in_(keys))
        )
    }
    if not found:
        return None
    if len(found) != len(specs):
        raise IdempotencyConflict(
            "some of these idempotency keys were already used by another posting"
        )
    originals = [found[spec.idempotency_key] for spec in specs]
    if not all(spec.matches(row) for spec, row in zip(specs, originals, strict=True)):
        raise IdempotencyConflict(
            "these idempotency keys were already used for a different transfer; "
            "use new keys for a new posting"
        )
    return [Posted.of(row) for row in originals]


def post(
    session: Session,
    specs: Sequence[TransferSpec],
    *,
    actor: str,
    audit_stream: str | None = None,
) -> list[Posted]:
    """Post linked transfers atomically; a repeat of the same batch returns the originals."""
    _validate(specs)
    # The Python path costs ~11 statements of client CPU per posting; the function, one.
    if session.get_bind().dialect.name == "postgresql":
        return _post_postgresql(session, specs, actor=actor, audit_stream=audit_stream)
    originals = _existing(session, specs)
    if originals is not None:
        return originals
    try:
        with session.begin_nested():
            return _post_new(session, specs, actor=actor, audit_stream=audit_stream)
    except IntegrityError:
        # A concurrent posting took one of the keys between our check and our insert.
        originals = _existing(session, specs)
        if originals is None:
            raise
        return originals


def _audit_details(transfer: TransferSpec | Posted, transfer_id: int, batch_id: str) -> str:
    """A transfer's audit details in canonical JSON (keys sorted), from a template: a
    crediting pass writes one per deposit."""
    return (
        f'{{"batch_id":{audit.json_string(batch_id)},'
        f'"credit_account_id":{int(transfer.credit_account_id)},'
        f'"debit_account_id":{int(transfer.debit_account_id)},'
        f'"idempotency_key":{audit.json_string(transfer.idempotency_key)},'
        f'"ref":{audit.json_string(f"{transfer.ref_type}:{transfer.ref_id}")},'
        f'"transfer_id":{int(transfer_id)}}}'
    )


def _post_new(
    session: Session, specs: Sequence[TransferSpec], *, actor: str, audit_stream: str | None
) -> list[Posted]:
    account_ids = sorted(
        {spec.debit_account_id for spec in specs} | {spec.credit_account_id for spec in specs}
    )
    accounts = {
        row.id: row
        for row in session.execute(
            select(
                LedgerAccount.id,
                LedgerAccount.kind,
                LedgerAccount.owner,
                LedgerAccount.asset,
                LedgerAccount.no_overdraft,
            ).where(LedgerAccount.id.in_(account_ids))
        )
    }
    missing = [account_id for account_id in account_ids if account_id not in accounts]
    if missing:
        raise UnknownAccount(f"no ledger account with id {missing[0]}")
    for spec in specs:
        debit, credit = accounts[spec.debit_account_id], accounts[spec.credit_account_id]
        if debit.asset != credit.asset:
            raise AssetMismatch(
                f"cannot move {debit.asset} from account {debit.id} into {credit.asset} "
                f"account {credit.id}: both sides of a transfer must hold the same asset"
            )

    debits: dict[int, int] = defaultdict(int)
    credits: dict[int, int] = defaultdict(int)
    for spec in specs:
        debits[spec.debit_account_id] += spec.amount
        credits[spec.credit_account_id] += spec.amount
    # Ascending id order: concurrent postings lock shared accounts in the same order.
    for account_id in account_ids:
        account = accounts[account_id]
        if not account.no_overdraft:
            continue
        debit_total, credit_total = debits[account_id], credits[account_id]
        result = session.execute(
            update(LedgerAccount)
            .where(
                LedgerAccount.id == account_id,
                LedgerAccount.credits_posted + credit_total - LedgerAccount.debits_posted
                >= debit_total,
            )
            .values(
                debits_posted=LedgerAccount.debits_posted + debit_total,
                credits_posted=LedgerAccount.credits_posted + credit_total,
            )
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise InsufficientFunds(
                f"account {account_id} ({account.kind} {account.owner} {account.asset}) "
                f"cannot cover {debit_total - credit_total} base units"
            )

    batch_id = str(uuid.uuid4())
    now = utcnow()
    values = [
        {
            "idempotency_key": spec.idempotency_key,
            "debit_account_id": spec.debit_account_id,
            "credit_account_id": spec.credit_account_id,
            "asset": accounts[spec.debit_account_id].asset,
            "amount": spec.amount,
            "code": spec.code.value,
            "ref_type": spec.ref_type,
            "ref_id": spec.ref_id,
            "batch_id": batch_id,
            "created_at": now,
        }
        for spec in specs
    ]
    ids = list(
        session.scalars(
            insert(LedgerTransfer).returning(LedgerTransfer.id, sort_by_parameter_order=True),
            values,
        )
    )
    posted = [
        Posted(id=i, **{k: v for k, v in row.items() if k != "created_at"})
        for i, row in zip(ids, values, strict=True)
    ]
    entries_by_stream: dict[str, list[audit.Entry]] = defaultdict(list)
    for transfer in posted:
        stream = audit_stream or f"{transfer.ref_type}:{transfer.ref_id}"
        entries_by_stream[stream].append(
            audit.Entry(
                actor=actor,
                action=f"ledger_{transfer.code}",
                asset=transfer.asset,
                amount=transfer.amount,
                details=_audit_details(transfer, transfer.id, batch_id),
            )
        )
    for stream in sorted(entries_by_stream):
        audit.append_many(session, stream, entries_by_stream[stream])
    return posted


_PG_POST = (
    "SELECT status, message, transfer_id, asset, batch_id FROM escrowd_post("
    "%s::text, %s::text, %s::text, %s::timestamptz, %s::text)"
)
_PG_REFUSALS: dict[str, type[EscrowdError]] = {
    "insufficient_funds": InsufficientFunds,
    "unknown_account": UnknownAccount,
    "asset_mismatch": AssetMismatch,
    "idempotency_conflict": IdempotencyConflict,
}
_ID_SENTINEL = '"transfer_id":0}'


def raise_refusal(status: str, message: str | None) -> None:
    """Raise the typed error for a refusal status of the posting functions, if it is one."""
    refusal = _PG_REFUSALS.get(status)
    if refusal is not None:
        raise refusal(message or status)


def _details_head(spec: TransferSpec, batch_id: str) -> str:
    """The audit details JSON up to the transfer id, which only the database knows.

    "transfer_id" sorts last among the keys, so the canonical JSON ends with it and the
    function appends the id and the closing brace."""
    full = _audit_details(spec, 0, batch_id)
    assert full.endswith(_ID_SENTINEL)
    return full[: -len("0}")]


def _post_postgresql(
    session: Session, specs: Sequence[TransferSpec], *, actor: str, audit_stream: str | None
) -> list[Posted]:
    """One round trip to escrowd_post (see the migration): the same checks, outcomes and
    rows as the Python path, without ~11 statements' worth of client CPU per posting."""
    # Plain SQL does not autoflush; the caller's pending ORM writes must land first.
    session.flush()
    params = _pg_post_params(specs, actor=actor, audit_stream=audit_stream)
    return _pg_posted(specs, prepared_rows(session, _PG_POST, params))


def post_alone(
    engine: Engine,
    specs: Sequence[TransferSpec],
    *,
    actor: str,
    audit_stream: str | None = None,
) -> list[Posted]:
    """`post` as a transaction of its own, committed when this returns (retried on deadlock
    or serialization failure). On PostgreSQL it is the escrowd_post call alone, in
    autocommit: one round trip where BEGIN, the call and COMMIT take three."""
    if engine.dialect.name != "postgresql":
        return in_transaction(
            make_session_factory(engine),
            lambda session: post(session, specs, actor=actor, audit_stream=audit_stream),
        )
    _validate(specs)
    params = _pg_post_params(specs, actor=actor, audit_stream=audit_stream)
    return _pg_posted(specs, with_retries(lambda: statement_rows(engine, _PG_POST, params)))


def _pg_post_params(
    specs: Sequence[TransferSpec], *, actor: str, audit_stream: str | None
) -> tuple[str, str, str, datetime, str]:
    batch_id = str(uuid.uuid4())
    now = utcnow()
    # One JSON text parameter: far cheaper for the driver to send than nine arrays.
    transfers = json.dumps(
        [
            [
                spec.idempotency_key,
                spec.debit_account_id,
                spec.credit_account_id,
                spec.amount,
                spec.code.value,
                spec.ref_type,
                spec.ref_id,
                audit_stream or f"{spec.ref_type}:{spec.ref_id}",
                _details_head(spec, batch_id),
            ]
            for spec in specs
        ]
    )
    return transfers, actor, batch_id, now, audit.timestamp_text(now)


def _pg_posted(specs: Sequence[TransferSpec], rows: list[tuple[Any, ...]]) -> list[Posted]:
    """escrowd_post's rows as Posted transfers, or its refusal raised as a typed error."""
    status, message = rows[0][0], rows[0][1]
    raise_refusal(status, message)
    assert status in ("posted", "existing") and len(rows) == len(specs), status
    posted = []
    for spec, (_status, _message, transfer_id, asset, row_batch_id) in zip(
        specs, rows, strict=True
    ):
        assert transfer_id is not None and asset is not None and row_batch_id is not None
        posted.append(
            Posted(
                id=transfer_id,
                idempotency_key=spec.idempotency_key,
                debit_account_id=spec.debit_account_id,
                credit_account_id=spec.credit_account_id,
                asset=asset,
                amount=spec.amount,
                code=spec.code.value,
                ref_type=spec.ref_type,
                ref_id=spec.ref_id,
                batch_id=row_batch_id,
            )
        )
    return posted


def account_ids(
    session: Session, kind: AccountKind, asset: str, owners: Sequence[str]
) -> dict[str, int]:
    """Ids of the (kind, owner, asset) accounts of many owners, missing ones created in the
    order given: what `get_or_create_account` does for each, in a few statements; safe
    under races."""
    wanted = list(dict.fromkeys(owners))
    found = _ids_by_owner(session, kind, asset, wanted)
    missing = [owner for owner in wanted if owner not in found]
    if missing:
        now = utcnow()
        bulk.insert_rows(
            session,
            LedgerAccount.metadata.tables[LedgerAccount.__tablename__],
            [
                {
                    "kind": kind.value,
                    "owner": owner,
                    "asset": asset,
                    "no_overdraft": kind in NO_OVERDRAFT_KINDS,
                    "debits_posted": 0,
                    "credits_posted": 0,
                    "created_at": now,
                }
                for owner in missing
            ],
            skip_conflicts_on=("kind", "owner", "asset"),
        )
        found.update(_ids_by_owner(session, kind, asset, missing))
    return found


def _ids_by_owner(
    session: Session, kind: AccountKind, asset: str, owners: Sequence[str]
) -> dict[str, int]:
    if session.get_bind().dialect.name == "postgresql":
        # One array parameter, not an IN list of a window's thousand owners (see
        # _accounts_by_id).
        with driver_cursor(session) as cursor:
            cursor.execute(
                "SELECT owner, id FROM ledger_accounts "
                "WHERE kind = %b AND asset = %b AND owner = ANY(%s::text[])",
                [kind.value, asset, bulk.array_arg(owners)],
            )
            return {str(owner): int(account_id) for owner, account_id in cursor}
    found: dict[str, int] = {}
    for start in range(0, len(owners), IN_LIST_BATCH):
        found.update(
            session.execute(
                select(LedgerAccount.owner, LedgerAccount.id).where(
                    LedgerAccount.kind == kind.value,
                    LedgerAccount.asset == asset,
                    LedgerAccount.owner.in_(owners[start : start + IN_LIST_BATCH]),
                )
            ).all()
        )
    return found


def post_credits(
    session: Session, specs: Sequence[TransferSpec], *, actor: str, audit_streams: Sequence[str]
) -> None:
    """Post many unlinked transfers at once, each as `post` would post it alone (a batch
    id of its own, its audit row in its stream, `audit_streams[i]` for `specs[i]`), in a
    few set-based statements: one insert of the transfers, each protected account's
    credits added once, the audit rows appended together (tests/test_crediting_paths.py
    holds the two to the same rows and hashes).

    For credits: nothing is debited from a no-overdraft account (the one check per account
    a debit would need is `post`'s). Every key must be new; the caller has claimed what it
    credits (a deposit row lock), so a key used already fails the transaction."""
    assert len(specs) == len(audit_streams)
    if not specs:
        return
    for spec in specs:
        _validate([spec])
    session.flush()
    accounts = _accounts_by_id(
        session,
        sorted(
            {spec.debit_account_id for spec in specs} | {spec.credit_account_id for spec in specs}
        ),
    )
    credits: dict[int, int] = defaultdict(int)
    assets = []
    for spec in specs:
        debit = accounts.get(spec.debit_account_id)
        credit = accounts.get(spec.credit_account_id)
        if debit is None or credit is None:
            missing = spec.debit_account_id if debit is None else spec.credit_account_id
            raise UnknownAccount(f"no ledger account with id {missing}")
        if debit[0] != credit[0]:
            raise AssetMismatch(
                f"cannot move {debit[0]} from account {spec.debit_account_id} into "
                f"{credit[0]} account {spec.credit_account_id}: both sides of a transfer must "
                "hold the same asset"
            )
        if debit[1]:
            raise InvalidAmount(
                f"account {spec.debit_account_id} may not be overdrawn: debit it with "
                "ledger.post, which checks its balance"
            )
        if credit[1]:
            credits[spec.credit_account_id] += spec.amount
        assets.append(debit[0])
    _add_credits(session, credits)
    transfer_ids = _reserve_transfer_ids(session, len(specs))
    # Read (and locked) before the transfers' append is queued, which a read would wait for.
    heads = audit.lock_heads(session, sorted(set(audit_streams)))
    now = utcnow()
    batch_ids = _random_uuids(len(specs))
    codes = [spec.code.value for spec in specs]
    transfers = LedgerTransfer.metadata.tables[LedgerTransfer.__tablename__]
    rows = [
        {
            "idempotency_key": spec.idempotency_key,
            "debit_account_id": spec.debit_account_id,
            "credit_account_id": spec.credit_account_id,
            "asset": asset,
            "amount": spec.amount,
            "code": code,
            "ref_type": spec.ref_type,
            "ref_id": spec.ref_id,
            "batch_id": batch_id,
            "created_at": now,
        }
        for spec, asset, batch_id, code in zip(specs, assets, batch_ids, codes, strict=True)
    ]
    if transfer_ids:
        for row, transfer_id in zip(rows, transfer_ids, strict=True):
            row["id"] = transfer_id
        bulk.insert_rows(session, transfers, rows)
    else:
        # SQLite numbers the rows as it inserts them, in the order given.
        transfer_ids = list(
            session.connection()
            .execute(
                insert(transfers).returning(transfers.c.id, sort_by_parameter_order=True), rows
            )
            .scalars()
        )
    entries: dict[str, list[audit.Entry]] = defaultdict(list)
    for spec, asset, batch_id, code, transfer_id, stream in zip(
        specs, assets, batch_ids, codes, transfer_ids, audit_streams, strict=True
    ):
        entries[stream].append(
            audit.Entry(
                actor=actor,
                action=f"ledger_{code}",
                asset=asset,
                amount=spec.amount,
                details=_audit_details(spec, transfer_id, batch_id),
            )
        )
    audit.append_streams(session, entries, heads=heads)


# The variant digit of a random UUID (RFC 9562: bits 10xx) for each hex digit drawn.
_VARIANT_DIGIT = {f"{n:x}": f"{8 | (n & 3):x}" for n in range(16)}


def _random_uuids(count: int) -> list[str]:
    """`count` random (version 4) UUIDs in text, as str(uuid.uuid4()) writes them, from one
    read of the system's random source: uuid4() reads it once per id, a system call each,
    2 % of a backfill window's crediting."""
    digits = os.urandom(16 * count).hex()
    return [
        f"{digits[i : i + 8]}-{digits[i + 8 : i + 12]}-4{digits[i + 13 : i + 16]}-"
        f"{_VARIANT_DIGIT[digits[i + 16]]}{digits[i + 17 : i + 20]}-{digits[i + 20 : i + 32]}"
        for i in range(0, 32 * count, 32)
    ]


def _accounts_by_id(session: Session, ids: Sequence[int]) -> dict[int, tuple[str, bool]]:
    """(asset, no_overdraft) of the accounts `ids`. PostgreSQL gets them as one array
    parameter: an IN list of a window's thousand accounts is SQL text that SQLAlchemy
    renders and psycopg parses again on every call."""
    if session.get_bind().dialect.name == "postgresql":
        with driver_cursor(session) as cursor:
            cursor.execute(
                "SELECT id, asset, no_overdraft FROM ledger_accounts WHERE id = ANY(%s::bigint[])",
                [bulk.array_arg(ids)],
            )
            return {int(i): (str(asset), bool(flag)) for i, asset, flag in cursor}
    found: dict[int, tuple[str, bool]] = {}
    for start in range(0, len(ids), IN_LIST_BATCH):
        for row in session.execute(
            select(LedgerAccount.id, LedgerAccount.asset, LedgerAccount.no_overdraft).where(
                LedgerAccount.id.in_(ids[start : start + IN_LIST_BATCH])
            )
        ):
            found[row.id] = (row.asset, row.no_overdraft)
    return found


def _add_credits(session: Session, credits: dict[int, int]) -> None:
    """Add each protected account's credits in one statement, the rows locked in
    ascending id order first (as every posting path takes them, so none deadlock)."""
    if not credits:
        return
    account_ids = sorted(credits)
    if session.get_bind().dialect.name != "postgresql":
        session.connection().execute(
            update(LedgerAccount.metadata.tables[LedgerAccount.__tablename__])
            .where(LedgerAccount.id == bindparam("b_id"))
            .values(credits_posted=LedgerAccount.credits_posted + bindparam("b_amount")),
            [{"b_id": account_id, "b_amount": credits[account_id]} for account_id in account_ids],
        )
        return
    with driver_cursor(session) as cursor:
        cursor.execute(
            "SELECT id FROM ledger_accounts WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
            [account_ids],
        )
        cursor.execute(
            "UPDATE ledger_accounts AS a SET credits_posted = a.credits_posted + u.amount "
            "FROM unnest(%s::bigint[], %s::bigint[]) AS u (id, amount) WHERE a.id = u.id",
            [account_ids, [credits[account_id] for account_id in account_ids]],
        )


def _reserve_transfer_ids(session: Session, count: int) -> list[int]:
    """PostgreSQL: `count` ids from the transfers' sequence, ascending, so the rows can be
    written with COPY and their audit rows built first. SQLite: none (it assigns them)."""
    if session.get_bind().dialect.name != "postgresql":
        return []
    with driver_cursor(session) as cursor:
        # The sequence looked up once: written inside nextval(), the catalog lookup ran for
        # every row, ten times the cost of the nextval calls themselves.
        cursor.execute(
            "WITH s AS MATERIALIZED "
            "(SELECT pg_get_serial_sequence('ledger_transfers', 'id')::regclass AS seq) "
            "SELECT nextval(s.seq) FROM s, generate_series(1, %s)",
            [count],
        )
        return sorted(int(row[0]) for row in cursor)


def balance(session: Session, account: LedgerAccount) -> int:
    """credits - debits. Tracked accounts read their row; hot accounts sum their transfers."""
    if account.no_overdraft:
        posted = session.execute(
            select(LedgerAccount.credits_posted - LedgerAccount.debits_posted).where(
                LedgerAccount.id == account.id
            )
        ).scalar_one()
        return int(posted)
    return _summed_balances(session, [account.id])[account.id]


def _summed_balances(session: Session, account_ids: Sequence[int]) -> dict[int, int]:
    result = dict.fromkeys(account_ids, 0)
    credited = session.execute(
        select(LedgerTransfer.credit_account_id, func.sum(LedgerTransfer.amount))
        .where(LedgerTransfer.credit_account_id.in_(account_ids))
        .group_by(LedgerTransfer.credit_account_id)
    )
    for account_id, total in credited:
        result[account_id] += int(total)
    debited = session.execute(
        select(LedgerTransfer.debit_account_id, func.sum(LedgerTransfer.amount))
        .where(LedgerTransfer.debit_account_id.in_(account_ids))
        .group_by(LedgerTransfer.debit_account_id)
    )
    for account_id, total in debited:
        result[account_id] -= int(total)
    return result


@dataclass(frozen=True)
class Violation:
    check: str
    message: str


def check(session: Session) -> list[Violation]:
    """Verify the ledger's invariants; an empty list means all hold."""
    violations: list[Violation] = []
    accounts = {
        a.id: a
        for a in session.scalars(select(LedgerAccount).execution_options(populate_existing=True))
    }
    summed = _all_summed(session)

    mismatched = session.execute(
        select(LedgerTransfer.id, LedgerTransfer.asset)
        .join(LedgerAccount, LedgerAccount.id == LedgerTransfer.debit_account_id)
        .where(LedgerAccount.asset != LedgerTransfer.asset)
        .union_all(
            select(LedgerTransfer.id, LedgerTransfer.asset)
            .join(LedgerAccount, LedgerAccount.id == LedgerTransfer.credit_account_id)
            .where(LedgerAccount.asset != LedgerTransfer.asset)
        )
    ).all()
    for transfer_id, asset in mismatched:
        violations.append(
            Violation(
                "transfer_balanced",
                f"transfer {transfer_id} moves {asset} to or from an account of another asset",
            )
        )
    debit_account = aliased(LedgerAccount)
    credit_account = aliased(LedgerAccount)
    dangling = session.execute(
        select(LedgerTransfer.id, LedgerTransfer.debit_account_id, LedgerTransfer.credit_account_id)
        .outerjoin(debit_account, debit_account.id == LedgerTransfer.debit_account_id)
        .outerjoin(credit_account, credit_account.id == LedgerTransfer.credit_account_id)
        .where(or_(debit_account.id.is_(None), credit_account.id.is_(None)))
        .order_by(LedgerTransfer.id)
    ).all()
    violations.extend(
        Violation(
            "transfer_accounts",
            f"transfer {tid} refers to a missing account (debit {debit}, credit {credit})",
        )
        for tid, debit, credit in dangling
    )
    bad_amounts = session.scalars(select(LedgerTransfer.id).where(LedgerTransfer.amount <= 0)).all()
    violations.extend(
        Violation("transfer_positive", f"transfer {tid} has a non-positive amount")
        for tid in bad_amounts
    )

    per_asset: dict[str, int] = defaultdict(int)
    for account in accounts.values():
        debit_sum, credit_sum = summed.get(account.id, (0, 0))
        bal = credit_sum - debit_sum
        per_asset[account.asset] += bal
        if account.no_overdraft:
            if (account.debits_posted, account.credits_posted) != (debit_sum, credit_sum):
                violations.append(
                    Violation(
                        "posted_totals",
                        f"account {account.id} ({account.kind} {account.owner}) records "
                        f"debits {account.debits_posted} credits {account.credits_posted} "
                        f"but its transfers sum to {debit_sum} and {credit_sum}",
                    )
                )
            if bal < 0:
                violations.append(
                    Violation(
                        "no_overdraft",
                        f"account {account.id} ({account.kind} {account.owner} "
                        f"{account.asset}) is negative: {bal}",
                    )
                )
    for asset, total in sorted(per_asset.items()):
        if total != 0:
            violations.append(
                Violation("sum_zero", f"balances of {asset} sum to {total}, not zero")
            )
    violations.extend(_asset_scales(session))
    violations.extend(_deposit_credits(session))
    violations.extend(_escrowed_totals(accounts.values(), session))
    return violations


def _escrowed_totals(accounts: Iterable[LedgerAccount], session: Session) -> list[Violation]:
    """Each agent's available account records what its open escrows as buyer hold of the
    account's asset (what a balance read shows as escrowed)."""
    held: dict[tuple[str, str], int] = defaultdict(int)
    for buyer, asset, total in session.execute(
        select(Escrow.buyer_agent_id, Escrow.asset, func.sum(Escrow.amount))
        .where(Escrow.status.in_([status.value for status in OPEN_ESCROW_STATES]))
        .group_by(Escrow.buyer_agent_id, Escrow.asset)
    ):
        held[str(buyer), asset] = int(total)
    out = []
    for account in accounts:
        if account.kind != AccountKind.AGENT_AVAILABLE:
            continue
        expected = held.pop((account.owner, account.asset), 0)
        if account.escrowed != expected:
            out.append(
                Violation(
                    "escrowed_totals",
                    f"account {account.id} (agent {account.owner} {account.asset}) records "
                    f"{account.escrowed} in open escrows, but the agent's open escrows as "
                    f"buyer hold {expected}",
                )
            )
    out.extend(
        Violation(
            "escrowed_totals",
            f"agent {buyer} has {total} {asset} in open escrows and no {asset} account",
        )
        for (buyer, asset), total in sorted(held.items())
    )
    return out


def _asset_scales(session: Session) -> list[Violation]:
    """Every registered token of a ledger asset converts exactly into the ledger's scale."""
    out = []
    for asset in session.scalars(select(Asset).order_by(Asset.id)):
        scale = LEDGER_DECIMALS.get(asset.symbol)
        if scale is not None and asset.decimals < scale:
            out.append(
                Violation(
                    "asset_scale",
                    f"{asset.symbol} on {asset.chain} has {asset.decimals} decimals, coarser "
                    f"than the ledger's {scale}: its amounts cannot all be paid out there",
                )
            )
    return out


# The credit states a deposit of each status can be in: a final deposit was credited, held
# as dust or refused; any other has no credit or what a deep reorg left of one.
_NOT_FINAL_STATES = {
    DepositCreditState.NONE.value,
    DepositCreditState.REVERSED.value,
    DepositCreditState.REVERSAL_SHORT.value,
}
_STATES_BY_STATUS = {
    DepositStatus.CONFIRMED.value: {
        DepositCreditState.CREDITED.value,
        DepositCreditState.DUST.value,
        DepositCreditState.REFUSED.value,
    },
    DepositStatus.PENDING.value: _NOT_FINAL_STATES,
    DepositStatus.ORPHANED.value: _NOT_FINAL_STATES,
}
# States in which no ledger units stand for a deposit.
_UNCREDITED_STATES = {
    DepositCreditState.NONE.value,
    DepositCreditState.DUST.value,
    DepositCreditState.REFUSED.value,
    DepositCreditState.REVERSED.value,
}


def _deposit_credits(session: Session) -> list[Violation]:
    """Each deposit's credit is what its amount converts to at the ledger's scale, the
    ledger's deposit transfers for it net to what its row says stands, and its credit
    state fits its status: every confirmed deposit credited once, at the right scale."""
    net: dict[str, int] = defaultdict(int)
    for ref_id, code, total in session.execute(
        select(LedgerTransfer.ref_id, LedgerTransfer.code, func.sum(LedgerTransfer.amount))
        .where(
            LedgerTransfer.ref_type == "deposit",
            LedgerTransfer.code.in_([TransferCode.DEPOSIT, TransferCode.DEPOSIT_REVERSAL]),
        )
        .group_by(LedgerTransfer.ref_id, LedgerTransfer.code)
    ):
        net[ref_id] += int(total) if code == TransferCode.DEPOSIT else -int(total)
    out: list[Violation] = []
    rows = session.execute(
        select(
            Deposit.id,
            Deposit.chain,
            Deposit.tx_hash,
            Deposit.amount,
            Deposit.status,
            Deposit.credit_state,
            Deposit.credited_base_units,
            Asset.symbol,
            Asset.decimals,
        )
        .join(Asset, Asset.id == Deposit.asset_id)
        .order_by(Deposit.id)
        .execution_options(yield_per=10_000)
    )
    for row in rows:
        where = f"deposit {row.id} ({row.chain} {row.tx_hash})"
        posted = net.pop(str(row.id), 0)
        if posted != row.credited_base_units:
            out.append(
                Violation(
                    "deposit_credit",
                    f"{where}: its ledger transfers credit {posted} {row.symbol} base units "
                    f"but it records {row.credited_base_units} standing",
                )
            )
        scale = LEDGER_DECIMALS.get(row.symbol)
        units = None if scale is None else to_ledger_units(row.amount, row.decimals, scale)[0]
        state = row.credit_state
        if state == DepositCreditState.CREDITED and row.credited_base_units != units:
            out.append(
                Violation(
                    "deposit_scale",
                    f"{where}: credited {row.credited_base_units} {row.symbol} base units, "
                    f"but {row.amount} at {row.decimals} decimals is {units} at the ledger's "
                    f"scale of {scale}",
                )
            )
        if state in _UNCREDITED_STATES and row.credited_base_units != 0:
            out.append(Violation("deposit_credit", f"{where}: {state} but a credit stands for it"))
        if state not in _STATES_BY_STATUS.get(row.status, set()):
            out.append(
                Violation("deposit_credit", f"{where}: status {row.status} with credit {state}")
            )
    for ref_id, posted in sorted(net.items()):
        if posted:
            out.append(
                Violation(
                    "deposit_credit", f"deposit transfers net {posted} for missing deposit {ref_id}"
                )
            )
    return out


def _all_summed(session: Session) -> dict[int, tuple[int, int]]:
    """(debits, credits) of every account, summed from its transfers in one pass each way."""
    totals: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for account_id, total in session.execute(
        select(LedgerTransfer.debit_account_id, func.sum(LedgerTransfer.amount)).group_by(
            LedgerTransfer.debit_account_id
        )
    ):
        totals[account_id][0] = int(total)
    for account_id, total in session.execute(
        select(LedgerTransfer.credit_account_id, func.sum(LedgerTransfer.amount)).group_by(
            LedgerTransfer.credit_account_id
        )
    ):
        totals[account_id][1] = int(total)
    return {account_id: (d, c) for account_id, (d, c) in totals.items()}


__all__ = [
    "NO_OVERDRAFT_KINDS",
    "Posted",
    "TransferSpec",
    "Violation",
    "account_ids",
    "balance",
    "check",
    "find_account",
    "get_or_create_account",
    "post",
    "post_credits",
]
