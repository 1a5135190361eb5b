"""EVM payouts on anvil: release -> confirmed, stuck replacement, revert -> reversal."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from sqlalchemy import Engine, select

from escrowd.devnet.evm import _rpc, mine_blocks
from escrowd.escrow import accounts, ledger, service
from escrowd.escrow.payout_worker import (
    Ahead,
    EvmPayoutChain,
    PayoutWorker,
    Shortfall,
    WorkerOptions,
)
from escrowd.indexer.errors import RpcError
from escrowd.models import Asset, Escrow, Payout, PayoutReason, PayoutTransaction
from escrowd.models.db import make_engine
from tests.escrow_fixtures import audit_actions
from tests.evm_fixtures import EvmChain, anvil_chain
from tests.payout_fixtures import EvmPayoutWorld, make_evm_world, random_address

__all__ = ["anvil_chain"]

pytestmark = pytest.mark.anvil


class StaleBalanceChain(EvmPayoutChain):
    """Reads balances from a node that has not seen the latest blocks: always enough."""

    def shortfall(self, payout: Payout, asset: Asset, ahead: Sequence[Ahead]) -> Shortfall | None:
        return None


@pytest.fixture
def world(anvil_chain: EvmChain, sqlite_url: str, tmp_path: Path) -> Iterator[EvmPayoutWorld]:
    engine: Engine = make_engine(sqlite_url)
    yield make_evm_world(anvil_chain, sqlite_url, engine, tmp_path)
    engine.dispose()


def test_release_pays_the_worker_exactly_amount_minus_fee(world: EvmPayoutWorld) -> None:
    destination = random_address()
    with world.sessions() as s, s.begin():
        buyer = service.register_agent(s, "buyer")
        worker = service.register_agent(s, "worker")
        world.credit(s, buyer.id, 10_000_000)
        service.fund_escrow(
            s,
            job_id="job-1",
            buyer=buyer,
            worker=worker,
            asset="USDC",
            amount=10_000_000,
            fee_bps=250,
        )
        escrow = service.release_escrow(s, "job-1")
        payout = world.request(
            s,
            worker.id,
            destination,
            escrow.worker_amount or 0,
            "release:job-1",
            reason=PayoutReason.RELEASE,
            escrow_id=escrow.id,
        )
        payout_id = payout.id
    stats = world.worker().run_until_idle()
    assert stats.confirmed == 1
    assert world.chain.token.balance_of(destination) == 10_000_000 - 250_000
    with world.sessions() as s:
        confirmed = s.get(Payout, payout_id)
        assert confirmed is not None and confirmed.status == "confirmed"
        escrow_row = s.scalars(select(Escrow).where(Escrow.job_id == "job-1")).one()
        assert escrow_row.payout_tx_hash == confirmed.tx_hash
        receipt = world.chain.source.receipt(confirmed.tx_hash or "")
        assert receipt is not None and receipt.succeeded
        assert ledger.balance(s, accounts.payouts_in_flight(s, "anvil", "USDC")) == 0
        assert ledger.balance(s, accounts.agent_available(s, worker.id, "USDC")) == 0
    assert audit_actions(world.sessions, f"payout:{payout_id}") == [
        "ledger_payout_hold",
        "payout_requested",
        "payout_signed",
        "payout_broadcast",
        "ledger_payout",
        "payout_confirmed",
    ]
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


def test_stuck_transaction_is_replaced_once_and_only_one_lands(world: EvmPayoutWorld) -> None:
    destination = random_address()
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 5_000_000)
        payout_id = world.request(s, agent.id, destination, 5_000_000, "stuck-1").id
    w3 = world.chain.w3
    _rpc(w3, "evm_setAutomine", [False])
    worker = world.worker(stuck_after_s=0.2, rebroadcast_after_s=60.0)
    worker.run_once()  # signed and broadcast; sits in the mempool
    with world.sessions() as s:
        first = s.get(Payout, payout_id)
        assert first is not None and first.status == "broadcast"
        first_hash = first.tx_hash
    time.sleep(0.3)
    worker.run_once()  # stuck: replaced with the same nonce and a higher fee
    with world.sessions() as s:
        txs = s.scalars(
            select(PayoutTransaction)
            .where(PayoutTransaction.payout_id == payout_id)
            .order_by(PayoutTransaction.id)
        ).all()
    assert len(txs) == 2
    assert txs[0].nonce == txs[1].nonce
    assert (txs[1].max_fee_per_gas or 0) * 8 >= (txs[0].max_fee_per_gas or 0) * 9
    # The node now holds the replacement; the old bytes cannot take its place back.
    with pytest.raises(RpcError, match="underpriced"):
        world.chain.source.send_raw_transaction(txs[0].raw_tx)
    mine_blocks(w3, 2)
    _rpc(w3, "evm_setAutomine", [True])
    worker.run_until_idle()
    landed = [tx.tx_hash for tx in txs if world.chain.source.receipt(tx.tx_hash) is not None]
    assert len(landed) == 1
    assert world.transfers_from_hot() == {(destination, 5_000_000): 1}
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "confirmed"
        assert payout.tx_hash == landed[0] and first_hash in {t.tx_hash for t in txs}
    assert world.ledger_clean()
    assert world.reconcile_differences() == []


def test_reverted_transfer_fails_the_payout_and_reverses_the_hold(world: EvmPayoutWorld) -> None:
    destination = random_address()
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 3_000_000)
        payout_id = world.request(s, agent.id, destination, 3_000_000, "revert-1").id
    # The hot wallet lost its coins outside escrowd, and the balance read before signing
    # came from a node that had not seen it yet: the transfer reverts on chain.
    hot = world.keystore.evm_hot_wallet
    _rpc(world.chain.w3, "anvil_impersonateAccount", [hot.address])
    world.chain.token.transfer(hot.address, world.chain.accounts[1], 3_000_000)
    worker = PayoutWorker(
        world.sessions, StaleBalanceChain(world.sender()), WorkerOptions(worker_id="w1")
    )
    stats = worker.run_until_idle()
    assert stats.failed == 1
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "failed" and payout.error
        assert ledger.balance(s, accounts.agent_available(s, agent.id, "USDC")) == 3_000_000
        assert ledger.balance(s, accounts.payouts_in_flight(s, "anvil", "USDC")) == 0
    assert world.transfers_from_hot() == {(world.chain.accounts[1], 3_000_000): 1}
    assert audit_actions(world.sessions, f"payout:{payout_id}")[-2:] == [
        "ledger_payout_reversal",
        "payout_failed",
    ]
    assert world.ledger_clean()


def test_payout_stays_in_flight_until_the_confirmation_depth(world: EvmPayoutWorld) -> None:
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, 2_000_000)
        payout_id = world.request(s, agent.id, random_address(), 2_000_000, "depth-1").id
    worker = world.worker(sender=world.sender(confirmations=3))
    worker.run_once()
    worker.run_once()
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "broadcast"
        assert ledger.balance(s, accounts.payouts_in_flight(s, "anvil", "USDC")) == 2_000_000
    mine_blocks(world.chain.w3, 2)
    worker.run_once()
    with world.sessions() as s:
        assert s.get(Payout, payout_id).status == "confirmed"  # type: ignore[union-attr]
        assert ledger.balance(s, accounts.payouts_in_flight(s, "anvil", "USDC")) == 0
