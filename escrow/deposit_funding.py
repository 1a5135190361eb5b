"""Escrows funded from one named deposit (seed 000's `jobs.deposit_tx_hash`).

Besides funding from an agent's balance, a marketplace can name one confirmed deposit by
chain, transaction hash and, when the transaction holds several deposits, its log index
(EVM) or instruction index (Solana). The deposit was credited to the agent whose deposit
address received it; that agent is the escrow's buyer. Funding moves the deposit's
credited amount, or the smaller amount the request names, from the buyer's available
balance into the new escrow: the deposit is used up by that one escrow, and whatever the
request did not take stays the buyer's available balance.

A deposit funds one escrow at most: the escrow records it under a UNIQUE index, and the
deposit row is locked while the escrow is funded, so of two requests racing for one
deposit the second sees the first's escrow and gets DepositUsed (the index backs this up).
A deposit still pending answers DepositPending (409 `deposit_pending`: retry once it is
confirmed), an orphaned or reversed one DepositUnusable, an unknown one DepositNotFound.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import structlog
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from escrowd.config.errors import ValidationFailed
from escrowd.escrow import audit, service
from escrowd.escrow.errors import (
    DepositAgentMismatch,
    DepositAmbiguous,
    DepositNotFound,
    DepositPending,
    DepositUnusable,
    DepositUsed,
    InvalidAmount,
)
from escrowd.models import (
    Agent,
    Asset,
    Deposit,
    DepositStatus,
    Escrow,
    LedgerTransfer,
    TransferCode,
)

log = structlog.get_logger(__name__)

MAX_TX_HASH_LENGTH = 100
MAX_CHAIN_LENGTH = 32


@dataclass(frozen=True)
class DepositRef:
    """A deposit as the marketplace names it. `log_index` may be left out when the
    transaction holds one deposit (to the buyer, when a buyer is named)."""

    chain: str
    tx_hash: str
    log_index: int | None = None

    def check(self) -> None:
        if not self.chain or len(self.chain) > MAX_CHAIN_LENGTH:
            raise ValidationFailed(f"chain must be 1 to {MAX_CHAIN_LENGTH} characters")
        if not self.tx_hash or len(self.tx_hash) > MAX_TX_HASH_LENGTH:
            raise ValidationFailed(f"tx_hash must be 1 to {MAX_TX_HASH_LENGTH} characters")
        index = self.log_index
        if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
            raise ValidationFailed(f"log_index must be an integer, got {index!r}")
        if index is not None and not 0 <= index < 2**31:
            raise ValidationFailed(f"log_index must be between 0 and 2^31 - 1, got {index}")

    @property
    def stored_hash(self) -> str:
        """EVM hashes are stored in lower case; Solana signatures (base58) as they are."""
        return self.tx_hash.lower() if self.tx_hash.startswith(("0x", "0X")) else self.tx_hash

    def __str__(self) -> str:
        suffix = "" if self.log_index is None else f" #{self.log_index}"
        return f"{self.chain} {self.tx_hash}{suffix}"


@dataclass(frozen=True)
class Credit:
    """What the ledger credited for a deposit: its asset and net amount (credits minus
    reversals) and whether it was ever credited."""

    asset: str | None
    net: int
    ever_credited: bool


def credited(session: Session, deposit: Deposit) -> Credit:
    """Read from the deposit's ledger transfers, not from the deposit row: the ledger is
    what the buyer's balance holds, whatever the row's amount representation."""
    rows = session.execute(
        select(LedgerTransfer.code, LedgerTransfer.asset, func.sum(LedgerTransfer.amount))
        .where(
            LedgerTransfer.ref_type == "deposit",
            LedgerTransfer.ref_id == str(deposit.id),
            LedgerTransfer.code.in_([TransferCode.DEPOSIT, TransferCode.DEPOSIT_REVERSAL]),
        )
        .group_by(LedgerTransfer.code, LedgerTransfer.asset)
    ).all()
    credits = sum(int(total) for code, _, total in rows if code == TransferCode.DEPOSIT)
    reversals = sum(int(total) for code, _, total in rows if code != TransferCode.DEPOSIT)
    asset = next((asset for code, asset, _ in rows if code == TransferCode.DEPOSIT), None)
    return Credit(asset=asset, net=credits - reversals, ever_credited=credits > 0)


def _locked_deposit(session: Session, ref: DepositRef, buyer: Agent | None) -> Deposit:
    """The named deposit, locked until commit (two fundings from it queue here)."""
    query = (
        select(Deposit)
        .where(Deposit.chain == ref.chain, Deposit.tx_hash == ref.stored_hash)
        .order_by(Deposit.log_index)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if ref.log_index is not None:
        query = query.where(Deposit.log_index == ref.log_index)
    found = list(session.scalars(query))
    if len(found) > 1 and buyer is not None:
        found = [deposit for deposit in found if deposit.agent_id == buyer.id] or found
    if not found:
        raise DepositNotFound(
            f"no deposit {ref} is known; if it was just sent, retry once the indexer has "
            "seen it (GET /v1/deposits lists what it has seen)"
        )
    if len(found) > 1:
        indexes = ", ".join(str(deposit.log_index) for deposit in found)
        raise DepositAmbiguous(
            f"transaction {ref.tx_hash} on {ref.chain} holds {len(found)} deposits; name one "
            f"with log_index ({indexes})"
        )
    return found[0]


def deposit_asset(session: Session, ref: DepositRef, buyer: Agent | None = None) -> str:
    """The ledger asset (symbol) of the named deposit, to read an amount in its units."""
    ref.check()
    return session.get_one(Asset, _locked_deposit(session, ref, buyer).asset_id).symbol


def _usable_credit(session: Session, deposit: Deposit, ref: DepositRef) -> Credit:
    credit = credited(session, deposit)
    if deposit.status == DepositStatus.ORPHANED:
        raise DepositUnusable(
            f"deposit {ref} was orphaned: its block left the chain, so it funds nothing"
        )
    if credit.net > 0 and deposit.status != DepositStatus.PENDING:
        return credit
    if credit.ever_credited:
        raise DepositUnusable(f"deposit {ref} was credited and then reversed; it funds nothing")
    raise DepositPending(
        f"deposit {ref} is {deposit.status} (block {deposit.block_number}) and not credited "
        "yet; send the same request again once it is confirmed"
    )


def fund_escrow_from_deposit(
    session: Session,
    *,
    job_id: str,
    deposit: DepositRef,
    worker: Agent,
    buyer: Agent | None = None,
    amount: int | None = None,
    fee_bps: int,
    expires_at: datetime | None = None,
    actor: str = "api",
) -> Escrow:
    """A new escrow for `job_id` holding the named deposit's credited amount (or
    `amount`, at most that), paid by the agent the deposit was credited to. `buyer`, when
    given, must be that agent."""
    deposit.check()
    if amount is not None and (isinstance(amount, bool) or not isinstance(amount, int)):
        raise InvalidAmount(f"escrow amount must be an integer in base units, got {amount!r}")
    row = _locked_deposit(session, deposit, buyer)
    owner = session.get_one(Agent, row.agent_id)
    if buyer is not None and buyer.id != owner.id:
        raise DepositAgentMismatch(
            f"deposit {deposit} was credited to agent {owner.external_id}, not to buyer "
            f"{buyer.external_id}; name the agent it was sent to"
        )
    credit = _usable_credit(session, row, deposit)
    assert credit.asset is not None
    used_by = session.scalar(select(Escrow.job_id).where(Escrow.deposit_id == row.id))
    if used_by is not None:
        raise DepositUsed(f"deposit {deposit} already funds escrow {used_by}")
    wanted = credit.net if amount is None else amount
    if wanted > credit.net:
        raise InvalidAmount(
            f"amount {wanted} is more than the {credit.net} base units of {credit.asset} the "
            f"deposit {deposit} credited"
        )
    escrow = service.fund_escrow(
        session,
        job_id=job_id,
        buyer=owner,
        worker=worker,
        asset=credit.asset,
        amount=wanted,
        fee_bps=fee_bps,
        expires_at=expires_at,
        actor=actor,
    )
    escrow.deposit_id = row.id
    escrow.depositor_address = row.from_address
    try:
        with session.begin_nested():
            session.flush()
    except IntegrityError:
        raise DepositUsed(f"deposit {deposit} already funds another escrow") from None
    audit.append(
        session,
        stream=f"escrow:{job_id}",
        actor=actor,
        action="escrow_funded_from_deposit",
        asset=credit.asset,
        amount=wanted,
        details={
            "deposit_id": row.id,
            "chain": row.chain,
            "tx_hash": row.tx_hash,
            "log_index": row.log_index,
            "depositor_address": row.from_address,
            "deposit_credited": credit.net,
        },
    )
    log.info(
        "escrow_funded_from_deposit",
        job_id=job_id,
        chain=row.chain,
        tx_hash=row.tx_hash,
        log_index=row.log_index,
        amount_base_units=wanted,
    )
    return escrow


@dataclass(frozen=True)
class FundingDeposit:
    """The deposit an escrow was funded from, as the escrow shows it."""

    deposit_id: int
    chain: str
    tx_hash: str
    log_index: int
    depositor_address: str | None


def funding_deposit(session: Session, escrow: Escrow) -> FundingDeposit | None:
    """None for an escrow funded from a balance (no query then)."""
    if escrow.deposit_id is None:
        return None
    row = session.get_one(Deposit, escrow.deposit_id)
    return FundingDeposit(
        deposit_id=row.id,
        chain=row.chain,
        tx_hash=row.tx_hash,
        log_index=row.log_index,
        depositor_address=escrow.depositor_address,
    )
