"""The EVM deposit poller: one object per configured chain, driven by the daemon's
scheduler (`poll_once`, `confirm_once`) or looped by `escrowd backfill evm`.

A poll reads the node's head with the newest stored block hashes (one request), then
scans windows of USDC `Transfer` logs from the cursor to the head. Each window's
deposits, block hashes and cursor advance commit in one transaction, so a crash between
fetching and committing loses nothing: the next poll scans the window again and recording
is idempotent.

What a node says is checked before the cursor moves (the fault model in the README):
- The cursor is the last block whose logs were read when it was already ``settle`` blocks
  deep (``max(1, confirmations)``): the newest blocks are read again on every poll until
  they are, so logs a node serves late (header first, logs a moment later) are still
  found before anything in their block is credited.
- A head below what was already scanned is a lagging replica, not a reorg: the poll is
  skipped and reported (`NodeLagging`), nothing is rolled back. Only a block hash that
  changed, read twice the same way, is a reorg.
- Blocks read again must carry the hashes stored for them, new blocks near the head must
  link to each other and to the last scanned block; otherwise the window is dropped and
  the next poll's head check decides.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import ValidationFailed
from escrowd.config.settings import EvmChainSettings
from escrowd.indexer import confirm, reorg
from escrowd.indexer.errors import NodeBehind, RangeTooLarge, RpcError, RpcUnavailable
from escrowd.indexer.evm_source import BlockHeader, EvmSource, TransferLog
from escrowd.indexer.sink import DepositSink
from escrowd.indexer.store import FoundDeposit, WatchedAddresses, get_cursor, record_deposits
from escrowd.models import Chain, ChainBlock
from escrowd.models.registry import ensure_asset

log = structlog.get_logger(__name__)

BLOCKS_BEHIND = Gauge(
    "escrowd_evm_blocks_behind_head", "Blocks between the node's head and the cursor.", ["chain"]
)
DEPOSITS_FOUND = Counter(
    "escrowd_evm_deposits_found_total", "New deposits recorded as pending.", ["chain"]
)
RPC_ERRORS = Counter(
    "escrowd_evm_poll_errors_total", "Polls that ended on an RPC failure.", ["chain", "reason"]
)
NODE_BEHIND = Gauge(
    "escrowd_evm_node_behind_blocks",
    "How far the node's head was below the blocks already scanned at the last poll (0: not).",
    ["chain"],
)
LATE_DEPOSITS = Counter(
    "escrowd_evm_late_deposits_total",
    "Deposits found by reading a block again after an earlier read of it lacked them.",
    ["chain"],
)
POLL_SECONDS = Histogram(
    "escrowd_evm_poll_duration_seconds",
    "Wall time of one poll.",
    ["chain"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class ChainIdMismatch(ValidationFailed):
    """The node serves another chain than the configured one: never scan it."""

    type = "chain_id_mismatch"


class ChainChanged(NodeBehind):
    """The chain moved under a window while it was read (reorg in flight); the window is
    dropped and the next poll's reorg check handles it."""


class ForeignLog(RpcError):
    """The node returned a log of another contract than the one asked for."""


class AdaptiveWindow:
    """How many blocks one log query covers, always in [1, max_blocks].

    It starts at ``start_blocks`` and doubles after each light window until the first
    refusal, timeout or overfull window (slow start: a catch-up never opens with one huge
    query); from then on it doubles only after ``grow_after`` light windows in a row. A
    refusal or timeout halves it (or takes the provider's suggestion); a window that
    returned more than ``max_logs`` logs scales the next one down in proportion, so a
    dense range comes in windows of bounded memory and transaction size whose fetches
    overlap the previous window's commit."""

    def __init__(
        self,
        max_blocks: int,
        *,
        max_logs: int = 10_000,
        start_blocks: int = 16,
        grow_after: int = 3,
    ) -> None:
        assert max_blocks >= 1 and max_logs >= 1 and start_blocks >= 1 and grow_after >= 1
        self.max_blocks = max_blocks
        self.max_logs = max_logs
        self.size = min(max_blocks, start_blocks)
        self.grow_after = grow_after
        self._slow_start = True
        self._successes = 0

    def shrink(self, from_block: int, to_block: int, suggested_to_block: int | None) -> None:
        self._slow_start = False
        self._successes = 0
        if suggested_to_block is not None and from_block <= suggested_to_block < to_block:
            self.size = suggested_to_block - from_block + 1
        else:
            self.size = max(1, (to_block - from_block + 1) // 2)

    def succeeded(self, blocks: int, logs: int) -> None:
        """A window of ``blocks`` blocks returned ``logs`` logs."""
        if logs > self.max_logs:
            self._slow_start = False
            self._successes = 0
            self.size = max(1, min(self.size, blocks * self.max_logs // logs))
            return
        if 2 * logs > self.max_logs:
            # Doubling would overshoot the log bound: stay at this size.
            self._successes = 0
            return
        self._successes += 1
        if self._slow_start or self._successes >= self.grow_after:
            self._successes = 0
            self.size = min(self.max_blocks, self.size * 2)


@dataclass(frozen=True, slots=True)
class _Window:
    """One fetched window: its logs, end header and the deposits among the logs."""

    to_block: int
    logs: list[TransferLog]
    end: BlockHeader
    deposits: list[FoundDeposit]
    # With ``credit_final``: the chain's hashes of the deposits' blocks already at
    # confirmation depth, read after the logs.
    final_hashes: dict[int, str]


@dataclass(frozen=True)
class WindowDone:
    """Progress after one committed window: logs read up to ``scanned_to``, verified up to
    ``cursor``."""

    head: int
    cursor: int | None
    scanned_to: int
    blocks_scanned: int
    deposits_found: int


@dataclass(frozen=True)
class PollResult:
    """What one poll did. ``cursor`` is the verified cursor, ``scanned_to`` the newest block
    whose logs were read, ``lag_blocks`` the head minus ``scanned_to``. ``error`` is set when
    the poll failed or was skipped; ``node_behind_blocks`` when the node's head was below
    ``scanned_to`` (a lagging replica)."""

    chain: str
    blocks_scanned: int = 0
    deposits_found: int = 0
    late_deposits: int = 0
    head: int | None = None
    cursor: int | None = None
    scanned_to: int | None = None
    lag_blocks: int | None = None
    node_behind_blocks: int | None = None
    rolled_back_to: int | None = None
    reorg: bool = False
    done: bool = False
    error: str | None = None


@dataclass
class _ScanState:
    """Where a scan stands: the verified cursor, the newest block read, and the hashes
    stored for the blocks read above the cursor (read again until they settle)."""

    cursor: int | None
    cursor_hash: str | None
    known: dict[int, str]

    @property
    def scanned(self) -> int | None:
        return max(self.known, default=self.cursor)


class EvmPoller:
    """Scans one EVM chain for USDC deposits into watched addresses.

    ``cursor_key`` "" is the live cursor; a backfill uses its own key, ``start_block`` and
    ``stop_block`` and skips reorg tracking (history far below the head). ``credit_final``
    (a backfill's) credits the deposits of blocks already at confirmation depth in their
    window's transaction, once their block hashes are checked against the chain, instead
    of leaving them pending for a confirmation pass."""

    def __init__(
        self,
        settings: EvmChainSettings,
        source: EvmSource,
        sessions: sessionmaker[Session],
        sink: DepositSink,
        *,
        cursor_key: str = "",
        start_block: int | None = None,
        stop_block: int | None = None,
        track_reorgs: bool | None = None,
        credit_final: bool = False,
    ) -> None:
        self.settings = settings
        self.chain = settings.name
        self.source = source
        self.sessions = sessions
        self.sink = sink
        self.cursor_key = cursor_key
        self.start_block = settings.start_block if start_block is None else start_block
        self.stop_block = stop_block
        self.track_reorgs = cursor_key == "" if track_reorgs is None else track_reorgs
        self.credit_final = credit_final
        self.contract = settings.usdc_address.lower()
        self.window = AdaptiveWindow(
            settings.max_block_window, max_logs=settings.max_logs_per_window
        )
        # Deposit addresses belong to the EVM family: one address per agent serves every
        # EVM chain, so the watched set is the family's, whatever this chain is named.
        self.watched = WatchedAddresses(Chain.EVM, normalize=True)
        self._asset_id: int | None = None

    # start-up ---------------------------------------------------------------------------

    def _start(self) -> int:
        if self._asset_id is not None:
            return self._asset_id
        node_chain_id = self.source.chain_id()
        if node_chain_id != self.settings.chain_id:
            raise ChainIdMismatch(
                f"chain {self.chain!r} is configured with chain_id {self.settings.chain_id} "
                f"but its node reports {node_chain_id}: fix rpc_urls or chain_id"
            )
        with self.sessions() as session, session.begin():
            asset = ensure_asset(
                session,
                chain=self.chain,
                symbol="USDC",
                decimals=self.settings.usdc_decimals,
                token_address=self.settings.usdc_address,
            )
            self._asset_id = asset.id
        log.info("evm_poller_started", chain=self.chain, chain_id=node_chain_id)
        return self._asset_id

    # one poll -----------------------------------------------------------------------

    def poll_once(
        self,
        *,
        max_windows: int | None = None,
        on_window: Callable[[WindowDone], None] | None = None,
    ) -> PollResult:
        """Scan from the cursor towards the head (at most ``max_windows`` windows), calling
        ``on_window`` after each window's commit. RPC failures end the poll with ``error``
        set and the cursor where the last fully committed window left it."""
        started = time.monotonic()
        head: int | None = None
        state: _ScanState | None = None
        try:
            asset_id = self._start()
            with self.sessions() as session:
                self.watched.refresh(session)
            state = self._state()
            rolled: reorg.Rollback | None = None
            if self.track_reorgs:
                head, rolled = self._check_head(state)
                if rolled is not None:
                    state = self._state()
            else:
                head = self.source.head()
                reorg.check_not_behind(self.chain, head, state.scanned)
            scanned, found, late = self._scan(asset_id, head, state, max_windows, on_window)
        except reorg.NodeLagging as exc:
            RPC_ERRORS.labels(self.chain, "NodeLagging").inc()
            if self.cursor_key == "":
                NODE_BEHIND.labels(self.chain).set(exc.blocks)
            log.warning(
                "node_lagging", chain=self.chain, node_head=exc.head, scanned_to=exc.scanned
            )
            return PollResult(
                chain=self.chain,
                head=exc.head,
                cursor=state.cursor if state else None,
                scanned_to=exc.scanned,
                node_behind_blocks=exc.blocks,
                error=f"NodeLagging: {exc}",
            )
        except (RpcError, reorg.CursorMoved) as exc:
            reason = type(exc).__name__
            RPC_ERRORS.labels(self.chain, reason).inc()
            log.warning("poll_failed", chain=self.chain, reason=reason, error=str(exc))
            return PollResult(chain=self.chain, head=head, error=f"{reason}: {exc}")
        except reorg.DeepReorg as exc:
            RPC_ERRORS.labels(self.chain, "DeepReorg").inc()
            log.error("deep_reorg_halted", chain=self.chain, error=exc.message)
            return PollResult(chain=self.chain, head=head, error=f"DeepReorg: {exc.message}")
        finally:
            POLL_SECONDS.labels(self.chain).observe(time.monotonic() - started)
        scanned_to = state.scanned
        target = self._target(head)
        lag = max(0, head - (scanned_to if scanned_to is not None else self.start_block - 1))
        if self.cursor_key == "":
            BLOCKS_BEHIND.labels(self.chain).set(lag)
            NODE_BEHIND.labels(self.chain).set(0)
        return PollResult(
            chain=self.chain,
            blocks_scanned=scanned,
            deposits_found=found,
            late_deposits=late,
            head=head,
            cursor=state.cursor,
            scanned_to=scanned_to,
            lag_blocks=lag,
            rolled_back_to=rolled.to_block if rolled else None,
            reorg=rolled is not None,
            done=scanned_to is not None and scanned_to >= target,
        )

    def confirm_once(self) -> confirm.ConfirmResult:
        """Credit (or orphan) the pending deposits that reached the confirmation depth."""
        self._start()
        return confirm.confirm_once(
            self.sessions,
            self.source,
            self.sink,
            chain=self.chain,
            confirmations=self.settings.confirmations,
        )

    # internals ------------------------------------------------------------------------

    def _target(self, head: int) -> int:
        return head if self.stop_block is None else min(head, self.stop_block)

    @property
    def settle_blocks(self) -> int:
        """How deep a block must be before its logs are read for the last time. Only the
        live poller settles; a backfill reads history once (the live poller reads the
        newest blocks again in any case)."""
        return max(1, self.settings.confirmations) if self.track_reorgs else 0

    def _state(self) -> _ScanState:
        with self.sessions() as session, session.begin():
            cursor = get_cursor(session, self.chain, self.cursor_key)
            number, block_hash = cursor.block_number, cursor.block_hash
            known: dict[int, str] = {}
            if self.track_reorgs:
                floor = -1 if number is None else number
                known = {
                    b.block_number: b.block_hash
                    for b in reorg.stored_blocks(session, self.chain, floor + 1)
                }
        return _ScanState(number, block_hash, known)

    def _check_head(self, state: _ScanState) -> tuple[int, reorg.Rollback | None]:
        """The node's head, after rolling back a reorg the stored hashes reveal."""
        scanned = state.scanned
        depth = self.settings.max_reorg_depth
        floor = (scanned if scanned is not None else self.start_block) - depth
        with self.sessions() as session:
            rows = [
                (b.block_number, b.block_hash)
                for b in reorg.stored_blocks(session, self.chain, floor)
            ]
        checked = reorg.check_head(
            self.source,
            self.chain,
            rows,
            scanned=scanned,
            start_block=self.start_block,
            max_reorg_depth=depth,
        )
        if not checked.reorged:
            return checked.head, None
        rolled = reorg.roll_back(
            self.sessions,
            self.source,
            self.sink,
            chain=self.chain,
            cursor_key=self.cursor_key,
            expected_cursor=state.cursor,
            ancestor=checked.ancestor,
            head=checked.head,
        )
        return checked.head, rolled

    def _fetch(self, from_block: int, head: int) -> tuple[int, list[TransferLog], BlockHeader]:
        """Logs of the largest window from ``from_block`` the provider accepts."""
        target = self._target(head)
        while True:
            to_block = min(target, from_block + self.window.size - 1)
            try:
                logs, end = self.source.logs_with_end_header(
                    self.settings.usdc_address, from_block, to_block
                )
            except RangeTooLarge as exc:
                if to_block == from_block:
                    raise
                self.window.shrink(from_block, to_block, exc.suggested_to_block)
                log.info("window_shrunk", chain=self.chain, size=self.window.size, reason="range")
                continue
            except RpcUnavailable as exc:
                if not exc.timed_out or to_block == from_block:
                    raise
                self.window.shrink(from_block, to_block, None)
                log.info("window_shrunk", chain=self.chain, size=self.window.size, reason="timeout")
                continue
            self.window.succeeded(to_block - from_block + 1, len(logs))
            return to_block, logs, end

    def _scan(
        self,
        asset_id: int,
        head: int,
        state: _ScanState,
        max_windows: int | None,
        on_window: Callable[[WindowDone], None] | None,
    ) -> tuple[int, int, int]:
        """Windows from the cursor towards the target: (blocks read, deposits found, of
        which late). While a window commits, one thread fetches the next: the node and the
        database work at the same time, and the next window's logs are only used after
        this one's commit (in chain order). ``state`` follows the commits."""
        target = self._target(head)
        settled = head - self.settle_blocks
        read_before = state.scanned
        position = self.start_block - 1 if state.cursor is None else state.cursor
        parent_hash = state.cursor_hash
        scanned = found = late = windows = 0
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evm-prefetch") as prefetch:
            next_fetch: Future[_Window] | None = None
            while True:
                from_block = position + 1
                if from_block > target or (max_windows is not None and windows >= max_windows):
                    return scanned, found, late
                if next_fetch is None:
                    window = self._fetch_window(from_block, head, asset_id)
                else:
                    window = next_fetch.result()
                    next_fetch = None
                to_block, end = window.to_block, window.end
                fresh: list[BlockHeader] = []
                if self.track_reorgs:
                    fresh = self._verify(window, from_block, head, state.known, parent_hash)
                if to_block < target and (max_windows is None or windows + 1 < max_windows):
                    next_fetch = prefetch.submit(self._fetch_window, to_block + 1, head, asset_id)
                hashes = {**state.known, **{h.number: h.hash for h in fresh}, to_block: end.hash}
                cursor: tuple[int, str] | None = None
                settled_to = min(to_block, settled)
                if settled_to in hashes and (state.cursor is None or settled_to > state.cursor):
                    cursor = (settled_to, hashes[settled_to])
                deposits, again = _split(window.deposits, read_before)
                new, new_late = self._commit(
                    expected_cursor=state.cursor,
                    cursor=cursor,
                    headers=fresh or ([] if to_block in state.known else [end]),
                    deposits=deposits,
                    again=again,
                    head=head,
                    final_hashes=window.final_hashes,
                )
                found += new
                late += new_late
                scanned += to_block - from_block + 1
                windows += 1
                if cursor is not None:
                    state.cursor, state.cursor_hash = cursor
                if self.track_reorgs:
                    floor = -1 if state.cursor is None else state.cursor
                    state.known = {n: h for n, h in hashes.items() if n > floor}
                position, parent_hash = to_block, end.hash
                if on_window is not None:
                    on_window(
                        WindowDone(head, state.cursor, to_block, to_block - from_block + 1, new)
                    )

    def _verify(
        self,
        window: _Window,
        from_block: int,
        head: int,
        known: dict[int, str],
        parent_hash: str | None,
    ) -> list[BlockHeader]:
        """Check a window against the hashes stored for the blocks read before and, for the
        blocks near the head read for the first time, against their headers, which must
        link to each other and to the block before. Returns those headers; raises
        `ChainChanged` when anything disagrees (a reorg in flight or a node on another
        fork: the next poll's head check tells which)."""
        to_block, end = window.to_block, window.end
        first = max(from_block, head - self.settings.max_reorg_depth)
        fresh = reorg.headers_of(
            self.source, [n for n in range(first, to_block + 1) if n not in known]
        )
        hashes = {**known, **{h.number: h.hash for h in fresh}}
        problem: str | None = None
        if hashes.get(to_block, end.hash) != end.hash:
            problem = f"block {to_block} changed since it was read"
        elif fresh:
            before = hashes.get(fresh[0].number - 1)
            if fresh[0].number == from_block:
                before = parent_hash
            problem = reorg.check_linkage(fresh, end, before)
        if problem is None:
            problem = _logs_disagree(window.logs, hashes)
        if problem is not None:
            raise ChainChanged(f"{self.chain}: {problem}; rescanning next poll")
        return fresh

    def _fetch_window(self, from_block: int, head: int, asset_id: int) -> _Window:
        # The watched set only changes at the start of a poll, so the prefetch thread can
        # pick the deposits out too.
        to_block, logs, end = self._fetch(from_block, head)
        deposits = self._deposits(logs, asset_id)
        final_hashes: dict[int, str] = {}
        if self.credit_final:
            deep = head - self.settings.confirmations
            numbers = sorted({d.block_number for d in deposits if d.block_number <= deep})
            final_hashes = {h.number: h.hash for h in reorg.headers_of(self.source, numbers)}
        return _Window(to_block, logs, end, deposits, final_hashes)

    def _deposits(self, logs: list[TransferLog], asset_id: int) -> list[FoundDeposit]:
        out: list[FoundDeposit] = []
        for entry in logs:
            if entry.contract.lower() != self.contract:
                raise ForeignLog(
                    f"{self.chain}: node returned a log of {entry.contract} for a query on "
                    f"{self.settings.usdc_address}; check the node"
                )
            if entry.removed or entry.amount <= 0:
                continue
            watched = self.watched.get(entry.to_addr)
            if watched is None:
                continue
            out.append(
                FoundDeposit(
                    tx_hash=entry.tx_hash,
                    log_index=entry.log_index,
                    asset_id=asset_id,
                    watched=watched,
                    from_address=entry.from_addr,
                    amount=entry.amount,
                    block_number=entry.block_number,
                    block_hash=entry.block_hash,
                )
            )
        return out

    def _commit(
        self,
        *,
        expected_cursor: int | None,
        cursor: tuple[int, str] | None,
        headers: list[BlockHeader],
        deposits: list[FoundDeposit],
        again: list[FoundDeposit],
        head: int,
        final_hashes: dict[int, str],
    ) -> tuple[int, int]:
        """Record the window's deposits and new block hashes and advance the cursor (when
        ``cursor`` is given), together. ``again`` are the deposits in blocks read before;
        returns (new deposits, of which found only on reading a block again)."""
        with self.sessions() as session, session.begin():
            row = get_cursor(session, self.chain, self.cursor_key, lock=True)
            if row.block_number != expected_cursor:
                raise reorg.CursorMoved(
                    f"{self.chain}: cursor {self.cursor_key!r} moved to {row.block_number} "
                    f"while this poller scanned from {expected_cursor}; retrying next poll"
                )
            new = record_deposits(
                session, self.chain, deposits, self.sink, final_hashes=final_hashes
            )
            late = (
                record_deposits(session, self.chain, again, self.sink, final_hashes=final_hashes)
                if again
                else 0
            )
            if self.track_reorgs and headers:
                self._store_blocks(session, headers, head)
            if cursor is not None:
                row.block_number, row.block_hash = cursor
        if new or late:
            DEPOSITS_FOUND.labels(self.chain).inc(new + late)
            log.info("deposits_found", chain=self.chain, count=new + late, head=head)
        if late:
            LATE_DEPOSITS.labels(self.chain).inc(late)
            log.warning("late_deposit_logs", chain=self.chain, count=late, head=head)
        return new + late, late

    def _store_blocks(self, session: Session, headers: list[BlockHeader], head: int) -> None:
        first, last = headers[0].number, headers[-1].number
        session.execute(
            delete(ChainBlock).where(
                ChainBlock.chain == self.chain,
                ChainBlock.block_number >= first,
                ChainBlock.block_number <= last,
            )
        )
        session.add_all(
            ChainBlock(
                chain=self.chain,
                block_number=h.number,
                block_hash=h.hash,
                parent_hash=h.parent_hash,
            )
            for h in headers
        )
        # Bounded table: nothing below the reorg horizon is needed but the newest row.
        session.execute(
            delete(ChainBlock).where(
                ChainBlock.chain == self.chain,
                ChainBlock.block_number < min(last, head - self.settings.max_reorg_depth),
            )
        )


def _split(
    deposits: list[FoundDeposit], read_before: int | None
) -> tuple[list[FoundDeposit], list[FoundDeposit]]:
    """(deposits in blocks read for the first time, deposits in blocks read before)."""
    if read_before is None:
        return deposits, []
    first: list[FoundDeposit] = []
    again: list[FoundDeposit] = []
    for deposit in deposits:
        (again if deposit.block_number <= read_before else first).append(deposit)
    return first, again


def _logs_disagree(logs: list[TransferLog], hashes: dict[int, str]) -> str | None:
    for entry in logs:
        expected = hashes.get(entry.block_number)
        if expected is not None and entry.block_hash != expected:
            return f"logs of block {entry.block_number} belong to another fork"
    return None
