"""Solana deposit indexer: finds SOL and SPL-USDC deposits at `confirmed`, credits them
once at `finalized`.

Deposit accounts, one policy for both modes: a watched wallet's own lamports (SOL), and
every token account of the USDC mint whose owner is a watched wallet (USDC): its
associated token account or any other, attributed by owner + mint (``solana_deposits``).

Two scanning strategies, chosen by the number of watched wallets (`block_scan_threshold`):

- per-address: one poll reads every watched account's state with ``getMultipleAccounts``
  (100 accounts a call, at confirmed, never older than the last answer: minContextSlot)
  and pages ``getSignaturesForAddress`` only for the accounts whose state differs from the
  one their cursor was verified at, or that a payout left from recently (an outflow and a
  deposit of the same amount would leave the state as it was). Pages overlap by one
  signature, so a replica that answers ``[]`` for a `before` it lacks is caught. Each
  wallet's token accounts are listed with ``getTokenAccountsByOwner`` in rotation (all
  within `token_account_rescan_s`), which finds token accounts other than the ATA. An
  account's deposits, signature cursor and state commit together.
- block scan: ``getBlocks`` from the chain cursor to the confirmed slot, ``getBlock``
  (accounts details) each; every block must name the block before it as its parent. A
  block the list left out is fetched; a parent the scan did not see is a fork, and the
  cursor goes back to the finalized slot. A slot the list named is never passed over on
  the node's word that it was skipped. Cursor and deposits commit per batch.

The chain cursor (key "") always means "every watched account verified through this
slot": a first start sets it to the current finalized slot (or `start_slot`, refused
below the node's first available block); the per-address mode moves it after a poll that
verified every account; the block scan continues from it, so crossing the threshold goes
on where the per-address polls stood. Every poll reads the confirmed slot before the
watched addresses, so an address added meanwhile cannot receive in a slot already passed.

``confirm_once`` credits pending deposits the cluster has finalized. A null status and a
null ``getTransaction`` are not taken as an answer: the deposit's finalized block is read
(if it holds the signature, the deposit is confirmed from it), and a deposit is orphaned
only when its block is known skipped, more than a blockhash lifetime of blocks has been
finalized after it (the transaction can no longer land anywhere), and it was absent on two
reads at different finalized slots.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.indexer.errors import (
    BlockNotAvailable,
    HistoryPruned,
    NodeBehind,
    RpcError,
    RpcUnavailable,
    SlotSkipped,
)
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
    MAX_MULTIPLE_ACCOUNTS,
    AccountState,
    CallCounter,
    SignatureInfo,
    SolanaBlock,
    SolanaRpcSource,
    SolanaSource,
    SolanaTransaction,
)
from escrowd.indexer.store import FoundDeposit, WatchedAddresses, get_cursor, record_deposits
from escrowd.models import (
    Chain,
    ChainCursor,
    Deposit,
    DepositAddress,
    DepositStatus,
    Payout,
    utcnow,
)
from escrowd.models.registry import ensure_asset

log = structlog.get_logger(__name__)

Strategy = Literal["per_address", "block_scan"]
PER_ADDRESS: Strategy = "per_address"
BLOCK_SCAN: Strategy = "block_scan"

# getSignatureStatuses accepts at most 256 signatures per call.
STATUS_BATCH = 256
# A transaction's blockhash is usable for 150 blocks after its own (MAX_PROCESSING_AGE);
# once more blocks than this are finalized after the slot it was seen in, it can no
# longer land anywhere.
BLOCKHASH_EXPIRY_BLOCKS = 152
# An SPL token account's amount (u64 at byte 64): with lamports, its state for polling.
TOKEN_AMOUNT_SLICE = (64, 8)
ABSENT = "absent"
# A payout from a deposit wallet that changed after its accounts were last verified (less
# this margin: the clocks of different hosts may disagree) forces a check of them.
OUTFLOW_MARGIN = timedelta(minutes=5)

SLOTS_BEHIND = Gauge(
    "escrowd_solana_slots_behind",
    "Confirmed slot minus the slot the Solana indexer has verified every account through.",
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
SCAN_STOPS = Counter(
    "escrowd_solana_scan_stops_total",
    "Solana scans that stopped short (the cursor stays; the next poll retries), by reason: "
    "node_behind, history_incomplete, transaction_unavailable, block_unavailable, "
    "history_pruned, listed_block_skipped, fork, cursor_moved.",
    ["chain", "reason"],
)
UNANSWERED_STATUS = Counter(
    "escrowd_solana_unanswered_status_total",
    "Pending Solana deposits the node answered null for (status and transaction), by what "
    "was decided: confirmed_from_block, waiting (not final yet), orphaned.",
    ["chain", "outcome"],
)
POLL_SECONDS = Histogram(
    "escrowd_solana_poll_duration_seconds",
    "Wall time of one Solana indexer poll.",
    ["chain", "strategy"],
)
POLL_REQUESTS = Histogram(
    "escrowd_solana_poll_rpc_requests",
    "JSON-RPC requests one Solana indexer poll sent (retries included).",
    ["chain", "strategy"],
    buckets=(2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000),
)


class HistoryIncomplete(RpcError):
    """A getSignaturesForAddress page did not continue the previous one (a replica that
    lacks the `before` signature answers []): the history cannot be taken as complete."""


@dataclass
class PollResult:
    strategy: Strategy
    deposits_found: int = 0
    transactions_fetched: int = 0
    blocks_scanned: int = 0
    accounts_checked: int = 0
    scanned_through_slot: int | None = None
    rpc_requests: int | None = None
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


def _fingerprint(account: AccountState | None) -> str:
    """An account's state as far as deposits go: lamports and the token amount bytes."""
    if account is None:
        return ABSENT
    return f"{account.lamports}:{account.data.hex()}"


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
        # The newest context slot an answer had: later answers must not be older.
        self._context_floor = 0
        self._rotation = 0
        # Pending signatures found absent after their blockhash expired, and the
        # finalized slot of that read: a second read at a later slot makes it final.
        self._absent_since: dict[str, int] = {}

    # ---- public steps ----------------------------------------------------------------

    def strategy(self) -> Strategy:
        many = len(self.watched) >= self.settings.block_scan_threshold
        return BLOCK_SCAN if many else PER_ADDRESS

    def step(self) -> tuple[PollResult, ConfirmResult]:
        return self.poll_once(), self.confirm_once()

    def poll_once(self) -> PollResult:
        """Find new deposits up to the confirmed slot and record them as pending."""
        started = time.perf_counter()
        calls: CallCounter | None = getattr(self.source, "calls", None)
        calls_before = calls.total() if calls is not None else 0
        result = PollResult(self.strategy())
        try:
            # Before the watched set is refreshed: see the module docstring.
            confirmed_slot = self.source.get_slot(
                "confirmed", min_context_slot=self._context_floor or None
            )
            self._context_floor = max(self._context_floor, confirmed_slot)
            self._prepare()
            result.strategy = self.strategy()
            position = self._chain_position()
            if result.strategy == BLOCK_SCAN:
                self._scan_blocks(position, confirmed_slot, result)
            else:
                self._scan_addresses(position, confirmed_slot, result)
        except RpcError as exc:
            RPC_ERRORS.labels(self.chain).inc()
            result.error = str(exc)
            if isinstance(exc, NodeBehind):
                SCAN_STOPS.labels(self.chain, "node_behind").inc()
            elif isinstance(exc, HistoryPruned):
                SCAN_STOPS.labels(self.chain, "history_pruned").inc()
            log.warning(
                "poll_failed",
                chain=self.chain,
                strategy=result.strategy,
                error=str(exc),
                kind=type(exc).__name__,
            )
        finally:
            POLL_SECONDS.labels(self.chain, result.strategy).observe(time.perf_counter() - started)
            if calls is not None:
                result.rpc_requests = calls.total() - calls_before
                POLL_REQUESTS.labels(self.chain, result.strategy).observe(result.rpc_requests)
        return result

    def confirm_once(self) -> ConfirmResult:
        """Credit pending deposits the cluster has finalized; orphan those it dropped."""
        result = ConfirmResult()
        try:
            finalized_slot = self.source.get_slot("finalized")
            result.finalized_slot = finalized_slot
            with self._transaction() as session:
                pending = session.execute(
                    select(Deposit.tx_hash, Deposit.block_number, Deposit.block_hash)
                    .where(
                        Deposit.chain == self.chain,
                        Deposit.status == DepositStatus.PENDING,
                        Deposit.block_number <= finalized_slot,
                    )
                    .order_by(Deposit.block_number, Deposit.id)
                    .limit(self.max_confirm_per_step)
                ).all()
            seen_at: dict[str, tuple[int, str]] = {}
            for row in pending:
                seen_at.setdefault(row.tx_hash, (row.block_number, row.block_hash))
            signatures = list(seen_at)
            # Every status first, then one transaction: the sink credits the step together.
            outcomes: dict[str, _Outcome] = {}
            for start in range(0, len(signatures), STATUS_BATCH):
                chunk = signatures[start : start + STATUS_BATCH]
                outcomes.update(self._outcomes(chunk, seen_at, finalized_slot))
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

    def _chain_position(self) -> int:
        """The chain cursor's slot, set on a first start (module docstring)."""
        with self._transaction() as session:
            position = get_cursor(session, self.chain).block_number
        if position is not None:
            return position
        block_hash: str | None = None
        start = self.settings.start_slot
        if start is not None:
            first = self.source.get_first_available_block()
            if start < first:
                raise HistoryPruned(
                    f"solana.start_slot {start} is below the first available block {first} "
                    "of the RPC node: that history is gone there; use an archival RPC URL "
                    "or a later start_slot"
                )
            slot = start - 1
        else:
            slot = self.source.get_slot("finalized")
            block_hash = self.source.get_block(
                slot, "finalized", transaction_details="none"
            ).blockhash
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, lock=True)
            if cursor.block_number is None:
                cursor.block_number, cursor.block_hash = slot, block_hash
                cursor.updated_at = utcnow()
                log.info("solana_scan_started", chain=self.chain, after_slot=slot)
            return cursor.block_number

    def _stop(self, reason: str, **fields: object) -> None:
        SCAN_STOPS.labels(self.chain, reason).inc()
        log.warning("scan_stopped", chain=self.chain, reason=reason, **fields)

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

    def _scan_blocks(self, position: int, confirmed_slot: int, result: PollResult) -> None:
        result.scanned_through_slot = position
        try:
            self._scan_blocks_from(position, confirmed_slot, result)
        finally:
            self._set_behind(confirmed_slot, result.scanned_through_slot)

    def _scan_blocks_from(self, position: int, confirmed_slot: int, result: PollResult) -> None:
        with self._transaction() as session:
            position_hash = get_cursor(session, self.chain).block_hash
        if position >= confirmed_slot:
            return
        if position_hash is None and position >= 0:
            # Left by the per-address mode (or start_slot): the block there, if any, is
            # what the first scanned block must name as its parent.
            try:
                position_hash = self.source.get_block(
                    position, "confirmed", transaction_details="none"
                ).blockhash
            except (SlotSkipped, HistoryPruned):
                position_hash = None  # no block there (start_slot - 1): nothing to link to
        end = min(confirmed_slot, position + self.max_slots_per_poll)
        # The node may list fewer slots than asked (it caps long ranges): scan those.
        queue = deque(self.source.get_blocks(position + 1, end, "confirmed"))
        if not queue:
            # No block at all up to the end: pruned history answers [] too.
            first = self.source.get_first_available_block()
            if first > position + 1:
                raise HistoryPruned(
                    f"the RPC node's history starts at slot {first}, after the cursor "
                    f"({position}): deposits in between cannot be verified there; add an "
                    "archival RPC URL"
                )
        through, through_hash = position, position_hash
        batch: list[SolanaBlock] = []
        unreadable: set[int] = set()
        while queue:
            slot = queue.popleft()
            try:
                block = self.source.get_block(slot, "confirmed", transaction_details="accounts")
            except SlotSkipped:
                # Listed, yet "skipped": believed only if the next block's parent passes it.
                unreadable.add(slot)
                continue
            except (BlockNotAvailable, HistoryPruned) as exc:
                reason = "history_pruned" if isinstance(exc, HistoryPruned) else "block_unavailable"
                self._stop(reason, slot=slot, error=str(exc))
                break
            if through_hash is not None and block.parent_slot >= block.slot:
                self._stop("fork", slot=slot, parent_slot=block.parent_slot)
                break  # a block cannot descend from a later one: not an answer to trust
            if through_hash is not None and block.parent_slot > through:
                if block.parent_slot in unreadable:
                    self._stop("listed_block_skipped", slot=block.parent_slot)
                    break
                # A block between that the list left out: read it first.
                queue.appendleft(slot)
                queue.appendleft(block.parent_slot)
                continue
            if through_hash is not None and (
                block.parent_slot != through or block.previous_blockhash != through_hash
            ):
                self._commit_blocks(position, through, through_hash, batch, result)
                self._rewind(through, block)
                return
            batch.append(block)
            through, through_hash = block.slot, block.blockhash
            if len(batch) >= self.blocks_per_commit:
                if not self._commit_blocks(position, through, through_hash, batch, result):
                    return
                position, batch = through, []
        self._commit_blocks(position, through, through_hash, batch, result)

    def _commit_blocks(
        self,
        position: int,
        through: int,
        through_hash: str | None,
        blocks: list[SolanaBlock],
        result: PollResult,
    ) -> bool:
        if not blocks:
            return True
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, lock=True)
            if cursor.block_number != position:
                # Another instance advanced the cursor meanwhile: its scan wins.
                self._stop("cursor_moved", expected=position, found=cursor.block_number)
                return False
            deposits: list[BalanceDeposit] = []
            for block in blocks:
                result.transactions_fetched += len(block.transactions)
                for tx in block.transactions:
                    deposits += self._extract(tx)
            hashes = {block.slot: block.blockhash for block in blocks}
            new = self._record(session, deposits, hashes)
            cursor.block_number, cursor.block_hash = through, through_hash
            cursor.updated_at = utcnow()
        result.blocks_scanned += len(blocks)
        result.scanned_through_slot = through
        self._count_new(new, result, through)
        return True

    def _rewind(self, through: int, block: SolanaBlock) -> None:
        """`block` does not descend from the last block scanned: the cluster switched
        forks above the finalized slot. Scan again from the finalized block; deposits of
        the dropped blocks stay pending until confirm_once decides them."""
        self._stop("fork", slot=block.slot, parent_slot=block.parent_slot, scanned=through)
        finalized = self.source.get_slot("finalized")
        if finalized >= through:
            return  # the node contradicts itself; retry on the next poll
        header = self.source.get_block(finalized, "finalized", transaction_details="none")
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, lock=True)
            if cursor.block_number == through:
                cursor.block_number, cursor.block_hash = finalized, header.blockhash
                cursor.updated_at = utcnow()

    # ---- per address -----------------------------------------------------------------

    def _scan_addresses(self, position: int, confirmed_slot: int, result: PollResult) -> None:
        owners = self.watched.owners()
        wallets = [watched.address for watched in owners]
        with self._transaction() as session:
            rows = session.execute(
                select(
                    ChainCursor.key,
                    ChainCursor.signature,
                    ChainCursor.account_state,
                    ChainCursor.updated_at,
                ).where(ChainCursor.chain == self.chain, ChainCursor.key != "")
            ).all()
            last_outflow = self._last_outflows(session, wallets)
        cursors = {row.key: (row.signature, row.account_state) for row in rows}
        verified_at = {row.key: row.updated_at for row in rows}
        # Every watched account with its wallet ("" for token accounts found earlier,
        # known only by their cursor row).
        owner_of: dict[str, str] = {}
        for watched in owners:
            owner_of[watched.address] = watched.address
            if watched.token_account is not None:
                owner_of[watched.token_account] = watched.address
        for key in cursors:
            owner_of.setdefault(key, "")
        for address, wallet in self._discover_token_accounts(wallets):
            owner_of.setdefault(address, wallet)
        accounts = list(owner_of)
        states, context = self._account_states(accounts, confirmed_slot)
        latest_outflow = max(last_outflow.values(), default=None)
        forced = set()
        for address, wallet in owner_of.items():
            # Funds left this wallet since the account was last verified: a deposit of
            # the same amount meanwhile would leave its state as it was.
            outflow = last_outflow.get(wallet) if wallet else latest_outflow
            checked = verified_at.get(address)
            if outflow is not None and (checked is None or outflow + OUTFLOW_MARGIN > checked):
                forced.add(address)
        # An account that never existed has no history; one that held funds cannot
        # be emptied without our signature, so "absent and never scanned" is settled.
        changed = [
            address
            for address in accounts
            if address in forced
            or (
                states[address] != cursors.get(address, (None, None))[1]
                and not (states[address] == ABSENT and address not in cursors)
            )
        ]
        result.accounts_checked = len(changed)
        fetched: dict[str, SolanaTransaction] = {}
        block_hashes: dict[int, str] = {}
        verified = True
        for address in changed:
            until = cursors.get(address, (None, None))[0]
            try:
                complete = self._scan_address(
                    address,
                    until=until,
                    state=states[address],
                    context=context,
                    fetched=fetched,
                    block_hashes=block_hashes,
                    result=result,
                )
            except (NodeBehind, RpcUnavailable):
                raise  # the node as a whole: the next poll retries everything
            except RpcError as exc:
                reason = (
                    "history_incomplete"
                    if isinstance(exc, HistoryIncomplete)
                    else "block_unavailable"
                )
                self._stop(reason, address=address, error=str(exc))
                complete = False
            verified = verified and complete
        scanned_through = position
        if verified and context > position:
            with self._transaction() as session:
                cursor = get_cursor(session, self.chain, lock=True)
                if cursor.block_number is not None and cursor.block_number < context:
                    cursor.block_number, cursor.block_hash = context, None
                    cursor.updated_at = utcnow()
                scanned_through = context
        result.scanned_through_slot = scanned_through
        self._set_behind(confirmed_slot, scanned_through)

    def _last_outflows(self, session: Session, wallets: list[str]) -> dict[str, datetime]:
        """When a payout (a sweep) from each watched wallet (a deposit address of the
        chain) last changed."""
        found: dict[str, datetime] = {}
        # Each wallet's latest change alone, read from the end of its run in the index:
        # a max() over the group read every payout of the batch's wallets.
        latest = (
            select(func.max(Payout.updated_at))
            .where(Payout.chain == self.chain, Payout.source_address == DepositAddress.address)
            .scalar_subquery()
        )
        for start in range(0, len(wallets), 500):
            rows = session.execute(
                select(DepositAddress.address, latest).where(
                    DepositAddress.chain == self.chain,
                    DepositAddress.address.in_(wallets[start : start + 500]),
                )
            )
            found.update((source, changed) for source, changed in rows if changed is not None)
        return found

    def _discover_token_accounts(self, wallets: list[str]) -> list[tuple[str, str]]:
        """USDC token accounts of the wallets due in this poll's rotation."""
        if not wallets:
            return []
        share = self.settings.poll_interval_s / self.settings.token_account_rescan_s
        count = min(len(wallets), math.ceil(len(wallets) * share))
        start = self._rotation % len(wallets)
        due = (wallets + wallets)[start : start + count]
        self._rotation = start + count
        found = []
        for wallet in due:
            for account in self.source.get_token_accounts_by_owner(
                wallet, self.settings.usdc_mint, "confirmed"
            ):
                if account.owner == wallet:
                    found.append((account.address, wallet))
        return found

    def _account_states(
        self, accounts: list[str], confirmed_slot: int
    ) -> tuple[dict[str, str], int]:
        """Each account's state, and the oldest context slot of the answers (every state
        is at least that recent)."""
        states: dict[str, str] = {}
        context: int | None = None
        for start in range(0, len(accounts), MAX_MULTIPLE_ACCOUNTS):
            chunk = accounts[start : start + MAX_MULTIPLE_ACCOUNTS]
            answer = self.source.get_multiple_accounts(
                chunk,
                commitment="confirmed",
                min_context_slot=self._context_floor or None,
                data_slice=TOKEN_AMOUNT_SLICE,
            )
            self._context_floor = max(self._context_floor, answer.context_slot)
            context = answer.context_slot if context is None else min(context, answer.context_slot)
            for address, account in zip(chunk, answer.accounts, strict=True):
                states[address] = _fingerprint(account)
        return states, confirmed_slot if context is None else context

    def _new_signatures(self, address: str, until: str | None, context: int) -> list[SignatureInfo]:
        """Signatures after `until` as of at least slot `context`, oldest first (the node
        pages newest first). Each further page starts one signature back, which it must
        repeat: that proves the node had the page's `before` signature."""
        limit = self.settings.signatures_page_limit
        page = self.source.get_signatures_for_address(
            address, until=until, limit=limit, commitment="confirmed", min_context_slot=context
        )
        infos = list(page)
        while len(page) == limit:
            page = self.source.get_signatures_for_address(
                address,
                before=infos[-2].signature,
                until=until,
                limit=limit,
                commitment="confirmed",
                min_context_slot=context,
            )
            if not page or page[0].signature != infos[-1].signature:
                raise HistoryIncomplete(
                    f"getSignaturesForAddress({address}) did not continue its previous page "
                    f"before {infos[-2].signature} (a replica without that signature)"
                )
            infos += page[1:]
        infos.reverse()
        return infos

    def _scan_address(
        self,
        address: str,
        *,
        until: str | None,
        state: str,
        context: int,
        fetched: dict[str, SolanaTransaction],
        block_hashes: dict[int, str],
        result: PollResult,
    ) -> bool:
        """Record one account's new deposits; True when its history through `context`
        is complete (then its state is stored with its cursor)."""
        newest: SignatureInfo | None = None
        deposits: list[BalanceDeposit] = []
        complete = True
        for info in self._new_signatures(address, until, context):
            if info.err is None:
                tx = fetched.get(info.signature)
                if tx is None:
                    tx = self.source.get_transaction(info.signature, "confirmed")
                    if tx is None:
                        # Listed but not served (a lagging replica): resume here.
                        self._stop("transaction_unavailable", signature=info.signature)
                        complete = False
                        break
                    fetched[info.signature] = tx
                    result.transactions_fetched += 1
                deposits += self._extract(tx)
            newest = info
        for deposit in deposits:
            if deposit.slot not in block_hashes:
                header = self.source.get_block(
                    deposit.slot, "confirmed", transaction_details="none"
                )
                block_hashes[deposit.slot] = header.blockhash
        with self._transaction() as session:
            cursor = get_cursor(session, self.chain, address, lock=True)
            if cursor.signature != until:
                self._stop("cursor_moved", address=address)
                return False
            new = self._record(session, deposits, block_hashes)
            if newest is not None:
                cursor.signature, cursor.block_number = newest.signature, newest.slot
            if complete:
                cursor.account_state = state
            cursor.updated_at = utcnow()
        self._count_new(new, result, newest.slot if newest is not None else context)
        return complete

    # ---- confirmation ----------------------------------------------------------------

    def _outcomes(
        self, signatures: Sequence[str], seen_at: dict[str, tuple[int, str]], finalized_slot: int
    ) -> dict[str, _Outcome]:
        statuses = self.source.get_signature_statuses(signatures)
        outcomes: dict[str, _Outcome] = {}
        for signature, status in zip(signatures, statuses, strict=True):
            if status is None:
                # Ask by transaction too: a status cache miss must not orphan money.
                tx = self.source.get_transaction(signature, "finalized")
                if tx is None:
                    slot, block_hash = seen_at[signature]
                    outcomes[signature] = self._unanswered(
                        signature, slot, block_hash, finalized_slot
                    )
                    continue
                outcomes[signature] = self._finalized_outcome(tx.slot, tx.err)
            elif status.confirmation_status != "finalized":
                outcomes[signature] = _Outcome("wait")
            else:
                outcomes[signature] = self._finalized_outcome(status.slot, status.err)
            self._absent_since.pop(signature, None)
        return outcomes

    def _unanswered(
        self, signature: str, slot: int, block_hash: str, finalized_slot: int
    ) -> _Outcome:
        """Null status and null transaction for a deposit seen in `slot`: decide from
        the finalized chain itself, or wait (module docstring)."""
        try:
            block = self.source.get_block(slot, "finalized", transaction_details="signatures")
        except SlotSkipped as exc:
            if exc.code != -32007:
                return self._waiting(signature, "block_unknown")  # long-term storage gap
            block = None
        except RpcError:
            return self._waiting(signature, "block_unavailable")
        if block is not None and signature in block.signatures:
            if block.blockhash == block_hash:
                self._absent_since.pop(signature, None)
                UNANSWERED_STATUS.labels(self.chain, "confirmed_from_block").inc()
                log.warning(
                    "deposit_confirmed_from_block", chain=self.chain, tx_hash=signature, slot=slot
                )
                return _Outcome("confirm", slot=slot)
            return self._waiting(signature, "block_changed")
        after = self.source.get_blocks_with_limit(slot + 1, BLOCKHASH_EXPIRY_BLOCKS, "finalized")
        if len(after) < BLOCKHASH_EXPIRY_BLOCKS:
            return self._waiting(signature, "blockhash_may_be_valid")
        first_read = self._absent_since.setdefault(signature, finalized_slot)
        if first_read >= finalized_slot:
            return self._waiting(signature, "absent_once")
        self._absent_since.pop(signature)
        UNANSWERED_STATUS.labels(self.chain, "orphaned").inc()
        return _Outcome("orphan")

    def _waiting(self, signature: str, why: str) -> _Outcome:
        UNANSWERED_STATUS.labels(self.chain, "waiting").inc()
        log.info("deposit_status_unanswered", chain=self.chain, tx_hash=signature, waiting_for=why)
        return _Outcome("wait")

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
