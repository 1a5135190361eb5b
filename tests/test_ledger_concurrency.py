"""16 writers posting random transfers on PostgreSQL at once."""

from __future__ import annotations

import random
import threading
import time

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from escrowd.escrow import audit, ledger
from escrowd.escrow.errors import InsufficientFunds
from escrowd.escrow.uow import in_transaction
from escrowd.models.db import make_session_factory
from tests.ledger_helpers import fund, make_accounts, spec

THREADS = 16
TRANSFERS_PER_THREAD = 500
ACCOUNTS = 50
START_BALANCE = 1_000


@pytest.mark.postgres
def test_concurrent_random_transfers(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions() as session:
        world, accounts = make_accounts(session, ACCOUNTS)
        for account in accounts:
            fund(session, account, START_BALANCE, world=world)
        session.commit()
    account_ids = [a.id for a in accounts]
    by_id = {a.id: a for a in accounts}
    outcomes = {"posted": 0, "refused": 0}
    lock = threading.Lock()
    windows: list[tuple[float, float]] = []
    errors: list[BaseException] = []
    stop_checkpoints = threading.Event()

    def writer(thread_no: int) -> None:
        rng = random.Random(thread_no)
        started = time.monotonic()
        try:
            for n in range(TRANSFERS_PER_THREAD):
                src, dst = rng.sample(account_ids, 2)
                amount = rng.randint(1, 400)
                transfer = spec(by_id[src], by_id[dst], amount, key=f"c-{thread_no}-{n}")

                def work(session: Session, transfer: ledger.TransferSpec = transfer) -> bool:
                    try:
                        ledger.post(
                            session, [transfer], actor="test", audit_stream=f"writer:{thread_no}"
                        )
                    except InsufficientFunds:
                        return False
                    return True

                posted = in_transaction(sessions, work)
                with lock:
                    outcomes["posted" if posted else "refused"] += 1
        except BaseException as exc:
            errors.append(exc)
        with lock:
            windows.append((started, time.monotonic()))

    def checkpointer() -> None:
        while not stop_checkpoints.wait(0.2):
            in_transaction(sessions, lambda s: audit.write_checkpoint(s, actor="test"))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(THREADS)]
    cp = threading.Thread(target=checkpointer)
    cp.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    stop_checkpoints.set()
    cp.join(timeout=30)
    assert not errors, errors[:3]
    assert outcomes["posted"] + outcomes["refused"] == THREADS * TRANSFERS_PER_THREAD
    assert outcomes["posted"] > THREADS * TRANSFERS_PER_THREAD // 2
    # All writers were running at the same time: none waited for another to finish.
    assert max(start for start, _ in windows) < min(end for _, end in windows)

    with sessions() as session:
        assert ledger.check(session) == []
        balances = [ledger.balance(session, a) for a in accounts]
        assert min(balances) >= 0
        assert sum(balances) == ACCOUNTS * START_BALANCE
        report = audit.verify(session)
        assert report.ok, report.problems[:5]
        # One audit row per transfer posted, plus funding and checkpoints.
        assert report.rows_checked >= outcomes["posted"] + ACCOUNTS
