"""Operations that are a transaction of their own: ledger.post_alone, models.db.statement_rows
and the one-call escrow path of EscrowService on PostgreSQL (service.fund_escrow_alone,
service.settle_escrow_alone), checked for what a caller sees on real databases."""

from __future__ import annotations

import itertools
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DataError, DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.errors import ValidationFailed
from escrowd.escrow import accounts, audit, ledger, service
from escrowd.escrow.errors import (
    AgentNotFound,
    EscrowConflict,
    EscrowNotFound,
    IdempotencyConflict,
    InsufficientFunds,
    InvalidAmount,
    UnknownAccount,
    UnknownAsset,
)
from escrowd.escrow.interface import EscrowService, escrow_value
from escrowd.escrow.values import Escrow as EscrowValue
from escrowd.models import (
    AccountKind,
    AuditLog,
    Escrow,
    EscrowStatus,
    LedgerAccount,
    LedgerTransfer,
    TransferCode,
)
from escrowd.models import db as models_db
from escrowd.models.db import make_session_factory, statement_rows
from tests.escrow_fixtures import PLATFORM, credit, make_settings, platform_fees, seed_asset
from tests.ledger_helpers import fund
from tests.log_capture import captured_logs

_keys = itertools.count(1)


def _key(prefix: str) -> str:
    return f"one-call-{prefix}-{next(_keys)}"


def _leg(
    debit: int,
    credit_to: int,
    amount: int,
    *,
    key: str | None = None,
    code: TransferCode = TransferCode.ADJUSTMENT,
    ref_id: str = "job-1",
) -> ledger.TransferSpec:
    return ledger.TransferSpec(
        idempotency_key=key or _key("leg"),
        debit_account_id=debit,
        credit_account_id=credit_to,
        amount=amount,
        code=code,
        ref_type="one_call",
        ref_id=ref_id,
    )


def _counts(sessions: sessionmaker[Session]) -> tuple[int, int]:
    with sessions() as s:
        transfers = s.scalar(select(func.count()).select_from(LedgerTransfer)) or 0
        audits = s.scalar(select(func.count()).select_from(AuditLog)) or 0
    return transfers, audits


def _balances(sessions: sessionmaker[Session], *account_ids: int) -> list[int]:
    with sessions() as s:
        return [ledger.balance(s, s.get_one(LedgerAccount, i)) for i in account_ids]


def _clean(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        assert ledger.check(s) == []
        report = audit.verify(s)
        assert report.ok, report.first_problem


# --- 1. post_alone on SQLite and PostgreSQL -------------------------------------------------


def _world(sessions: sessionmaker[Session]) -> tuple[int, int, int, int]:
    """custody, alice (funded with 1000), bob, platform fees: ids."""
    with sessions() as s, s.begin():
        world = accounts.custody(s, "testchain", "USDC")
        alice = ledger.get_or_create_account(s, AccountKind.AGENT_AVAILABLE, "alice", "USDC")
        bob = ledger.get_or_create_account(s, AccountKind.AGENT_AVAILABLE, "bob", "USDC")
        fees = accounts.platform_fees(s, "USDC")
        fund(s, alice, 1_000, world=world)
        return world.id, alice.id, bob.id, fees.id


def test_post_alone_two_legs_commit_with_audit(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    world, alice, bob, fees = _world(sessions)
    before = _counts(sessions)
    legs = [
        _leg(alice, bob, 300, code=TransferCode.ESCROW_RELEASE),
        _leg(alice, fees, 10, code=TransferCode.FEE),
    ]
    posted = ledger.post_alone(engine, legs, actor="tester")

    assert [p.idempotency_key for p in posted] == [leg.idempotency_key for leg in legs]
    assert [p.amount for p in posted] == [300, 10]
    assert {p.asset for p in posted} == {"USDC"}
    assert len({p.batch_id for p in posted}) == 1
    assert _counts(sessions) == (before[0] + 2, before[1] + 2)
    assert _balances(sessions, alice, bob, fees, world) == [690, 300, 10, -1_000]
    with sessions() as s:
        rows = s.scalars(
            select(LedgerTransfer)
            .where(LedgerTransfer.id.in_([p.id for p in posted]))
            .order_by(LedgerTransfer.id)
        ).all()
        assert [(r.debit_account_id, r.credit_account_id, r.amount) for r in rows] == [
            (alice, bob, 300),
            (alice, fees, 10),
        ]
        trail = s.scalars(
            select(AuditLog).where(AuditLog.stream == "one_call:job-1").order_by(AuditLog.seq)
        ).all()
        assert [(a.actor, a.action, a.amount) for a in trail] == [
            ("tester", "ledger_escrow_release", 300),
            ("tester", "ledger_fee", 10),
        ]
        assert [f'"transfer_id":{p.id}}}' in a.details for a, p in zip(trail, posted)] == [
            True,
            True,
        ]
    _clean(sessions)


def test_post_alone_audit_stream_is_used(engine: Engine, sessions: sessionmaker[Session]) -> None:
    _, alice, bob, _ = _world(sessions)
    ledger.post_alone(engine, [_leg(alice, bob, 5)], actor="tester", audit_stream="mine")
    ledger.post_alone(engine, [_leg(alice, bob, 6)], actor="tester", audit_stream="mine")
    with sessions() as s:
        seqs = s.scalars(select(AuditLog.seq).where(AuditLog.stream == "mine")).all()
    assert sorted(seqs) == [1, 2]
    _clean(sessions)


def test_post_alone_repeat_returns_originals(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _, alice, bob, fees = _world(sessions)
    legs = [_leg(alice, bob, 300), _leg(alice, fees, 10)]
    first = ledger.post_alone(engine, legs, actor="tester")
    after_first = _counts(sessions), _balances(sessions, alice, bob, fees)

    again = ledger.post_alone(engine, legs, actor="tester")

    assert [p.id for p in again] == [p.id for p in first]
    assert [p.batch_id for p in again] == [p.batch_id for p in first]
    assert (_counts(sessions), _balances(sessions, alice, bob, fees)) == after_first
    _clean(sessions)


def test_post_alone_same_keys_other_amount_conflict(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _, alice, bob, fees = _world(sessions)
    legs = [_leg(alice, bob, 300), _leg(alice, fees, 10)]
    ledger.post_alone(engine, legs, actor="tester")
    after_first = _counts(sessions), _balances(sessions, alice, bob, fees)
    changed = [legs[0], _leg(alice, fees, 11, key=legs[1].idempotency_key)]

    with pytest.raises(IdempotencyConflict):
        ledger.post_alone(engine, changed, actor="tester")

    assert (_counts(sessions), _balances(sessions, alice, bob, fees)) == after_first
    _clean(sessions)


def test_post_alone_overdraft_writes_nothing(
    engine: Engine, sessions: sessionmaker[Session]
) -> None:
    _, alice, bob, fees = _world(sessions)
    before = _counts(sessions), _balances(sessions, alice, bob, fees)
    # The first leg alone is covered; together they overdraw alice: neither may land.
    legs = [_leg(alice, bob, 900), _leg(alice, fees, 101)]

    with pytest.raises(InsufficientFunds):
        ledger.post_alone(engine, legs, actor="tester")

    assert (_counts(sessions), _balances(sessions, alice, bob, fees)) == before
    # The keys were not used up: the same keys with a covered amount post.
    covered = [legs[0], _leg(alice, fees, 100, key=legs[1].idempotency_key)]
    assert len(ledger.post_alone(engine, covered, actor="tester")) == 2
    assert _balances(sessions, alice) == [0]
    _clean(sessions)


def test_post_alone_unknown_account(engine: Engine, sessions: sessionmaker[Session]) -> None:
    _, alice, _, _ = _world(sessions)
    before = _counts(sessions)
    with pytest.raises(UnknownAccount):
        ledger.post_alone(engine, [_leg(alice, 987_654, 1)], actor="tester")
    assert _counts(sessions) == before
    _clean(sessions)


# --- 2. statement_rows and its connections (PostgreSQL) ------------------------------------


def _backend_pid(engine: Engine) -> int:
    """The backend of the connection statement_rows uses next (the one used last)."""
    [(pid,)] = statement_rows(engine, "SELECT pg_backend_pid()", ())
    assert isinstance(pid, int)
    return pid


def _session_pid(engine: Engine) -> int:
    with make_session_factory(engine)() as s:
        pid = s.connection().exec_driver_sql("SELECT pg_backend_pid()").scalar()
    assert isinstance(pid, int)
    return pid


def _assert_transactional(engine: Engine) -> None:
    """Sessions are transactional: a write rolled back is gone (in autocommit it would have
    stayed)."""
    sessions = make_session_factory(engine)
    owner = _key("rolled-back")
    with sessions() as s:
        ledger.get_or_create_account(s, AccountKind.GENERAL, owner, "USDC")
        s.rollback()
    with sessions() as s:
        assert ledger.find_account(s, AccountKind.GENERAL, owner, "USDC") is None


def _wait_gone(dsn: str, pid: int) -> None:
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(200):
            gone = other.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if gone.fetchone() == (0,):
                return
            time.sleep(0.005)
    raise AssertionError(f"backend {pid} still there")


def _pg_world(engine: Engine) -> tuple[sessionmaker[Session], int, int]:
    sessions = make_session_factory(engine)
    _, alice, bob, _ = _world(sessions)
    return sessions, alice, bob


@pytest.mark.postgres
def test_sessions_never_get_a_statement_connection(pg_engine: Engine) -> None:
    # Statement connections stay in autocommit, outside the engine's pool: after successes,
    # refusals and errors, sessions still run on other, transactional connections.
    sessions, alice, bob = _pg_world(pg_engine)

    ledger.post_alone(pg_engine, [_leg(alice, bob, 10)], actor="tester")
    with pytest.raises(InsufficientFunds):
        ledger.post_alone(pg_engine, [_leg(alice, bob, 10_000)], actor="tester")
    with pytest.raises(UnknownAccount):
        ledger.post_alone(pg_engine, [_leg(alice, 987_654, 1)], actor="tester")
    with pytest.raises(DataError):
        statement_rows(pg_engine, "SELECT 1/0", ())

    statement_pid = _backend_pid(pg_engine)
    assert _session_pid(pg_engine) != statement_pid
    _assert_transactional(pg_engine)
    # One statement connection served all of these calls, one at a time.
    assert _backend_pid(pg_engine) == statement_pid
    assert _balances(sessions, alice, bob) == [990, 10]


@pytest.mark.postgres
def test_statement_rows_values_keep_their_types_both_ways(pg_engine: Engine) -> None:
    when = datetime(2026, 11, 24, 3, 30, 0, 123456, tzinfo=UTC)
    row = statement_rows(
        pg_engine,
        "SELECT %s::text IS NULL, %s::bigint + 1, %s::timestamptz, %s::text[], %s::text, %s::jsonb",
        (None, 2**62, when, ["funded", 'a "b", c', None], "é'\\ü", '{"k": [1, "x"]}'),
    )
    assert row == [(True, 2**62 + 1, when, ["funded", 'a "b", c', None], "é'\\ü", {"k": [1, "x"]})]
    assert row[0][2].utcoffset() == timedelta(0)


@pytest.mark.postgres
def test_statement_rows_refuses_a_percent_sign_it_would_misread(pg_engine: Engine) -> None:
    with pytest.raises(ValueError, match="placeholders"):
        statement_rows(pg_engine, "SELECT 'a%' || %s::text", ("b",))
    assert statement_rows(pg_engine, "SELECT 'a' || %s::text", ("b",)) == [("ab",)]


@pytest.mark.postgres
def test_statement_rows_error_then_next_statement_works(pg_engine: Engine) -> None:
    with pytest.raises(DBAPIError) as caught:
        statement_rows(pg_engine, "SELECT 1/0", ())
    assert isinstance(caught.value, DataError)
    assert isinstance(caught.value.orig, psycopg.errors.DivisionByZero)
    assert statement_rows(pg_engine, "SELECT %s::int + 1", (41,)) == [(42,)]
    # A failed statement leaves no aborted transaction behind on its connection.
    with pytest.raises(DBAPIError):
        statement_rows(pg_engine, "SELECT * FROM no_such_table", ())
    assert statement_rows(pg_engine, "SELECT %s::text", ("ok",)) == [("ok",)]


@pytest.mark.postgres
def test_post_alone_committed_when_it_returns(pg_engine: Engine, pg_url: str) -> None:
    _, alice, bob = _pg_world(pg_engine)
    pid = _backend_pid(pg_engine)
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn, autocommit=True) as other:
        [posted] = ledger.post_alone(pg_engine, [_leg(alice, bob, 25)], actor="tester")
        row = other.execute(
            "SELECT amount FROM ledger_transfers WHERE id = %s", (posted.id,)
        ).fetchone()
        assert row == (25,)
        balance = other.execute(
            "SELECT credits_posted - debits_posted FROM ledger_accounts WHERE id = %s", (bob,)
        ).fetchone()
        assert balance == (25,)
        # Idle again, the connection holds no open transaction (and no locks).
        state = other.execute(
            "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
        assert state == ("idle",)


@pytest.mark.postgres
def test_statement_rows_drops_a_connection_the_server_closed(
    pg_engine: Engine, pg_url: str
) -> None:
    _, alice, bob = _pg_world(pg_engine)
    pid = _backend_pid(pg_engine)
    _wait_gone(pg_url.replace("postgresql+psycopg://", "postgresql://"), pid)
    # Within a second of its last use the connection is not pinged: the call fails...
    with pytest.raises(DBAPIError):
        ledger.post_alone(pg_engine, [_leg(alice, bob, 7)], actor="tester")
    # ...and the broken connection is not handed out again.
    assert _backend_pid(pg_engine) != pid
    [posted] = ledger.post_alone(pg_engine, [_leg(alice, bob, 7)], actor="tester")
    assert posted.amount == 7
    _assert_transactional(pg_engine)


@pytest.mark.postgres
def test_statement_rows_pings_an_idle_connection(
    pg_engine: Engine, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice, bob = _pg_world(pg_engine)
    pid = _backend_pid(pg_engine)
    _wait_gone(pg_url.replace("postgresql+psycopg://", "postgresql://"), pid)
    # Idle for longer than the ping threshold: the dead connection is found before use.
    monkeypatch.setattr(models_db, "PING_AFTER_IDLE_S", 0.0)

    [posted] = ledger.post_alone(pg_engine, [_leg(alice, bob, 3)], actor="tester")

    assert posted.amount == 3
    assert _backend_pid(pg_engine) != pid


@pytest.mark.postgres
def test_dispose_closes_statement_connections(pg_engine: Engine, pg_url: str) -> None:
    pid = _backend_pid(pg_engine)
    dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")

    pg_engine.dispose()

    with psycopg.connect(dsn, autocommit=True) as other:
        for _ in range(200):
            left = other.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,))
            if left.fetchone() == (0,):
                break
            time.sleep(0.005)
        else:
            raise AssertionError("the statement connection outlived Engine.dispose()")
    # The engine stays usable, with new connections.
    assert _backend_pid(pg_engine) != pid


@pytest.mark.postgres
def test_statement_connections_are_reused_across_threads(pg_engine: Engine) -> None:
    threads, calls = 8, 25
    pids: list[set[int]] = [set() for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def caller(slot: int) -> None:
        start.wait()
        try:
            for n in range(calls):
                [(pid, value)] = statement_rows(
                    pg_engine, "SELECT pg_backend_pid(), %s::int * 2", (n,)
                )
                assert value == 2 * n
                pids[slot].add(pid)
        except BaseException as exc:
            errors.append(exc)

    workers = [threading.Thread(target=caller, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert not errors, errors[:3]
    # No more connections than callers at once, each used for many calls.
    assert len(set().union(*pids)) <= threads


# --- 3. Concurrent post_alone on PostgreSQL ------------------------------------------------

THREADS = 8
CALLS_PER_THREAD = 40
LEGS = 2
START = 1_000_000


@pytest.mark.postgres
def test_concurrent_post_alone_new_shared_streams(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions() as s, s.begin():
        world = accounts.custody(s, "testchain", "USDC")
        # Each thread spends from its own no-overdraft account into its neighbour's and into
        # the platform fees (a hot account, never locked): most concurrent calls share no
        # account row, so they meet on their shared new audit stream instead.
        funded = [
            ledger.get_or_create_account(s, AccountKind.AGENT_AVAILABLE, f"c-{i}", "USDC")
            for i in range(THREADS)
        ]
        for account in funded:
            fund(s, account, START, world=world)
        fees_id = accounts.platform_fees(s, "USDC").id
    ids = [a.id for a in funded]
    before_transfers, _ = _counts(sessions)
    barrier = threading.Barrier(THREADS)
    errors: list[BaseException] = []
    nets: Counter[int] = Counter()
    lock = threading.Lock()

    def writer(thread_no: int) -> None:
        try:
            for n in range(CALLS_PER_THREAD):
                src = ids[thread_no]
                amount = 1 + (thread_no * CALLS_PER_THREAD + n) % 97
                legs = [
                    _leg(src, ids[(thread_no + 1) % THREADS], amount, key=f"cc-{thread_no}-{n}-a"),
                    _leg(src, fees_id, 1, key=f"cc-{thread_no}-{n}-b"),
                ]
                # Every thread creates the same new stream in this round at the same moment.
                barrier.wait(timeout=30)
                posted = ledger.post_alone(
                    pg_engine, legs, actor="tester", audit_stream=f"round-{n}"
                )
                assert len(posted) == LEGS
                with lock:
                    for leg in legs:
                        nets[leg.debit_account_id] -= leg.amount
                        nets[leg.credit_account_id] += leg.amount
        except BaseException as exc:
            errors.append(exc)
            barrier.abort()

    with captured_logs() as logs:
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors[:3]

    transfers, _ = _counts(sessions)
    assert transfers - before_transfers == THREADS * CALLS_PER_THREAD * LEGS
    assert _balances(sessions, *ids, fees_id) == [START + nets[i] for i in ids] + [nets[fees_id]]
    with sessions() as s:
        per_round = dict(
            s.execute(
                select(AuditLog.stream, func.count())
                .where(AuditLog.stream.like("round-%"))
                .group_by(AuditLog.stream)
            ).all()
        )
    assert per_round == {f"round-{n}": THREADS * LEGS for n in range(CALLS_PER_THREAD)}
    _clean(sessions)
    # The scenario did exercise the retry: concurrent creations of one stream's head.
    assert any(entry["event"] == "transaction_retry" for entry in logs)


# --- 4. EscrowService on PostgreSQL: the one-call path -----------------------------------


def _service(pg_engine: Engine, tmp_path: Path) -> tuple[EscrowService, sessionmaker[Session]]:
    svc = EscrowService(pg_engine, make_settings(tmp_path), platform=PLATFORM)
    svc.register_agent("buyer")
    svc.register_agent("worker")
    sessions = make_session_factory(pg_engine)
    with sessions() as s, s.begin():
        seed_asset(s)
        credit(s, service.get_agent(s, "buyer").id, 1_000_000)
    return svc, sessions


def _available(svc: EscrowService, agent: str) -> tuple[int, int]:
    found = {b.asset: b for b in svc.balances(agent)}
    b = found.get("USDC")
    return (0, 0) if b is None else (b.available_base_units, b.escrowed_as_buyer_base_units)


def _state(svc: EscrowService, sessions: sessionmaker[Session]) -> tuple[object, ...]:
    with sessions() as s:
        escrows = s.execute(
            select(Escrow.job_id, Escrow.status, Escrow.amount).order_by(Escrow.id)
        ).all()
    return (
        _available(svc, "buyer"),
        _available(svc, "worker"),
        platform_fees(sessions),
        escrows,
        _counts(sessions),
    )


def _assert_usable(escrow: EscrowValue, sessions: sessionmaker[Session]) -> None:
    """The returned value equals the stored row, its times timezone-aware UTC."""
    with sessions() as s:
        stored = service.get_escrow(s, escrow.job_id)
        assert escrow == escrow_value(stored, "buyer", "worker")
    for stamp in (escrow.created_at, escrow.resolved_at, escrow.expires_at):
        assert stamp is None or stamp.utcoffset() == timedelta(0)


@pytest.mark.postgres
def test_service_fund_then_resolve(pg_engine: Engine, tmp_path: Path) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    expires = datetime(2100, 1, 2, 3, 4, 5, 123456, tzinfo=UTC)

    funded = svc.fund_escrow(
        job_id="job-r",
        buyer="buyer",
        worker="worker",
        asset="USDC",
        amount=400_000,
        expires_at=expires,
    )

    assert funded.status == EscrowStatus.FUNDED
    assert (funded.amount_base_units, funded.fee_bps, funded.asset) == (400_000, 250, "USDC")
    assert funded.expires_at == expires
    assert funded.created_at.tzinfo is not None
    assert abs(datetime.now(UTC) - funded.created_at) < timedelta(minutes=5)
    assert funded.worker_amount_base_units is None and funded.resolved_at is None
    _assert_usable(funded, sessions)
    assert _available(svc, "buyer") == (600_000, 400_000)

    resolved = svc.resolve_escrow("job-r", 100_000)

    assert resolved.status == EscrowStatus.RESOLVED
    # The worker's share minus the fee on that share; the rest back to the buyer, no fee.
    assert (
        resolved.worker_amount_base_units,
        resolved.fee_amount_base_units,
        resolved.refund_amount_base_units,
    ) == (
        97_500,
        2_500,
        300_000,
    )
    assert resolved.resolved_at is not None and resolved.resolved_at.tzinfo is not None
    assert resolved.resolved_at >= resolved.created_at
    _assert_usable(resolved, sessions)
    assert _available(svc, "buyer") == (900_000, 0)
    assert _available(svc, "worker") == (97_500, 0)
    assert platform_fees(sessions) == 2_500
    with pytest.raises(EscrowConflict):
        svc.release_escrow("job-r")
    _clean(sessions)


@pytest.mark.postgres
def test_service_fund_then_refund_twice(pg_engine: Engine, tmp_path: Path) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    svc.fund_escrow(job_id="job-f", buyer="buyer", worker="worker", asset="USDC", amount=250_000)
    assert _available(svc, "buyer") == (750_000, 250_000)

    refunded = svc.refund_escrow("job-f")

    assert refunded.status == EscrowStatus.REFUNDED
    assert (
        refunded.worker_amount_base_units,
        refunded.fee_amount_base_units,
        refunded.refund_amount_base_units,
    ) == (
        0,
        0,
        250_000,
    )
    _assert_usable(refunded, sessions)
    assert _available(svc, "buyer") == (1_000_000, 0)
    assert _available(svc, "worker") == (0, 0)
    settled = _state(svc, sessions)

    with pytest.raises(EscrowConflict):
        svc.refund_escrow("job-f")
    assert _state(svc, sessions) == settled
    _clean(sessions)


@pytest.mark.postgres
def test_service_fund_then_release_and_second_fund_of_job(
    pg_engine: Engine, tmp_path: Path
) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    svc.fund_escrow(job_id="job-x", buyer="buyer", worker="worker", asset="USDC", amount=400_000)
    with pytest.raises(EscrowConflict):
        svc.fund_escrow(job_id="job-x", buyer="buyer", worker="worker", asset="USDC", amount=1)
    released = svc.release_escrow("job-x")
    assert (released.status, released.worker_amount_base_units, released.fee_amount_base_units) == (
        EscrowStatus.RELEASED,
        390_000,
        10_000,
    )
    assert _available(svc, "worker") == (390_000, 0)
    assert _available(svc, "buyer") == (600_000, 0)
    _clean(sessions)


@pytest.mark.postgres
def test_service_release_unknown_job(pg_engine: Engine, tmp_path: Path) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    before = _state(svc, sessions)
    with pytest.raises(EscrowNotFound):
        svc.release_escrow("no-such-job")
    with pytest.raises(EscrowNotFound):
        svc.refund_escrow("no-such-job")
    with pytest.raises(EscrowNotFound):
        svc.resolve_escrow("no-such-job", 1)
    assert _state(svc, sessions) == before


@pytest.mark.postgres
def test_service_fund_refusals_change_nothing(pg_engine: Engine, tmp_path: Path) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    before = _state(svc, sessions)

    with pytest.raises(InsufficientFunds):
        svc.fund_escrow(
            job_id="job-big", buyer="buyer", worker="worker", asset="USDC", amount=1_000_001
        )
    assert _state(svc, sessions) == before

    with pytest.raises(UnknownAsset):
        svc.fund_escrow(
            job_id="job-asset", buyer="buyer", worker="worker", asset="NOPE1CALL", amount=1
        )
    assert _state(svc, sessions) == before

    with pytest.raises(AgentNotFound):
        svc.fund_escrow(job_id="job-who", buyer="nobody", worker="worker", asset="USDC", amount=1)
    with pytest.raises(AgentNotFound):
        svc.fund_escrow(job_id="job-who", buyer="buyer", worker="nobody", asset="USDC", amount=1)
    with pytest.raises(ValidationFailed):
        svc.fund_escrow(job_id="job-who", buyer="buyer", worker="buyer", asset="USDC", amount=1)
    assert _state(svc, sessions) == before

    # The refused job ids are still free: the full balance can fund one of them.
    funded = svc.fund_escrow(
        job_id="job-big", buyer="buyer", worker="worker", asset="USDC", amount=1_000_000
    )
    assert funded.status == EscrowStatus.FUNDED
    assert _available(svc, "buyer") == (0, 1_000_000)
    _clean(sessions)


@pytest.mark.postgres
def test_service_resolve_share_out_of_range(pg_engine: Engine, tmp_path: Path) -> None:
    svc, sessions = _service(pg_engine, tmp_path)
    svc.fund_escrow(job_id="job-s", buyer="buyer", worker="worker", asset="USDC", amount=400_000)
    before = _state(svc, sessions)

    with pytest.raises(InvalidAmount):
        svc.resolve_escrow("job-s", 400_001)
    with pytest.raises(InvalidAmount):
        svc.resolve_escrow("job-s", -1)
    assert _state(svc, sessions) == before

    # Still funded and settleable: the whole amount to the worker is in range.
    resolved = svc.resolve_escrow("job-s", 400_000)
    assert (
        resolved.worker_amount_base_units,
        resolved.fee_amount_base_units,
        resolved.refund_amount_base_units,
    ) == (
        390_000,
        10_000,
        0,
    )
    _clean(sessions)
