"""The EVM deposit poller: one object per configured chain, driven by the daemon's
scheduler (`poll_once`, `confirm_once`) or looped by `escrowd backfill evm`.

A poll verifies the stored block hashes (reorgs), then scans windows of USDC `Transfer`
logs from the cursor to the head. Each window's deposits, block hashes and cursor advance
commit in one transaction, so a crash between fetching and committing loses nothing:
the next poll scans the window again and recording is idempotent.
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


@dataclass(frozen=True)
class WindowDone:
    """Progress after one committed window."""

    head: int
    cursor: int
    blocks_scanned: int
    deposits_found: int


@dataclass(frozen=True)
class PollResult:
    chain: str
    blocks_scanned: int = 0
    deposits_found: int = 0
    head: int | None = None
    cursor: int | None = None
    lag_blocks: int | None = None
    rolled_back_to: int | None = None
    reorg: bool = False
    done: bool = False
    error: str | None = None


class EvmPoller:
    """Scans one EVM chain for USDC deposits into watched addresses.

    ``cursor_key`` "" is the live cursor; a backfill uses its own key, ``start_block`` and
    ``stop_block`` and skips reorg tracking (history far below the head)."""

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
        try:
            asset_id = self._start()
            with self.sessions() as session:
                self.watched.refresh(session)
            head = self.source.head()
            rolled: reorg.Rollback | None = None
            if self.track_reorgs:
                rolled = self._check_reorg(head)
            scanned, found, cursor = self._scan(asset_id, head, max_windows, on_window)
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
        target = self._target(head)
        lag = max(0, head - (cursor if cursor is not None else self.start_block - 1))
        if self.cursor_key == "":
            BLOCKS_BEHIND.labels(self.chain).set(lag)
        return PollResult(
            chain=self.chain,
            blocks_scanned=scanned,
            deposits_found=found,
            head=head,
            cursor=cursor,
            lag_blocks=lag,
            rolled_back_to=rolled.to_block if rolled else None,
            reorg=rolled is not None,
            done=cursor is not None and cursor >= target,
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

    def _cursor(self) -> tuple[int | None, str | None]:
        with self.sessions() as session, session.begin():
            cursor = get_cursor(session, self.chain, self.cursor_key)
            return cursor.block_number, cursor.block_hash

    def _check_reorg(self, head: int) -> reorg.Rollback | None:
        cursor_block, _ = self._cursor()
        if cursor_block is None:
            return None
        depth = self.settings.max_reorg_depth
        with self.sessions() as session:
            rows = [
                (b.block_number, b.block_hash)
                for b in reorg.stored_blocks(session, self.chain, cursor_block - depth)
            ]
        found = reorg.find_ancestor(
            self.source,
            self.chain,
            rows,
            head,
            start_block=self.start_block,
            cursor_block=cursor_block,
            max_reorg_depth=depth,
        )
        reorged, ancestor = found
        if not reorged:
            return None
        return reorg.roll_back(
            self.sessions,
            self.source,
            self.sink,
            chain=self.chain,
            cursor_key=self.cursor_key,
            expected_cursor=cursor_block,
            ancestor=ancestor,
            head=head,
        )

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
        max_windows: int | None,
        on_window: Callable[[WindowDone], None] | None,
    ) -> tuple[int, int, int | None]:
        """Windows from the cursor towards ``target``. While a window commits, one thread
        fetches the next: the node and the database work at the same time, and the next
        window's logs are only used after this one's commit (in chain order)."""
        cursor_block, cursor_hash = self._cursor()
        target = self._target(head)
        scanned = found = windows = 0
        depth = self.settings.max_reorg_depth
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="evm-prefetch") as prefetch:
            next_fetch: Future[_Window] | None = None
            while True:
                from_block = self.start_block if cursor_block is None else cursor_block + 1
                if from_block > target or (max_windows is not None and windows >= max_windows):
                    return scanned, found, cursor_block
                if next_fetch is None:
                    window = self._fetch_window(from_block, head, asset_id)
                else:
                    window = next_fetch.result()
                    next_fetch = None
                to_block, logs, end = window.to_block, window.logs, window.end
                headers: list[BlockHeader] = []
                if self.track_reorgs and to_block > head - depth:
                    first = max(from_block, head - depth + 1)
                    headers = reorg.headers_of(self.source, list(range(first, to_block + 1)))
                    parent = cursor_hash if first == from_block else None
                    problem = reorg.check_linkage(headers, end, parent)
                    if problem is None:
                        problem = _logs_disagree(logs, headers)
                    if problem is not None:
                        raise ChainChanged(f"{self.chain}: {problem}; rescanning next poll")
                if to_block < target and (max_windows is None or windows + 1 < max_windows):
                    next_fetch = prefetch.submit(self._fetch_window, to_block + 1, head, asset_id)
                new = self._commit(
                    expected_cursor=cursor_block,
                    to_block=to_block,
                    end=end,
                    headers=headers,
                    deposits=window.deposits,
                    head=head,
                )
                found += new
                scanned += to_block - from_block + 1
                windows += 1
                cursor_block, cursor_hash = to_block, end.hash
                if on_window is not None:
                    on_window(WindowDone(head, to_block, to_block - from_block + 1, new))

    def _fetch_window(self, from_block: int, head: int, asset_id: int) -> _Window:
        # The watched set only changes at the start of a poll, so the prefetch thread can
        # pick the deposits out too.
        to_block, logs, end = self._fetch(from_block, head)
        return _Window(to_block, logs, end, self._deposits(logs, asset_id))

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
        to_block: int,
        end: BlockHeader,
        headers: list[BlockHeader],
        deposits: list[FoundDeposit],
        head: int,
    ) -> int:
        """Record the window's deposits and block hashes and advance the cursor, together."""
        with self.sessions() as session, session.begin():
            cursor = get_cursor(session, self.chain, self.cursor_key, lock=True)
            if cursor.block_number != expected_cursor:
                raise reorg.CursorMoved(
                    f"{self.chain}: cursor {self.cursor_key!r} moved to {cursor.block_number} "
                    f"while this poller scanned from {expected_cursor}; retrying next poll"
                )
            new = record_deposits(session, self.chain, deposits, self.sink)
            if self.track_reorgs:
                self._store_blocks(session, headers or [end], head)
            cursor.block_number = to_block
            cursor.block_hash = end.hash
        if new:
            DEPOSITS_FOUND.labels(self.chain).inc(new)
            log.info("deposits_found", chain=self.chain, count=new, to_block=to_block)
        return new

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


def _logs_disagree(logs: list[TransferLog], headers: list[BlockHeader]) -> str | None:
    if not headers:
        return None
    first = headers[0].number
    for entry in logs:
        if (
            entry.block_number >= first
            and entry.block_hash != headers[entry.block_number - first].hash
        ):
            return f"logs of block {entry.block_number} belong to another fork"
    return None
