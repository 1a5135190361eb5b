"""Crash safety: the payout worker runs as a subprocess and dies (os._exit at each step,
and SIGKILL at random moments) while paying 200 payouts on anvil; restarted each time,
every payout is paid exactly once on chain and the books still balance."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine

from escrowd.escrow import service
from escrowd.escrow.payout_worker import CRASH_POINTS
from escrowd.models.db import make_engine
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import EvmPayoutWorld, make_evm_world, random_address

__all__ = ["anvil_chain"]

pytestmark = pytest.mark.anvil

PAYOUTS = 200
KILLED = 137


@pytest.fixture
def world(anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path) -> Iterator[EvmPayoutWorld]:
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def test_killed_worker_pays_each_of_200_payouts_exactly_once(world: EvmPayoutWorld) -> None:
    rng = random.Random(9)
    expected: Counter[tuple[str, int]] = Counter()
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        amounts = [1_000_000 + i for i in range(PAYOUTS)]
        world.credit(s, agent.id, sum(amounts))
        for i, amount in enumerate(amounts):
            destination = random_address()
            world.request(s, agent.id, destination, amount, f"crash-{i}")
            expected[(destination, amount)] += 1

    exits: list[int] = []
    # Each step is hit once per payout that reaches it; crash somewhere in the middle.
    for point in CRASH_POINTS:
        proc = world.run_worker_process("w1", crash_at=point, crash_after=rng.randint(5, 30))
        exits.append(proc.wait(timeout=60))
    for _ in range(2):
        proc = world.run_worker_process("w1")
        time.sleep(rng.uniform(2.5, 4.0))  # interpreter start-up is ~2 s of this
        proc.kill()
        exits.append(proc.wait(timeout=10))
    assert exits.count(KILLED) >= len(CRASH_POINTS), exits

    final = world.run_worker_process("w1")
    _, stderr = final.communicate(timeout=90)
    assert final.returncode == 0, stderr.decode()[-2000:]

    assert world.statuses() == {"confirmed": PAYOUTS}
    # Exactly the requested transfers left the hot wallet: none twice, none missing.
    assert world.transfers_from_hot() == expected
    assert world.ledger_clean()
    assert world.reconcile_differences() == []
