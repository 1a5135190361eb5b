"""Database side of the indexers, shared by every chain: watched addresses, cursors, and
recording deposits exactly once."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from indexer.sink import DepositSink
from models import ChainCursor, Deposit, DepositAddress, DepositStatus, utcnow


@dataclass(frozen=True)
class Watched:
    deposit_address_id: int
    agent_id: int
    address: str
    token_account: str | None


class WatchedAddresses:
    """The deposit addresses of one chain, in memory, refreshed incrementally by id.

    A lookup is a dict probe, so a poll costs the same with a thousand or a million
    addresses; a refresh reads only rows added since the last one."""

    def __init__(self, chain: str, *, normalize: bool = False) -> None:
        self.chain = chain
        # EVM addresses compare case-insensitively; Solana base58 is case-sensitive.
        self._normalize = normalize
        self._by_address: dict[str, Watched] = {}
        self._last_id = 0

    def _key(self, address: str) -> str:
        return address.lower() if self._normalize else address

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
                watched = Watched(row.id, row.agent_id, row.address, row.token_account)
                self._by_address[self._key(row.address)] = watched
                if row.token_account:
                    self._by_address[self._key(row.token_account)] = watched
                self._last_id = row.id
            added += len(rows)
            if len(rows) < batch:
                return added

    def get(self, address: str) -> Watched | None:
        return self._by_address.get(self._key(address))

    def __contains__(self, address: str) -> bool:
        return self._key(address) in self._by_address

    def __len__(self) -> int:
        return len({w.deposit_address_id for w in self._by_address.values()})

    def owners(self) -> list[Watched]:
        return list({w.deposit_address_id: w for w in self._by_address.values()}.values())


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
    with its new block (if it had been credited, that credit was reversed first)."""
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
        if existing.credited and not existing.reversed:
            # Orphaned but its credit could not be reversed: crediting again would double it.
            return False
        existing.status = DepositStatus.PENDING
        existing.credited = False
        existing.reversed = False
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
