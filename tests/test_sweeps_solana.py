"""Solana sweeps on the simulator: SOL and USDC move from deposit addresses to the hot
wallet (fee paid by the hot wallet), ledger-neutral for agents, reconcile clean."""

from __future__ import annotations

from sqlalchemy import select

from escrowd.escrow import accounts, ledger, service
from escrowd.escrow.payout_worker import PayoutWorker, SolanaPayoutChain, WorkerOptions
from escrowd.escrow.sweeps import discover_solana_sweeps
from escrowd.models import DepositAddress, Payout, WebhookEvent
from tests.payout_fixtures import record_deposit
from tests.test_payouts_solana import CHAIN, SolanaWorld, world

__all__ = ["world"]


def test_deposit_addresses_are_swept_into_the_hot_wallet_once(world: SolanaWorld) -> None:
    deposit = world.keystore.derive_solana(0)
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        agent_id = agent.id
        s.add(
            DepositAddress(
                agent_id=agent.id, chain="solana", address=deposit.address, derivation_index=0
            )
        )
        s.flush()
        world.credit(s, agent.id, "USDC", 6_000_000, holder=deposit.address)
        world.credit(s, agent.id, "SOL", 3 * 10**9, holder=deposit.address)
        for asset, amount in (("USDC", 6_000_000), ("SOL", 3 * 10**9)):
            record_deposit(s, chain=CHAIN, asset=asset, address=deposit.address, amount=amount)
    world.sim.finalize_all()
    assert world.differences() == []

    def sweep() -> int:
        return discover_solana_sweeps(
            world.sessions,
            world.source,
            chain=CHAIN,
            hot_wallet=world.hot,
            min_base_units={"SOL": 1_000_000, "USDC": 10_000},
        )

    assert sweep() == 2
    assert sweep() == 0  # one open sweep per address and asset
    worker = PayoutWorker(
        world.sessions,
        SolanaPayoutChain(world.sender(), deposit_key=world.keystore.derive_solana),
        WorkerOptions(worker_id="w1"),
    )
    worker.run_once()
    world.sim.finalize_all()
    worker.run_until_idle()
    assert world.token_balance(deposit.address) == 0
    assert world.source.get_balance(deposit.address) == 0
    with world.sessions() as s:
        sweeps = s.scalars(select(Payout).where(Payout.reason == "sweep")).all()
        assert sorted((p.status, p.amount) for p in sweeps) == [
            ("confirmed", 6_000_000),
            ("confirmed", 3 * 10**9),
        ]
        assert ledger.balance(s, accounts.agent_available(s, agent_id, "USDC")) == 6_000_000
        assert ledger.balance(s, accounts.agent_available(s, agent_id, "SOL")) == 3 * 10**9
        assert s.scalars(select(WebhookEvent).where(WebhookEvent.type.like("payout.%"))).all() == []
    assert sweep() == 0
    assert world.clean()
    assert world.differences() == []
