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
from escrowd.indexer.errors import NodeBehind
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


class NodeLagging(NodeBehind):
    """The node's head is below blocks escrowd already scanned: a replica that lags (or a
    reorg onto a chain not yet as long as ours), never taken for a reorg. The poll is
    skipped; ``blocks`` is how far the node is behind what was scanned."""

    def __init__(self, message: str, *, head: int, scanned: int) -> None:
        super().__init__(message)
        self.head = head
        self.scanned = scanned

    @property
    def blocks(self) -> int:
        return self.scanned - self.head


class ReadsDisagree(NodeBehind):
    """Two reads of the same blocks answered different hashes (replicas on different forks
    behind one URL): nothing is rolled back on it; the next poll looks again."""


@dataclass(frozen=True)
class HeadCheck:
    """The node's head and whether the blocks scanned are still its chain; ``ancestor`` is
    the newest stored block still canonical after a reorg (None: rescan from the start)."""

    head: int
    reorged: bool = False
    ancestor: int | None = None


def check_head(
    source: EvmSource,
    chain: str,
    rows: Sequence[tuple[int, str]],
    *,
    scanned: int | None,
    start_block: int,
    max_reorg_depth: int,
) -> HeadCheck:
    """Read the head and the newest stored blocks (``rows``, newest first) from one node in
    one request. Only a changed block hash, read twice the same way from a node at least as
    far as ``scanned``, is a reorg: a node below ``scanned`` raises `NodeLagging`, a block
    it answers null for `NodeBehind`, two reads that differ `ReadsDisagree`. A head below
    ``scanned`` is read once more before the poll is given up as lagging."""
    recent = list(rows[:RECHECK_BLOCKS])
    numbers = [n for n, _ in recent]
    head, node = source.head_with_headers(numbers)
    if scanned is not None and head < scanned:
        # Behind a load balancer the next request may reach another replica: ask once more.
        head, node = source.head_with_headers(numbers)
        check_not_behind(chain, head, scanned)
    if all(h is not None and h.hash == stored for h, (_, stored) in zip(node, recent, strict=True)):
        return HeadCheck(head)
    missing = [n for h, n in zip(node, numbers, strict=True) if h is None]
    if missing:
        raise NodeBehind(f"{chain}: node at head {head} answered null for block {missing[0]}")
    again_head, again = source.head_with_headers(numbers)
    check_not_behind(chain, again_head, scanned)
    if any(b is None or a is None or a.hash != b.hash for a, b in zip(node, again, strict=True)):
        raise ReadsDisagree(
            f"{chain}: two reads of blocks {numbers[-1]}-{numbers[0]} answered different "
            "hashes (replicas on different forks?); nothing rolled back, retrying next poll"
        )
    floor = (scanned if scanned is not None else start_block) - max_reorg_depth
    ancestor = find_ancestor(
        source, chain, rows, min(head, again_head), start_block=start_block, floor_block=floor
    )
    return HeadCheck(min(head, again_head), reorged=True, ancestor=ancestor)


def check_not_behind(chain: str, head: int, scanned: int | None) -> None:
    if scanned is not None and head < scanned:
        raise NodeLagging(
            f"{chain}: node head {head} is below block {scanned} already scanned (a lagging "
            "replica); poll skipped, nothing rolled back",
            head=head,
            scanned=scanned,
        )


def find_ancestor(
    source: EvmSource,
    chain: str,
    rows: Sequence[tuple[int, str]],
    head: int,
    *,
    start_block: int,
    floor_block: int,
) -> int | None:
    """The highest stored block (``rows`` newest first) the node still has with the same
    hash, or None when the reorg reaches below the first block ever scanned (rescan from
    ``start_block``). Raises `DeepReorg` when nothing at or above ``floor_block`` is."""
    candidates = [(n, h) for n, h in rows if n >= floor_block]
    for start in range(0, len(candidates), HEADER_BATCH):
        batch = candidates[start : start + HEADER_BATCH]
        node = _canonical(source, [n for n, _ in batch], head)
        for number, block_hash in batch:
            if node.get(number) == block_hash:
                return number
    if start_block > floor_block:
        return None
    raise DeepReorg(
        f"{chain}: no stored block at or above {floor_block} is still canonical; the reorg "
        "is deeper than max_reorg_depth. The cursor is not moved: check the node, then raise "
        "max_reorg_depth or reset the cursor by hand"
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
    """Forget the block hashes above ``ancestor`` (None: every one), move the cursor back
    to it if it is above, and orphan the deposits up to ``head`` whose block is no longer
    canonical, all in one transaction."""
    above = -1 if ancestor is None else ancestor
    with sessions() as session:
        numbers = session.scalars(
            select(Deposit.block_number)
            .where(
                Deposit.chain == chain,
                Deposit.block_number > above,
                Deposit.block_number <= head,
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
                Deposit.block_number <= head,
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
        if ancestor is None or (cursor.block_number is not None and ancestor < cursor.block_number):
            # The reorg reached below what was verified: scan again from the ancestor.
            cursor.block_number = ancestor
            cursor.block_hash = None
            if ancestor is not None:
                cursor.block_hash = session.scalar(
                    select(ChainBlock.block_hash).where(
                        ChainBlock.chain == chain, ChainBlock.block_number == ancestor
                    )
                )
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
