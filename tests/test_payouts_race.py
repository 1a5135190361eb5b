"""Two payout workers and API retries racing on the same payouts (threads, PostgreSQL,
anvil): each payout is paid once; a payout in flight never goes back to requested."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select, update

from escrowd.escrow import service
from escrowd.escrow.payout_worker import PassStats, PayoutWorker, _LostClaim
from escrowd.models import Payout, utcnow
from tests.conftest import PG_URL_BASE
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import EvmPayoutWorld, make_evm_world, random_address

__all__ = ["anvil_chain"]

pytestmark = [pytest.mark.anvil, pytest.mark.postgres]
PAYOUTS = 30


@pytest.fixture
def world(
    anvil_chain: EvmChain, pg_engine: Engine, pg_url: str, tmp_path: Path
) -> Iterator[EvmPayoutWorld]:
    assert pg_url.startswith(PG_URL_BASE)
    yield make_evm_world(anvil_chain, pg_url, pg_engine, tmp_path)


def test_two_workers_and_api_retries_pay_each_payout_once(world: EvmPayoutWorld) -> None:
    expected: Counter[tuple[str, int]] = Counter()
    requests: list[tuple[str, int, str]] = []
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        agent_id = agent.id
        world.credit(s, agent_id, PAYOUTS * 2_000_000)
    for i in range(PAYOUTS):
        destination, amount = random_address(), 1_000_000 + i
        requests.append((destination, amount, f"race-{i}"))
        expected[(destination, amount)] += 1
    # Each payout is created before the workers start; the retries hit it mid-flight.
    with world.sessions() as s, s.begin():
        for destination, amount, key in requests:
            world.request(s, agent_id, destination, amount, key)

    workers: list[PayoutWorker] = [world.worker("worker-a"), world.worker("worker-b")]
    errors: list[BaseException] = []
    barrier = threading.Barrier(3)

    def run_worker(worker: PayoutWorker) -> None:
        try:
            barrier.wait()
            worker.run_until_idle(pause_s=0.01)
        except BaseException as exc:
            errors.append(exc)

    def api_retries() -> None:
        try:
            barrier.wait()
            for destination, amount, key in requests:
                with world.sessions() as s, s.begin():
                    world.request(s, agent_id, destination, amount, key)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run_worker, args=(w,)) for w in workers]
    threads.append(threading.Thread(target=api_retries))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert world.statuses() == {"confirmed": PAYOUTS}
    assert world.transfers_from_hot() == expected
    with world.sessions() as s:
        claimants = set(s.scalars(select(Payout.claimed_by)))
    assert claimants <= {"worker-a", "worker-b"}
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


def test_a_worker_that_lost_its_claim_cannot_move_the_payout(world: EvmPayoutWorld) -> None:
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 1_000_000)
        payout_id = world.request(s, agent.id, random_address(), 1_000_000, "lease-1").id
    first, second = world.worker("first"), world.worker("second")
    assert first.claim(payout_id)
    assert not second.claim(payout_id)  # the lease is held
    # The first worker's lease runs out while it is stalled; the second takes over.
    with world.sessions() as s, s.begin():
        s.execute(
            update(Payout)
            .where(Payout.id == payout_id)
            .values(claimed_until=utcnow() - timedelta(seconds=1))
        )
    assert second.claim(payout_id)
    stats = first.run_once()
    assert stats.claimed == 0 and stats.signed == 0
    # Even driven directly, the stale worker's transition matches no row and commits nothing.
    with pytest.raises(_LostClaim):
        first.advance(payout_id, PassStats())
    with world.sessions() as s:
        assert s.get(Payout, payout_id).status == "requested"  # type: ignore[union-attr]
    second.run_until_idle()
    assert world.statuses() == {"confirmed": 1}
    assert world.transfers_from_hot().total() == 1
