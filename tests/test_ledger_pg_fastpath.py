"""PostgreSQL posts through one server-side function (escrowd_post); SQLite through Python.

The same seeded sequence of postings, valid and invalid, must give the same outcomes,
balances, transfers and audit rows on both paths, and the rows the function writes must
verify (and be caught when edited) with the Python audit code.
"""

from __future__ import annotations

import json
import random
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from escrowd.config.errors import EscrowdError
from escrowd.escrow import audit, ledger
from escrowd.models import AccountKind, AuditLog, LedgerAccount, LedgerTransfer, TransferCode
from escrowd.models.db import make_engine, make_session_factory

pytestmark = pytest.mark.postgres

# Multi-byte and JSON-special characters exercise the byte lengths and escaping that the
# SQL digest must reproduce exactly.
_REFS = ["job-1", "job-ü", 'quote"and\\slash', "emoji-\U0001f600"]


@dataclass(frozen=True)
class _Op:
    legs: list[tuple[int, int, int, str]]  # (debit index, credit index, amount, key)
    ref: str
    stream: str | None


def _operations(seed: int, count: int) -> list[_Op]:
    rng = random.Random(seed)
    used: list[list[tuple[int, int, int, str]]] = []
    ops: list[_Op] = []
    for n in range(count):
        roll = rng.random()
        if used and roll < 0.15:
            legs = rng.choice(used)  # exact repeat: must return the originals
        elif used and roll < 0.25:
            legs = [(d, c, a + 1, k) for d, c, a, k in rng.choice(used)]  # same keys, new content
        elif used and roll < 0.3:
            legs = [rng.choice(used)[0], (1, 2, 1, f"k{n}-extra")]  # partly reused keys
        else:
            # Index 0 is the custody "world", 6 unknown, 7 a SOL account, 8 platform fees.
            legs = []
            for leg in range(rng.choice([1, 1, 2, 3])):
                debit = rng.choice([0, 1, 2, 3, 4, 5, 1, 2, 3, 6, 7])
                credit = rng.choice([c for c in (1, 2, 3, 4, 5, 8, 7, 6) if c != debit])
                legs.append((debit, credit, rng.randint(1, 900), f"k{n}-{leg}"))
            used.append(legs)
        stream = rng.choice([None, None, f"escrow:{rng.choice(_REFS)}"])
        ops.append(_Op(legs, rng.choice(_REFS), stream))
    return ops


def _accounts(session: Session) -> list[int]:
    world = ledger.get_or_create_account(session, AccountKind.CUSTODY, "chain", "USDC")
    agents = [
        ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, f"agent-{i}", "USDC")
        for i in range(5)
    ]
    sol = ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, "agent-0", "SOL")
    fees = ledger.get_or_create_account(session, AccountKind.PLATFORM_FEES, "platform", "USDC")
    return [world.id, *(a.id for a in agents), 999_999, sol.id, fees.id]


def _run(engine: Engine, ops: list[_Op]) -> dict[str, Any]:
    """Apply `ops` in order; return every outcome and the resulting state, ids included."""
    sessions = make_session_factory(engine)
    outcomes: list[object] = []
    with sessions() as session:
        ids = _accounts(session)
        for i in (1, 2, 3):
            ledger.post(
                session,
                [
                    ledger.TransferSpec(
                        f"fund-{i}", ids[0], ids[i], 1_000, TransferCode.DEPOSIT, "test", "fund"
                    )
                ],
                actor="test",
            )
        session.commit()
        for op in ops:
            specs = [
                ledger.TransferSpec(
                    key, ids[d], ids[c], amount, TransferCode.ADJUSTMENT, "test", op.ref
                )
                for d, c, amount, key in op.legs
            ]
            try:
                posted = ledger.post(session, specs, actor="prop", audit_stream=op.stream)
            except EscrowdError as exc:
                outcomes.append((type(exc).__name__, str(exc)))
            else:
                outcomes.append([(p.id, p.asset, p.amount, p.idempotency_key) for p in posted])
            # Rejected postings must leave the transaction usable and write nothing.
            session.commit()
        batch_names: dict[str, str] = {}

        def batch(batch_id: str) -> str:
            return batch_names.setdefault(batch_id, f"batch-{len(batch_names)}")

        transfers = [
            (
                t.id,
                t.idempotency_key,
                t.debit_account_id,
                t.credit_account_id,
                t.asset,
                t.amount,
                t.code,
                t.ref_type,
                t.ref_id,
                batch(t.batch_id),
            )
            for t in session.scalars(select(LedgerTransfer).order_by(LedgerTransfer.id))
        ]
        audit_rows = []
        for row in session.scalars(select(AuditLog).order_by(AuditLog.id)):
            details = json.loads(row.details)
            details["batch_id"] = batch(details["batch_id"])
            audit_rows.append(
                (row.id, row.stream, row.seq, row.actor, row.action, row.asset, row.amount, details)
            )
        state = {
            "outcomes": outcomes,
            "balances": [
                ledger.balance(session, account)
                for account in session.scalars(select(LedgerAccount).order_by(LedgerAccount.id))
            ],
            "transfers": transfers,
            "audit": audit_rows,
            "violations": ledger.check(session),
            "audit_ok": audit.verify(session).ok,
        }
    return state


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_function_path_matches_python_path(seed: int, sqlite_url: str, pg_engine: Engine) -> None:
    ops = _operations(seed, 60)
    sqlite_engine = make_engine(sqlite_url)
    try:
        python_path = _run(sqlite_engine, ops)
    finally:
        sqlite_engine.dispose()
    function_path = _run(pg_engine, ops)

    kinds = {o[0] if isinstance(o, tuple) else "posted" for o in python_path["outcomes"]}
    # The sequence really covers every refusal and successful posting.
    assert kinds >= {
        "posted",
        "InsufficientFunds",
        "IdempotencyConflict",
        "UnknownAccount",
        "AssetMismatch",
    }
    assert function_path["outcomes"] == python_path["outcomes"]
    assert function_path["balances"] == python_path["balances"]
    assert function_path["transfers"] == python_path["transfers"]
    assert function_path["audit"] == python_path["audit"]
    assert function_path["violations"] == python_path["violations"] == []
    assert function_path["audit_ok"] and python_path["audit_ok"]


def _pair(session: Session) -> tuple[int, int, int]:
    world = ledger.get_or_create_account(session, AccountKind.CUSTODY, "chain", "USDC")
    alice = ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, "alice", "USDC")
    bob = ledger.get_or_create_account(session, AccountKind.AGENT_AVAILABLE, "bob", "USDC")
    ledger.post(
        session,
        [ledger.TransferSpec("fund", world.id, alice.id, 100, TransferCode.DEPOSIT, "t", "f")],
        actor="test",
    )
    session.commit()
    return world.id, alice.id, bob.id


@pytest.mark.parametrize("first_commits", [True, False])
@pytest.mark.parametrize("same_content", [True, False])
def test_concurrent_poster_of_the_same_key(
    pg_engine: Engine, first_commits: bool, same_content: bool
) -> None:
    """The second poster waits on the first; it then gets the originals, a conflict, or
    (when the first rolled back) posts itself. Its own account updates never survive a loss."""
    sessions = make_session_factory(pg_engine)
    with sessions() as session:
        _, alice, bob = _pair(session)
    first_spec = ledger.TransferSpec("pay", alice, bob, 30, TransferCode.ADJUSTMENT, "t", "x")
    second_spec = ledger.TransferSpec(
        "pay", alice, bob, 30 if same_content else 31, TransferCode.ADJUSTMENT, "t", "x"
    )
    result: dict[str, object] = {}

    def second() -> None:
        with sessions() as session:
            try:
                result["posted"] = ledger.post(session, [second_spec], actor="b")
                session.commit()
            except EscrowdError as exc:
                result["error"] = exc

    with sessions() as first:
        original = ledger.post(first, [first_spec], actor="a")
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.5)
        assert thread.is_alive(), "the second poster should wait for the first's key"
        if first_commits:
            first.commit()
        else:
            first.rollback()
        thread.join(timeout=30)

    with sessions() as session:
        transfers = session.scalars(select(LedgerTransfer).where(LedgerTransfer.id > 1)).all()
        assert ledger.check(session) == []
        assert audit.verify(session).ok
        bob_balance = session.scalar(
            text("SELECT credits_posted - debits_posted FROM ledger_accounts WHERE id = :id"),
            {"id": bob},
        )
    assert len(transfers) == 1
    if not first_commits:
        assert result["posted"] == [ledger.Posted.of(transfers[0])]
        assert bob_balance == second_spec.amount
    elif same_content:
        assert result["posted"] == original
        assert bob_balance == 30
    else:
        assert type(result["error"]).__name__ == "IdempotencyConflict"
        assert bob_balance == 30


def _tamper(engine: Engine, sql: str, params: dict[str, object]) -> None:
    with engine.begin() as conn:
        # A superuser can switch the append-only trigger off; verify must still notice.
        conn.execute(text("ALTER TABLE audit_log DISABLE TRIGGER USER"))
        conn.execute(text(sql), params)
        conn.execute(text("ALTER TABLE audit_log ENABLE TRIGGER USER"))


def test_edits_to_function_written_rows_are_caught(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions() as session:
        _, alice, bob = _pair(session)
        ledger.post(
            session,
            [
                ledger.TransferSpec("p1", alice, bob, 10, TransferCode.ESCROW_RELEASE, "job", "ü"),
                ledger.TransferSpec("p2", alice, bob, 5, TransferCode.FEE, "job", "ü"),
            ],
            actor="test",
        )
        session.commit()
        assert audit.verify(session).ok
        victim = session.scalars(select(AuditLog).where(AuditLog.seq == 2)).one()
    restore = (
        "UPDATE audit_log SET amount = :amount, details = :details, created_at = :created_at"
        " WHERE id = :id"
    )
    original: dict[str, object] = {
        "id": victim.id,
        "amount": victim.amount,
        "details": victim.details,
        "created_at": victim.created_at,
    }
    for sql in (
        "UPDATE audit_log SET amount = amount + 1 WHERE id = :id",
        "UPDATE audit_log SET details = replace(details, '\"p2\"', '\"p3\"') WHERE id = :id",
        "UPDATE audit_log SET created_at = created_at + interval '1 microsecond' WHERE id = :id",
    ):
        _tamper(pg_engine, sql, {"id": victim.id})
        with sessions() as session:
            report = audit.verify(session)
        assert not report.ok, sql
        assert f"id={victim.id}" in (report.first_problem or ""), sql
        _tamper(pg_engine, restore, original)
        with sessions() as session:
            assert audit.verify(session).ok
