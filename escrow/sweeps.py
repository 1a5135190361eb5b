"""Sweeps: consolidate USDC from EVM deposit addresses into the hot wallet.

A sweep is a `payouts` row with reason ``sweep`` (source = the deposit address,
destination = the hot wallet) and no ledger effect: both ends are custody of the same
chain and asset, so agents' balances and ``custody(chain, asset)`` are unchanged, and
reconciliation (which sums every custody address) is unaffected. Audit rows record each
step in the payout's stream; no webhook event is sent (nothing changed for any agent).

Steps, each stored before anything is sent (the payout rules):
1. the deposit address lacks gas: the gas wallet sends it ETH for one transfer at the
   quoted fee (stored as a transaction of the sweep, recognisable by its recipient);
2. once that is mined, the deposit address (key derived from the seed) signs the USDC
   transfer to the hot wallet with its own escrowd-owned nonce; if fees rose in between
   so that it cannot pay that transaction's fee cap, the gas wallet tops it up (step 1
   again) rather than the sweep being re-signed;
3. confirmed at the chain's depth (or failed for good on a revert).
At most one open sweep per deposit address, so a sweep is never duplicated. States:
requested -> signed -> confirmed | failed; requested -> waiting_funds while the gas wallet
cannot pay the gas; needs_attention when a step raised an unexpected error (each sweep is
isolated like a payout, and a step failing for RPC trouble backs off). Only credited
funds are swept (`sweepable`). Run one sweeper per chain (a scheduler job under its
advisory lock), like every other job.

Run passes from the command line (used by the crash tests):
``python -m escrowd.escrow.sweeps --config FILE --chain NAME [--until-idle]``.

Solana sweeps need no gas funding (the hot wallet is the fee payer, the deposit key
co-signs), so `discover_solana_sweeps` only creates the sweep rows and the payout worker
(`SolanaPayoutChain(..., deposit_key=keystore.derive_solana)`) drives them like payouts;
the fee it pays in SOL is booked as network cost, like a payout's.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta

import rlp
import structlog
from eth_utils.address import to_checksum_address
from sqlalchemy import func, or_, select, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import Settings
from escrowd.escrow import audit, payouts
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_sender import (
    ERC20_TRANSFER_GAS,
    NATIVE_TRANSFER_GAS,
    EvmSender,
    decode_fees,
    quote_fees,
)
from escrowd.indexer.evm_source import EvmSource
from escrowd.indexer.sending import SignedTx, TxState
from escrowd.indexer.solana_source import SolanaSource
from escrowd.models import (
    Asset,
    Chain,
    Deposit,
    DepositAddress,
    DepositCreditState,
    DepositStatus,
    Payout,
    PayoutReason,
    PayoutStatus,
    PayoutTransaction,
    utcnow,
)
from escrowd.models.db import IN_LIST_BATCH
from escrowd.models.escrow import FAILED_SWEEP_SQL
from escrowd.wallets.keystore import EvmKey, UnlockedKeystore

log = structlog.get_logger(__name__)

# Not settled: at most one such sweep per (address, asset), and its amount counts as swept.
OPEN = tuple(status.value for status in payouts.OPEN)
# Settled or under way: what a deposit address no longer has to sweep.
SWEPT = (*OPEN, PayoutStatus.CONFIRMED.value)
# Sweeps the EVM sweeper drives (a waiting one: to check the gas wallet again).
IN_FLIGHT = (PayoutStatus.REQUESTED.value, PayoutStatus.SIGNED.value)
WORKED = (*IN_FLIGHT, PayoutStatus.WAITING_FUNDS.value)
# The largest amount one sweep row holds (payouts.amount is a BIGINT of token units).
MAX_SWEEP_BASE_UNITS = 2**63 - 1
# Gas sent to a deposit address covers this many times one transfer at the quoted fee.
GAS_MARGIN = 2
# A Solana sweep that failed is not retried for this long, doubled per failure in a row.
SOLANA_SWEEP_RETRY = timedelta(minutes=5)
SOLANA_SWEEP_RETRY_MAX = timedelta(hours=6)
# Where a crash test may kill the EVM sweeper; each leaves different state stored.
CRASH_POINTS = (
    "after_fund_sign",
    "after_fund_store",
    "after_fund_broadcast",
    "after_sweep_sign",
    "after_sweep_store",
    "after_sweep_broadcast",
    "before_confirm",
)


@dataclass
class SweepStats:
    created: int = 0
    funded: int = 0
    sent: int = 0
    confirmed: int = 0
    failed: int = 0
    waiting: int = 0
    errors: int = 0
    parked: int = 0


class SendRefused(RpcError):
    """The node did not take a stored transaction of the sweep. The bytes stay stored and
    the next pass sends them again, without a backoff: a fee cap below today's base fee
    becomes valid again as fees fall."""


class GasWalletShort(Exception):
    """The gas wallet cannot pay the gas a deposit address needs for its sweep."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def create_sweep(
    session: Session,
    *,
    chain: str,
    asset: Asset,
    source: str,
    agent_id: int,
    destination: str,
    amount: int,
) -> bool:
    """A sweep row in status requested unless one is open for (source, asset); no
    ledger effect. False when one already exists."""
    previous = session.scalars(
        select(Payout.status).where(
            Payout.chain == chain,
            Payout.reason == PayoutReason.SWEEP.value,
            Payout.source_address == source,
            Payout.asset_id == asset.id,
        )
    ).all()
    if any(status in OPEN for status in previous):
        return False
    payout = Payout(
        idempotency_key=f"sweep:{chain}:{source}:{asset.symbol}:{len(previous)}",
        chain=chain,
        asset_id=asset.id,
        agent_id=agent_id,
        reason=PayoutReason.SWEEP.value,
        source_address=source,
        destination=destination,
        amount=amount,
    )
    session.add(payout)
    session.flush()
    audit.append(
        session,
        stream=f"payout:{payout.id}",
        actor="sweeper",
        action="sweep_requested",
        asset=asset.symbol,
        amount=amount,
        details={"chain": chain, "source": source, "destination": destination},
    )
    return True


@dataclass(frozen=True)
class Sweepable:
    agent_id: int
    # Credited deposits of the asset to the address, less what sweeps took or are taking.
    credited_base_units: int


def sweepable(session: Session, *, chain: str, asset_id: int) -> dict[str, Sweepable]:
    """Deposit addresses holding credited funds of an asset on `chain` not yet swept. Only
    credited funds are swept: a deposit seen at `latest` but short of its confirmations
    may still be reorged away, and its coins stay where the indexer expects them."""
    credited: dict[tuple[str, int], int] = {}
    # Summed in Python: token amounts can exceed 64 bits and are text on SQLite.
    for address, agent_id, amount in session.execute(
        select(DepositAddress.address, DepositAddress.agent_id, Deposit.amount)
        .join(Deposit, Deposit.deposit_address_id == DepositAddress.id)
        .where(
            Deposit.chain == chain,
            Deposit.asset_id == asset_id,
            Deposit.status == DepositStatus.CONFIRMED.value,
            # Credited (its dust with it) or all dust; a refused one is left where it is.
            Deposit.credit_state.in_(
                [DepositCreditState.CREDITED.value, DepositCreditState.DUST.value]
            ),
        )
    ):
        credited[address, agent_id] = credited.get((address, agent_id), 0) + int(amount)
    swept = dict(
        session.execute(
            select(Payout.source_address, func.sum(Payout.amount))
            .where(
                Payout.chain == chain,
                Payout.asset_id == asset_id,
                Payout.reason == PayoutReason.SWEEP.value,
                Payout.status.in_(SWEPT),
            )
            .group_by(Payout.source_address)
        ).all()
    )
    found = {}
    for (address, agent_id), total in credited.items():
        left = total - int(swept.get(address, 0))
        if left > 0:
            found[address] = Sweepable(agent_id=agent_id, credited_base_units=left)
    return found


def discover_solana_sweeps(
    sessions: sessionmaker[Session],
    source: SolanaSource,
    *,
    chain: str,
    hot_wallet: str,
    min_base_units: dict[str, int],
) -> int:
    """Create a sweep for every Solana deposit address holding at least the minimum of
    an asset's credited funds (SOL: the hot wallet pays the fee; USDC: the sum over all its
    token accounts of the mint, which the signed sweep takes from each). The payout worker,
    built with `deposit_key`, signs and sends them. After a sweep of an address and asset
    failed, the next waits `SOLANA_SWEEP_RETRY` doubled per failure in a row."""
    with sessions() as session:
        assets = list(session.scalars(select(Asset).where(Asset.chain == chain)))
        candidates = {
            asset.id: sweepable(session, chain=chain, asset_id=asset.id) for asset in assets
        }
        not_before = _after_failures(session, chain)
    created = 0
    now = utcnow()
    for asset in assets:
        for address, due in candidates[asset.id].items():
            wait = not_before.get((address, asset.id))
            if wait is not None and now < wait[0]:
                if (chain, address, asset.id, wait[1]) not in _BACKOFF_LOGGED:
                    _BACKOFF_LOGGED.add((chain, address, asset.id, wait[1]))
                    log.warning(
                        "sweep_backing_off",
                        chain=chain,
                        source=address,
                        asset=asset.symbol,
                        failures=wait[1],
                        next_attempt=wait[0].isoformat(),
                    )
                continue
            if asset.token_address is None:
                balance = source.get_balance(address)
                amount = min(balance, due.credited_base_units)
                left = balance - amount
                if 0 < left < source.get_minimum_balance_for_rent_exemption(0):
                    # An account may not keep less than rent: sweep once the rest is credited.
                    continue
            else:
                balance = sum(
                    account.amount_base_units
                    for account in source.get_token_accounts_by_owner(address, asset.token_address)
                )
                amount = min(balance, due.credited_base_units)
            if amount < max(1, min_base_units.get(asset.symbol, 1)):
                continue
            create = functools.partial(
                create_sweep,
                chain=chain,
                asset=asset,
                source=address,
                agent_id=due.agent_id,
                destination=hot_wallet,
                amount=amount,
            )
            created += in_transaction(sessions, create)
    return created


# Each (chain, address, asset, failures) backing off is logged once per process.
_BACKOFF_LOGGED: set[tuple[str, str, int, int]] = set()


def _after_failures(session: Session, chain: str) -> dict[tuple[str, int], tuple[datetime, int]]:
    """(source, asset id) whose latest sweeps failed: when the next may start, and how
    many failed in a row.

    No wait is longer than SOLANA_SWEEP_RETRY_MAX, so only pairs with a sweep that failed
    within it can still be waiting: their sweeps alone are read (failures are few), not
    every sweep the chain ever made."""
    failing = {
        (source, asset_id)
        for source, asset_id in session.execute(
            select(Payout.source_address, Payout.asset_id).where(
                text(FAILED_SWEEP_SQL),
                Payout.chain == chain,
                Payout.updated_at >= utcnow() - SOLANA_SWEEP_RETRY_MAX,
            )
        )
    }
    failed: dict[tuple[str, int], tuple[int, datetime]] = {}
    sources = sorted({source for source, _ in failing})
    for start in range(0, len(sources), IN_LIST_BATCH):
        for row in session.execute(
            select(Payout.source_address, Payout.asset_id, Payout.status, Payout.updated_at)
            .where(
                Payout.chain == chain,
                Payout.source_address.in_(sources[start : start + IN_LIST_BATCH]),
                Payout.reason == PayoutReason.SWEEP.value,
            )
            .order_by(Payout.id)
        ):
            key = (row.source_address, row.asset_id)
            if key not in failing:
                continue
            if row.status == PayoutStatus.FAILED.value:
                failed[key] = (failed.get(key, (0, row.updated_at))[0] + 1, row.updated_at)
            else:
                failed.pop(key, None)
    return {
        key: (at + min(SOLANA_SWEEP_RETRY_MAX, SOLANA_SWEEP_RETRY * 2 ** (count - 1)), count)
        for key, (count, at) in failed.items()
    }


class DiscoveryHealth:
    """A chain's sweep discovery (balance reads over every deposit address) failing pass
    after pass for RPC trouble: an info line each time, one `sweep_discovery_stalled`
    error once it lasted `stalled_after_s`, an info line when it works again. The open
    sweeps are still driven meanwhile, and the job's tick does not fail."""

    def __init__(self, chain: str, stalled_after_s: float) -> None:
        self.chain = chain
        self.stalled_after_s = stalled_after_s
        self._failing_since: float | None = None
        self._stall_reported = False

    @contextmanager
    def attempt(self) -> Iterator[None]:
        try:
            yield
        except payouts.TRANSIENT_ERRORS as exc:
            self._failed(exc)
        else:
            if self._failing_since is not None:
                log.info("sweep_discovery_recovered", chain=self.chain)
            self._failing_since = None
            self._stall_reported = False

    def _failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        failing_s = now - self._failing_since
        fields = {"chain": self.chain, "error": f"{type(exc).__name__}: {exc}"}
        if not self._stall_reported and failing_s >= self.stalled_after_s:
            self._stall_reported = True
            log.error("sweep_discovery_stalled", failing_s=round(failing_s, 1), **fields)
        else:
            log.info("sweep_discovery_failed", **fields)


def recipient_of(raw_tx: bytes) -> str:
    """The `to` of a signed EIP-1559 transaction (a sweep's gas funding goes to its source)."""
    fields = rlp.decode(raw_tx[1:])
    return str(to_checksum_address(bytes(fields[5])))


class EvmSweeper:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        source: EvmSource,
        *,
        chain: str,
        chain_id: int,
        gas_wallet: EvmKey,
        hot_wallet: str,
        deposit_key: Callable[[int], EvmKey],
        max_fee_gwei: int,
        confirmations: int,
        min_amount_base_units: int,
        backoff: payouts.Backoff | None = None,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        self.sessions = sessions
        self.backoff = backoff or payouts.Backoff()
        self.discovery = DiscoveryHealth(chain, self.backoff.stalled_after_s)
        self.crash = crash or (lambda point: None)
        self.source = source
        self.chain = chain
        self.hot_wallet = to_checksum_address(hot_wallet)
        self.deposit_key = deposit_key
        self.min_amount = max(1, min_amount_base_units)
        self._sender_args = {
            "chain": chain,
            "chain_id": chain_id,
            "max_fee_gwei": max_fee_gwei,
            "confirmations": confirmations,
        }
        self.gas = EvmSender(source, gas_wallet, **self._sender_args)  # type: ignore[arg-type]

    def _sender(self, key: EvmKey) -> EvmSender:
        return EvmSender(self.source, key, **self._sender_args)  # type: ignore[arg-type]

    def _asset(self, session: Session) -> Asset | None:
        """The chain's USDC, None until the chain's poller registered it on its first tick."""
        return session.scalars(
            select(Asset).where(Asset.chain == self.chain, Asset.symbol == "USDC")
        ).one_or_none()

    def _asset_of(self, session: Session, payout: Payout) -> Asset:
        return session.get_one(Asset, payout.asset_id)

    def run_once(self) -> SweepStats:
        stats = SweepStats()
        with self.sessions() as session:
            registered = self._asset(session) is not None
        if not registered:
            # A fresh database: nothing can have been credited, so nothing to sweep yet.
            log.debug("sweeps_waiting_for_asset", chain=self.chain)
            return stats
        with self.discovery.attempt():
            self._discover(stats)
        now = utcnow()
        with self.sessions() as session:
            due_ids = list(
                session.scalars(
                    select(Payout.id)
                    .where(
                        Payout.chain == self.chain,
                        Payout.reason == PayoutReason.SWEEP.value,
                        Payout.status.in_(WORKED),
                        or_(Payout.retry_at.is_(None), Payout.retry_at <= now),
                    )
                    .order_by(Payout.id)
                )
            )
        for payout_id in due_ids:
            self._advance_isolated(payout_id, stats)
        return stats

    def _advance_isolated(self, payout_id: int, stats: SweepStats) -> None:
        """Advance one sweep; whatever it raises stays with it (backoff, waiting or parked)."""
        with self.sessions() as session:
            step_errors = session.scalar(select(Payout.step_errors).where(Payout.id == payout_id))
        try:
            self._advance(payout_id, stats)
        except GasWalletShort as short:
            stats.waiting += 1
            self._short_of_gas(payout_id, short.reason)
        except SendRefused as exc:
            stats.errors += 1
            self._step_failed(payout_id, exc, delay=False)
        except payouts.TRANSIENT_ERRORS as exc:
            stats.errors += 1
            self._step_failed(payout_id, exc)
        except Exception as exc:
            stats.parked += 1
            self._park(payout_id, exc)
        else:
            if step_errors:
                in_transaction(self.sessions, lambda s: payouts.clear_step_failures(s, payout_id))
                log.info("sweep_step_recovered", payout_id=payout_id, failed_steps=step_errors)

    def _step_failed(self, payout_id: int, exc: BaseException, *, delay: bool = True) -> None:
        failure = in_transaction(
            self.sessions,
            lambda s: payouts.record_step_failure(s, payout_id, self.backoff, delay=delay),
        )
        assert failure is not None, "a sweep is not claimed: its failure is always recorded"
        fields = {
            "payout_id": payout_id,
            "chain": self.chain,
            "error": f"{type(exc).__name__}: {exc}",
            "failed_steps": failure.step_errors,
            "retry_in_s": round(failure.retry_in_s, 3),
        }
        if failure.stalled_now:
            log.error("sweep_stalled", stalled_after_s=self.backoff.stalled_after_s, **fields)
        else:
            log.info("sweep_step_failed", **fields)

    def _park(self, payout_id: int, exc: BaseException) -> None:
        reason = f"{type(exc).__name__}: {exc}"

        def work(session: Session) -> None:
            payout = session.get_one(Payout, payout_id)
            payouts.park(session, payout, reason=reason, actor="sweeper")

        in_transaction(self.sessions, work)
        log.error(
            "sweep_needs_attention",
            payout_id=payout_id,
            chain=self.chain,
            error=reason,
            traceback="".join(traceback.format_exception(exc)),
        )

    def _short_of_gas(self, payout_id: int, reason: str) -> None:
        """The gas wallet cannot fund this sweep: an unsigned sweep waits in waiting_funds
        (announced once); one already signed backs off like any failed step."""

        def work(session: Session) -> bool:
            payout = session.get_one(Payout, payout_id)
            payout.status_reason = reason[:500]
            if payout.status != PayoutStatus.REQUESTED.value:
                return False
            payout.status = PayoutStatus.WAITING_FUNDS.value
            session.flush()
            self._audit(session, payout, "sweep_waiting_funds", reason=payout.status_reason)
            return True

        if in_transaction(self.sessions, work):
            log.warning("sweep_waiting_for_funds", payout_id=payout_id, reason=reason)
            return
        with self.sessions() as session:
            status = session.get_one(Payout, payout_id).status
        if status != PayoutStatus.WAITING_FUNDS.value:
            self._step_failed(payout_id, GasWalletShort(reason))

    def _due_count(self) -> int:
        """Sweeps a pass would work on now (not waiting for funds, parked or backing off)."""
        now = utcnow()
        with self.sessions() as session:
            count = session.scalar(
                select(func.count())
                .select_from(Payout)
                .where(
                    Payout.chain == self.chain,
                    Payout.reason == PayoutReason.SWEEP.value,
                    Payout.status.in_(IN_FLIGHT),
                    or_(Payout.retry_at.is_(None), Payout.retry_at <= now),
                )
            )
        return count or 0

    def run_until_idle(self, *, max_passes: int = 200, pause_s: float = 0.05) -> SweepStats:
        """Passes until nothing is left to sweep on this chain (tests, CLI)."""
        total = SweepStats()
        for _ in range(max_passes):
            stats = self.run_once()
            for name in (f.name for f in fields(SweepStats)):
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            # A pass that confirmed a sweep may leave a later deposit to its address for
            # the next one to find: idle is a pass that did nothing with nothing due.
            if stats == SweepStats() and self._due_count() == 0:
                break
            time.sleep(pause_s)
        return total

    def _discover(self, stats: SweepStats) -> None:
        with self.sessions() as session:
            asset = self._asset(session)
            assert asset is not None and asset.token_address is not None
            token, asset_id = asset.token_address, asset.id
            due = sweepable(session, chain=self.chain, asset_id=asset_id)
            busy = set(
                session.scalars(
                    select(Payout.source_address).where(
                        Payout.chain == self.chain,
                        Payout.reason == PayoutReason.SWEEP.value,
                        Payout.status.in_(OPEN),
                    )
                )
            )
        for address, credited in due.items():
            if address in busy:
                continue
            balance = self.source.erc20_balance(token, address)
            # A sweep's amount is a BIGINT of token units: more (USDC at 18 decimals above
            # about 9.2 tokens) goes in the next sweep.
            amount = min(balance, credited.credited_base_units, MAX_SWEEP_BASE_UNITS)
            if amount < self.min_amount:
                continue
            create = functools.partial(
                self._create, address=address, agent_id=credited.agent_id, amount=amount
            )
            if in_transaction(self.sessions, create):
                stats.created += 1

    def _create(self, session: Session, address: str, agent_id: int, amount: int) -> bool:
        asset = self._asset(session)
        assert asset is not None, "discovery runs once the asset is registered"
        return create_sweep(
            session,
            chain=self.chain,
            asset=asset,
            source=address,
            agent_id=agent_id,
            destination=self.hot_wallet,
            amount=amount,
        )

    def _audit(self, session: Session, payout: Payout, action: str, **details: object) -> None:
        audit.append(
            session,
            stream=f"payout:{payout.id}",
            actor="sweeper",
            action=action,
            asset="USDC",
            amount=payout.amount,
            details={
                "chain": payout.chain,
                "source": payout.source_address,
                "destination": payout.destination,
                "tx_hash": payout.tx_hash,
                **details,
            },
        )

    def _transactions(
        self, payout_id: int
    ) -> tuple[list[PayoutTransaction], list[PayoutTransaction]]:
        """(gas funding transactions, sweep transactions) of a sweep, oldest first."""
        with self.sessions() as session:
            payout = session.get(Payout, payout_id)
            assert payout is not None
            txs = list(
                session.scalars(
                    select(PayoutTransaction)
                    .where(PayoutTransaction.payout_id == payout_id)
                    .order_by(PayoutTransaction.id)
                )
            )
            source = to_checksum_address(payout.source_address)
        funding = [t for t in txs if recipient_of(t.raw_tx) == source]
        return funding, [t for t in txs if t not in funding]

    def _advance(self, payout_id: int, stats: SweepStats) -> None:
        funding, sweeps = self._transactions(payout_id)
        if funding and self.source.receipt(funding[-1].tx_hash) is None:
            # Gas on its way: the sweep waits for it, its stored bytes sent until mined.
            self._send(funding[-1].raw_tx)
            return
        if sweeps:
            outcome = self._sender(self._key_of(payout_id)).outcome([t.tx_hash for t in sweeps])
            if outcome.state is TxState.PENDING:
                if outcome.tx_hash is None and not self._top_up(payout_id, sweeps[-1], stats):
                    self._send(sweeps[-1].raw_tx)
                return
            self.crash("before_confirm")
            in_transaction(
                self.sessions,
                lambda s: self._finish(
                    s, payout_id, outcome.state, outcome.tx_hash, outcome.block_number
                ),
            )
            if outcome.state is TxState.CONFIRMED:
                stats.confirmed += 1
            else:
                stats.failed += 1
            return
        if self._top_up(payout_id, None, stats):
            return
        key = self._key_of(payout_id)
        signed = in_transaction(self.sessions, lambda s: self._sign_sweep(s, payout_id, key))
        self.crash("after_sweep_store")
        self._send(signed.raw_tx)
        self.crash("after_sweep_broadcast")
        stats.sent += 1

    def _top_up(self, payout_id: int, stored: PayoutTransaction | None, stats: SweepStats) -> bool:
        """Send the deposit address the gas it lacks, for the stored sweep transaction or
        (none stored yet) one at today's fees; False when it has enough."""
        signed = in_transaction(self.sessions, lambda s: self._fund_gas(s, payout_id, stored))
        if signed is None:
            return False
        stats.funded += 1
        self.crash("after_fund_store")
        self._send(signed.raw_tx)
        self.crash("after_fund_broadcast")
        return True

    def _send(self, raw_tx: bytes) -> None:
        try:
            self.source.send_raw_transaction(raw_tx)
        except RpcError as exc:
            raise SendRefused(str(exc)) from exc

    def _key_of(self, payout_id: int) -> EvmKey:
        with self.sessions() as session:
            source = session.scalar(select(Payout.source_address).where(Payout.id == payout_id))
            index = session.scalar(
                select(DepositAddress.derivation_index).where(
                    DepositAddress.chain == Chain.EVM.value, DepositAddress.address == source
                )
            )
        assert index is not None, "a sweep's source is one of our deposit addresses"
        key = self.deposit_key(index)
        assert key.address.lower() == str(source).lower(), "deposit key derivation mismatch"
        return key

    def _store(self, session: Session, payout: Payout, signed: SignedTx) -> None:
        session.add(
            PayoutTransaction(
                payout_id=payout.id,
                tx_hash=signed.tx_hash,
                raw_tx=signed.raw_tx,
                nonce=signed.nonce,
                max_fee_per_gas=signed.max_fee_per_gas,
            )
        )

    def _fund_gas(
        self, session: Session, payout_id: int, stored: PayoutTransaction | None
    ) -> SignedTx | None:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status in WORKED
        # A stored sweep is never re-signed, so when fees moved between funding and
        # signing its own fee cap is what the address must cover, or it never lands.
        fees = (
            decode_fees(stored.raw_tx)[1]
            if stored is not None
            else quote_fees(self.source, self.gas.cap_wei)
        )
        need = ERC20_TRANSFER_GAS * fees.max_fee_per_gas
        have = self.source.native_balance_wei(payout.source_address)
        if have >= need:
            return None
        send_wei = GAS_MARGIN * need - have
        # The node refuses (or the chain reverts) a transfer the gas wallet cannot pay.
        cost_wei = send_wei + self.gas.gas_cost_cap_wei(NATIVE_TRANSFER_GAS)
        gas_wallet_wei = self.source.native_balance_wei(self.gas.address)
        if gas_wallet_wei < cost_wei:
            raise GasWalletShort(
                f"gas wallet {self.gas.address} holds {gas_wallet_wei} wei; sending "
                f"{payout.source_address} the gas for its sweep needs up to {cost_wei} wei: "
                "top up the gas wallet"
            )
        self._funds_available(session, payout)
        signed = self.gas.sign_native_transfer(
            session, to=payout.source_address, amount_wei=send_wei
        )
        self.crash("after_fund_sign")
        self._store(session, payout, signed)
        self._audit(session, payout, "sweep_gas_funded", funding_tx_hash=signed.tx_hash)
        return signed

    def _sign_sweep(self, session: Session, payout_id: int, key: EvmKey) -> SignedTx:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status in WORKED
        self._funds_available(session, payout)
        asset = self._asset_of(session, payout)
        assert asset.token_address is not None
        signed = self._sender(key).sign_token_transfer(
            session, token=asset.token_address, to=self.hot_wallet, amount_base_units=payout.amount
        )
        self.crash("after_sweep_sign")
        self._store(session, payout, signed)
        payout.status = PayoutStatus.SIGNED.value
        payout.tx_hash = signed.tx_hash
        payout.raw_tx = signed.raw_tx
        payout.nonce = signed.nonce
        payout.attempts += 1
        session.flush()
        self._audit(session, payout, "sweep_signed")
        return signed

    def _funds_available(self, session: Session, payout: Payout) -> None:
        """A sweep that waited for the gas wallet goes on."""
        if payout.status != PayoutStatus.WAITING_FUNDS.value:
            return
        payout.status = PayoutStatus.REQUESTED.value
        payout.status_reason = None
        session.flush()
        self._audit(session, payout, "sweep_funds_available")

    def _finish(
        self,
        session: Session,
        payout_id: int,
        state: TxState,
        tx_hash: str | None,
        block: int | None,
    ) -> None:
        payout = session.get(Payout, payout_id)
        assert payout is not None and payout.status in OPEN
        payout.status = (
            PayoutStatus.CONFIRMED.value
            if state is TxState.CONFIRMED
            else PayoutStatus.FAILED.value
        )
        payout.tx_hash = tx_hash
        payout.block_number = block
        session.flush()
        self._audit(session, payout, f"sweep_{payout.status}")
        log.info("sweep_finished", payout_id=payout_id, status=payout.status, tx_hash=tx_hash)


def build_evm_sweeper(
    sessions: sessionmaker[Session],
    settings: Settings,
    chain: str,
    keystore: UnlockedKeystore,
    source: EvmSource | None = None,
    *,
    crash: Callable[[str], None] | None = None,
) -> EvmSweeper:
    """The sweeper of a configured EVM chain: gas from the keystore's gas wallet, USDC
    into its hot wallet, deposit keys derived from its seed; the dust minimum is the
    payout minimum. `source` defaults to the chain's JSON-RPC URLs."""
    from escrowd.indexer.evm_source import JsonRpcEvmSource

    evm = settings.evm_chain(chain)
    return EvmSweeper(
        sessions,
        source or JsonRpcEvmSource.for_chain(evm),
        chain=evm.name,
        chain_id=evm.chain_id,
        gas_wallet=keystore.evm_gas_wallet,
        hot_wallet=keystore.evm_hot_wallet.address,
        deposit_key=keystore.derive_evm,
        max_fee_gwei=evm.max_fee_gwei,
        confirmations=evm.confirmations,
        min_amount_base_units=settings.payouts.min_usdc_base_units,
        backoff=payouts.Backoff.of(settings),
        crash=crash,
    )


def main(argv: Sequence[str] | None = None) -> int:
    from pathlib import Path

    from escrowd.config.settings import load_settings
    from escrowd.escrow.payout_worker import CrashHook, unlock_from_settings
    from escrowd.models.db import make_engine, make_session_factory

    parser = argparse.ArgumentParser(prog="python -m escrowd.escrow.sweeps")
    parser.add_argument("--config", required=True)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    settings = load_settings(Path(args.config))
    engine = make_engine(settings.resolved_database_url)
    sweeper = build_evm_sweeper(
        make_session_factory(engine),
        settings,
        args.chain,
        unlock_from_settings(settings),
        crash=CrashHook.from_env(CRASH_POINTS),
    )
    stats = sweeper.run_until_idle() if args.until_idle else sweeper.run_once()
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
