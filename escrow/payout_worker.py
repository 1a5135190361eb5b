"""The payout worker: claims payouts in the database and drives each one through
requested -> signed -> broadcast -> confirmed | failed, exactly once across crashes.

Rules (see DESIGN.md, Payouts):
- One sender per payout: a worker claims a row with a conditional UPDATE (free, expired
  lease, or already its own), and every later transition is again conditional on
  (status, claimed_by), so a worker that lost its lease cannot commit anything. The lease
  is short (`payouts.lease_s`): a heartbeat renews it while the pass runs and the pass
  releases it at its end, so a killed worker holds up its payouts for seconds.
- Signed bytes, their hash and (EVM) the nonce commit in one transaction before the
  first broadcast; after a crash the stored bytes are sent again, never re-signed while
  they may still land. EVM replacements reuse the nonce; Solana re-signs only once the
  blockhash expired and no stored signature is known to the cluster. Stored bytes of a
  payout another worker holds (or one parked) are rebroadcast when a later nonce of the
  same wallet waits on them: same bytes, so nothing can land twice.
- No way back: nothing moves a signed or broadcast payout to requested, and nothing
  fails it except the chain (EVM receipt status 0, Solana err); "unknown" stays in flight.
- Before signing, the hot wallet must cover the amount and the fee: if it cannot, the
  payout waits in waiting_funds (saying why) instead of burning gas on a revert.
- Each payout is isolated: a step that fails for RPC or database trouble backs off
  (growing delay, one `payout_stalled` alert); any other error parks that payout in
  needs_attention (hold kept) and the pass goes on with the next one.
- Confirmed: the hold is posted as an outflow (payouts in flight -> custody). Failed: the
  hold is reversed (payouts in flight -> agent available). Each state change writes an
  audit row and a webhook event in the same transaction.

Run one pass from the command line (used by the crash tests):
``python -m escrowd.escrow.payout_worker --config FILE --chain NAME --worker-id ID``.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Protocol

import structlog
from sqlalchemy import ColumnElement, and_, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import Settings
from escrowd.escrow import accounts, audit, ledger, payouts
from escrowd.escrow.money import to_chain_units
from escrowd.escrow.uow import in_transaction
from escrowd.indexer.errors import RpcError
from escrowd.indexer.sending import LandingVerdict, SignedTx, TxOutcome, TxState
from escrowd.models import (
    AccountKind,
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
from escrowd.models.registry import ledger_decimals
from escrowd.wallets.addresses import associated_token_address
from escrowd.wallets.keystore import SolanaKey, UnlockedKeystore, load_passphrase, unlock_keystore

if TYPE_CHECKING:
    # Imported lazily at run time: an EVM worker need not load the Solana stack.
    from escrowd.indexer.evm_sender import EvmSender
    from escrowd.indexer.solana_sender import SolanaSender

log = structlog.get_logger(__name__)

CRASH_ENV = "ESCROWD_TEST_CRASH_AT"
CRASH_AFTER_ENV = "ESCROWD_TEST_CRASH_AFTER"
CRASH_HANG_ENV = "ESCROWD_TEST_CRASH_HANG"
# Where a crash test may kill the worker; each is a moment with different stored state.
CRASH_POINTS = ("after_hold", "after_sign", "after_store", "after_broadcast", "before_confirm")
IN_FLIGHT = (PayoutStatus.REQUESTED, PayoutStatus.SIGNED, PayoutStatus.BROADCAST)
NETWORK_FEE_ASSET = "SOL"
# Solana's fee per signature and the size of an SPL token account (for its rent).
LAMPORTS_PER_SIGNATURE = 5_000
TOKEN_ACCOUNT_LEN = 165
TRANSIENT_ERRORS = payouts.TRANSIENT_ERRORS


@dataclass(frozen=True)
class Ahead:
    """Payouts of one asset and reason signed before this one and not settled yet: what
    they may still take out of the hot wallet."""

    asset_id: int
    reason: str
    # The chain's own coin (SOL): its amount leaves the same balance as the fees.
    native: bool
    count: int
    amount: int

    @property
    def sweep(self) -> bool:
        return self.reason == PayoutReason.SWEEP.value


@dataclass(frozen=True)
class Shortfall:
    """Why the hot wallet cannot pay a payout now."""

    reason: str
    # True: its balance alone cannot cover this payout. False: it could, but not together
    # with the payouts signed ahead of it, some of which its balance may already reflect
    # (wait without a state change; either they settle or the shortfall becomes certain).
    certain: bool


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

    def start_pass(self) -> None:
        """Forget balances read in an earlier pass."""
        ...

    def shortfall(self, payout: Payout, asset: Asset, ahead: Sequence[Ahead]) -> Shortfall | None:
        """Why the hot wallet cannot cover `payout` (amount and fee) after `ahead`; None
        when it can."""
        ...

    def next_mined_nonce(self) -> int | None:
        """The hot wallet's nonce the chain expects next (EVM); None for a chain without
        sequential nonces, where no transaction waits on another."""
        ...


class SimulatedCrash(BaseException):
    """Raised at a crash point in-process tests ask for (a subprocess exits instead)."""


@dataclass
class WorkerOptions:
    worker_id: str
    lease_s: float = 10.0
    stuck_after_s: float = 120.0
    rebroadcast_after_s: float = 10.0
    # Solana re-signs after expiry at most this often before failing the payout for good.
    max_sign_attempts: int = 5
    batch_limit: int = 200
    backoff: payouts.Backoff = field(default_factory=payouts.Backoff)

    @property
    def heartbeat_s(self) -> float:
        # Three renewals per lease: one slow statement does not let the lease lapse.
        return self.lease_s / 3

    @classmethod
    def of(cls, settings: Settings, worker_id: str) -> WorkerOptions:
        return cls(
            worker_id=worker_id,
            lease_s=settings.payouts.lease_s,
            stuck_after_s=settings.payouts.stuck_after_s,
            backoff=payouts.Backoff.of(settings),
        )


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
    waiting: int = 0
    parked: int = 0


class _LostClaim(Exception):
    """Another worker holds the payout now, or its status moved on: do nothing."""


@dataclass
class CrashHook:
    """Crash on the `after`-th time `point` is reached (tests only). With `hang` the
    process stops there instead, alive (its heartbeat still running), for the test to
    kill it with SIGKILL."""

    point: str | None = None
    after: int = 1
    exit_process: bool = True
    hang: bool = False
    _hits: int = field(default=0)

    @classmethod
    def from_env(cls, points: Sequence[str] = CRASH_POINTS) -> CrashHook:
        point = os.environ.get(CRASH_ENV) or None
        assert point is None or point in points, f"unknown crash point {point}"
        return cls(
            point=point,
            after=int(os.environ.get(CRASH_AFTER_ENV, "1")),
            hang=os.environ.get(CRASH_HANG_ENV) == "1",
        )

    def __call__(self, point: str) -> None:
        if point != self.point:
            return
        self._hits += 1
        if self._hits < self.after:
            return
        if self.hang:
            threading.Event().wait()
        if self.exit_process:
            os._exit(137)
        raise SimulatedCrash(point)


def _workable() -> list[str]:
    return [status.value for status in payouts.WORKABLE]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


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

    def _claimable(self) -> list[ColumnElement[bool]]:
        now = utcnow()
        me = self.options.worker_id
        return [
            Payout.status.in_(_workable()),
            or_(
                Payout.claimed_by.is_(None),
                Payout.claimed_by == me,
                Payout.claimed_until < now,
            ),
        ]

    def _candidates(self, statuses: Sequence[PayoutStatus] = payouts.WORKABLE) -> list[int]:
        now = utcnow()
        query = select(Payout.id).where(
            Payout.chain == self.chain.chain,
            Payout.status.in_([s.value for s in statuses]),
            *self._claimable(),
            # Backing off after a failed step: not yet.
            or_(Payout.retry_at.is_(None), Payout.retry_at <= now),
        )
        if not self.chain.handles_sweeps:
            query = query.where(Payout.reason != PayoutReason.SWEEP.value)
        with self.sessions() as session:
            return list(session.scalars(query.order_by(Payout.id).limit(self.options.batch_limit)))

    def claim(self, payout_id: int) -> bool:
        """Take (or renew) the lease on a payout; False when another worker holds it."""
        return bool(self.claim_many([payout_id]))

    def claim_many(self, payout_ids: Sequence[int]) -> dict[int, tuple[PayoutStatus, int]]:
        """Lease those of `payout_ids` that are free, expired or ours, in one statement;
        returns the claimed ones with their status and count of failed steps."""
        me = self.options.worker_id

        def work(session: Session) -> dict[int, tuple[PayoutStatus, int]]:
            now = utcnow()
            rows = session.execute(
                update(Payout)
                .where(Payout.id.in_(payout_ids), *self._claimable())
                .values(claimed_by=me, claimed_until=now + timedelta(seconds=self.options.lease_s))
                .returning(Payout.id, Payout.status, Payout.step_errors)
                .execution_options(synchronize_session=False)
            ).all()
            return {row.id: (PayoutStatus(row.status), row.step_errors) for row in rows}

        return in_transaction(self.sessions, work)

    def renew_claims(self) -> int:
        """Extend the lease of every payout this worker holds (the heartbeat). Rows a
        transition of ours has locked are skipped: that transition renews them itself."""
        me = self.options.worker_id
        mine = (
            select(Payout.id)
            .where(Payout.claimed_by == me, Payout.status.in_(_workable()))
            .with_for_update(skip_locked=True)
            .scalar_subquery()
        )

        def work(session: Session) -> int:
            result = session.execute(
                update(Payout)
                .where(Payout.id.in_(mine))
                .values(claimed_until=utcnow() + timedelta(seconds=self.options.lease_s))
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

        return in_transaction(self.sessions, work)

    def release_claims(self) -> int:
        """Give up every lease this worker holds, so another worker (or this one after a
        restart) may take its payouts at once: at the end of a pass and on shutdown."""
        me = self.options.worker_id

        def work(session: Session) -> int:
            result = session.execute(
                update(Payout)
                .where(Payout.claimed_by == me, Payout.status.in_(_workable()))
                .values(claimed_by=None, claimed_until=None)
                .execution_options(synchronize_session=False)
            )
            return int(result.rowcount)  # type: ignore[attr-defined]

        return in_transaction(self.sessions, work)

    @contextmanager
    def _heartbeat(self) -> Iterator[None]:
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(self.options.heartbeat_s):
                try:
                    self.renew_claims()
                except Exception as exc:
                    # The leases may lapse; our transitions then find them lost and stop.
                    log.info(
                        "payout_heartbeat_failed", chain=self.chain.chain, error=_describe(exc)
                    )

        thread = threading.Thread(
            target=beat, name=f"payout-heartbeat:{self.chain.chain}", daemon=True
        )
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

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
        self.chain.start_pass()
        with self._heartbeat():
            try:
                # Each payout is claimed right before it is worked on: a worker that dies
                # holds up only the one it was on, never a batch it had not reached.
                for payout_id in self._candidates():
                    claimed = self.claim_many([payout_id])
                    if payout_id not in claimed:
                        continue
                    stats.claimed += 1
                    status, step_errors = claimed[payout_id]
                    self._advance_isolated(payout_id, status, step_errors, stats)
            except Exception:
                self.release_claims()
                raise
            # Not on a BaseException (a simulated crash): a killed process releases nothing.
            self.release_claims()
        self._fill_nonce_gaps()
        return stats

    def _advance_isolated(
        self, payout_id: int, status: PayoutStatus, step_errors: int, stats: PassStats
    ) -> None:
        """Advance one payout; whatever it raises stays with it (backoff or parked)."""
        try:
            self.advance(payout_id, stats, status)
        except _LostClaim:
            log.info("payout_claim_lost", payout_id=payout_id, worker=self.options.worker_id)
        except TRANSIENT_ERRORS as exc:
            # Unknown outcome: the payout stays where it is and is tried again later.
            stats.errors += 1
            self._step_failed(payout_id, exc)
        except Exception as exc:
            stats.parked += 1
            self._park(payout_id, exc)
        else:
            if step_errors:
                self._step_recovered(payout_id, step_errors)

    def _step_failed(self, payout_id: int, exc: BaseException) -> None:
        backoff, me = self.options.backoff, self.options.worker_id
        try:
            failure = in_transaction(
                self.sessions,
                lambda s: payouts.record_step_failure(s, payout_id, backoff, claimed_by=me),
            )
        except Exception as db_exc:
            log.info("payout_backoff_not_recorded", payout_id=payout_id, error=_describe(db_exc))
            return
        if failure is None:
            return
        fields = {
            "payout_id": payout_id,
            "chain": self.chain.chain,
            "error": _describe(exc),
            "failed_steps": failure.step_errors,
            "retry_in_s": round(failure.retry_in_s, 3),
        }
        if failure.stalled_now:
            log.error("payout_stalled", stalled_after_s=backoff.stalled_after_s, **fields)
        else:
            log.info("payout_step_failed", **fields)

    def _step_recovered(self, payout_id: int, step_errors: int) -> None:
        try:
            in_transaction(self.sessions, lambda s: payouts.clear_step_failures(s, payout_id))
        except Exception as exc:
            # Only the backoff bookkeeping is stale; the next failure or success fixes it.
            log.info("payout_recovery_not_recorded", payout_id=payout_id, error=_describe(exc))
            return
        log.info(
            "payout_step_recovered",
            payout_id=payout_id,
            chain=self.chain.chain,
            failed_steps=step_errors,
        )

    def _park(self, payout_id: int, exc: BaseException) -> None:
        reason = _describe(exc)
        me = self.options.worker_id

        def work(session: Session) -> bool:
            payout = session.scalars(
                select(Payout)
                .where(
                    Payout.id == payout_id,
                    Payout.claimed_by == me,
                    Payout.status.in_(_workable()),
                )
                .with_for_update()
            ).one_or_none()
            if payout is None:
                return False
            payouts.park(session, payout, reason=reason, actor=f"worker:{me}")
            return True

        try:
            parked = in_transaction(self.sessions, work)
        except Exception as db_exc:
            # Still claimed: the lease lapses and a later pass meets the error again.
            log.error("payout_park_failed", payout_id=payout_id, error=_describe(db_exc))
            return
        if parked:
            log.error(
                "payout_needs_attention",
                payout_id=payout_id,
                chain=self.chain.chain,
                error=reason,
                traceback="".join(traceback.format_exception(exc)),
            )

    def run_until_idle(self, *, max_passes: int = 1_000, pause_s: float = 0.05) -> PassStats:
        """Passes until no payout of this chain is in flight and due (tests, benchmarks,
        CLI): one waiting for funds or backing off after a failed step does not count."""
        total = PassStats()
        for _ in range(max_passes):
            stats = self.run_once()
            for name in total.__dataclass_fields__:
                setattr(total, name, getattr(total, name) + getattr(stats, name))
            if not self._candidates(IN_FLIGHT):
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
        if status in (PayoutStatus.REQUESTED, PayoutStatus.WAITING_FUNDS):
            if not self._covered(payout_id, status, stats):
                return
            self.crash("after_hold")
            unsigned = status
            fresh = in_transaction(self.sessions, lambda s: self._sign(s, payout_id, unsigned))
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

    # --- the float ------------------------------------------------------------------

    def _covered(self, payout_id: int, status: PayoutStatus, stats: PassStats) -> bool:
        """Whether the hot wallet covers the payout now; if it cannot for certain, the
        payout waits in waiting_funds (entered once, with an event and a warning)."""
        with self.sessions() as session:
            payout = session.get_one(Payout, payout_id)
            asset = session.get_one(Asset, payout.asset_id)
            ahead = [
                Ahead(
                    asset_id=row.asset_id,
                    reason=row.reason,
                    native=row.token_address is None,
                    count=int(row.n),
                    amount=int(row.amount),
                )
                for row in session.execute(
                    select(
                        Payout.asset_id,
                        Payout.reason,
                        Asset.token_address,
                        func.count().label("n"),
                        func.sum(Payout.amount).label("amount"),
                    )
                    .join(Asset, Asset.id == Payout.asset_id)
                    .where(
                        Payout.chain == self.chain.chain,
                        or_(
                            Payout.status.in_([s.value for s in payouts.SIGNED_STATES]),
                            and_(
                                Payout.status == PayoutStatus.NEEDS_ATTENTION.value,
                                Payout.attention_from.in_([s.value for s in payouts.SIGNED_STATES]),
                            ),
                        ),
                    )
                    .group_by(Payout.asset_id, Payout.reason, Asset.token_address)
                )
            ]
            shortfall = self.chain.shortfall(payout, asset, ahead)
        if shortfall is None:
            return True
        if not shortfall.certain:
            stats.pending += 1
            log.debug(
                "payout_waits_for_payouts_ahead", payout_id=payout_id, reason=shortfall.reason
            )
            return False
        stats.waiting += 1
        in_transaction(
            self.sessions, lambda s: self._mark_waiting(s, payout_id, status, shortfall.reason)
        )
        return False

    def _mark_waiting(
        self, session: Session, payout_id: int, status: PayoutStatus, reason: str
    ) -> None:
        payout = self._hold(session, payout_id, status)
        if status is PayoutStatus.WAITING_FUNDS:
            # Still waiting: the reason's figures are updated, nothing is announced again.
            payout.status_reason = reason[:500]
            return
        asset = self._asset(session, payout)
        payout.status = PayoutStatus.WAITING_FUNDS.value
        payout.status_reason = reason[:500]
        session.flush()
        self._record(session, payout, asset, "payout_waiting_funds", reason=payout.status_reason)
        self._event(session, payout, status_reason=payout.status_reason)
        log.warning(
            "payout_waiting_for_funds",
            payout_id=payout.id,
            chain=payout.chain,
            asset=asset.symbol,
            amount_base_units=payout.amount,
            reason=payout.status_reason,
        )

    def _fill_nonce_gaps(self) -> None:
        """Send again the stored bytes of this wallet's signed payouts that no pass of ours
        drives (held by another, maybe dead, worker; or parked) when a later nonce of the
        wallet is in flight and the chain still expects theirs: the later one cannot be
        mined before them. The same bytes: nothing can land twice."""
        now = utcnow()
        me = self.options.worker_id
        signed = [s.value for s in payouts.SIGNED_STATES]
        with self.sessions() as session:
            rows = session.execute(
                select(Payout.id, Payout.nonce, Payout.raw_tx).where(
                    Payout.chain == self.chain.chain,
                    Payout.reason != PayoutReason.SWEEP.value,
                    Payout.raw_tx.is_not(None),
                    Payout.nonce.is_not(None),
                    or_(
                        and_(
                            Payout.status.in_(signed),
                            Payout.claimed_by.is_not(None),
                            Payout.claimed_by != me,
                            Payout.claimed_until >= now,
                        ),
                        and_(
                            Payout.status == PayoutStatus.NEEDS_ATTENTION.value,
                            Payout.attention_from.in_(signed),
                        ),
                    ),
                )
            ).all()
            # The wallet's highest nonce in flight: the nonces below it hold it up.
            highest = session.scalar(
                select(func.max(Payout.nonce)).where(
                    Payout.chain == self.chain.chain,
                    Payout.reason != PayoutReason.SWEEP.value,
                    Payout.status.in_(signed),
                )
            )
        due = [
            row
            for row in rows
            if highest is not None
            and row.nonce < highest
            and time.monotonic() - self._last_sent.get(row.id, float("-inf"))
            > self.options.rebroadcast_after_s
        ]
        if not due:
            return
        try:
            expected = self.chain.next_mined_nonce()
        except TRANSIENT_ERRORS as exc:
            log.info("payout_gap_check_failed", chain=self.chain.chain, error=_describe(exc))
            return
        if expected is None:
            return
        for row in sorted(due, key=lambda r: r.nonce):
            if row.nonce < expected:
                continue
            self._last_sent[row.id] = time.monotonic()
            try:
                self.chain.broadcast(row.raw_tx)
            except Exception as exc:
                log.info("payout_gap_rebroadcast_refused", payout_id=row.id, error=_describe(exc))
            else:
                log.info("payout_gap_rebroadcast", payout_id=row.id, nonce=row.nonce)

    # --- outcomes -------------------------------------------------------------------

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

    def _event(self, session: Session, payout: Payout, **extra: object) -> None:
        payouts.emit_event(session, payout, f"payout.{payout.status}", **extra)

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

    def _sign(self, session: Session, payout_id: int, status: PayoutStatus) -> bytes:
        payout = self._hold(session, payout_id, status)
        asset = self._asset(session, payout)
        if status is PayoutStatus.WAITING_FUNDS:
            self._record(session, payout, asset, "payout_funds_available")
            payout.status_reason = None
        signed = self.chain.sign(session, payout, asset)
        self.crash("after_sign")
        self._store(session, payout, signed)
        payout.status = PayoutStatus.SIGNED.value
        if not payout.source_address:
            payout.source_address = self.chain.source_address
        session.flush()
        self._record(session, payout, asset, "payout_signed")
        self._event(session, payout)
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
        self._event(session, payout)
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
        self._event(session, payout, block_number=outcome.block_number)
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
        payouts.release_hold(session, payout, asset, actor=f"worker:{self.options.worker_id}")
        self._book_network_cost(session, payout, outcome)
        session.flush()
        self._record(session, payout, asset, "payout_failed", error=payout.error)
        self._event(session, payout, error=payout.error)
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
        self._balances: dict[str | None, int] = {}

    def sign(self, session: Session, payout: Payout, asset: Asset) -> SignedTx:
        assert asset.token_address is not None, "EVM payouts move the USDC token"
        return self.sender.sign_token_transfer(
            session,
            token=asset.token_address,
            to=payout.destination,
            amount_base_units=_token_units(payout, asset),
        )

    def renew(self, session: Session, payout: Payout, asset: Asset) -> SignedTx | None:
        assert payout.raw_tx is not None and asset.token_address is not None
        return self.sender.sign_replacement(
            payout.raw_tx,
            token=asset.token_address,
            to=payout.destination,
            amount_base_units=_token_units(payout, asset),
        )

    def broadcast(self, raw_tx: bytes) -> str:
        return self.sender.broadcast(raw_tx)

    def outcome(self, payout: Payout, asset: Asset, tx_hashes: Sequence[str]) -> TxOutcome:
        found = self.sender.outcome(tx_hashes)
        if found.state is not TxState.PENDING:
            # Mined during this pass, maybe after the balances were read: read them again,
            # or a payout no longer counted as ahead would seem covered by its coins.
            self._balances.clear()
        return found

    def start_pass(self) -> None:
        self._balances.clear()

    def _balance(self, token: str | None) -> int:
        """The hot wallet's balance of `token` (None: wei), read once per pass."""
        if token not in self._balances:
            source, address = self.sender.source, self.sender.address
            self._balances[token] = (
                source.native_balance_wei(address)
                if token is None
                else source.erc20_balance(token, address)
            )
        return self._balances[token]

    def shortfall(self, payout: Payout, asset: Asset, ahead: Sequence[Ahead]) -> Shortfall | None:
        assert asset.token_address is not None, "EVM payouts move the USDC token"
        # The node accepts a transaction only if the sender can pay its whole fee cap.
        gas_each = self.sender.gas_cost_cap_wei()
        tokens, wei = self._balance(asset.token_address), self._balance(None)
        mine = [a for a in ahead if not a.sweep]
        count_ahead = sum(a.count for a in mine)
        # Payouts hold ledger units; the wallet holds the chain token's units.
        scale = ledger_decimals(asset.symbol)
        tokens_ahead = to_chain_units(
            sum(a.amount for a in mine if a.asset_id == asset.id), asset.decimals, scale
        )
        needed = _token_units(payout, asset)
        wei_ahead = gas_each * count_ahead
        if tokens >= needed + tokens_ahead and wei >= gas_each + wei_ahead:
            return None
        reason = (
            f"hot wallet {self.sender.address} holds {tokens} {asset.symbol} token base units "
            f"and {wei} wei; this payout needs {needed} token base units and up to "
            f"{gas_each} wei of gas"
        )
        if mine:
            reason += (
                f", after {count_ahead} payouts signed ahead of it that need {tokens_ahead} "
                f"and {wei_ahead} wei"
            )
        return Shortfall(
            reason + ": top up the hot wallet",
            certain=tokens < needed or wei < gas_each,
        )

    def next_mined_nonce(self) -> int | None:
        return self.sender.source.nonce(self.sender.address, pending=False)


def _token_units(payout: Payout, asset: Asset) -> int:
    """A payout's amount, held in ledger units, in the base units of its chain's token
    (USDC with 18 decimals: times 10^12), exactly."""
    return to_chain_units(payout.amount, asset.decimals, ledger_decimals(asset.symbol))


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
        self._balances: dict[str | None, int] = {}
        self._rent: dict[int, int] = {}

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
        found = self.sender.outcome(
            tx_hashes,
            last_valid_block_height=payout.last_valid_block_height,
            intended_lamports_delta=intended,
        )
        if found.state is not TxState.PENDING:
            self._balances.clear()  # as on EVM: the balances read may predate it
        return found

    def start_pass(self) -> None:
        self._balances.clear()

    def _balance(self, mint: str | None) -> int:
        """The hot wallet's balance of `mint` (None: lamports), read once per pass at
        "processed": a top-up counts at once. Should that block be dropped, the signed
        transaction fails the node's preflight and the payout backs off. A payout of
        ours that landed but is not finalized is counted twice (in the balance and ahead):
        a wait, never a waiting_funds state."""
        if mint not in self._balances:
            source, address = self.sender.source, self.sender.address
            self._balances[mint] = (
                source.get_balance(address, "processed")
                if mint is None
                else sum(
                    account.amount_base_units
                    for account in source.get_token_accounts_by_owner(address, mint, "processed")
                )
            )
        return self._balances[mint]

    def _rent_exempt(self, data_len: int) -> int:
        if data_len not in self._rent:
            self._rent[data_len] = self.sender.source.get_minimum_balance_for_rent_exemption(
                data_len
            )
        return self._rent[data_len]

    @staticmethod
    def _lamports_taken(*, sweep: bool, native: bool, count: int, amount: int) -> int:
        """Lamports `count` transactions take from the hot wallet, token account rent
        aside: the fees (a sweep is signed by its deposit address too) and SOL amounts."""
        fees = LAMPORTS_PER_SIGNATURE * (2 if sweep else 1) * count
        return fees + (amount if native and not sweep else 0)

    def shortfall(self, payout: Payout, asset: Asset, ahead: Sequence[Ahead]) -> Shortfall | None:
        sweep = payout.reason == PayoutReason.SWEEP.value
        mint = asset.token_address
        # The hot wallet pays every fee, so it must keep its own rent-exempt reserve.
        lamports_need = self._rent_exempt(0) + self._lamports_taken(
            sweep=sweep, native=mint is None, count=1, amount=payout.amount
        )
        tokens_need = payout.amount if mint is not None and not sweep else 0
        lamports_ahead = sum(
            self._lamports_taken(sweep=a.sweep, native=a.native, count=a.count, amount=a.amount)
            for a in ahead
        )
        tokens_ahead = sum(
            a.amount for a in ahead if mint is not None and a.asset_id == asset.id and not a.sweep
        )
        lamports = self._balance(None)
        tokens = self._balance(mint) if mint is not None else 0
        account_rent = self._rent_exempt(TOKEN_ACCOUNT_LEN)
        if mint is not None and lamports - lamports_need - lamports_ahead < account_rent:
            # Close to the line: whether the receiving token account exists matters now.
            owner = self.sender.address if sweep else payout.destination
            if not self._token_account_exists(owner, mint):
                lamports_need += account_rent
        if lamports >= lamports_need + lamports_ahead and tokens >= tokens_need + tokens_ahead:
            return None
        what = "sweep" if sweep else "payout"
        reason = (
            f"hot wallet {self.sender.address} holds {lamports} lamports and {tokens} "
            f"{asset.symbol if mint is not None else 'token'} base units; this {what} needs "
            f"{lamports_need} lamports (fee, amount if SOL, rent, the wallet's own reserve) "
            f"and {tokens_need} base units"
        )
        if ahead:
            reason += (
                f", after {sum(a.count for a in ahead)} transactions signed ahead of it that need "
                f"{lamports_ahead} lamports and {tokens_ahead} base units"
            )
        return Shortfall(
            reason + ": top up the hot wallet",
            certain=lamports < lamports_need or tokens < tokens_need,
        )

    def _token_account_exists(self, owner: str, mint: str) -> bool:
        expected = associated_token_address(owner, mint)
        return any(
            account.address == expected
            for account in self.sender.source.get_token_accounts_by_owner(owner, mint, "confirmed")
        )

    def next_mined_nonce(self) -> int | None:
        return None


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
    source = JsonRpcEvmSource.for_chain(evm)
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


def landing_verdict(
    settings: Settings, sessions: sessionmaker[Session], payout_id: int, *, wait_s: float
) -> LandingVerdict | None:
    """What the chain shows about the transactions signed for a payout (None: nothing was
    ever signed for it), read from the configured RPC endpoints: no key is needed.

    EVM: they share one nonce; none can be mined once the chain used it for another
    transaction at the confirmation depth. Solana: none can land once the finalized block
    height is past the newest blockhash's validity and the cluster knows none of them."""
    from escrowd.escrow.sweeps import recipient_of

    with sessions() as session:
        payout = session.get(Payout, payout_id)
        if payout is None:
            raise payouts.PayoutNotFound(f"no payout {payout_id}")
        stored = list(
            session.scalars(
                select(PayoutTransaction)
                .where(PayoutTransaction.payout_id == payout_id)
                .order_by(PayoutTransaction.id.desc())
            )
        )
    if not stored:
        return None
    if settings.solana is not None and settings.solana.name == payout.chain:
        from escrowd.indexer import solana_sender
        from escrowd.indexer.solana_source import SolanaRpcSource

        with SolanaRpcSource(settings.solana.rpc_urls) as solana_source:
            return solana_sender.landing_verdict(
                solana_source,
                signatures=[tx.tx_hash for tx in stored],
                last_valid_block_height=payout.last_valid_block_height,
            )
    from escrowd.indexer import evm_sender
    from escrowd.indexer.evm_source import JsonRpcEvmSource

    evm = settings.evm_chain(payout.chain)
    # A sweep's gas funding comes from the gas wallet: only its own transfers count.
    own = [
        tx
        for tx in stored
        if payout.reason != PayoutReason.SWEEP.value
        or recipient_of(tx.raw_tx).lower() != payout.source_address.lower()
    ]
    if not own:
        return LandingVerdict(
            False, "only gas for the sweep was sent; no transfer of the sweep was ever signed"
        )
    assert payout.nonce is not None, "a signed EVM payout has its nonce"
    with JsonRpcEvmSource(evm.rpc_urls, chain=evm.name) as evm_source:
        return evm_sender.landing_verdict(
            evm_source,
            signer=payout.source_address,
            nonce=payout.nonce,
            tx_hashes=[tx.tx_hash for tx in own],
            confirmations=evm.confirmations,
            wait_s=wait_s,
        )


def main(argv: Sequence[str] | None = None) -> int:
    from escrowd.config.settings import load_settings
    from escrowd.models.db import make_engine, make_session_factory

    parser = argparse.ArgumentParser(prog="python -m escrowd.escrow.payout_worker")
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
        WorkerOptions.of(settings, args.worker_id),
        crash=CrashHook.from_env(),
    )
    stats = worker.run_until_idle() if args.until_idle else worker.run_once()
    print(stats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
