"""EVM sweeps on anvil: deposit-address USDC moves to the hot wallet once, gas funded by
the gas wallet, ledger untouched and reconciliation clean throughout; only credited funds
are swept."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select
from web3.types import Wei

from escrowd.escrow import service
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.sweeps import EvmSweeper, build_evm_sweeper
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.models import Deposit, DepositAddress, LedgerTransfer, Payout
from escrowd.models.db import make_engine
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.log_capture import captured_logs
from tests.payout_fixtures import CHAIN, EvmPayoutWorld, make_evm_world, record_deposit

__all__ = ["anvil_chain"]

pytestmark = pytest.mark.anvil


@pytest.fixture
def world(anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path) -> Iterator[EvmPayoutWorld]:
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def _sweeper(world: EvmPayoutWorld) -> EvmSweeper:
    return build_evm_sweeper(world.sessions, world.settings, "anvil", world.keystore)


def test_sweep_moves_deposits_to_the_hot_wallet_once(world: EvmPayoutWorld) -> None:
    chain = world.chain
    # Gas wallet funded by the operator; two agents' deposit addresses received USDC.
    chain.w3.eth.send_transaction(
        {
            "from": chain.accounts[0],
            "to": world.keystore.evm_gas_wallet.address,
            "value": Wei(10**19),
        }
    )
    amounts = {0: 4_000_000, 1: 2_500_000}
    with world.sessions() as s, s.begin():
        for index, amount in amounts.items():
            agent = service.register_agent(s, f"agent-{index}")
            address = world.keystore.derive_evm(index).address
            s.add(
                DepositAddress(
                    agent_id=agent.id, chain="evm", address=address, derivation_index=index
                )
            )
            s.flush()
            chain.token.mint(address, amount)
            record_deposit(s, chain=CHAIN, asset="USDC", address=address, amount=amount)
    hot = world.keystore.evm_hot_wallet.address
    assert world.reconcile_differences() == []
    # A later deposit the indexer has seen but not yet credited (short of its depth).
    late_address = world.keystore.derive_evm(1).address
    chain.token.mint(late_address, 700_000)
    with world.sessions() as s, s.begin():
        late = record_deposit(
            s, chain=CHAIN, asset="USDC", address=late_address, amount=700_000, credited=False
        )
        late_id = late.id

    sweeper = _sweeper(world)
    for _ in range(6):
        sweeper.run_once()
    # Only credited funds moved: the uncredited deposit is still where the indexer saw it.
    assert chain.token.balance_of(world.keystore.derive_evm(0).address) == 0
    assert chain.token.balance_of(late_address) == 700_000
    assert chain.token.balance_of(hot) == sum(amounts.values())
    # The indexer credits it at its depth.
    with world.sessions() as s, s.begin():
        LedgerDepositSink().confirmed(s, s.get_one(Deposit, late_id))
    with world.sessions() as s:
        transfers_before = s.scalar(select(func.count()).select_from(LedgerTransfer))
    for _ in range(6):
        sweeper.run_once()
        assert world.reconcile_differences() == []
    for index in amounts:
        assert chain.token.balance_of(world.keystore.derive_evm(index).address) == 0
    assert chain.token.balance_of(hot) == sum(amounts.values()) + 700_000
    with world.sessions() as s:
        sweeps = s.scalars(select(Payout).where(Payout.reason == "sweep")).all()
        assert sorted(p.amount for p in sweeps) == sorted([*amounts.values(), 700_000])
        assert {p.status for p in sweeps} == {"confirmed"}
        assert s.scalar(select(func.count()).select_from(LedgerTransfer)) == transfers_before
    # Nothing left to sweep: further passes create nothing.
    assert sweeper.run_once().created == 0
    assert world.ledger_clean()


def test_a_sweep_waits_for_the_gas_wallet_and_a_failing_discovery_alerts_once(
    world: EvmPayoutWorld,
) -> None:
    chain = world.chain
    address = world.keystore.derive_evm(0).address
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        s.add(DepositAddress(agent_id=agent.id, chain="evm", address=address, derivation_index=0))
        s.flush()
        record_deposit(s, chain=CHAIN, asset="USDC", address=address, amount=3_000_000)
    hot = world.keystore.evm_hot_wallet.address
    chain.token.mint(address, 3_000_000)
    gas_wallet = world.keystore.evm_gas_wallet.address

    # The gas wallet was never funded: the sweep waits, nothing is sent, one warning.
    sweeper = _sweeper(world)
    with captured_logs() as logs:
        for _ in range(3):
            sweeper.run_once()
    with world.sessions() as s:
        sweep = s.scalars(select(Payout).where(Payout.reason == "sweep")).one()
    assert sweep.status == "waiting_funds"
    assert sweep.status_reason is not None and f"gas wallet {gas_wallet} holds 0 wei" in (
        sweep.status_reason
    )
    assert [e["event"] for e in logs].count("sweep_waiting_for_funds") == 1
    assert chain.source.nonce(gas_wallet, pending=True) == 0

    chain.w3.eth.send_transaction(
        {"from": chain.accounts[0], "to": gas_wallet, "value": Wei(10**18)}
    )
    sweeper.run_until_idle()
    assert chain.token.balance_of(address) == 0
    assert chain.token.balance_of(hot) == 3_000_000
    assert world.reconcile_differences() == []

    # A node that cannot be reached: each discovery fails, one error once it lasted.
    chain.token.mint(address, 1_000_000)
    with world.sessions() as s, s.begin():
        record_deposit(s, chain=CHAIN, asset="USDC", address=address, amount=1_000_000)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    dead = JsonRpcEvmSource(
        [dead_url],
        policy=RetryPolicy(timeout_s=0.5, attempts_per_url=1, backoff_base_s=0.01),
        chain=CHAIN,
    )
    settings = world.settings.model_copy(
        update={"payouts": world.settings.payouts.model_copy(update={"stalled_after_s": 0.2})}
    )
    blind = build_evm_sweeper(world.sessions, settings, CHAIN, world.keystore, dead)
    with captured_logs() as logs:
        for _ in range(4):
            blind.run_once()
            time.sleep(0.1)
    events = [e["event"] for e in logs]
    assert events.count("sweep_discovery_stalled") == 1
    assert events.count("sweep_discovery_failed") == 3
    assert "sweep_discovery_recovered" not in events
    dead.close()
    assert world.ledger_clean()
