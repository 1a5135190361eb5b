"""Database side of the indexers, shared by every chain: watched addresses, cursors, and
recording deposits exactly once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from escrowd.indexer.sink import DepositSink, StoredDeposit
from escrowd.models import (
    ChainCursor,
    Deposit,
    DepositAddress,
    DepositCreditState,
    DepositStatus,
    bulk,
    utcnow,
)
from escrowd.models.db import deferred_writes


@dataclass(frozen=True)
class Watched:
    deposit_address_id: int
    agent_id: int
    address: str
    token_account: str | None


class WatchedAddresses:
    """The deposit addresses of one chain, in memory, refreshed incrementally by id.

    A lookup is a dict probe, so a poll costs the same with a thousand or a million
    addresses; a refresh reads only rows added since the last one. Entries are kept
    compact (EVM addresses as 20 raw bytes, ids packed into one int) so a million
    addresses fit in about 150 MB."""

    def __init__(self, chain: str, *, normalize: bool = False) -> None:
        self.chain = chain
        # EVM addresses compare case-insensitively (kept as raw bytes); Solana base58 is
        # case-sensitive and kept as given.
        self._evm = normalize
        self._wallets: dict[bytes | str, int] = {}
        self._token_owner: dict[str, str] = {}
        self._token_of: dict[bytes | str, str] = {}
        self._last_id = 0

    def _key(self, address: str) -> bytes | str | None:
        if not self._evm:
            return address
        try:
            raw = bytes.fromhex(address[2:] if address[:2] in ("0x", "0X") else address)
        except ValueError:
            return None
        return raw if len(raw) == 20 else None

    def _address_of(self, key: bytes | str) -> str:
        return "0x" + key.hex() if isinstance(key, bytes) else key

    def refresh(self, session: Session, *, batch: int = 50_000) -> int:
        added = 0
        while True:
            rows = session.execute(
                select(
                    DepositAddress.id,
                    DepositAddress.agent_id,
                    DepositAddress.address,
                    DepositAddress.token_account,
                )
                .where(DepositAddress.chain == self.chain, DepositAddress.id > self._last_id)
                .order_by(DepositAddress.id)
                .limit(batch)
            ).all()
            for row in rows:
                key = self._key(row.address)
                assert key is not None, f"stored deposit address {row.address!r} is malformed"
                assert 0 < row.agent_id < 2**32, "agent ids are packed into 32 bits"
                self._wallets[key] = (row.id << 32) | row.agent_id
                if row.token_account:
                    self._token_owner[row.token_account] = row.address
                    self._token_of[key] = row.token_account
                self._last_id = row.id
            added += len(rows)
            if len(rows) < batch:
                return added

    def _watched(self, key: bytes | str, address: str) -> Watched:
        packed = self._wallets[key]
        return Watched(packed >> 32, packed & 0xFFFFFFFF, address, self._token_of.get(key))

    def get(self, address: str) -> Watched | None:
        """The entry for a wallet address, or for a wallet's token account (then `address`
        is the owning wallet and `token_account` the queried one)."""
        key = self._key(address)
        if key is not None and key in self._wallets:
            return self._watched(key, address)
        owner = self._token_owner.get(address)
        if owner is None:
            return None
        owner_key = self._key(owner)
        assert owner_key is not None
        return self._watched(owner_key, owner)

    def __contains__(self, address: str) -> bool:
        return self.get(address) is not None

    def __len__(self) -> int:
        return len(self._wallets)

    def owners(self) -> list[Watched]:
        """Every watched wallet (EVM addresses in lower case)."""
        return [self._watched(key, self._address_of(key)) for key in self._wallets]


def get_cursor(session: Session, chain: str, key: str = "", *, lock: bool = False) -> ChainCursor:
    """The cursor row for (chain, key), created empty on first use."""
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    session.execute(
        insert(ChainCursor)
        .values(chain=chain, key=key, updated_at=utcnow())
        .on_conflict_do_nothing(index_elements=["chain", "key"])
    )
    query = select(ChainCursor).where(ChainCursor.chain == chain, ChainCursor.key == key)
    if lock:
        query = query.with_for_update()
    return session.scalars(query.execution_options(populate_existing=True)).one()


@dataclass(frozen=True)
class FoundDeposit:
    """A transfer into a watched address, as seen on chain (not yet stored)."""

    tx_hash: str
    log_index: int
    asset_id: int
    watched: Watched
    from_address: str | None
    amount: int
    block_number: int
    block_hash: str


def record_deposit(session: Session, chain: str, found: FoundDeposit, sink: DepositSink) -> bool:
    """Store a deposit as pending once; True when it is new (or revived after an orphaning).

    Keyed (chain, tx hash, log/instruction index): seeing the same transfer again is a no-op.
    A deposit orphaned by a reorg and mined again at the same position comes back to pending
    with its new block, keeping its credit state: the part of an earlier credit that its
    reversal could not take back still stands, and confirming it credits only the rest."""
    assert found.amount > 0, "only positive transfers are deposits"
    existing = session.scalars(
        select(Deposit)
        .where(
            Deposit.chain == chain,
            Deposit.tx_hash == found.tx_hash,
            Deposit.log_index == found.log_index,
        )
        .with_for_update()
    ).one_or_none()
    if existing is not None:
        if existing.status != DepositStatus.ORPHANED:
            return False
        existing.status = DepositStatus.PENDING
        existing.block_number = found.block_number
        existing.block_hash = found.block_hash
        session.flush()
        sink.recorded(session, existing)
        return True
    deposit = Deposit(
        chain=chain,
        tx_hash=found.tx_hash,
        log_index=found.log_index,
        asset_id=found.asset_id,
        agent_id=found.watched.agent_id,
        deposit_address_id=found.watched.deposit_address_id,
        from_address=found.from_address,
        amount=found.amount,
        block_number=found.block_number,
        block_hash=found.block_hash,
        status=DepositStatus.PENDING,
    )
    session.add(deposit)
    session.flush()
    sink.recorded(session, deposit)
    return True


# A new deposit's credit columns before it is final (the model's defaults).
_PENDING_COLUMNS: dict[str, Any] = {
    "status": DepositStatus.PENDING.value,
    "credit_state": DepositCreditState.NONE.value,
    "credited_base_units": 0,
    "dust_base_units": 0,
    "credit_note": None,
    "credited": False,
    "reversed": False,
}


def record_deposits(
    session: Session,
    chain: str,
    found: list[FoundDeposit],
    sink: DepositSink,
    *,
    final_hashes: Mapping[int, str] | None = None,
) -> int:
    """Store many deposits as pending in a few set-based statements; returns how many are
    new (or revived).

    ``final_hashes`` (block number -> the chain's hash of a block already at confirmation
    depth, read after the logs) credits the new deposits in those blocks at once, in this
    transaction: they are stored confirmed with the sink's `final_columns` and credited by
    its `credited_new`, the same rows, audit entries and events as recording them pending
    and confirming them in a later pass. A key stored meanwhile by someone else is left to
    that one's confirmation.

    Keys not stored yet are inserted together (a key stored meanwhile by someone else is
    skipped by the unique constraint, never doubled) and reported to the sink in one
    batch. Keys already stored are skipped, except orphaned ones, which `record_deposit`
    may revive; a rescan of stored windows costs one query per 500 transaction hashes."""
    unique: dict[tuple[str, int], FoundDeposit] = {}
    for item in found:
        assert item.amount > 0, "only positive transfers are deposits"
        unique.setdefault((item.tx_hash, item.log_index), item)
    if not unique:
        return 0
    moved = _move_standing_orphans(session, chain, unique, sink)
    for key in moved:
        del unique[key]
    if not unique:
        return len(moved)
    now = utcnow()
    pending = DepositStatus.PENDING.value
    rows = [
        {
            "chain": chain,
            "tx_hash": item.tx_hash,
            "log_index": item.log_index,
            "asset_id": item.asset_id,
            "agent_id": item.watched.agent_id,
            "deposit_address_id": item.watched.deposit_address_id,
            "from_address": item.from_address,
            "amount": item.amount,
            "block_number": item.block_number,
            "block_hash": item.block_hash,
            "status": pending,
            "credited": False,
            "reversed": False,
            "created_at": now,
            "updated_at": now,
        }
        for item in unique.values()
    ]
    final_keys: set[tuple[str, int]] = set()
    if final_hashes:
        final_keys = {
            key
            for key, item in unique.items()
            if final_hashes.get(item.block_number) == item.block_hash
        }
        # Stored confirmed at once: no pending row to read back and update, which cost the
        # database more than the insert itself.
        final_items = [(key, item) for key, item in unique.items() if key in final_keys]
        columns = iter(
            sink.final_columns(session, [(item.asset_id, item.amount) for _, item in final_items])
        )
        for key, row in zip(unique, rows, strict=True):
            row.update(next(columns) if key in final_keys else _PENDING_COLUMNS)
    inserted = {
        (tx_hash, log_index): deposit_id
        for deposit_id, tx_hash, log_index in bulk.insert_rows(
            session,
            Deposit.metadata.tables[Deposit.__tablename__],
            rows,
            skip_conflicts_on=("chain", "tx_hash", "log_index"),
            returning=("id", "tx_hash", "log_index"),
        )
    }
    if inserted:
        stored_new = {
            key: StoredDeposit(
                inserted[key],
                chain,
                item.tx_hash,
                item.log_index,
                item.asset_id,
                item.watched.agent_id,
                item.amount,
                item.block_number,
                item.block_hash,
                pending,
            )
            for key, item in unique.items()
            if key in inserted
        }
        # Seen first, then credited: the audit rows and events of a pending deposit
        # confirmed later. Their appends go out while the next ones are built.
        with deferred_writes(session):
            sink.recorded_many(session, list(stored_new.values()))
            sink.credited_new(session, [d for key, d in stored_new.items() if key in final_keys])
    stored = [item for key, item in unique.items() if key not in inserted]
    return len(moved) + len(inserted) + _revive_orphaned(session, chain, stored, sink)


def _move_standing_orphans(
    session: Session, chain: str, unique: dict[tuple[str, int], FoundDeposit], sink: DepositSink
) -> list[tuple[str, int]]:
    """Revive orphaned deposits whose credit still partly stands (a reversal short of it)
    when their transaction reappears at another log index (an EVM log's index counts from
    the start of its block), so the transfer stays one deposit with one credit instead of
    a new deposit credited in full beside the standing part. Returns the keys taken."""
    orphans = session.execute(
        select(
            Deposit.id,
            Deposit.tx_hash,
            Deposit.log_index,
            Deposit.deposit_address_id,
            Deposit.amount,
        )
        .where(
            Deposit.chain == chain,
            Deposit.status == DepositStatus.ORPHANED,
            Deposit.credit_state == DepositCreditState.REVERSAL_SHORT,
        )
        .order_by(Deposit.log_index)
    ).all()
    waiting: dict[tuple[str, int, int], list[int]] = {}
    for orphan in orphans:
        waiting.setdefault((orphan.tx_hash, orphan.deposit_address_id, orphan.amount), []).append(
            orphan.id
        )
    candidates = sorted(
        (
            key
            for key, item in unique.items()
            if (item.tx_hash, item.watched.deposit_address_id, item.amount) in waiting
        ),
        key=lambda key: key[1],
    )
    if not candidates:
        return []
    stored = {
        (row.tx_hash, row.log_index)
        for row in session.execute(
            select(Deposit.tx_hash, Deposit.log_index).where(
                Deposit.chain == chain, Deposit.tx_hash.in_({tx for tx, _ in candidates})
            )
        )
    }
    moved: list[tuple[str, int]] = []
    for key in candidates:
        item = unique[key]
        ids = waiting[item.tx_hash, item.watched.deposit_address_id, item.amount]
        if key in stored or not ids:
            continue
        deposit = session.get(Deposit, ids.pop(0), with_for_update=True)
        if deposit is None or deposit.status != DepositStatus.ORPHANED:
            continue
        deposit.log_index = item.log_index
        deposit.status = DepositStatus.PENDING
        deposit.block_number = item.block_number
        deposit.block_hash = item.block_hash
        session.flush()
        sink.recorded(session, deposit)
        moved.append(key)
    return moved


def _revive_orphaned(
    session: Session, chain: str, stored: list[FoundDeposit], sink: DepositSink
) -> int:
    if not stored:
        return 0
    tx_hashes = sorted({f.tx_hash for f in stored})
    orphaned: set[tuple[str, int]] = set()
    for start in range(0, len(tx_hashes), 500):
        orphaned.update(
            (row.tx_hash, row.log_index)
            for row in session.execute(
                select(Deposit.tx_hash, Deposit.log_index).where(
                    Deposit.chain == chain,
                    Deposit.tx_hash.in_(tx_hashes[start : start + 500]),
                    Deposit.status == DepositStatus.ORPHANED,
                )
            )
        )
    return sum(
        record_deposit(session, chain, item, sink)
        for item in stored
        if (item.tx_hash, item.log_index) in orphaned
    )
