"""The payout worker: claims payouts in the database and drives each one through
requested -> signed -> broadcast -> confirmed | failed, exactly once across crashes.

Rules (see DESIGN.md, Payouts):
- One sender per payout: a worker claims a row with a conditional UPDATE (free, expired
  lease, or already its own), and every later transition is again conditional on
  (status, claimed_by), so a worker that lost its lease cannot commit anything.
- Signed bytes, their hash and (EVM) the nonce commit in one transaction before the
  first broadcast; after a crash the stored bytes are sent again, never re-signed while
  they may still land. EVM replacements reuse the nonce; Solana re-signs only once the
  blockhash expired and no stored signature is known to the cluster.
- No way back: nothing moves a signed or broadcast payout to requested, and nothing
  fails it except the chain (EVM receipt status 0, Solana err); "unknown" stays in flight.
- Confirmed: the hold is posted as an outflow (payouts in flight -> custody). Failed: the
  hold is reversed (payouts in flight -> agent available). Each state change writes an
  audit row and a webhook event in the same transaction.

Run one pass from the command line (used by the crash tests):
``python -m escrow.payout_worker --config FILE --chain NAME --worker-id ID``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import structlog
from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import EscrowdError
from escrowd.config.settings import Settings
from escrowd.escrow import accounts, audit, events, ledger
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.indexer.sending import SignedTx, TxOutcome, TxState
from escrowd.models import (
    AccountKind,
    Agent,
    Asset,
    Chain,
    DepositAddress,
    Escrow,
    Payout,
    PayoutReason,
    PayoutStatus,
    PayoutTransaction,
    TransferCode,
    utcnow,
)
from escrowd.wallets.keystore import SolanaKey, UnlockedKeystore, load_passphrase, unlock_keystore

if TYPE_CHECKING:
    # Imported lazily at run time: an EVM worker need not load the Solana stack.
    from escrowd.indexer.evm_sender import EvmSender
    from escrowd.indexer.solana_sender import SolanaSender

log = structlog.get_logger(__name__)

CRASH_ENV = "ESCROWD_TEST_CRASH_AT"
CRASH_AFTER_ENV = "ESCROWD_TEST_CRASH_AFTER"
# Where a crash test may kill the worker; each is a moment with different stored state.
CRASH_POINTS = ("after_hold", "after_sign", "after_store", "after_broadcast", "before_confirm")
IN_FLIGHT = (PayoutStatus.REQUESTED, PayoutStatus.SIGNED, PayoutStatus.BROADCAST)
NETWORK_FEE_ASSET = "SOL"


class PayoutChain(Protocol):
    """One chain as the worker sees it (adapters below wrap the indexer senders)."""

    chain: str
    source_address: str
    # EVM: a stuck transaction may be replaced (same nonce, so only one can land).
    # Solana: never while the old signature may land; only after expiry.
    replaces_when_stuck: bool
    # Whether this adapter signs sweeps (reason "sweep", sent from a deposit address).
    handles_sweeps: bool

    def sign(self, session: Session, payout: Payout, asset: Asset) -> SignedTx: ...

    def renew(self, session: Session, payout: Payout, asset: Asset) -> SignedTx | None:
        """A transaction to take over from the stored ones: an EVM replacement (same
        nonce, higher fee) or a Solana re-sign after expiry; None if not possible now."""
        ...

    def broadcast(self, raw_tx: bytes) -> str: ...

    def outcome(self, payout: Payout, asset: Asset, tx_hashes: Sequence[str]) -> TxOutcome: ...

    @property
    def native_fee_asset(self) -> str | None:
        """The ledger asset the hot wallet's fees are paid in when the ledger tracks it."""
        ...


class SimulatedCrash(BaseException):
    """Raised at a crash point in-process tests ask for (a subprocess exits instead)."""


@dataclass
class WorkerOptions:
    worker_id: str
    lease_s: float = 60.0
    stuck_after_s: float = 120.0
    rebroadcast_after_s: float = 10.0
    # Solana re-signs after expiry at most this often before failing the payout for good.
    max_sign_attempts: int = 5
    batch_limit: int = 200
    # Payouts leased per statement: small enough that two workers share a backlog.
    claim_chunk: int = 16


@dataclass
class PassStats:
    claimed: int = 0
    signed: int = 0
    broadcast: int = 0
    confirmed: int = 0
    failed: int = 0
    renewed: int = 0
    pending: int = 0
    errors: int = 0


class _LostClaim(Exception):
    """Another worker holds the payout now, or its status moved on: do nothing."""


@dataclass
class CrashHook:
    """Crash on the `after`-th time `point` is reached (tests only)."""

    point: str | None = None
    after: int = 1
    exit_process: bool = True
    _hits: int = field(default=0)

    @classmethod
    def from_env(cls, points: Sequence[str] = CRASH_POINTS) -> CrashHook:
        point = os.environ.get(CRASH_ENV) or None
        assert point is None or point in points, f"unknown crash point {point}"
        return cls(point=point, after=int(os.environ.get(CRASH_AFTER_ENV, "1")))

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self._hits += 1
        if self._hits < self.after:
            return
        if self.exit_process:
            os._exit(137)
        raise SimulatedCrash(point)


class PayoutWorker:
    def __init__(
        self,
        sessions: sessionmaker[Session],
        chain: PayoutChain,
        options: WorkerOptions,
        *,
        crash: Callable[[str], None] | None = None,
    ) -> None:
        assert options.lease_s > 0 and options.batch_limit > 0
        self.sessions = sessions
        self.chain = chain
        self.options = options
        self.crash = crash or (lambda point: None)
        self._last_sent: dict[int, float] = {}

    # --- claiming ------------------------------------------------------------------

    def _candidates(self) -> list[int]:
        now = utcnow()
        me = self.options.worker_id
        query = select(Payout.id).where(
            Payout.chain == self.chain.chain,
            Payout.status.in_([s.value for s in IN_FLIGHT]),
            or_(
                Payout.claimed_by.is_(None),
                Payout.claimed_by == me,
                Payout.claimed_until < now,
            ),
        )
        if not self.chain.handles_sweeps:
            query = query.where(Payout.reason != PayoutReason.SWEEP.value)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(Payout.id).limit(self.options.batch_limit)))

    def claim(self, payout_id: int) -> bool:
        """Take (or renew) the lease on a payout; False when another worker holds it."""
        return bool(self.claim_many([payout_id]))

    def claim_many(self, payout_ids: Sequence[int]) -> dict[int, PayoutStatus]:
        """Lease those of `payout_ids` that are free, expired or ours, in one statement;
        returns the claimed ones with their status."""
        me = self.options.worker_id

        def work(session: Session) -> dict[int, PayoutStatus]:
            now = utcnow()
            rows = session.execute(
                update(Payout)
                .where(
                    Payout.id.in_(payout_ids),
                    Payout.status.in_([s.value for s in IN_FLIGHT]),
                    or_(
                        Payout.claimed_by.is_(None),
                        Payout.claimed_by == me,
                        Payout.claimed_until < now,
                    ),
                )
                .values(claimed_by=me, claimed_until=now + timedelta(seconds=self.options.lease_s))
                .returning(Payout.id, Payout.status)
                .execution_options(synchronize_session=False)
            ).all()
            return {row.id: PayoutStatus(row.status) for row in rows}

        return in_transaction(self.sessions, work)

    def _hold(self, session: Session, payout_id: int, status: PayoutStatus) -> Payout:
        """Lock our claimed payout in `status` for this transaction, or raise _LostClaim."""
        result = session.execute(
            update(Payout)
            .where(
                Payout.id == payout_id,
                Payout.status == status.value,
                Payout.claimed_by == self.options.worker_id,
            )
            .values(claimed_until=utcnow() + timedelta(seconds=self.options.lease_s))
            .execution_options(synchronize_session=False)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]
            raise _LostClaim(payout_id)
        payout = session.scalars(
            select(Payout).where(Payout.id == payout_id).execution_options(populate_existing=True)
        ).one()
        return payout

    # --- one pass -------------------------------------------------------------------

    def run_once(self) -> PassStats:
        stats = PassStats()
        candidates = self._candidates()
        chunk = self.options.claim_chunk
        for start in range(0, len(candidates), chunk):
            claimed = self.claim_many(candidates[start : start + chunk])
            for payout_id in sorted(claimed):
                stats.claimed += 1
                self._advance_logged(payout_id, claimed[payout_id], stats)
        return stats

    def _advance_logged(self, payout_id: int, status: PayoutStatus, stats: PassStats) -> None:
        try:
            self.advance(payout_id, stats, status)
        except _LostClaim:
            log.info("payout_claim_lost", payout_id=payout_id, worker=self.options.worker_id)
        except (RpcError, EscrowdError) as exc:
            # Unknown outcome: the payout stays where it is and the next pass retries.
            stats.errors += 1
            log.warning("payout_step_failed", payout_id=payout_id, error=str(exc))

    def run_until_idle(self, *, max_passes: int = 1_000, pause_s: float = 0.05) -> PassStats:
        """Passes until no payout of this chain is in flight (tests, benchmarks, CLI)."""
        total = PassStats()
        for _ in range(max_passes):
            stats = self.run_once()
            for name in total.__dataclass_fields__:
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            if stats.claimed == 0 and not self._candidates():
                break
            time.sleep(pause_s)
        return total

    def _status(self, payout_id: int) -> PayoutStatus:
        with self.sessions() as session:
            status = session.scalar(select(Payout.status).where(Payout.id == payout_id))
        assert status is not None
        return PayoutStatus(status)

    def advance(self, payout_id: int, stats: PassStats, status: PayoutStatus | None = None) -> None:
        """Move one claimed payout as far as the chain allows now."""
        status = status or self._status(payout_id)
        fresh: bytes | None = None
        if status is PayoutStatus.REQUESTED:
            self.crash("after_hold")
            fresh = in_transaction(self.sessions, lambda s: self._sign(s, payout_id))
            stats.signed += 1
            self.crash("after_store")
            status = PayoutStatus.SIGNED
        if status is PayoutStatus.SIGNED:
            if fresh is None:
                # Signed before a crash: it may have been sent and landed already.
                outcome = self._outcome(payout_id)
                if outcome.tx_hash is not None:
                    # On chain: record that it was broadcast, then settle as usual.
                    in_transaction(self.sessions, lambda s: self._mark_broadcast(s, payout_id))
                    stats.broadcast += 1
                    self._after_outcome(payout_id, PayoutStatus.BROADCAST, outcome, stats)
                    return
                if outcome.state is not TxState.PENDING:
                    self._after_outcome(payout_id, PayoutStatus.SIGNED, outcome, stats)
                    return
            self.chain.broadcast(fresh or self._latest_raw(payout_id))
            self._last_sent[payout_id] = time.monotonic()
            self.crash("after_broadcast")
            in_transaction(self.sessions, lambda s: self._mark_broadcast(s, payout_id))
            stats.broadcast += 1
            status = PayoutStatus.BROADCAST
        if status is PayoutStatus.BROADCAST:
            self.crash("before_confirm")
            self._after_outcome(payout_id, status, self._outcome(payout_id), stats)

    def _outcome(self, payout_id: int) -> TxOutcome:
        with self.sessions() as session:
            payout = session.get(Payout, payout_id)
            assert payout is not None
            hashes = list(
                session.scalars(
                    select(PayoutTransaction.tx_hash)
                    .where(PayoutTransaction.payout_id == payout_id)
                    .order_by(PayoutTransaction.id.desc())
                )
            )
            return self.chain.outcome(payout, self._asset(session, payout), hashes)

    def _latest_raw(self, payout_id: int) -> bytes:
        with self.sessions() as session:
            raw = session.scalar(select(Payout.raw_tx).where(Payout.id == payout_id))
        assert raw is not None, "a signed payout always has its stored bytes"
        return raw

    def _latest_signed_at(self, payout_id: int) -> float:
        with self.sessions() as session:
            created = session.scalar(
                select(PayoutTransaction.created_at)
                .where(PayoutTransaction.payout_id == payout_id)
                .order_by(PayoutTransaction.id.desc())
                .limit(1)
            )
        assert created is not None
        return (utcnow() - created).total_seconds()

    def _after_outcome(
        self, payout_id: int, status: PayoutStatus, outcome: TxOutcome, stats: PassStats
    ) -> None:
        if outcome.state is TxState.CONFIRMED:
            in_transaction(self.sessions, lambda s: self._settle(s, payout_id, status, outcome))
            stats.confirmed += 1
            self._last_sent.pop(payout_id, None)
            return
        if outcome.state is TxState.FAILED:
            in_transaction(self.sessions, lambda s: self._fail(s, payout_id, status, outcome))
            stats.failed += 1
            self._last_sent.pop(payout_id, None)
            return
        if outcome.state is TxState.EXPIRED:
            self._renew(payout_id, status, stats, reason="blockhash_expired")
            return
        stats.pending += 1
        if outcome.tx_hash is not None:
            return  # seen on chain, waiting for depth or finality: nothing to send
        if (
            self.chain.replaces_when_stuck
            and self._latest_signed_at(payout_id) > self.options.stuck_after_s
        ):
            self._renew(payout_id, status, stats, reason="stuck")
            return
        last = self._last_sent.get(payout_id)
        if last is None or time.monotonic() - last > self.options.rebroadcast_after_s:
            try:
                self.chain.broadcast(self._latest_raw(payout_id))
            except RpcError as exc:
                log.info("payout_rebroadcast_refused", payout_id=payout_id, error=str(exc))
            self._last_sent[payout_id] = time.monotonic()

    def _renew(self, payout_id: int, status: PayoutStatus, stats: PassStats, reason: str) -> None:
        renewed = in_transaction(
            self.sessions, lambda s: self._store_renewal(s, payout_id, status, reason)
        )
        if renewed is None:
            return
        stats.renewed += 1
        self.chain.broadcast(renewed.raw_tx)
        self._last_sent[payout_id] = time.monotonic()

    # --- transitions (each in one transaction) --------------------------------------

    def _asset(self, session: Session, payout: Payout) -> Asset:
        asset = session.get(Asset, payout.asset_id)
        assert asset is not None
        return asset

    def _record(
        self, session: Session, payout: Payout, asset: Asset, action: str, **details: object
    ) -> None:
        audit.append(
            session,
            stream=f"payout:{payout.id}",
            actor=f"worker:{self.options.worker_id}",
            action=action,
            asset=asset.symbol,
            amount=payout.amount,
            details={
                "chain": payout.chain,
                "status": payout.status,
                "tx_hash": payout.tx_hash,
                "nonce": payout.nonce,
                **details,
            },
        )

    def _event(self, session: Session, payout: Payout, asset: Asset, **extra: object) -> None:
        if payout.reason == PayoutReason.SWEEP.value:
            return  # internal custody moves: nothing changed for any webhook consumer
        agent = None if payout.agent_id is None else session.get(Agent, payout.agent_id)
        events.emit(
            session,
            f"payout.{payout.status}",
            {
                "payout_id": payout.id,
                "agent": agent.external_id if agent is not None else None,
                "network": payout.chain,
                "asset": asset.symbol,
                "destination": payout.destination,
                "amount_base_units": str(payout.amount),
                "reason": payout.reason,
                "status": payout.status,
                "tx_hash": payout.tx_hash,
                **extra,
            },
        )

    def _store(self, session: Session, payout: Payout, signed: SignedTx) -> None:
        session.add(
            PayoutTransaction(
                payout_id=payout.id,
                tx_hash=signed.tx_hash,
                raw_tx=signed.raw_tx,
                nonce=signed.nonce,
                max_fee_per_gas=signed.max_fee_per_gas,
                last_valid_block_height=signed.last_valid_block_height,
            )
        )
        payout.tx_hash = signed.tx_hash
        payout.raw_tx = signed.raw_tx
        payout.nonce = signed.nonce
        payout.max_fee_per_gas = signed.max_fee_per_gas
        payout.last_valid_block_height = signed.last_valid_block_height
        payout.attempts += 1

    def _sign(self, session: Session, payout_id: int) -> bytes:
        payout = self._hold(session, payout_id, PayoutStatus.REQUESTED)
        asset = self._asset(session, payout)
        signed = self.chain.sign(session, payout, asset)
        self.crash("after_sign")
        self._store(session, payout, signed)
        payout.status = PayoutStatus.SIGNED.value
        if not payout.source_address:
            payout.source_address = self.chain.source_address
        session.flush()
        self._record(session, payout, asset, "payout_signed")
        self._event(session, payout, asset)
        log.info(
            "payout_signed",
            payout_id=payout.id,
            chain=payout.chain,
            tx_hash=signed.tx_hash,
            nonce=signed.nonce,
        )
        return signed.raw_tx

    def _mark_broadcast(self, session: Session, payout_id: int) -> None:
        payout = self._hold(session, payout_id, PayoutStatus.SIGNED)
        asset = self._asset(session, payout)
        payout.status = PayoutStatus.BROADCAST.value
        payout.broadcast_at = utcnow()
        session.flush()
        self._record(session, payout, asset, "payout_broadcast")
        self._event(session, payout, asset)
        log.info(
            "payout_broadcast", payout_id=payout.id, chain=payout.chain, tx_hash=payout.tx_hash
        )

    def _store_renewal(
        self, session: Session, payout_id: int, status: PayoutStatus, reason: str
    ) -> SignedTx | None:
        payout = self._hold(session, payout_id, status)
        asset = self._asset(session, payout)
        if reason == "blockhash_expired" and payout.attempts >= self.options.max_sign_attempts:
            self._fail_locked(
                session,
                payout,
                asset,
                TxOutcome(
                    TxState.FAILED,
                    error="blockhash expired "
                    f"{payout.attempts} times without landing; gave up re-signing",
                ),
            )
            return None
        renewed = self.chain.renew(session, payout, asset)
        if renewed is None:
            log.info("payout_renewal_not_possible", payout_id=payout_id, reason=reason)
            return None
        previous = payout.tx_hash
        self._store(session, payout, renewed)
        session.flush()
        self._record(session, payout, asset, "payout_resigned", reason=reason, replaces=previous)
        log.info(
            "payout_resigned",
            payout_id=payout_id,
            reason=reason,
            tx_hash=renewed.tx_hash,
            replaces=previous,
        )
        return renewed

    def _settle(
        self, session: Session, payout_id: int, status: PayoutStatus, outcome: TxOutcome
    ) -> None:
        payout = self._hold(session, payout_id, status)
        asset = self._asset(session, payout)
        assert outcome.tx_hash is not None
        payout.status = PayoutStatus.CONFIRMED.value
        payout.tx_hash = outcome.tx_hash
        payout.block_number = outcome.block_number
        payout.confirmed_at = utcnow()
        stream = f"payout:{payout.id}"
        actor = f"worker:{self.options.worker_id}"
        if payout.reason != PayoutReason.SWEEP.value:
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        idempotency_key=f"payout:{payout.id}:settle",
                        debit_account_id=accounts.payouts_in_flight(
                            session, payout.chain, asset.symbol
                        ).id,
                        credit_account_id=accounts.custody(session, payout.chain, asset.symbol).id,
                        amount=payout.amount,
                        code=TransferCode.PAYOUT,
                        ref_type="payout",
                        ref_id=str(payout.id),
                    )
                ],
                actor=actor,
                audit_stream=stream,
            )
        self._book_network_cost(session, payout, outcome)
        if payout.escrow_id is not None:
            escrow = session.get(Escrow, payout.escrow_id)
            assert escrow is not None
            if payout.reason == PayoutReason.RELEASE.value:
                escrow.payout_tx_hash = outcome.tx_hash
            elif payout.reason == PayoutReason.REFUND.value:
                escrow.refund_tx_hash = outcome.tx_hash
        session.flush()
        self._record(session, payout, asset, "payout_confirmed", block_number=outcome.block_number)
        self._event(session, payout, asset, block_number=outcome.block_number)
        log.info(
            "payout_confirmed",
            payout_id=payout.id,
            chain=payout.chain,
            tx_hash=outcome.tx_hash,
            amount_base_units=payout.amount,
        )

    def _book_network_cost(self, session: Session, payout: Payout, outcome: TxOutcome) -> None:
        """Fees and rent the hot wallet paid in a ledger-tracked coin (SOL) leave custody."""
        fee_asset = self.chain.native_fee_asset
        if fee_asset is None or outcome.network_cost_base_units <= 0:
            return
        ledger.post(
            session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"payout:{payout.id}:network_cost",
                    debit_account_id=ledger.get_or_create_account(
                        session, AccountKind.GENERAL, f"network_costs:{payout.chain}", fee_asset
                    ).id,
                    credit_account_id=accounts.custody(session, payout.chain, fee_asset).id,
                    amount=outcome.network_cost_base_units,
                    code=TransferCode.ADJUSTMENT,
                    ref_type="payout",
                    ref_id=str(payout.id),
                )
            ],
            actor=f"worker:{self.options.worker_id}",
            audit_stream=f"payout:{payout.id}",
        )

    def _fail(
        self, session: Session, payout_id: int, status: PayoutStatus, outcome: TxOutcome
    ) -> None:
        payout = self._hold(session, payout_id, status)
        self._fail_locked(session, payout, self._asset(session, payout), outcome)

    def _fail_locked(
        self, session: Session, payout: Payout, asset: Asset, outcome: TxOutcome
    ) -> None:
        assert outcome.state is TxState.FAILED
        payout.status = PayoutStatus.FAILED.value
        payout.error = (outcome.error or "failed on chain")[:500]
        if outcome.tx_hash is not None:
            payout.tx_hash = outcome.tx_hash
            payout.block_number = outcome.block_number
        if payout.reason != PayoutReason.SWEEP.value:
            assert payout.agent_id is not None
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        idempotency_key=f"payout:{payout.id}:reversal",
                        debit_account_id=accounts.payouts_in_flight(
                            session, payout.chain, asset.symbol
                        ).id,
                        credit_account_id=accounts.agent_available(
                            session, payout.agent_id, asset.symbol
                        ).id,
                        amount=payout.amount,
                        code=TransferCode.PAYOUT_REVERSAL,
                        ref_type="payout",
                        ref_id=str(payout.id),
                    )
                ],
                actor=f"worker:{self.options.worker_id}",
                audit_stream=f"payout:{payout.id}",
            )
        self._book_network_cost(session, payout, outcome)
        session.flush()
        self._record(session, payout, asset, "payout_failed", error=payout.error)
        self._event(session, payout, asset, error=payout.error)
        log.warning("payout_failed", payout_id=payout.id, chain=payout.chain, error=payout.error)


# --- chain adapters ------------------------------------------------------------------


class EvmPayoutChain:
    """USDC payouts from the EVM hot wallet."""

    native_fee_asset: str | None = None
    replaces_when_stuck = True
    # EVM sweeps need gas funding first: escrow.sweeps.EvmSweeper drives them.
    handles_sweeps = False

    def __init__(self, sender: EvmSender) -> None:
        self.sender = sender
        self.chain = sender.chain
        self.source_address = sender.address

    def sign(self, session: Session, payout: Payout, asset: Asset) -> SignedTx:
        assert asset.token_address is not None, "EVM payouts move the USDC token"
        return self.sender.sign_token_transfer(
            session,
            token=asset.token_address,
            to=payout.destination,
            amount_base_units=payout.amount,
        )

    def renew(self, session: Session, payout: Payout, asset: Asset) -> SignedTx | None:
        assert payout.raw_tx is not None and asset.token_address is not None
        return self.sender.sign_replacement(
            payout.raw_tx,
            token=asset.token_address,
            to=payout.destination,
            amount_base_units=payout.amount,
        )

    def broadcast(self, raw_tx: bytes) -> str:
        return self.sender.broadcast(raw_tx)

    def outcome(self, payout: Payout, asset: Asset, tx_hashes: Sequence[str]) -> TxOutcome:
        return self.sender.outcome(tx_hashes)


class SolanaPayoutChain:
    """SOL and USDC payouts from the Solana hot wallet (which pays fees and rent), and,
    given `deposit_key`, sweeps from deposit addresses (the deposit key signs too)."""

    native_fee_asset: str | None = NETWORK_FEE_ASSET
    replaces_when_stuck = False

    def __init__(
        self, sender: SolanaSender, deposit_key: Callable[[int], SolanaKey] | None = None
    ) -> None:
        self.sender = sender
        self.chain = sender.chain
        self.source_address = sender.address
        self.deposit_key = deposit_key
        self.handles_sweeps = deposit_key is not None

    def sign(self, session: Session, payout: Payout, asset: Asset) -> SignedTx:
        if payout.reason == PayoutReason.SWEEP.value:
            assert self.deposit_key is not None
            index = session.scalar(
                select(DepositAddress.derivation_index).where(
                    DepositAddress.chain == Chain.SOLANA.value,
                    DepositAddress.address == payout.source_address,
                )
            )
            assert index is not None, "a sweep's source is one of our deposit addresses"
            key = self.deposit_key(index)
            assert key.address == payout.source_address, "deposit key derivation mismatch"
            return self.sender.sign_sweep(
                key.keypair(),
                mint=asset.token_address,
                decimals=asset.decimals,
                amount_base_units=payout.amount,
            )
        return self.sender.sign_transfer(
            mint=asset.token_address,
            decimals=asset.decimals,
            to=payout.destination,
            amount_base_units=payout.amount,
        )

    def renew(self, session: Session, payout: Payout, asset: Asset) -> SignedTx | None:
        return self.sign(session, payout, asset)

    def broadcast(self, raw_tx: bytes) -> str:
        return self.sender.broadcast(raw_tx)

    def outcome(self, payout: Payout, asset: Asset, tx_hashes: Sequence[str]) -> TxOutcome:
        # A SOL payout's amount leaves the hot wallet on purpose and a SOL sweep's arrives;
        # the rest of its balance change is network cost.
        intended = 0
        if asset.token_address is None:
            sweep = payout.reason == PayoutReason.SWEEP.value
            intended = payout.amount if sweep else -payout.amount
        return self.sender.outcome(
            tx_hashes,
            last_valid_block_height=payout.last_valid_block_height,
            intended_lamports_delta=intended,
        )


# --- command line (one worker process; crash tests kill it) --------------------------


def unlock_from_settings(settings: Settings) -> UnlockedKeystore:
    """The keystore named by the settings, unlocked with the configured passphrase source."""
    return unlock_keystore(
        settings.keystore_path,
        load_passphrase(
            env_name=settings.keystore.passphrase_env,
            passphrase_file=settings.keystore.passphrase_file,
            credential_name=settings.keystore.credential_name,
        ),
    )


def build_chain(settings: Settings, chain: str, keystore: UnlockedKeystore) -> PayoutChain:
    """The adapter for a configured chain, signing with the keystore's hot wallet."""
    if settings.solana is not None and settings.solana.name == chain:
        from escrowd.indexer.solana_sender import SolanaSender
        from escrowd.indexer.solana_source import SolanaRpcSource

        sol = settings.solana
        return SolanaPayoutChain(
            SolanaSender(
                SolanaRpcSource(sol.rpc_urls, timeout_s=sol.rpc_timeout_s),
                keystore.solana_hot_wallet,
                chain=sol.name,
            ),
            deposit_key=keystore.derive_solana,
        )
    from escrowd.indexer.evm_sender import EvmSender
    from escrowd.indexer.evm_source import JsonRpcEvmSource

    evm = settings.evm_chain(chain)
    source = JsonRpcEvmSource(evm.rpc_urls, chain=evm.name)
    return EvmPayoutChain(
        EvmSender(
            source,
            keystore.evm_hot_wallet,
            chain=evm.name,
            chain_id=evm.chain_id,
            max_fee_gwei=evm.max_fee_gwei,
            confirmations=evm.confirmations,
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    from escrowd.config.settings import load_settings
    from escrowd.models.db import make_engine, make_session_factory

    parser = argparse.ArgumentParser(prog="python -m escrow.payout_worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--chain", required=True)
    parser.add_argument("--worker-id", required=True)
    parser.add_argument("--until-idle", action="store_true")
    args = parser.parse_args(argv)
    from pathlib import Path

    settings = load_settings(Path(args.config))
    engine = make_engine(settings.resolved_database_url)
    worker = PayoutWorker(
        make_session_factory(engine),
        build_chain(settings, args.chain, unlock_from_settings(settings)),
        WorkerOptions(worker_id=args.worker_id, stuck_after_s=settings.payouts.stuck_after_s),
        crash=CrashHook.from_env(),
    )
    stats = worker.run_until_idle() if args.until_idle else worker.run_once()
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
