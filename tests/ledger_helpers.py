"""Small builders shared by ledger, audit and escrow tests."""

from __future__ import annotations

import itertools

from sqlalchemy.orm import Session

from escrowd.escrow import ledger
from escrowd.models import AccountKind, LedgerAccount, TransferCode

_keys = itertools.count(1)


def new_key(prefix: str = "t") -> str:
    return f"{prefix}-{next(_keys)}"


def fund(session: Session, account: LedgerAccount, amount: int, *, world: LedgerAccount) -> None:
    """Credit `account` from an unlimited `world` account (like a deposit from custody)."""
    ledger.post(
        session,
        [
            ledger.TransferSpec(
                idempotency_key=new_key("fund"),
                debit_account_id=world.id,
                credit_account_id=account.id,
                amount=amount,
                code=TransferCode.DEPOSIT,
                ref_type="test",
                ref_id=f"fund-{account.id}",
            )
        ],
        actor="test",
    )


def make_accounts(
    session: Session, count: int, asset: str = "USDC"
) -> tuple[LedgerAccount, list[LedgerAccount]]:
    world = ledger.get_or_create_account(session, AccountKind.CUSTODY, "testchain", asset)
    agents = [
        ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, f"agent-{i}", asset)
        for i in range(count)
    ]
    return world, agents


def spec(
    debit: LedgerAccount, credit: LedgerAccount, amount: int, key: str | None = None
) -> ledger.TransferSpec:
    return ledger.TransferSpec(
        idempotency_key=key or new_key(),
        debit_account_id=debit.id,
        credit_account_id=credit.id,
        amount=amount,
        code=TransferCode.ADJUSTMENT,
        ref_type="test",
        ref_id="x",
    )
