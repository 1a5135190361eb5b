"""The confirmation step: a pending EVM deposit is credited once it is `confirmations`
blocks deep and its block hash is still the canonical one at that moment. It is orphaned
only when two reads of its block agree on another hash: a replica on a stale fork behind
a load balancer, answering once, orphans nothing."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import structlog
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.reorg import headers_of, rewind_below
from escrowd.indexer.sink import DepositSink, Finalized
from escrowd.models import Deposit, DepositStatus

log = structlog.get_logger(__name__)

# Deposits confirmed per database transaction (credited together by the sink, set-based):
# bounds the transaction, not the work.
CONFIRM_BATCH = 10_000


@dataclass(frozen=True)
class ConfirmResult:
    head: int
    confirmed: int
    orphaned: int


def confirm_once(
    sessions: sessionmaker[Session],
    source: EvmSource,
    sink: DepositSink,
    *,
    chain: str,
    confirmations: int,
    cursor_key: str = "",
    batch: int = CONFIRM_BATCH,
) -> ConfirmResult:
    """Confirm (credit) or orphan every pending deposit at least ``confirmations`` deep.

    Each batch: one batched header fetch, then one transaction in which the deposits'
    status changes and their credits (by the sink, together) commit. RPC errors propagate
    before anything is written."""
    head = source.head()
    deepest = head - confirmations
    confirmed = orphaned = 0
    last_id = 0
    while True:
        with sessions() as session:
            rows = session.execute(
                select(Deposit.id, Deposit.block_number, Deposit.block_hash)
                .where(
                    Deposit.chain == chain,
                    Deposit.status == DepositStatus.PENDING,
                    Deposit.block_number <= deepest,
                    Deposit.id > last_id,
                )
                .order_by(Deposit.id)
                .limit(batch)
            ).all()
        if not rows:
            break
        last_id = rows[-1].id
        numbers = sorted({row.block_number for row in rows})
        canonical = {header.number: header.hash for header in headers_of(source, numbers)}
        _drop_unconfirmed_changes(
            source, chain, canonical, [(r.block_number, r.block_hash) for r in rows]
        )
        # A block left out of `canonical` was read two ways: neither credit nor orphan yet.
        replaced = [
            row
            for row in rows
            if row.block_number in canonical and canonical[row.block_number] != row.block_hash
        ]
        # Orphans first, in a transaction of their own: each transaction then locks its
        # deposits in id order, as the reorg rollback does.
        if replaced:
            with sessions() as session, session.begin():
                for row in replaced:
                    deposit = session.get(Deposit, row.id, with_for_update=True)
                    if (
                        deposit is None
                        or deposit.status != DepositStatus.PENDING
                        or deposit.block_hash != row.block_hash
                    ):
                        continue
                    log.warning(
                        "deposit_block_replaced",
                        chain=chain,
                        tx_hash=deposit.tx_hash,
                        block_number=deposit.block_number,
                    )
                    sink.orphaned(session, deposit)
                    rewind_below(session, chain, cursor_key, deposit.block_number)
                    orphaned += 1
        final = [
            Finalized(row.id, row.block_hash)
            for row in rows
            if canonical.get(row.block_number) == row.block_hash
        ]
        with sessions() as session, session.begin():
            # Only those still pending at these hashes: another instance (or the poller's
            # reorg handling) may have got here first.
            confirmed += sink.confirmed_many(session, final)
        if len(rows) < batch:
            break
    if confirmed or orphaned:
        log.info("deposits_confirmed", chain=chain, confirmed=confirmed, orphaned=orphaned)
    return ConfirmResult(head=head, confirmed=confirmed, orphaned=orphaned)


def _drop_unconfirmed_changes(
    source: EvmSource, chain: str, canonical: dict[int, str], blocks: Sequence[tuple[int, str]]
) -> None:
    """Read again, in one request, the blocks whose hash differs from a deposit's (``blocks``:
    (number, hash) of the deposits); keep in ``canonical`` only the changes the second read
    repeats (the others wait for a later tick)."""
    changed = sorted({number for number, block_hash in blocks if canonical[number] != block_hash})
    if not changed:
        return
    _, again = source.head_with_headers(changed)
    for number, header in zip(changed, again, strict=True):
        if header is None or header.hash != canonical[number]:
            log.warning("deposit_block_reads_disagree", chain=chain, block_number=number)
            del canonical[number]
