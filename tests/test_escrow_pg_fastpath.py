"""On PostgreSQL, fund/release/refund/resolve are one call each of a server-side function;
on SQLite the Python path runs statement by statement. The same scenario must give the
same outcomes, escrow rows, ledger transfers, audit rows and webhook payloads on both, and
the function's audit rows must verify with the Python audit code."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import EscrowdError
from escrowd.escrow import audit, ledger, service
from escrowd.escrow.audit import canonical_json
from escrowd.models import (
    Agent,
    AuditLog,
    Escrow,
    LedgerAccount,
    LedgerTransfer,
    WebhookEvent,
)
from escrowd.models.db import make_engine, make_session_factory
from tests.escrow_fixtures import credit, seed_asset

# JSON-special, multi-byte, astral and control characters: the SQL must escape them
# exactly as canonical_json does, or hashes and payloads differ.
_TRICKY = [
    "plain-job",
    'quote"and\\slash',
    "tab\there\nnewline\x01\x7f",
    "ünïcödé-雇用",
    "emoji-\U0001f600-end",
]


@pytest.mark.postgres
def test_json_text_matches_canonical_json(pg_engine: Engine) -> None:
    values = [*_TRICKY, "", "/", "\u2028", "\ud7ff\ue000\uffff", "\U0010ffff"]
    with pg_engine.connect() as conn:
        for value in values:
            rendered = conn.scalar(text("SELECT escrowd_json_text(:v)"), {"v": value})
            assert rendered == canonical_json({"k": value})[5:-1], value


def _scenario(sessions: sessionmaker[Session]) -> list[object]:
    """Every outcome kind of the four operations, refusals included; returns outcomes."""
    outcomes: list[object] = []

    def attempt(work: Any) -> None:
        with sessions() as s:
            try:
                escrow = work(s)
            except EscrowdError as exc:
                outcomes.append((type(exc).__name__, str(exc)))
                s.rollback()
            else:
                s.commit()
                outcomes.append(
                    (
                        escrow.job_id,
                        escrow.status,
                        escrow.worker_amount,
                        escrow.fee_amount,
                        escrow.refund_amount,
                        escrow.amount,
                        escrow.fee_bps,
                    )
                )

    with sessions() as s, s.begin():
        seed_asset(s)
        buyer = service.register_agent(s, "buyér-\U0001f600", None)
        service.register_agent(s, 'wor"ker\\\n', None)
        credit(s, buyer.id, 10_000_000)

    def fund(job: str, amount: int, fee_bps: int) -> Any:
        def work(s: Session) -> Escrow:
            return service.fund_escrow(
                s,
                job_id=job,
                buyer=service.get_agent(s, "buyér-\U0001f600"),
                worker=service.get_agent(s, 'wor"ker\\\n'),
                asset="USDC",
                amount=amount,
                fee_bps=fee_bps,
            )

        return work

    for n, job in enumerate(_TRICKY):
        attempt(fund(job, 999_999 + n, 333))
    attempt(fund(_TRICKY[0], 5, 0))  # duplicate job
    attempt(fund("too-much", 10**12, 250))  # insufficient funds
    attempt(lambda s: service.release_escrow(s, _TRICKY[0]))
    attempt(lambda s: service.release_escrow(s, _TRICKY[0]))  # already released
    attempt(lambda s: service.refund_escrow(s, _TRICKY[0]))  # already released
    attempt(lambda s: service.refund_escrow(s, _TRICKY[1]))
    attempt(lambda s: service.resolve_escrow(s, _TRICKY[2], 10**9))  # more than escrowed
    attempt(lambda s: service.resolve_escrow(s, _TRICKY[2], -1))
    attempt(lambda s: service.resolve_escrow(s, _TRICKY[2], 400_001))
    attempt(lambda s: service.resolve_escrow(s, _TRICKY[3], 0))
    attempt(lambda s: service.resolve_escrow(s, _TRICKY[4], 1_000_003))
    attempt(lambda s: service.release_escrow(s, "no-such-job"))
    return outcomes


def _state(sessions: sessionmaker[Session]) -> dict[str, Any]:
    """Everything the scenario wrote, with ids, batch ids and timestamps normalised."""
    with sessions() as s:
        batches: dict[str, str] = {}

        def batch(batch_id: str) -> str:
            return batches.setdefault(batch_id, f"batch-{len(batches)}")

        accounts = {
            a.id: (a.kind, a.owner, a.asset)
            for a in s.scalars(select(LedgerAccount).order_by(LedgerAccount.id))
        }
        agents = {a.id: a.external_id for a in s.scalars(select(Agent))}

        def owner(account_id: int) -> tuple[str, str, str]:
            kind, who, asset = accounts[account_id]
            if kind == "agent_available":
                who = agents[int(who)]
            return kind, who, asset

        def key(value: str) -> str:
            # The fixture's credit keys count up across the whole test session.
            return "test-credit" if value.startswith("test-credit-") else value

        transfers = [
            (
                key(t.idempotency_key),
                owner(t.debit_account_id),
                owner(t.credit_account_id),
                t.asset,
                t.amount,
                t.code,
                t.ref_type,
                t.ref_id,
                batch(t.batch_id),
            )
            for t in s.scalars(select(LedgerTransfer).order_by(LedgerTransfer.id))
        ]
        audit_rows = []
        for row in s.scalars(select(AuditLog).order_by(AuditLog.stream, AuditLog.seq)):
            details = json.loads(row.details)
            if "batch_id" in details:
                details["batch_id"] = batch(details["batch_id"])
                details["debit_account_id"] = owner(details["debit_account_id"])
                details["credit_account_id"] = owner(details["credit_account_id"])
                details["idempotency_key"] = key(details["idempotency_key"])
                details.pop("transfer_id")
            audit_rows.append(
                (row.stream, row.seq, row.actor, row.action, row.asset, row.amount, details)
            )
        events = []
        for event in s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)):
            payload = json.loads(event.payload)
            # Byte-identical to the Python path's canonical form, not only equal as JSON.
            assert event.payload == canonical_json(payload)
            events.append((event.type, event.api_version, payload))
        escrows = [
            (
                e.job_id,
                agents[e.buyer_agent_id],
                agents[e.worker_agent_id],
                e.asset,
                e.amount,
                e.fee_bps,
                e.status,
                e.worker_amount,
                e.fee_amount,
                e.refund_amount,
                e.resolved_at is not None,
            )
            for e in s.scalars(select(Escrow).order_by(Escrow.job_id))
        ]
        balances = {
            owner(a.id): ledger.balance(s, a)
            for a in s.scalars(select(LedgerAccount).order_by(LedgerAccount.id))
        }
        verified = audit.verify(s)
        return {
            "transfers": transfers,
            "audit": audit_rows,
            "events": events,
            "escrows": escrows,
            "balances": balances,
            "audit_ok": verified.ok,
            "violations": ledger.check(s),
        }


@pytest.mark.postgres
def test_function_path_matches_python_path(sqlite_url: str, pg_url: str) -> None:
    runs = {}
    for name, url in (("sqlite", sqlite_url), ("postgres", pg_url)):
        engine = make_engine(url)
        try:
            sessions = make_session_factory(engine)
            outcomes = _scenario(sessions)
            runs[name] = (outcomes, _state(sessions))
        finally:
            engine.dispose()
    (py_outcomes, py_state), (pg_outcomes, pg_state) = runs["sqlite"], runs["postgres"]
    assert pg_outcomes == py_outcomes
    for key in ("transfers", "audit", "events", "escrows", "balances"):
        assert pg_state[key] == py_state[key], key
    assert pg_state["audit_ok"] and py_state["audit_ok"]
    assert pg_state["violations"] == py_state["violations"] == []
    # The scenario reached every outcome: funded, settled three ways, and each refusal.
    refusals = {o[0] for o in py_outcomes if isinstance(o, tuple) and len(o) == 2}
    assert refusals == {"EscrowConflict", "InsufficientFunds", "InvalidAmount", "EscrowNotFound"}
    statuses = {o[1] for o in py_outcomes if isinstance(o, tuple) and len(o) > 2}
    assert statuses == {"funded", "released", "refunded", "resolved"}


@pytest.mark.postgres
def test_function_rows_are_caught_when_edited(pg_url: str) -> None:
    engine = make_engine(pg_url)
    try:
        sessions = make_session_factory(engine)
        _scenario(sessions)
        with sessions() as s, s.begin():
            assert audit.verify(s).ok
            # The trigger refuses edits; an operator with the power to drop it can still
            # change a row, and verify must name it.
            s.execute(text("ALTER TABLE audit_log DISABLE TRIGGER audit_log_append_only"))
            s.execute(
                text(
                    "UPDATE audit_log SET amount = amount + 1 WHERE id = "
                    "(SELECT min(id) FROM audit_log WHERE action = 'escrow_released')"
                )
            )
        with sessions() as s:
            report = audit.verify(s)
            assert not report.ok
            assert any("escrow:" in problem for _, problem in report.problems), report.problems
    finally:
        engine.dispose()
