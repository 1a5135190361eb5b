"""Reorg handling for the EVM poller: check the stored block hashes against the node, find
the common ancestor, and roll the scan back to it.

`chain_blocks` holds the header of every window end plus every block in the last
``max_reorg_depth`` blocks below the head that the poller scanned, each linked to its
parent when it was stored. A block still canonical implies all its ancestors are.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from prometheus_client import Counter
from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import Unavailable
from escrowd.indexer.evm_source import BlockHeader, EvmSource
from escrowd.indexer.sink import DepositSink
from escrowd.indexer.store import get_cursor
from escrowd.models import ChainBlock, Deposit, DepositStatus

log = structlog.get_logger(__name__)

REORGS = Counter("escrowd_evm_reorgs_total", "Reorgs detected by the EVM poller.", ["chain"])
CREDITED_ORPHANED = Counter(
    "escrowd_evm_credited_deposits_orphaned_total",
    "Credited deposits whose block left the canonical chain (reorg deeper than confirmations).",
    ["chain"],
)

# Stored blocks re-checked on every poll; the rest are only walked when one of these fails.
RECHECK_BLOCKS = 4
HEADER_BATCH = 32


class DeepReorg(Unavailable):
    """The chain reorganised below every block we still hold a hash for (deeper than
    ``max_reorg_depth``). The poller stops advancing until an operator looks."""

    type = "deep_reorg"


class CursorMoved(Unavailable):
    """Another poller moved the cursor while this one worked: drop this poll's result."""

    type = "cursor_moved"


@dataclass(frozen=True)
class Rollback:
    from_block: int | None
    to_block: int | None
    orphaned: int


def stored_blocks(session: Session, chain: str, min_block: int) -> list[ChainBlock]:
    """Stored headers at or above ``min_block``, newest first."""
    return list(
        session.scalars(
            select(ChainBlock)
            .where(ChainBlock.chain == chain, ChainBlock.block_number >= min_block)
            .order_by(ChainBlock.block_number.desc())
        )
    )


def headers_of(source: EvmSource, numbers: Sequence[int]) -> list[BlockHeader]:
    """Headers in order, fetched in bounded batches."""
    out: list[BlockHeader] = []
    for start in range(0, len(numbers), HEADER_BATCH):
        out.extend(source.block_headers(numbers[start : start + HEADER_BATCH]))
    return out


def _canonical(source: EvmSource, numbers: Sequence[int], head: int) -> dict[int, str]:
    """Node hashes of the given block numbers; blocks above the head are absent."""
    wanted = sorted({n for n in numbers if n <= head})
    return {header.number: header.hash for header in headers_of(source, wanted)}


def find_ancestor(
    source: EvmSource,
    chain: str,
    rows: Sequence[tuple[int, str]],
    head: int,
    *,
    start_block: int,
    cursor_block: int,
    max_reorg_depth: int,
) -> tuple[bool, int | None]:
    """Check stored (number, hash) pairs (newest first) against the node.

    Returns (False, None) when the newest ones still match (no reorg); else (True, the
    highest stored block that is still canonical), or (True, None) when the reorg reaches
    below the first block ever scanned (rescan from ``start_block``). Raises `DeepReorg`
    beyond that."""
    if not rows:
        return False, None
    recent = rows[:RECHECK_BLOCKS]
    node = _canonical(source, [n for n, _ in recent], head)
    if all(node.get(n) == h for n, h in recent):
        return False, None
    floor = cursor_block - max_reorg_depth
    candidates = [(n, h) for n, h in rows if n >= floor]
    for start in range(0, len(candidates), HEADER_BATCH):
        batch = candidates[start : start + HEADER_BATCH]
        node = _canonical(source, [n for n, _ in batch], head)
        for number, block_hash in batch:
            if node.get(number) == block_hash:
                return True, number
    if start_block > floor:
        return True, None
    raise DeepReorg(
        f"{chain}: no stored block in the last {max_reorg_depth} below block {cursor_block} "
        "is still canonical; the reorg is deeper than max_reorg_depth. The cursor is not "
        "moved: check the node, then raise max_reorg_depth or reset the cursor by hand"
    )


def roll_back(
    sessions: sessionmaker[Session],
    source: EvmSource,
    sink: DepositSink,
    *,
    chain: str,
    cursor_key: str,
    expected_cursor: int | None,
    ancestor: int | None,
    head: int,
) -> Rollback:
    """Move the cursor back to ``ancestor`` (None: before the first block), forget the
    abandoned block hashes and orphan the deposits whose block is no longer canonical,
    all in one transaction."""
    above = -1 if ancestor is None else ancestor
    with sessions() as session:
        numbers = session.scalars(
            select(Deposit.block_number)
            .where(
                Deposit.chain == chain,
                Deposit.block_number > above,
                Deposit.status != DepositStatus.ORPHANED,
            )
            .distinct()
        ).all()
    canonical = _canonical(source, numbers, head)
    orphaned = 0
    with sessions() as session, session.begin():
        cursor = get_cursor(session, chain, cursor_key, lock=True)
        if cursor.block_number != expected_cursor:
            raise CursorMoved(f"{chain}: cursor moved during reorg handling; retry next poll")
        deposits = session.scalars(
            select(Deposit)
            .where(
                Deposit.chain == chain,
                Deposit.block_number > above,
                Deposit.status != DepositStatus.ORPHANED,
            )
            .order_by(Deposit.id)
            .with_for_update()
        ).all()
        for deposit in deposits:
            if canonical.get(deposit.block_number) == deposit.block_hash:
                continue
            if deposit.credited and not deposit.reversed:
                CREDITED_ORPHANED.labels(chain).inc()
                log.error(
                    "credited_deposit_orphaned",
                    chain=chain,
                    tx_hash=deposit.tx_hash,
                    log_index=deposit.log_index,
                    block_number=deposit.block_number,
                    amount_base_units=deposit.amount,
                )
            sink.orphaned(session, deposit)
            orphaned += 1
        session.execute(
            delete(ChainBlock).where(ChainBlock.chain == chain, ChainBlock.block_number > above)
        )
        ancestor_hash = None
        if ancestor is not None:
            ancestor_hash = session.scalar(
                select(ChainBlock.block_hash).where(
                    ChainBlock.chain == chain, ChainBlock.block_number == ancestor
                )
            )
        cursor.block_number = ancestor
        cursor.block_hash = ancestor_hash
    REORGS.labels(chain).inc()
    log.warning(
        "reorg_rolled_back",
        chain=chain,
        from_block=expected_cursor,
        to_block=ancestor,
        deposits_orphaned=orphaned,
    )
    return Rollback(from_block=expected_cursor, to_block=ancestor, orphaned=orphaned)


def rewind_below(session: Session, chain: str, cursor_key: str, block_number: int) -> None:
    """Make the next scan start at or before ``block_number`` (the confirmation step found
    a deposit there whose block is gone), in the caller's transaction."""
    cursor = get_cursor(session, chain, cursor_key, lock=True)
    if cursor.block_number is None or cursor.block_number < block_number:
        return
    session.execute(
        delete(ChainBlock).where(ChainBlock.chain == chain, ChainBlock.block_number >= block_number)
    )
    below = session.scalars(
        select(ChainBlock)
        .where(ChainBlock.chain == chain, ChainBlock.block_number < block_number)
        .order_by(ChainBlock.block_number.desc())
        .limit(1)
    ).one_or_none()
    cursor.block_number = below.block_number if below is not None else block_number - 1
    cursor.block_hash = below.block_hash if below is not None else None
    log.warning("cursor_rewound", chain=chain, block_number=cursor.block_number)


def check_linkage(
    headers: Sequence[BlockHeader], end: BlockHeader, parent_hash: str | None
) -> str | None:
    """Why ``headers`` (consecutive, ending at ``end``'s block) do not form one chain
    hanging off ``parent_hash``; None when they do."""
    if not headers:
        return None
    if headers[-1].hash != end.hash:
        return f"block {end.number} changed between the log query and the header query"
    if parent_hash is not None and headers[0].parent_hash != parent_hash:
        return f"block {headers[0].number} does not extend the last scanned block"
    for previous, current in itertools.pairwise(headers):
        if current.parent_hash != previous.hash:
            return f"block {current.number} does not extend block {previous.number}"
    return None
