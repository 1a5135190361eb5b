"""Request-side checks: bad destinations, dust and insufficient balance are refused with a
typed error and nothing held (no payout row, no ledger transfer, balance unchanged)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from config.errors import EscrowdError, InsufficientFunds, ValidationFailed
from escrow.payouts import request_payout
from models import DepositAddress, LedgerTransfer, Payout, PayoutReason
from models.db import make_engine, make_session_factory
from tests.escrow_fixtures import CHAIN, available, seed_agents


@pytest.fixture
def sessions(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    # Request-side validation only: SQLite is enough (the race tests cover PostgreSQL).
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


OWN_EVM = "0x" + "5a" * 20
OWN_SOLANA = "9xQeWvG816bUx9EPjHmaT23yvVM2ZWbrrpZb9PusVFin"


def _attempt(
    sessions: sessionmaker[Session],
    agent_id: int,
    *,
    family: str,
    destination: str,
    amount: int,
    minimum: int = 10_000,
) -> None:
    with sessions() as s, s.begin():
        request_payout(
            s,
            chain=CHAIN,
            family=family,
            asset_symbol="USDC",
            agent_id=agent_id,
            destination=destination,
            amount=amount,
            reason=PayoutReason.WITHDRAWAL,
            reference="t",
            idempotency_key=f"dest-{destination}-{amount}",
            min_amount_base_units=minimum,
        )


@pytest.mark.parametrize(
    ("family", "destination", "amount", "error", "message"),
    [
        ("evm", "0x1234", 1_000_000, ValidationFailed, None),
        ("evm", "0x" + "00" * 20, 1_000_000, ValidationFailed, "zero"),
        ("evm", "0x" + "AB" * 19 + "aB", 1_000_000, ValidationFailed, "checksum"),
        ("evm", OWN_EVM, 1_000_000, ValidationFailed, "own deposit"),
        ("evm", OWN_EVM.upper().replace("0X", "0x"), 1_000_000, ValidationFailed, "own deposit"),
        ("solana", "not-base58-0OIl", 1_000_000, ValidationFailed, None),
        ("solana", "11111111111111111111111111111111", 1_000_000, ValidationFailed, "system"),
        ("solana", OWN_SOLANA, 1_000_000, ValidationFailed, "own deposit"),
        ("evm", "0x" + "12" * 20, 9_999, ValidationFailed, "minimum"),
        ("evm", "0x" + "12" * 20, 5_000_001, InsufficientFunds, "cannot cover"),
    ],
)
def test_refused_payout_holds_nothing(
    sessions: sessionmaker[Session],
    family: str,
    destination: str,
    amount: int,
    error: type[EscrowdError],
    message: str | None,
) -> None:
    ids = seed_agents(sessions, "agent", balance=5_000_000)
    with sessions() as s, s.begin():
        s.add(
            DepositAddress(agent_id=ids["agent"], chain="evm", address=OWN_EVM, derivation_index=0)
        )
        s.add(
            DepositAddress(
                agent_id=ids["agent"], chain="solana", address=OWN_SOLANA, derivation_index=0
            )
        )
    with sessions() as s:
        transfers_before = s.scalar(select(func.count()).select_from(LedgerTransfer))
    with pytest.raises(error, match=message):
        _attempt(sessions, ids["agent"], family=family, destination=destination, amount=amount)
    assert available(sessions, ids["agent"]) == 5_000_000
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(Payout)) == 0
        assert s.scalar(select(func.count()).select_from(LedgerTransfer)) == transfers_before


def test_valid_payout_holds_the_amount(sessions: sessionmaker[Session]) -> None:
    ids = seed_agents(sessions, "agent", balance=5_000_000)
    _attempt(sessions, ids["agent"], family="evm", destination="0x" + "12" * 20, amount=5_000_000)
    assert available(sessions, ids["agent"]) == 0
    with sessions() as s:
        assert s.scalars(select(Payout.status)).one() == "requested"
    with pytest.raises(InsufficientFunds):
        _attempt(sessions, ids["agent"], family="evm", destination="0x" + "34" * 20, amount=10_000)
