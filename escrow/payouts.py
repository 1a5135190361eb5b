"""Payouts outside the sender: the request, the operator's commands, shared bookkeeping.

- The request: validate the destination and amount, then write the payout row and its
  ledger hold (agent available -> payouts in flight) in the caller's transaction, together
  or not at all. Signing and sending belong to escrow/payout_worker.py.
- What the worker and the sweeper share: webhook payloads (the agent named by the
  marketplace's id), the backoff of a failing step, parking a payout that hit an
  unexpected error in needs_attention.
- Operator commands (`escrowd payouts retry|cancel`), each in the caller's transaction
  after `take_for_operator` claimed the payout like a worker would, so no worker moves it
  meanwhile. Cancel reverses the hold; the caller proves first that nothing signed for the
  payout can land (escrow/payout_worker.py `landing_verdict`).
- Plain reads for gauges and readiness (`payouts_by_status`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

import structlog
from sqlalchemy import func, or_, select, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from escrowd.config.errors import Conflict, NotFound, Unavailable
from escrowd.config.settings import Settings
from escrowd.escrow import accounts, audit, events, ledger
from escrowd.escrow.errors import IdempotencyConflict, InvalidAmount, UnknownAsset
from escrowd.indexer.errors import RpcError
from escrowd.models import (
    Agent,
    Asset,
    Chain,
    DepositAddress,
    Payout,
    PayoutReason,
    PayoutStatus,
    PayoutTransaction,
    TransferCode,
    utcnow,
)
from escrowd.models.registry import find_asset
from escrowd.wallets.addresses import (
    associated_token_address,
    validate_evm_address,
    validate_evm_destination,
    validate_solana_address,
)
from escrowd.wallets.errors import InvalidAddress
from escrowd.wallets.keystore import UnlockedKeystore

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PlatformAddresses:
    """escrowd's own wallets, which a payout must never be sent to: paying the hot wallet
    (payout signer and sweep destination) moves nothing yet books an outflow, and paying
    the gas wallet strands an agent's funds with the platform. Maps each address (EVM:
    lowercase; Solana: base58, with the USDC token accounts) to what it is."""

    evm: dict[str, str] = field(default_factory=dict)
    solana: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(
        cls,
        *,
        evm: dict[str, str] | None = None,
        solana: dict[str, str] | None = None,
        solana_usdc_mint: str | None = None,
    ) -> PlatformAddresses:
        """From {address: role}; with a mint, each Solana wallet's USDC associated token
        account too (the Solana sender pays owners, creating their token account)."""
        evm_roles = {validate_evm_address(a).lower(): role for a, role in (evm or {}).items()}
        solana_roles = {validate_solana_address(a): role for a, role in (solana or {}).items()}
        if solana_usdc_mint is not None:
            solana_roles |= {
                associated_token_address(wallet, solana_usdc_mint): f"{role} USDC token account"
                for wallet, role in solana_roles.items()
            }
        return cls(evm=evm_roles, solana=solana_roles)

    @classmethod
    def of_keystore(
        cls, keystore: UnlockedKeystore, solana_usdc_mint: str | None
    ) -> PlatformAddresses:
        return cls.of(
            evm={
                keystore.evm_hot_wallet.address: "EVM hot wallet",
                keystore.evm_gas_wallet.address: "EVM gas wallet",
            },
            solana={keystore.solana_hot_wallet.address: "Solana hot wallet"},
            solana_usdc_mint=solana_usdc_mint,
        )

    def role(self, family: str, canonical: str) -> str | None:
        """What the platform uses the address for, or None when it is not ours."""
        if family == Chain.EVM:
            return self.evm.get(canonical.lower())
        return self.solana.get(canonical)


def validate_destination(
    session: Session, family: str, destination: str, platform: PlatformAddresses
) -> str:
    """The destination in canonical form; refuses malformed and zero addresses, our
    deposit addresses and the platform's own wallets."""
    if family == Chain.EVM:
        canonical = validate_evm_destination(destination)
    elif family == Chain.SOLANA:
        canonical = validate_solana_address(destination)
        if canonical == "11111111111111111111111111111111":
            raise InvalidAddress(
                "the system program address cannot receive a payout",
                chain=family,
                address=destination,
            )
    else:
        raise InvalidAddress(
            f"unknown chain family {family!r}; expected 'evm' or 'solana'",
            chain=family,
            address=destination,
        )
    role = platform.role(family, canonical)
    if role is not None:
        raise InvalidAddress(
            f"the destination is escrowd's own {role}; pay out to an address outside the platform",
            chain=family,
            address=destination,
        )
    # EVM addresses compare case-insensitively: stored ones may be checksummed or not.
    condition = (
        func.lower(DepositAddress.address) == canonical.lower()
        if family == Chain.EVM
        else or_(DepositAddress.address == canonical, DepositAddress.token_account == canonical)
    )
    match = DepositAddress.chain == family
    if session.scalar(select(DepositAddress.id).where(match, condition).limit(1)) is not None:
        raise InvalidAddress(
            "the destination is one of escrowd's own deposit addresses; "
            "pay out to an address outside the platform",
            chain=family,
            address=destination,
        )
    return canonical


def request_payout(
    session: Session,
    *,
    chain: str,
    family: str,
    asset_symbol: str,
    agent_id: int,
    destination: str,
    amount: int,
    reason: PayoutReason,
    reference: str,
    idempotency_key: str,
    min_amount_base_units: int,
    platform: PlatformAddresses,
    source_address: str = "",
    escrow_id: int | None = None,
) -> Payout:
    """Create a payout in status ``requested`` with its ledger hold, in the caller's
    transaction. `chain` is the network name (custody is per network), `family` its
    address format ("evm" or "solana"); `platform`: the wallets a payout may not go to.
    Nothing is written when any check fails.

    A repeat with the same idempotency key and the same request returns the original
    payout; the same key for a different request is an IdempotencyConflict.
    """
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        raise InvalidAmount(f"payout amount must be a positive integer, got {amount!r}")
    asset = find_asset(session, chain, asset_symbol)
    if asset is None:
        raise UnknownAsset(f"{asset_symbol} is not registered on chain {chain!r}")
    canonical = validate_destination(session, family, destination, platform)
    if amount < min_amount_base_units:
        raise InvalidAmount(
            f"payout of {amount} base units is below the minimum of {min_amount_base_units} "
            f"for {asset_symbol}; request at least the minimum"
        )
    existing = session.scalars(
        select(Payout).where(Payout.idempotency_key == idempotency_key)
    ).one_or_none()
    if existing is not None:
        return _same_or_conflict(
            existing,
            chain=chain,
            asset_id=asset.id,
            agent_id=agent_id,
            destination=canonical,
            amount=amount,
            reason=reason,
            escrow_id=escrow_id,
        )
    try:
        with session.begin_nested():
            payout = Payout(
                idempotency_key=idempotency_key,
                chain=chain,
                asset_id=asset.id,
                agent_id=agent_id,
                escrow_id=escrow_id,
                reason=reason.value,
                source_address=source_address,
                destination=canonical,
                amount=amount,
            )
            session.add(payout)
            session.flush()
            stream = f"payout:{payout.id}"
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        idempotency_key=f"payout:{payout.id}:hold",
                        debit_account_id=accounts.agent_available(
                            session, agent_id, asset_symbol
                        ).id,
                        credit_account_id=accounts.payouts_in_flight(
                            session, chain, asset_symbol
                        ).id,
                        amount=amount,
                        code=TransferCode.PAYOUT_HOLD,
                        ref_type="payout",
                        ref_id=str(payout.id),
                    )
                ],
                actor=f"agent:{agent_id}",
                audit_stream=stream,
            )
            audit.append(
                session,
                stream=stream,
                actor=f"agent:{agent_id}",
                action="payout_requested",
                asset=asset_symbol,
                amount=amount,
                details={
                    "chain": chain,
                    "destination": canonical,
                    "reason": reason.value,
                    "reference": reference,
                    "escrow_id": escrow_id,
                },
            )
            events.emit(
                session,
                "payout.requested",
                event_data(session, payout, asset_symbol, reference=reference),
            )
    except IntegrityError:
        # A concurrent request with the same idempotency key won the insert.
        existing = session.scalars(
            select(Payout).where(Payout.idempotency_key == idempotency_key)
        ).one_or_none()
        if existing is None:
            raise
        return _same_or_conflict(
            existing,
            chain=chain,
            asset_id=asset.id,
            agent_id=agent_id,
            destination=canonical,
            amount=amount,
            reason=reason,
            escrow_id=escrow_id,
        )
    log.info(
        "payout_requested",
        payout_id=payout.id,
        chain=chain,
        asset=asset_symbol,
        agent_id=agent_id,
        amount_base_units=amount,
        reason=reason.value,
    )
    return payout


def _same_or_conflict(
    existing: Payout,
    *,
    chain: str,
    asset_id: int,
    agent_id: int,
    destination: str,
    amount: int,
    reason: PayoutReason,
    escrow_id: int | None,
) -> Payout:
    same = (
        existing.chain == chain
        and existing.asset_id == asset_id
        and existing.agent_id == agent_id
        and existing.destination == destination
        and existing.amount == amount
        and existing.reason == reason.value
        and existing.escrow_id == escrow_id
    )
    if not same:
        raise IdempotencyConflict(
            f"payout idempotency key {existing.idempotency_key!r} was already used for a "
            "different payout; use a new key for a new payout"
        )
    return existing


def chain_family(settings: Settings, chain: str) -> str:
    """The address format of a configured network: "evm" or "solana"."""
    if any(evm.name == chain for evm in settings.evm_chains):
        return Chain.EVM.value
    if settings.solana is not None and settings.solana.name == chain:
        return Chain.SOLANA.value
    raise UnknownAsset(f"chain {chain!r} is not configured; use one of the configured chains")


def minimum_payout(settings: Settings, asset_symbol: str) -> int:
    """The configured dust minimum of an asset, in base units (1 when none is configured)."""
    if asset_symbol == "USDC":
        return max(1, settings.payouts.min_usdc_base_units)
    if asset_symbol == "SOL":
        return max(1, settings.payouts.min_sol_lamports)
    return 1


# --- after the request: events, backoff, parking, operator commands, reads ---------------

# Statuses a payout worker claims and drives (waiting_funds: to check the float again).
WORKABLE = (
    PayoutStatus.REQUESTED,
    PayoutStatus.SIGNED,
    PayoutStatus.BROADCAST,
    PayoutStatus.WAITING_FUNDS,
)
# Not settled: the hold is still placed (a sweep's source address is still busy).
OPEN = (*WORKABLE, PayoutStatus.NEEDS_ATTENTION)
# Something signed for the payout may be on its way to the chain.
SIGNED_STATES = (PayoutStatus.SIGNED, PayoutStatus.BROADCAST)
# A payout or sweep step failing with these may succeed later unchanged (node or database
# trouble): back off and retry. Anything else is unexpected for that payout: park it.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    RpcError,
    Unavailable,
    OperationalError,
    InterfaceError,
    OSError,
)


class PayoutNotFound(NotFound):
    type = "payout_not_found"


class PayoutStateConflict(Conflict):
    type = "payout_state_conflict"


def event_data(
    session: Session, payout: Payout, asset_symbol: str, **extra: object
) -> dict[str, object]:
    """A payout.* webhook payload; the agent is named by the marketplace's id."""
    agent = session.get(Agent, payout.agent_id) if payout.agent_id is not None else None
    return {
        "payout_id": payout.id,
        "agent": agent.external_id if agent is not None else None,
        "network": payout.chain,
        "asset": asset_symbol,
        "destination": payout.destination,
        "amount_base_units": str(payout.amount),
        "reason": payout.reason,
        "status": payout.status,
        "tx_hash": payout.tx_hash,
        **extra,
    }


def emit_event(session: Session, payout: Payout, event_type: str, **extra: object) -> None:
    """The payout's webhook event in the caller's transaction; sweeps have none (custody
    moves between platform addresses: nothing changed for any consumer)."""
    if payout.reason == PayoutReason.SWEEP.value:
        return
    asset = session.get_one(Asset, payout.asset_id)
    events.emit(session, event_type, event_data(session, payout, asset.symbol, **extra))


def _audit(session: Session, payout: Payout, actor: str, action: str, **details: object) -> None:
    asset = session.get_one(Asset, payout.asset_id)
    audit.append(
        session,
        stream=f"payout:{payout.id}",
        actor=actor,
        action=action,
        asset=asset.symbol,
        amount=payout.amount,
        details={"chain": payout.chain, "status": payout.status, **details},
    )


@dataclass(frozen=True)
class Backoff:
    """Growing delay between attempts of a failing payout or sweep step, and when its
    failures have lasted long enough to raise the one alert."""

    base_s: float = 2.0
    max_s: float = 300.0
    stalled_after_s: float = 60.0

    def __post_init__(self) -> None:
        assert 0 < self.base_s <= self.max_s and self.stalled_after_s >= 0

    @classmethod
    def of(cls, settings: Settings) -> Backoff:
        payouts = settings.payouts
        return cls(payouts.retry_base_s, payouts.retry_max_s, payouts.stalled_after_s)

    def delay_s(self, consecutive_errors: int) -> float:
        assert consecutive_errors >= 1
        return min(self.max_s, self.base_s * float(2 ** min(consecutive_errors - 1, 32)))


@dataclass(frozen=True)
class StepFailure:
    step_errors: int
    retry_in_s: float
    # True exactly once per run of failures: when it first lasted `stalled_after_s`.
    stalled_now: bool


def record_step_failure(
    session: Session,
    payout_id: int,
    backoff: Backoff,
    claimed_by: str | None = None,
    *,
    delay: bool = True,
) -> StepFailure | None:
    """Count a failed step and (with `delay`) put the next attempt off; None when the
    payout is not (or no longer) `claimed_by` this worker (None: no claim to check)."""
    now = utcnow()
    condition = [Payout.id == payout_id]
    if claimed_by is not None:
        condition.append(Payout.claimed_by == claimed_by)
    payout = session.scalars(select(Payout).where(*condition).with_for_update()).one_or_none()
    if payout is None:
        return None
    payout.step_errors += 1
    payout.failing_since = payout.failing_since or now
    delay_s = backoff.delay_s(payout.step_errors) if delay else 0.0
    payout.retry_at = now + timedelta(seconds=delay_s) if delay else None
    stalled_now = (
        not payout.stall_reported
        and (now - payout.failing_since).total_seconds() >= backoff.stalled_after_s
    )
    if stalled_now:
        payout.stall_reported = True
    return StepFailure(payout.step_errors, delay_s, stalled_now)


def clear_step_failures(session: Session, payout_id: int) -> None:
    """A step succeeded: the payout is no longer failing."""
    session.execute(
        update(Payout)
        .where(Payout.id == payout_id)
        .values(step_errors=0, failing_since=None, retry_at=None, stall_reported=False)
        .execution_options(synchronize_session=False)
    )


def park(session: Session, payout: Payout, *, reason: str, actor: str) -> None:
    """Move a claimed open payout to needs_attention: nothing more happens to it (its hold,
    and for a signed one its nonce, stay) until `retry_payout` or `cancel_payout`."""
    assert payout.status in {s.value for s in WORKABLE}, payout.status
    payout.attention_from = payout.status
    payout.status = PayoutStatus.NEEDS_ATTENTION.value
    payout.status_reason = reason[:500]
    payout.claimed_by = None
    payout.claimed_until = None
    session.flush()
    _audit(session, payout, actor, "payout_needs_attention", reason=payout.status_reason)
    emit_event(session, payout, "payout.needs_attention", status_reason=payout.status_reason)


def take_for_operator(session: Session, payout_id: int, operator: str, lease_s: float) -> Payout:
    """Claim an open payout for an operator command, so no worker moves it meanwhile.
    Raises PayoutNotFound, or PayoutStateConflict when it is settled or a worker holds it."""
    now = utcnow()
    claimed = session.execute(
        update(Payout)
        .where(
            Payout.id == payout_id,
            Payout.status.in_([s.value for s in OPEN]),
            or_(
                Payout.claimed_by.is_(None),
                Payout.claimed_by == operator,
                Payout.claimed_until < now,
            ),
        )
        .values(claimed_by=operator, claimed_until=now + timedelta(seconds=lease_s))
        .execution_options(synchronize_session=False)
    )
    payout = session.scalars(
        select(Payout).where(Payout.id == payout_id).execution_options(populate_existing=True)
    ).one_or_none()
    if payout is None:
        raise PayoutNotFound(f"no payout {payout_id}; `escrowd payouts list` shows them")
    if claimed.rowcount != 1:  # type: ignore[attr-defined]
        if payout.status not in {s.value for s in OPEN}:
            raise PayoutStateConflict(
                f"payout {payout_id} is {payout.status}: settled, nothing to do"
            )
        raise PayoutStateConflict(
            f"payout {payout_id} is being worked on by {payout.claimed_by} right now; "
            "try again in a few seconds"
        )
    return payout


def release_operator_claim(session: Session, payout_id: int, operator: str) -> None:
    session.execute(
        update(Payout)
        .where(Payout.id == payout_id, Payout.claimed_by == operator)
        .values(claimed_by=None, claimed_until=None)
        .execution_options(synchronize_session=False)
    )


def release_hold(session: Session, payout: Payout, asset: Asset, *, actor: str) -> None:
    """Give a payout's held amount back to its agent (sweeps hold nothing). One key for a
    chain failure and a cancel alike: a payout's hold is released at most once."""
    if payout.reason == PayoutReason.SWEEP.value:
        return
    assert payout.agent_id is not None
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=f"payout:{payout.id}:reversal",
                debit_account_id=accounts.payouts_in_flight(session, payout.chain, asset.symbol).id,
                credit_account_id=accounts.agent_available(
                    session, payout.agent_id, asset.symbol
                ).id,
                amount=payout.amount,
                code=TransferCode.PAYOUT_REVERSAL,
                ref_type="payout",
                ref_id=str(payout.id),
            )
        ],
        actor=actor,
        audit_stream=f"payout:{payout.id}",
    )


def cancel_payout(
    session: Session, payout_id: int, *, operator: str, reason: str, evidence: str | None
) -> Payout:
    """Cancel a payout the operator holds (`take_for_operator`): status cancelled, the hold
    reversed to the agent (sweeps hold nothing), an audit row and a payout.cancelled event.

    The caller decides that nothing signed for it can land: `evidence` says how (None when
    nothing was ever signed). A payout with stored transactions and no evidence is refused.
    """
    payout = session.scalars(
        select(Payout).where(Payout.id == payout_id).with_for_update()
    ).one_or_none()
    if payout is None:
        raise PayoutNotFound(f"no payout {payout_id}; `escrowd payouts list` shows them")
    if payout.claimed_by != operator or payout.status not in {s.value for s in OPEN}:
        raise PayoutStateConflict(
            f"payout {payout_id} changed while it was checked ({payout.status}); run cancel again"
        )
    signed = session.scalar(
        select(PayoutTransaction.id).where(PayoutTransaction.payout_id == payout_id).limit(1)
    )
    if signed is not None and evidence is None:
        raise PayoutStateConflict(
            f"payout {payout_id} has signed transactions; it can be cancelled only once "
            "the chain shows none of them can land"
        )
    asset = session.get_one(Asset, payout.asset_id)
    previous = payout.status
    payout.status = PayoutStatus.CANCELLED.value
    payout.status_reason = reason[:500]
    payout.claimed_by = None
    payout.claimed_until = None
    payout.retry_at = None
    session.flush()
    release_hold(session, payout, asset, actor=operator)
    _audit(
        session,
        payout,
        operator,
        "payout_cancelled",
        reason=payout.status_reason,
        previous_status=previous,
        evidence=evidence,
    )
    emit_event(session, payout, "payout.cancelled", status_reason=payout.status_reason)
    log.warning(
        "payout_cancelled",
        payout_id=payout.id,
        chain=payout.chain,
        operator=operator,
        previous_status=previous,
        evidence=evidence,
    )
    return payout


def retry_payout(session: Session, payout_id: int, *, operator: str) -> Payout:
    """Put a payout the operator holds back in the workers' hands now: a needs_attention
    one where it was parked, any other open one with its backoff cleared (a waiting_funds
    one is checked against the float again)."""
    payout = session.scalars(
        select(Payout).where(Payout.id == payout_id).with_for_update()
    ).one_or_none()
    if payout is None:
        raise PayoutNotFound(f"no payout {payout_id}; `escrowd payouts list` shows them")
    if payout.claimed_by != operator or payout.status not in {s.value for s in OPEN}:
        raise PayoutStateConflict(
            f"payout {payout_id} changed while it was checked ({payout.status}); run retry again"
        )
    previous = payout.status
    if payout.status == PayoutStatus.NEEDS_ATTENTION.value:
        assert payout.attention_from is not None
        payout.status = payout.attention_from
    payout.attention_from = None
    payout.status_reason = None
    payout.claimed_by = None
    payout.claimed_until = None
    payout.step_errors = 0
    payout.failing_since = None
    payout.retry_at = None
    payout.stall_reported = False
    session.flush()
    _audit(session, payout, operator, "payout_retried", previous_status=previous)
    emit_event(session, payout, "payout.retried", previous_status=previous)
    log.info(
        "payout_retried",
        payout_id=payout.id,
        operator=operator,
        previous_status=previous,
        status=payout.status,
    )
    return payout


@dataclass(frozen=True)
class StatusAge:
    chain: str
    status: str
    count: int
    # Seconds since the oldest of them was requested.
    oldest_age_s: float


def payouts_by_status(
    session: Session, statuses: Sequence[PayoutStatus] = OPEN, *, now: datetime | None = None
) -> list[StatusAge]:
    """Open payouts (sweeps included) per chain and status with the age of the oldest:
    for gauges and readiness ("a payout waiting for funds for 10 minutes")."""
    now = now or utcnow()
    rows = session.execute(
        select(Payout.chain, Payout.status, func.count(), func.min(Payout.created_at))
        .where(Payout.status.in_([s.value for s in statuses]))
        .group_by(Payout.chain, Payout.status)
        .order_by(Payout.chain, Payout.status)
    ).all()
    return [
        StatusAge(
            chain=chain,
            status=status,
            count=int(count),
            oldest_age_s=max(0.0, (now - oldest).total_seconds()),
        )
        for chain, status, count, oldest in rows
    ]
