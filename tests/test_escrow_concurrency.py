"""PostgreSQL: racing state changes of one escrow, and many funds from one balance."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from escrowd.escrow import service
from escrowd.escrow.errors import EscrowConflict, InsufficientFunds
from escrowd.escrow.uow import in_transaction
from escrowd.models import Agent
from escrowd.models.db import make_session_factory
from tests.escrow_fixtures import available, ledger_clean, platform_fees, seed_agents

pytestmark = pytest.mark.postgres
THREADS = 16


def _run_threads(jobs: list[Callable[[], str]]) -> list[str]:
    """Run the jobs on THREADS threads released together; each returns an outcome label."""
    outcomes: list[str] = []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)
    per_thread = [jobs[i::THREADS] for i in range(THREADS)]

    def worker(mine: list[Callable[[], str]]) -> None:
        barrier.wait()
        for job in mine:
            result = job()
            with lock:
                outcomes.append(result)

    threads = [threading.Thread(target=worker, args=(mine,)) for mine in per_thread]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    return outcomes


def test_release_refund_resolve_race_has_one_winner_each(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    escrows, amount = 40, 1_000
    ids = seed_agents(sessions, "buyer", "worker", balance=escrows * amount)
    with sessions() as s, s.begin():
        buyer, worker = s.get_one(Agent, ids["buyer"]), s.get_one(Agent, ids["worker"])
        for n in range(escrows):
            service.fund_escrow(
                s,
                job_id=f"job-{n}",
                buyer=buyer,
                worker=worker,
                asset="USDC",
                amount=amount,
                fee_bps=250,
            )
    actions: dict[str, Callable[[Session, str], object]] = {
        "release": service.release_escrow,
        "refund": service.refund_escrow,
        "resolve": lambda s, job: service.resolve_escrow(s, job, amount // 2),
    }

    def attempt(name: str, job: str) -> Callable[[], str]:
        def run() -> str:
            try:
                in_transaction(sessions, lambda s: actions[name](s, job))
            except EscrowConflict as exc:
                assert f"escrow {job} is already" in exc.message
                return f"{job}:conflict"
            return f"{job}:won:{name}"

        return run

    # Every escrow gets 2 attempts of each kind, interleaved across threads.
    jobs = [attempt(name, f"job-{n}") for n in range(escrows) for name in actions for _ in (0, 1)]
    outcomes = _run_threads(jobs)
    winners = Counter(o.split(":won:")[0] for o in outcomes if ":won:" in o)
    assert winners == Counter({f"job-{n}": 1 for n in range(escrows)})
    assert sum(o.endswith(":conflict") for o in outcomes) == escrows * 5

    with sessions() as s:
        settled = {f"job-{n}": service.get_escrow(s, f"job-{n}") for n in range(escrows)}
    by_status = Counter(e.status for e in settled.values())
    released, refunded, resolved = (by_status[k] for k in ("released", "refunded", "resolved"))
    assert released + refunded + resolved == escrows
    # Worker: 975 per release, 500 - 12 = 488 per resolve; buyer: 1000 per refund, 500 per resolve.
    assert available(sessions, ids["worker"]) == escrows * amount + released * 975 + resolved * 488
    assert available(sessions, ids["buyer"]) == refunded * 1_000 + resolved * 500
    assert platform_fees(sessions) == released * 25 + resolved * 12
    assert ledger_clean(sessions)


def test_parallel_funding_never_overdraws_the_buyer(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    start, amount, attempts = 10_000, 700, 64  # room for 14 escrows, 64 tries
    ids = seed_agents(sessions, "buyer", "worker", balance=start)
    worker_balance_before = available(sessions, ids["worker"])

    def attempt(n: int) -> Callable[[], str]:
        def run() -> str:
            def work(s: Session) -> None:
                service.fund_escrow(
                    s,
                    job_id=f"par-{n}",
                    buyer=s.get_one(Agent, ids["buyer"]),
                    worker=s.get_one(Agent, ids["worker"]),
                    asset="USDC",
                    amount=amount,
                    fee_bps=0,
                )

            try:
                in_transaction(sessions, work)
            except InsufficientFunds:
                return "refused"
            return "funded"

        return run

    outcomes = Counter(_run_threads([attempt(n) for n in range(attempts)]))
    assert outcomes["funded"] == start // amount
    assert outcomes["refused"] == attempts - start // amount
    assert available(sessions, ids["buyer"]) == start - outcomes["funded"] * amount
    assert available(sessions, ids["worker"]) == worker_balance_before
    assert ledger_clean(sessions)


def test_concurrent_funds_of_one_job_create_one_escrow(pg_engine: Engine) -> None:
    sessions = make_session_factory(pg_engine)
    ids = seed_agents(sessions, "buyer", "worker", balance=100_000)

    def attempt() -> str:
        def work(s: Session) -> None:
            service.fund_escrow(
                s,
                job_id="same-job",
                buyer=s.get_one(Agent, ids["buyer"]),
                worker=s.get_one(Agent, ids["worker"]),
                asset="USDC",
                amount=1_000,
                fee_bps=250,
            )

        try:
            in_transaction(sessions, work)
        except EscrowConflict as exc:
            assert "escrow same-job already exists (funded)" in exc.message
            return "conflict"
        return "funded"

    outcomes = Counter(_run_threads([attempt for _ in range(THREADS)]))
    assert outcomes == Counter({"funded": 1, "conflict": THREADS - 1})
    assert available(sessions, ids["buyer"]) == 99_000
    assert ledger_clean(sessions)
