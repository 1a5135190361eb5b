"""Transfers of ERC-20 tokens other than a chain's USDC into deposit addresses: recorded as
unsupported deposits (never credited) so that an operator can see and recover them.

The scan runs as a job of its own every ``token_scan_interval_s`` under a cursor of its own
(key "tokens"), over settled blocks only (``max(1, confirmations)`` below the head, like the
deposit poller's cursor). A window's logs are asked for by recipient, not by contract: an
``eth_getLogs`` topic filter naming ``token_scan_batch_addresses`` deposit addresses at a
time. A scan therefore costs ceil(addresses / batch) requests per window of up to
``max_block_window`` blocks, whatever the chain's traffic: with 10,000 addresses and the
defaults, 20 requests every 5 minutes. Each window's rows and cursor commit together.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import structlog
from prometheus_client import Counter
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings
from escrowd.indexer.errors import RangeTooLarge, RpcError
from escrowd.indexer.evm_poller import AdaptiveWindow, ChainChanged
from escrowd.indexer.evm_source import BlockHeader, EvmSource, TransferLog
from escrowd.indexer.store import WatchedAddresses, get_cursor
from escrowd.models import Chain, UnsupportedDeposit, bulk, utcnow

log = structlog.get_logger(__name__)

CURSOR_KEY = "tokens"

UNSUPPORTED_FOUND = Counter(
    "escrowd_unsupported_deposits_total",
    "Transfers of tokens escrowd does not credit into deposit addresses, recorded.",
    ["chain"],
)
SCAN_ERRORS = Counter(
    "escrowd_evm_token_scan_errors_total",
    "Scans for unsupported tokens that ended on an RPC failure.",
    ["chain", "reason"],
)


class UnsupportedSink(Protocol):
    def recorded(self, session: Session, deposits: Sequence[UnsupportedDeposit]) -> None:
        """New unsupported deposits were stored: audit them and tell the marketplace, in
        the caller's transaction."""


@dataclass(frozen=True)
class TokenScanResult:
    chain: str
    blocks_scanned: int = 0
    found: int = 0
    cursor: int | None = None
    error: str | None = None


class TokenScanner:
    """Scans one EVM chain for Transfers of other tokens into watched addresses; at most
    ``max_windows`` windows per scan so one tick stays bounded."""

    def __init__(
        self,
        settings: EvmChainSettings,
        source: EvmSource,
        sessions: sessionmaker[Session],
        sink: UnsupportedSink,
        *,
        max_windows: int = 50,
    ) -> None:
        self.settings = settings
        self.chain = settings.name
        self.source = source
        self.sessions = sessions
        self.sink = sink
        self.max_windows = max_windows
        self.usdc = settings.usdc_address.lower()
        self.window = AdaptiveWindow(
            settings.max_block_window, max_logs=settings.max_logs_per_window
        )
        self.watched = WatchedAddresses(Chain.EVM, normalize=True)

    def scan_once(self) -> TokenScanResult:
        started = time.monotonic()
        scanned = found = 0
        cursor: int | None = None
        try:
            with self.sessions() as session:
                self.watched.refresh(session)
                cursor = get_cursor(session, self.chain, CURSOR_KEY).block_number
            addresses = [w.address for w in self.watched.owners()]
            batch = self.settings.token_scan_batch_addresses
            groups = [addresses[i : i + batch] for i in range(0, len(addresses), batch)]
            settled = self.source.head() - max(1, self.settings.confirmations)
            for _ in range(self.max_windows):
                from_block = self.settings.start_block if cursor is None else cursor + 1
                if from_block > settled:
                    break
                to_block, logs = self._fetch(from_block, settled, groups)
                found += self._commit(cursor, to_block, logs)
                scanned += to_block - from_block + 1
                cursor = to_block
        except RpcError as exc:
            reason = type(exc).__name__
            SCAN_ERRORS.labels(self.chain, reason).inc()
            log.warning("token_scan_failed", chain=self.chain, reason=reason, error=str(exc))
            return TokenScanResult(self.chain, scanned, found, cursor, f"{reason}: {exc}")
        log.debug(
            "token_scan_done",
            chain=self.chain,
            blocks=scanned,
            found=found,
            s=round(time.monotonic() - started, 3),
        )
        return TokenScanResult(self.chain, scanned, found, cursor)

    def _fetch(
        self, from_block: int, settled: int, groups: list[list[str]]
    ) -> tuple[int, list[TransferLog]]:
        """The logs of the widest window from ``from_block`` the provider accepts, every
        address group read against the same end block."""
        while True:
            to_block = min(settled, from_block + self.window.size - 1)
            try:
                logs: list[TransferLog] = []
                end: BlockHeader | None = None
                for group in groups:
                    part, header = self.source.transfers_to(group, from_block, to_block)
                    if end is not None and header.hash != end.hash:
                        raise ChainChanged(
                            f"{self.chain}: block {to_block} changed during a token scan"
                        )
                    end = header
                    logs.extend(part)
            except RangeTooLarge as exc:
                if to_block == from_block:
                    raise
                self.window.shrink(from_block, to_block, exc.suggested_to_block)
                continue
            self.window.succeeded(to_block - from_block + 1, len(logs))
            return to_block, logs

    def _commit(self, expected: int | None, to_block: int, logs: list[TransferLog]) -> int:
        rows = []
        now = utcnow()
        for entry in logs:
            if entry.removed or entry.amount <= 0 or entry.contract.lower() == self.usdc:
                continue
            watched = self.watched.get(entry.to_addr)
            if watched is None:
                continue
            rows.append(
                {
                    "chain": self.chain,
                    "tx_hash": entry.tx_hash,
                    "log_index": entry.log_index,
                    "token_address": entry.contract,
                    "agent_id": watched.agent_id,
                    "deposit_address_id": watched.deposit_address_id,
                    "to_address": entry.to_addr,
                    "from_address": entry.from_addr,
                    "amount_base_units": str(entry.amount),
                    "block_number": entry.block_number,
                    "block_hash": entry.block_hash,
                    "recovery_id": None,
                    "created_at": now,
                }
            )
        with self.sessions() as session, session.begin():
            row = get_cursor(session, self.chain, CURSOR_KEY, lock=True)
            if row.block_number != expected:
                raise ChainChanged(f"{self.chain}: token scan cursor moved; retrying next scan")
            ids = [
                inserted[0]
                for inserted in bulk.insert_rows(
                    session,
                    UnsupportedDeposit.metadata.tables[UnsupportedDeposit.__tablename__],
                    rows,
                    skip_conflicts_on=("chain", "tx_hash", "log_index"),
                    returning=("id",),
                )
            ]
            if ids:
                new = list(
                    session.scalars(
                        select(UnsupportedDeposit)
                        .where(UnsupportedDeposit.id.in_(ids))
                        .order_by(UnsupportedDeposit.id)
                    )
                )
                self.sink.recorded(session, new)
            row.block_number = to_block
            row.block_hash = None
        if ids:
            UNSUPPORTED_FOUND.labels(self.chain).inc(len(ids))
        return len(ids)
