"""The hot wallet's float and the workers' leases on anvil: a withdrawal the hot wallet
cannot cover (tokens or gas) waits in waiting_funds without sending anything and is paid
once the float is topped up; a worker killed with SIGKILL holds up only the payout it was
on (its heartbeat kept the lease while it lived), later nonces of the wallet are mined at
once and its own payout is taken over within its lease; a step slower than the lease
keeps it through the heartbeat."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
from sqlalchemy import Engine, select
from web3.types import Wei

from escrowd.devnet.evm import _rpc
from escrowd.escrow import service
from escrowd.escrow.payout_worker import EvmPayoutChain, PayoutWorker, WorkerOptions
from escrowd.escrow.sweeps import build_evm_sweeper
from escrowd.indexer.evm_sender import EvmSender
from escrowd.models import DepositAddress, Payout, WebhookEvent, utcnow
from escrowd.models.db import make_engine
from tests.escrow_fixtures import audit_actions
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import (
    CHAIN,
    EvmPayoutWorld,
    make_evm_world,
    random_address,
    record_deposit,
)

__all__ = ["anvil_chain"]

pytestmark = pytest.mark.anvil

USDC = 10**6


@pytest.fixture
def world(anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path) -> Iterator[EvmPayoutWorld]:
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def _payout(world: EvmPayoutWorld, payout_id: int) -> Payout:
    with world.sessions() as s:
        return s.get_one(Payout, payout_id)


def _event_types(world: EvmPayoutWorld, payout_id: int) -> list[str]:
    with world.sessions() as s:
        rows = s.scalars(select(WebhookEvent).order_by(WebhookEvent.id)).all()
    return [r.type for r in rows if json.loads(r.payload)["data"].get("payout_id") == payout_id]


def test_a_withdrawal_above_the_float_waits_and_is_paid_after_a_top_up(
    world: EvmPayoutWorld,
) -> None:
    chain, hot = world.chain, world.hot
    destination = random_address()
    deposit_address = world.keystore.derive_evm(0).address
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        agent_id = agent.id
        world.credit(s, agent_id, 2 * USDC)  # the hot wallet's float
        # 8 USDC more arrived at the agent's deposit address and are not swept yet.
        s.add(
            DepositAddress(
                agent_id=agent_id, chain="evm", address=deposit_address, derivation_index=0
            )
        )
        s.flush()
        chain.token.mint(deposit_address, 8 * USDC)
        record_deposit(s, chain=CHAIN, asset="USDC", address=deposit_address, amount=8 * USDC)
        payout_id = world.request(s, agent_id, destination, 5 * USDC, "float-1").id
    nonce_before = chain.source.nonce(hot, pending=True)
    wei_before = chain.source.native_balance_wei(hot)

    worker = world.worker()
    for _ in range(3):
        worker.run_once()
    payout = _payout(world, payout_id)
    assert payout.status == "waiting_funds"
    assert payout.status_reason is not None
    assert f"holds {2 * USDC} USDC token base units" in payout.status_reason
    assert f"needs {5 * USDC} token base units" in payout.status_reason
    # Nothing signed, sent or burnt while it waits; announced once.
    assert chain.source.nonce(hot, pending=True) == nonce_before
    assert chain.source.native_balance_wei(hot) == wei_before
    assert _event_types(world, payout_id) == ["payout.requested", "payout.waiting_funds"]
    assert world.reconcile_differences() == []

    # The sweep tops the float up with the deposit address's credited 8 USDC.
    chain.w3.eth.send_transaction(
        {
            "from": chain.accounts[0],
            "to": world.keystore.evm_gas_wallet.address,
            "value": Wei(10**18),
        }
    )
    build_evm_sweeper(world.sessions, world.settings, CHAIN, world.keystore).run_until_idle()
    assert chain.token.balance_of(hot) == 10 * USDC
    worker.run_until_idle()
    assert _payout(world, payout_id).status == "confirmed"
    assert chain.token.balance_of(destination) == 5 * USDC
    assert audit_actions(world.sessions, f"payout:{payout_id}")[2:5] == [
        "payout_waiting_funds",
        "payout_funds_available",
        "payout_signed",
    ]

    # Gas: a hot wallet without ETH for the fee waits too, and goes on once it has some.
    gas_destination = random_address()
    _rpc(chain.w3, "anvil_setBalance", [hot, hex(10**9)])
    with world.sessions() as s, s.begin():
        gas_id = world.request(s, agent_id, gas_destination, USDC, "float-2").id
    worker.run_once()
    waiting = _payout(world, gas_id)
    assert waiting.status == "waiting_funds"
    reason = waiting.status_reason or ""
    assert f"holds {5 * USDC} USDC token base units and {10**9} wei" in reason
    _rpc(chain.w3, "anvil_setBalance", [hot, hex(10**19)])
    worker.run_until_idle()
    assert _payout(world, gas_id).status == "confirmed"
    assert world.transfers_from_hot() == {(destination, 5 * USDC): 1, (gas_destination, USDC): 1}
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


def test_a_killed_worker_holds_up_only_its_own_payout_and_only_for_its_lease(
    world: EvmPayoutWorld,
) -> None:
    lease_s = 5.0
    settings = world.settings.model_copy(
        update={"payouts": world.settings.payouts.model_copy(update={"lease_s": lease_s})}
    )
    world.config_path.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
    expected = {}
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 100 * USDC)
        ids = []
        for i in range(10):
            destination = random_address()
            ids.append(world.request(s, agent.id, destination, USDC + i, f"lease-{i}").id)
            expected[(destination, USDC + i)] = 1
    # The worker stops with the 4th payout signed and stored, not yet sent.
    dead = world.run_worker_process("dead", crash_at="after_store", crash_after=4, hang=True)
    deadline = time.monotonic() + 60
    while (_payout(world, ids[3]).status, _payout(world, ids[3]).claimed_by) != ("signed", "dead"):
        assert time.monotonic() < deadline and dead.poll() is None
        time.sleep(0.05)
    # Alive, however long the step takes, its heartbeat keeps the lease...
    first_lease = _payout(world, ids[3]).claimed_until
    assert first_lease is not None
    while (_payout(world, ids[3]).claimed_until or first_lease) <= first_lease:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    # ...until it is killed (SIGKILL: no clean-up, the lease is left to lapse).
    dead.kill()
    assert dead.wait(timeout=10) == -signal.SIGKILL
    killed_at = time.monotonic()
    held = _payout(world, ids[3])
    assert (held.status, held.claimed_by) == ("signed", "dead")
    assert held.claimed_until is not None and held.claimed_until > utcnow()

    worker = world.worker("successor", lease_s=lease_s)
    later = ids[4:]
    while any(_payout(world, i).status != "confirmed" for i in later):
        assert time.monotonic() - killed_at < 30
        worker.run_once()
    # The later nonces were mined while the dead worker's lease still held its payout:
    # its stored bytes were sent again, never a new signature.
    assert utcnow() < held.claimed_until, "later payouts waited for the dead worker's lease"
    assert world.chain.source.nonce(world.hot, pending=False) == len(ids)
    while _payout(world, ids[3]).status != "confirmed":
        assert time.monotonic() - killed_at < lease_s + 5, "the lease was not taken over"
        worker.run_once()
        time.sleep(0.1)
    assert world.transfers_from_hot() == expected
    with world.sessions() as s:
        signed = s.scalars(select(Payout.attempts).where(Payout.id == ids[3])).one()
    assert signed == 1
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


class SlowBroadcast(EvmSender):
    """A node that takes longer than a lease to accept a transaction."""

    delay_s = 1.5

    def broadcast(self, raw_tx: bytes) -> str:
        time.sleep(self.delay_s)
        return super().broadcast(raw_tx)


def test_a_step_slower_than_the_lease_keeps_it_through_the_heartbeat(
    world: EvmPayoutWorld,
) -> None:
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, USDC)
        payout_id = world.request(s, agent.id, random_address(), USDC, "slow-1").id
    slow = SlowBroadcast(
        world.chain.source,
        world.keystore.evm_hot_wallet,
        chain="anvil",
        chain_id=31337,
        max_fee_gwei=200,
        confirmations=1,
    )
    worker = PayoutWorker(
        world.sessions, EvmPayoutChain(slow), WorkerOptions(worker_id="slow", lease_s=0.6)
    )
    other = world.worker("other", lease_s=0.6)
    attempts: list[bool] = []

    def try_to_take_over() -> None:
        time.sleep(1.0)  # beyond the lease, while the broadcast is still under way
        attempts.append(other.claim(payout_id))

    thief = threading.Thread(target=try_to_take_over)
    thief.start()
    stats = worker.run_once()
    thief.join()
    assert attempts == [False]
    assert stats.confirmed == 1
    payout = _payout(world, payout_id)
    assert payout.status == "confirmed" and payout.claimed_by == "slow"
    assert payout.attempts == 1
    assert world.ledger_clean()
    # Whatever a pass leaves open it releases: a waiting payout is free for any worker.
    _rpc(world.chain.w3, "anvil_setBalance", [world.hot, hex(0)])
    with world.sessions() as s, s.begin():
        agent_id = s.get_one(Payout, payout_id).agent_id
        assert agent_id is not None
        world.credit(s, agent_id, USDC)
        waiting_id = world.request(s, agent_id, random_address(), USDC, "slow-2").id
    worker.run_once()
    waiting = _payout(world, waiting_id)
    assert (waiting.status, waiting.claimed_by) == ("waiting_funds", None)
