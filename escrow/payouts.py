"""Payout requests: the payout row and its ledger hold, written together or not at all.

Only the request side lives here: validating the destination and amount, then holding the
funds (agent available -> payouts in flight) in the caller's transaction. Signing and
sending belong to the payout sender, which claims rows in status ``requested``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import structlog
from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from escrowd.config.settings import Settings
from escrowd.escrow import accounts, audit, events, ledger
from escrowd.escrow.errors import IdempotencyConflict, InvalidAmount, UnknownAsset
from escrowd.models import Agent, Chain, DepositAddress, Payout, PayoutReason, TransferCode
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
                {
                    "payout_id": payout.id,
                    "agent": session.get_one(Agent, agent_id).external_id,
                    "network": chain,
                    "asset": asset_symbol,
                    "destination": canonical,
                    "amount_base_units": str(amount),
                    "reason": reason.value,
                    "reference": reference,
                    "status": payout.status,
                },
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
