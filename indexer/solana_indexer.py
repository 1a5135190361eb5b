"""Solana deposit indexer: finds SOL and SPL-USDC deposits at `confirmed`, credits them
once at `finalized`.

Two scanning strategies behind one poller, chosen by the number of watched addresses:

- per-address (few addresses): ``getSignaturesForAddress`` for each deposit wallet AND
  its USDC associated token account (an SPL transfer lists the token account, not the
  owner), newest-first pages down to that address's cursor signature, processed
  oldest-first; the address's cursor and its deposits commit together. A transaction
  does not carry its block's hash, so the hash is read once per slot with
  ``getBlock(transactionDetails="none")``.
- block scan (many addresses): ``getBlocks`` from the chain cursor to the confirmed slot,
  ``getBlock`` each (skipped slots passed over; a block not available yet stops the scan
  there until the next poll); the watched set is an in-memory dict, so a poll costs the
  same with a thousand or a million addresses. Cursor and deposits commit per batch.

Both strategies feed the same pure extraction (``indexer.solana_deposits``) and the same
``record_deposit`` (insert-once on (chain, signature, index)), so they find the same
deposits. ``confirm_once`` checks pending deposits at or below the finalized slot with
``getSignatureStatuses``: finalized and successful -> ``sink.confirmed`` (the one
crediting function); unknown to the node or failed -> ``sink.orphaned``.

Known difference: per-address watching sees USDC only through the deposit address's
associated token account; USDC sent to some other token account the wallet owns is found
by the block scan alone (attribution is by owner + mint in both).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.indexer.errors import BlockNotAvailable, RpcError, SlotSkipped
from escrowd.indexer.sink import DepositSink, Finalized
from escrowd.indexer.solana_deposits import (
    SOL,
    SOL_DECIMALS,
    USDC,
    USDC_DECIMALS,
    BalanceDeposit,
    extract_deposits,
)
from escrowd.indexer.solana_source import (
    SignatureInfo,
    SolanaBlock,
    SolanaRpcSource,
    SolanaSource,
    SolanaTransaction,
)
from escrowd.indexer.store import FoundDeposit, WatchedAddresses, get_cursor, record_deposits
from escrowd.models import Chain, ChainCursor, Deposit, DepositStatus, utcnow
from escrowd.models.registry import ensure_asset

log = structlog.get_logger(__name__)

Strategy = Literal["per_address", "block_scan"]
PER_ADDRESS: Strategy = "per_address"
BLOCK_SCAN: Strategy = "block_scan"

# getSignatureStatuses accepts at most 256 signatures per call.
STATUS_BATCH = 256

SLOTS_BEHIND = Gauge(
    "escrowd_solana_slots_behind",
    "Confirmed slot minus the slot the Solana indexer has scanned through.",
    ["chain"],
)
DEPOSITS_FOUND = Counter(
    "escrowd_solana_deposits_found_total",
    "New Solana deposits recorded as pending.",
    ["chain", "asset"],
)
RPC_ERRORS = Counter(
    "escrowd_solana_rpc_errors_total",
    "Solana indexer polls or confirmation steps abandoned on an RPC failure.",
    ["chain"],
)
POLL_SECONDS = Histogram(
    "escrowd_solana_poll_duration_seconds",
    "Wall time of one Solana indexer poll.",
    ["chain", "strategy"],
)


@dataclass
class PollResult:
    strategy: Strategy
    deposits_found: int = 0
    transactions_fetched: int = 0
    blocks_scanned: int = 0
    scanned_through_slot: int | None = None
    error: str | None = None


@dataclass
class ConfirmResult:
    finalized_slot: int | None = None
    confirmed: int = 0
    orphaned: int = 0
    waiting: int = 0
    error: str | None = None


@dataclass(frozen=True)
class _Outcome:
    """What the finalized chain says about one pending signature."""

    kind: Literal["confirm", "orphan", "wait"]
    slot: int | None = None
    block_hash: str | None = None
    # Set when the transaction was finalized in a different slot than we recorded (it
    # landed again after its first block was dropped): the deposits it holds there.
    relanded: frozenset[tuple[int, int]] | None = None


def rpc_source(settings: SolanaSettings) -> SolanaRpcSource:
    """The JSON-RPC source for `settings`: its URLs in failover order, its timeout, and
    `rpc_max_retries` retry rounds with backoff after the first."""
    return SolanaRpcSource(
        settings.rpc_urls,
        timeout_s=settings.rpc_timeout_s,
        max_rounds=settings.rpc_max_retries + 1,
    )


class SolanaPoller:
    """Scans one Solana cluster for deposits to the watched addresses."""

    def __init__(
        self,
        settings: SolanaSettings,
        source: SolanaSource,
        sessions: sessionmaker[Session],
        sink: DepositSink,
        *,
        blocks_per_commit: int = 50,
        max_slots_per_poll: int = 10_000,
        max_confirm_per_step: int = 5_000,
    ) -> None:
        assert blocks_per_commit >= 1 and max_slots_per_poll >= 1 and max_confirm_per_step >= 1
        self.settings = settings
        self.chain = settings.name
        self.source = source
        self.sessions = sessions
        self.sink = sink
        self.blocks_per_commit = blocks_per_commit
        self.max_slots_per_poll = max_slots_per_poll
        self.max_confirm_per_step = max_confirm_per_step
        # Deposit addresses belong to the chain family; one Solana key serves any cluster.
        self.watched = WatchedAddresses(Chain.SOLANA, normalize=False)
        self._asset_ids: dict[str, int] = {}

    # ---- public steps ----------------------------------------------------------------

    def strategy(self) -> Strategy:
        many = len(self.watched) >= self.settings.block_scan_threshold
        return BLOCK_SCAN if many else PER_ADDRESS

    def step(self) -> tuple[PollResult, ConfirmResult]:
        return self.poll_once(), self.confirm_once()

    def poll_once(self) -> PollResult:
        """Find new deposits up to the confirmed slot and record them as pending."""
        started = time.perf_counter()
        self._prepare()
        result = PollResult(self.strategy())
        try:
            confirmed_slot = self.source.get_slot("confirmed")
            if result.strategy == BLOCK_SCAN:
                self._scan_blocks(confirmed_slot, result)
            else:
                self._scan_addresses(confirmed_slot, result)
        except RpcError as exc:
            RPC_ERRORS.labels(self.chain).inc()
            result.error = str(exc)
            log.warning("poll_failed", chain=self.chain, strategy=result.strategy, error=str(exc))
        finally:
            POLL_SECONDS.labels(self.chain, result.strategy).observe(time.perf_counter() - started)
        return result

    def confirm_once(self) -> ConfirmResult:
        """Credit pending deposits the cluster has finalized; orphan those it dropped."""
        result = ConfirmResult()
        try:
            finalized_slot = self.source.get_slot("finalized")
            result.finalized_slot = finalized_slot
            with self._transaction() as session:
                signatures = list(
                    dict.fromkeys(
                        session.scalars(
                            select(Deposit.tx_hash)
                            .where(
                                Deposit.chain == self.chain,
                                Deposit.status == DepositStatus.PENDING,
                                Deposit.block_number <= finalized_slot,
                            )
                            .order_by(Deposit.block_number, Deposit.id)
                            .limit(self.max_confirm_per_step)
                        )
                    )
                )
            # Every status first, then one transaction: the sink credits the step together.
            outcomes: dict[str, _Outcome] = {}
            for start in range(0, len(signatures), STATUS_BATCH):
                outcomes.update(self._outcomes(signatures[start : start + STATUS_BATCH]))
            if outcomes:
                self._apply_outcomes(outcomes, result)
        except RpcError as exc:
            RPC_ERRORS.labels(self.chain).inc()
            result.error = str(exc)
            log.warning("confirm_failed", chain=self.chain, error=str(exc))
        return result

    # ---- shared ----------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[Session]:
        with self.sessions() as session, session.begin():
            yield session

    def _prepare(self) -> None:
        with self._transaction() as session:
            if not self._asset_ids:
                sol = ensure_asset(
                    session, chain=self.chain, symbol=SOL, decimals=SOL_DECIMALS, token_address=None
                )
                usdc = ensure_asset(
                    session,
                    chain=self.chain,
                    symbol=USDC,
                    decimals=USDC_DECIMALS,
                    token_address=self.settings.usdc_mint,
                )
                session.flush()
                self._asset_ids = {SOL: sol.id, USDC: usdc.id}
            self.watched.refresh(session)

    def _is_watched_wallet(self, address: str) -> bool:
        # The watched map also holds token accounts; only the wallet itself earns SOL
        # deposits (a token account's lamports are its rent, not the agent's money).
        watched = self.watched.get(address)
        return watched is not None and watched.address == address

    def _extract(self, tx: SolanaTransaction) -> list[BalanceDeposit]:
        return extract_deposits(tx, self._is_watched_wallet, self.settings.usdc_mint)

    def _record(
        self, session: Session, deposits: Sequence[BalanceDeposit], block_hashes: dict[int, str]
    ) -> dict[str, int]:
        """Store each deposit once (bulk, insert-once); returns new deposits per asset."""
        found: dict[str, list[FoundDeposit]] = {SOL: [], USDC: []}
        for deposit in deposits:
            watched = self.watched.get(deposit.owner)
            assert watched is not None and watched.address == deposit.owner
            found[deposit.symbol].append(
                FoundDeposit(
                    tx_hash=deposit.signature,
                    log_index=deposit.index,
                    asset_id=self._asset_ids[deposit.symbol],
                    watched=watched,
                    from_address=deposit.from_address,
                    amount=deposit.amount_base_units,
                    block_number=deposit.slot,
                    block_hash=block_hashes[deposit.slot],
                )
            )
        return {
            symbol: record_deposits(session, self.chain, items, self.sink)
            for symbol, items in found.items()
        }

    def _count_new(self, new: dict[str, int], result: PollResult, last_slot: int) -> None:
        # Called after the commit, so a rolled-back batch is not counted.
        for symbol, count in new.items():
            DEPOSITS_FOUND.labels(self.chain, symbol).inc(count)
        total = sum(new.values())
        if total:
            log.info(
                "deposits_recorded",
                chain=self.chain,
                sol=new.get(SOL, 0),
                usdc=new.get(USDC, 0),
                through_slot=last_slot,
            )
        result.deposits_found += total

    def _set_behind(self, confirmed_slot: int, scanned_through: int) -> None:
        behind = max(0, confirmed_slot - scanned_through)
        SLOTS_BEHIND.labels(self.chain).set(behind)
        if behind > self.settings.max_lag_slots:
            log.warning(
                "indexer_lagging",
                chain=self.chain,
                slots_behind=behind,
                max_lag_slots=self.settings.max_lag_slots,
            )

    # ---- block scan ------------------------------------------------------------------

    def _scan_blocks(self, confirmed_slot: int, result: PollResult) -> None:
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain)
            position = cursor.block_number
        start = self.settings.start_slot if position is None else position + 1
        if start > confirmed_slot:
            result.scanned_through_slot = start - 1
            self._set_behind(confirmed_slot, start - 1)
            return
        end = min(confirmed_slot, start + self.max_slots_per_poll - 1)
        slots = self.source.get_blocks(start, end, "confirmed")
        for batch_start in range(0, max(len(slots), 1), self.blocks_per_commit):
            batch = slots[batch_start : batch_start + self.blocks_per_commit]
            blocks: list[SolanaBlock] = []
            through = end if batch_start + self.blocks_per_commit >= len(slots) else batch[-1]
            for slot in batch:
                try:
                    blocks.append(self.source.get_block(slot, "confirmed"))
                except SlotSkipped:
                    continue
                except BlockNotAvailable:
                    through = slot - 1
                    break
            if not self._commit_blocks(position, through, blocks, result):
                return
            position = through
            result.blocks_scanned += len(blocks)
            result.scanned_through_slot = through
            self._set_behind(confirmed_slot, through)
            if batch and through < batch[-1]:
                return  # a block was not available yet: resume there next poll

    def _commit_blocks(
        self, position: int | None, through: int, blocks: list[SolanaBlock], result: PollResult
    ) -> bool:
        scan_start = self.settings.start_slot if position is None else position + 1
        if through < scan_start:
            return False  # the first block was not available: nothing to commit
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, lock=True)
            if cursor.block_number != position:
                # Another instance advanced the cursor meanwhile: its scan wins.
                log.warning("cursor_moved", chain=self.chain, expected=position)
                return False
            deposits: list[BalanceDeposit] = []
            for block in blocks:
                result.transactions_fetched += len(block.transactions)
                for tx in block.transactions:
                    deposits += self._extract(tx)
            hashes = {block.slot: block.blockhash for block in blocks}
            new = self._record(session, deposits, hashes)
            cursor.block_number = through
            if blocks:
                cursor.block_hash = blocks[-1].blockhash
            cursor.updated_at = utcnow()
        self._count_new(new, result, through)
        return True

    # ---- per address -----------------------------------------------------------------

    def _scan_addresses(self, confirmed_slot: int, result: PollResult) -> None:
        with self._transaction() as session:
            cursors: dict[str, str | None] = {
                row.key: row.signature
                for row in session.execute(
                    select(ChainCursor.key, ChainCursor.signature).where(
                        ChainCursor.chain == self.chain, ChainCursor.key != ""
                    )
                )
            }
        # One poll fetches each transaction and block header once, however many watched
        # addresses it touches.
        fetched: dict[str, SolanaTransaction] = {}
        block_hashes: dict[int, str] = {}
        for watched in self.watched.owners():
            for address in (watched.address, watched.token_account):
                if address is not None:
                    self._scan_address(address, cursors.get(address), fetched, block_hashes, result)
        result.scanned_through_slot = confirmed_slot
        self._set_behind(confirmed_slot, confirmed_slot)

    def _new_signatures(self, address: str, until: str | None) -> list[SignatureInfo]:
        """Signatures after `until`, oldest first (the node pages newest first)."""
        limit = self.settings.signatures_page_limit
        infos: list[SignatureInfo] = []
        before: str | None = None
        while True:
            page = self.source.get_signatures_for_address(
                address, before=before, until=until, limit=limit, commitment="confirmed"
            )
            infos += page
            if len(page) < limit:
                break
            before = page[-1].signature
        infos.reverse()
        return infos

    def _scan_address(
        self,
        address: str,
        until: str | None,
        fetched: dict[str, SolanaTransaction],
        block_hashes: dict[int, str],
        result: PollResult,
    ) -> None:
        newest: SignatureInfo | None = None
        deposits: list[BalanceDeposit] = []
        for info in self._new_signatures(address, until):
            if info.err is None:
                tx = fetched.get(info.signature)
                if tx is None:
                    tx = self.source.get_transaction(info.signature, "confirmed")
                    if tx is None:
                        break  # listed but not served yet (lagging replica): resume here
                    fetched[info.signature] = tx
                    result.transactions_fetched += 1
                deposits += self._extract(tx)
            newest = info
        if newest is None:
            return
        for deposit in deposits:
            if deposit.slot not in block_hashes:
                header = self.source.get_block(
                    deposit.slot, "confirmed", transaction_details="none"
                )
                block_hashes[deposit.slot] = header.blockhash
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, address, lock=True)
            if cursor.signature != until:
                log.warning("cursor_moved", chain=self.chain, address=address)
                return
            new = self._record(session, deposits, block_hashes)
            cursor.signature = newest.signature
            cursor.block_number = newest.slot
            cursor.updated_at = utcnow()
        self._count_new(new, result, newest.slot)

    # ---- confirmation ----------------------------------------------------------------

    def _outcomes(self, signatures: Sequence[str]) -> dict[str, _Outcome]:
        statuses = self.source.get_signature_statuses(signatures)
        outcomes: dict[str, _Outcome] = {}
        for signature, status in zip(signatures, statuses, strict=True):
            if status is None:
                # Ask once more by transaction: a status cache miss must not orphan money.
                tx = self.source.get_transaction(signature, "finalized")
                if tx is None:
                    outcomes[signature] = _Outcome("orphan")
                    continue
                outcomes[signature] = self._finalized_outcome(tx.slot, tx.err)
            elif status.confirmation_status != "finalized":
                outcomes[signature] = _Outcome("wait")
            else:
                outcomes[signature] = self._finalized_outcome(status.slot, status.err)
        return outcomes

    @staticmethod
    def _finalized_outcome(slot: int, err: object) -> _Outcome:
        if err is not None:
            return _Outcome("orphan")
        return _Outcome("confirm", slot=slot)

    def _apply_outcomes(self, outcomes: dict[str, _Outcome], result: ConfirmResult) -> None:
        with self._transaction() as session:
            pending = session.scalars(
                select(Deposit)
                .where(
                    Deposit.chain == self.chain,
                    Deposit.tx_hash.in_(list(outcomes)),
                    Deposit.status == DepositStatus.PENDING,
                )
                .order_by(Deposit.id)
                .with_for_update()
            ).all()
            relanded: dict[str, _Outcome] = {}
            final: list[Finalized] = []
            for deposit in pending:
                outcome = outcomes[deposit.tx_hash]
                if outcome.kind == "confirm" and outcome.slot != deposit.block_number:
                    outcome = relanded.get(deposit.tx_hash) or self._relanded(deposit.tx_hash)
                    relanded[deposit.tx_hash] = outcome
                    assert outcome.relanded is not None or outcome.kind != "confirm"
                    if outcome.relanded is not None and (
                        (deposit.log_index, deposit.amount) not in outcome.relanded
                    ):
                        outcome = _Outcome("orphan")
                if outcome.kind == "wait":
                    result.waiting += 1
                elif outcome.kind == "orphan":
                    self.sink.orphaned(session, deposit)
                    result.orphaned += 1
                    log.warning(
                        "deposit_orphaned",
                        chain=self.chain,
                        tx_hash=deposit.tx_hash,
                        index=deposit.log_index,
                        slot=deposit.block_number,
                    )
                else:
                    if outcome.slot is not None and outcome.slot != deposit.block_number:
                        assert outcome.block_hash is not None
                        deposit.block_number = outcome.slot
                        deposit.block_hash = outcome.block_hash
                        session.flush()
                    final.append(Finalized(deposit.id, deposit.block_hash))
            result.confirmed += self.sink.confirmed_many(session, final)

    def _relanded(self, signature: str) -> _Outcome:
        """The transaction is finalized in another slot than the one we recorded: read
        it there and keep only the deposits it still holds."""
        tx = self.source.get_transaction(signature, "finalized")
        if tx is None or not tx.succeeded:
            return _Outcome("wait" if tx is None else "orphan")
        header = self.source.get_block(tx.slot, "finalized", transaction_details="none")
        held = frozenset((d.index, d.amount_base_units) for d in self._extract(tx))
        return _Outcome("confirm", slot=tx.slot, block_hash=header.blockhash, relanded=held)
