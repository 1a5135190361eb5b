"""Ledger postings: atomicity, idempotency, no-overdraft, typed bad input, invariants."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from escrowd.escrow import audit, ledger
from escrowd.escrow.errors import (
    AssetMismatch,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    UnknownAccount,
)
from escrowd.escrow.money import format_amount, parse_amount
from escrowd.models import AccountKind, AuditLog, LedgerTransfer
from tests.ledger_helpers import fund, make_accounts, new_key, spec


def _counts(session: Session) -> tuple[int, int]:
    transfers = session.scalar(select(func.count()).select_from(LedgerTransfer)) or 0
    audits = session.scalar(select(func.count()).select_from(AuditLog)) or 0
    return transfers, audits


def test_transfer_moves_balance_and_writes_audit(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 1_000_000, world=world)
    ledger.post(session, [spec(alice, bob, 250_000)], actor="test")
    session.commit()
    assert ledger.balance(session, alice) == 750_000
    assert ledger.balance(session, bob) == 250_000
    # The hot custody account is never updated in place; its balance is summed.
    assert ledger.balance(session, world) == -1_000_000
    assert world.debits_posted == 0
    assert _counts(session) == (2, 2)
    assert ledger.check(session) == []
    assert audit.verify(session).ok


def test_linked_batch_is_all_or_nothing(session: Session) -> None:
    world, (alice, bob, carol) = make_accounts(session, 3)
    fund(session, alice, 100, world=world)
    session.commit()
    before = _counts(session)
    # First leg alone would succeed; the second overdraws bob, so neither may be written.
    with pytest.raises(InsufficientFunds):
        ledger.post(session, [spec(alice, carol, 60), spec(bob, carol, 1)], actor="test")
    session.commit()
    assert _counts(session) == before
    assert ledger.balance(session, alice) == 100
    assert ledger.balance(session, carol) == 0


def test_overdraft_refused_and_nothing_written(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 10, world=world)
    session.commit()
    before = _counts(session)
    with pytest.raises(InsufficientFunds, match="cannot cover 11"):
        ledger.post(session, [spec(alice, bob, 11)], actor="test")
    session.commit()
    assert _counts(session) == before
    assert ledger.balance(session, alice) == 10


def test_idempotent_repeat_returns_original(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    first = ledger.post(session, [spec(alice, bob, 40, key="pay-1")], actor="test")
    again = ledger.post(session, [spec(alice, bob, 40, key="pay-1")], actor="test")
    session.commit()
    assert [t.id for t in again] == [t.id for t in first]
    assert ledger.balance(session, alice) == 60


def test_idempotency_key_reused_for_other_content_conflicts(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    ledger.post(session, [spec(alice, bob, 40, key="pay-1")], actor="test")
    session.commit()
    before = _counts(session)
    with pytest.raises(IdempotencyConflict):
        ledger.post(session, [spec(alice, bob, 41, key="pay-1")], actor="test")
    with pytest.raises(IdempotencyConflict):
        ledger.post(session, [spec(alice, bob, 40, key="pay-1"), spec(alice, bob, 1)], actor="test")
    session.commit()
    assert _counts(session) == before
    assert ledger.balance(session, alice) == 60


@pytest.mark.parametrize("amount", [0, -5, True, 1.5])
def test_bad_amounts_are_typed_errors(session: Session, amount: object) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    session.commit()
    before = _counts(session)
    bad = ledger.TransferSpec(
        idempotency_key=new_key(),
        debit_account_id=alice.id,
        credit_account_id=bob.id,
        amount=amount,  # type: ignore[arg-type]
        code=ledger.TransferCode.ADJUSTMENT,
        ref_type="test",
        ref_id="x",
    )
    with pytest.raises(InvalidAmount):
        ledger.post(session, [bad], actor="test")
    assert _counts(session) == before


def test_unknown_account_same_account_and_asset_mismatch(session: Session) -> None:
    world, (alice,) = make_accounts(session, 1)
    fund(session, alice, 100, world=world)
    sol = ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, "agent-0", "SOL")
    session.commit()
    before = _counts(session)
    missing = ledger.TransferSpec(
        new_key(), alice.id, 999_999, 1, ledger.TransferCode.FEE, "t", "x"
    )
    with pytest.raises(UnknownAccount, match="999999"):
        ledger.post(session, [missing], actor="test")
    with pytest.raises(InvalidAmount, match="two different accounts"):
        ledger.post(session, [spec(alice, alice, 1)], actor="test")
    with pytest.raises(AssetMismatch, match="same asset"):
        ledger.post(session, [spec(alice, sol, 1)], actor="test")
    session.commit()
    assert _counts(session) == before


def test_check_reports_tampered_totals(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    ledger.post(session, [spec(alice, bob, 30)], actor="test")
    session.commit()
    assert ledger.check(session) == []
    # Someone edits a balance row directly: the recorded totals no longer match the transfers.
    session.execute(
        text("UPDATE ledger_accounts SET credits_posted = credits_posted + 5 WHERE id = :id"),
        {"id": bob.id},
    )
    session.commit()
    checks = {v.check for v in ledger.check(session)}
    assert "posted_totals" in checks


@pytest.mark.parametrize(
    "statement",
    [
        "DELETE FROM ledger_accounts WHERE id = :id",
        "UPDATE ledger_accounts SET asset = 'SOL' WHERE id = :id",
        "UPDATE ledger_accounts SET owner = 'mallory' WHERE id = :id",
        "UPDATE ledger_accounts SET no_overdraft = NOT no_overdraft WHERE id = :id",
    ],
)
def test_database_refuses_removing_or_reidentifying_an_account(
    session: Session, statement: str
) -> None:
    # Transfers carry account ids without foreign keys (a key would lock the hot fee row on
    # every release), so the accounts themselves must stay put.
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    ledger.post(session, [spec(alice, bob, 30)], actor="test")
    session.commit()
    with pytest.raises(Exception, match=r"(?i)never re|refused"):
        session.execute(text(statement), {"id": bob.id})
    session.rollback()
    assert ledger.balance(session, bob) == 30
    assert ledger.check(session) == []


def test_check_reports_a_transfer_whose_account_is_missing(session: Session) -> None:
    world, (alice, bob) = make_accounts(session, 2)
    fund(session, alice, 100, world=world)
    ledger.post(session, [spec(alice, bob, 30)], actor="test")
    session.commit()
    # Rows written around the posting functions, with an account id nobody holds.
    session.execute(
        text(
            "INSERT INTO ledger_transfers (idempotency_key, debit_account_id, credit_account_id,"
            " asset, amount, code, ref_type, ref_id, batch_id, created_at) VALUES ('forged',"
            " :debit, 987654, 'USDC', 5, 'adjustment', 'x', 'y', 'b', CURRENT_TIMESTAMP)"
        ),
        {"debit": world.id},
    )
    session.commit()
    dangling = [v for v in ledger.check(session) if v.check == "transfer_accounts"]
    assert len(dangling) == 1
    assert "987654" in dangling[0].message


def test_database_refuses_negative_no_overdraft_balance(session: Session) -> None:
    _, (alice,) = make_accounts(session, 1)
    session.commit()
    with pytest.raises(Exception, match=r"(?i)check|constraint"):
        session.execute(
            text("UPDATE ledger_accounts SET debits_posted = 10 WHERE id = :id"), {"id": alice.id}
        )
        session.flush()
    session.rollback()


@pytest.mark.parametrize(
    ("text_in", "decimals", "expected"),
    [("12.5", 6, 12_500_000), ("0.000001", 6, 1), ("7", 9, 7_000_000_000), ("1.10", 2, 110)],
)
def test_parse_amount(text_in: str, decimals: int, expected: int) -> None:
    assert parse_amount(text_in, decimals) == expected
    assert parse_amount(format_amount(expected, decimals), decimals) == expected


@pytest.mark.parametrize(
    "text_in",
    [
        "0.0000001",
        "-1",
        "0",
        "0.000000",
        "1e6",
        " 1",
        "1,5",
        "",
        ".5",
        "01",
        "1." + "0" * 50,
        "NaN",
    ],
)
def test_parse_amount_rejects(text_in: str) -> None:
    with pytest.raises(InvalidAmount):
        parse_amount(text_in, 6)


def test_parse_amount_names_the_decimals() -> None:
    with pytest.raises(InvalidAmount, match="7 decimal places; this asset has 6"):
        parse_amount("1.1234567", 6)


# Random postings, some invalid: every invariant holds after each, rejected ones change nothing.
_operation = st.tuples(
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=0, max_value=4),
    st.integers(min_value=-5, max_value=400),
    st.booleans(),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops=st.lists(_operation, min_size=1, max_size=12))
def test_random_postings_keep_invariants(
    session: Session, ops: list[tuple[int, int, int, bool]]
) -> None:
    world, accounts = make_accounts(session, 5)
    expected = {a.id: ledger.balance(session, a) for a in accounts}
    for a in accounts:
        if expected[a.id] == 0:
            fund(session, a, 500, world=world)
            expected[a.id] = 500
    session.commit()
    for src, dst, amount, reuse_key in ops:
        debit, credit = accounts[src], accounts[dst]
        key = "reused-key" if reuse_key else new_key("prop")
        before = _counts(session)
        try:
            ledger.post(session, [spec(debit, credit, amount, key=key)], actor="prop")
        except (InvalidAmount, InsufficientFunds, IdempotencyConflict):
            session.commit()
            assert _counts(session) == before
            continue
        session.commit()
        if _counts(session) != before:
            expected[debit.id] -= amount
            expected[credit.id] += amount
    for a in accounts:
        assert ledger.balance(session, a) == expected[a.id]
        assert expected[a.id] >= 0
    assert ledger.check(session) == []
    assert audit.verify(session).ok
