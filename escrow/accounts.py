"""Which ledger account holds what: one naming rule for every caller."""

from __future__ import annotations

from sqlalchemy.orm import Session

from escrowd.escrow import ledger
from escrowd.models import AccountKind, LedgerAccount

PLATFORM_OWNER = "platform"


def agent_available(session: Session, agent_id: int, asset: str) -> LedgerAccount:
    return ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, str(agent_id), asset)


def escrow_account(session: Session, job_id: str, asset: str) -> LedgerAccount:
    return ledger.get_or_create_account(session, AccountKind.ESCROW, job_id, asset)


def platform_fees(session: Session, asset: str) -> LedgerAccount:
    return ledger.get_or_create_account(session, AccountKind.PLATFORM_FEES, PLATFORM_OWNER, asset)


def custody(session: Session, chain: str, asset: str) -> LedgerAccount:
    """What the platform holds on `chain`; its balance is minus the coins held there."""
    return ledger.get_or_create_account(session, AccountKind.CUSTODY, chain, asset)


def payouts_in_flight(session: Session, chain: str, asset: str) -> LedgerAccount:
    return ledger.get_or_create_account(session, AccountKind.PAYOUTS_IN_FLIGHT, chain, asset)
