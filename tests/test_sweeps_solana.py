"""Solana sweeps on the simulator: SOL and USDC move from deposit addresses to the hot
wallet (fee paid by the hot wallet), ledger-neutral for agents, reconcile clean."""

from __future__ import annotations

from datetime import timedelta

import pytest
from solders.pubkey import Pubkey
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import mint_to_checked
from spl.token.models import MintToCheckedParams
from sqlalchemy import select

from escrowd.escrow import accounts, ledger, service, sweeps
from escrowd.escrow.payout_worker import PayoutWorker, SolanaPayoutChain, WorkerOptions
from escrowd.escrow.sweeps import discover_solana_sweeps
from escrowd.models import DepositAddress, Payout, WebhookEvent
from tests.log_capture import captured_logs
from tests.payout_fixtures import record_deposit
from tests.solana_history import Chain
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


def test_usdc_is_swept_from_every_token_account_that_holds_it(world: SolanaWorld) -> None:
    deposit = world.keystore.derive_solana(0)
    owner = Pubkey.from_string(deposit.address)
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        s.add(
            DepositAddress(
                agent_id=agent.id, chain="solana", address=deposit.address, derivation_index=0
            )
        )
        s.flush()
        world.credit(s, agent.id, "USDC", 2_000_000, holder=deposit.address)  # into its ATA
    # 5 USDC more into a token account of the deposit address that is not its ATA.
    chain = Chain(world.sim, world.mint, world.mint, world.sim.faucet)
    other = chain.other_token_account(owner)
    mint_there = mint_to_checked(
        MintToCheckedParams(
            program_id=TOKEN_PROGRAM_ID,
            mint=world.mint,
            dest=other,
            mint_authority=world.sim.mint_authority.pubkey(),
            amount=5_000_000,
            decimals=6,
        )
    )
    world.sim.chain.sign_and_send([mint_there], [world.sim.faucet, world.sim.mint_authority])
    with world.sessions() as s, s.begin():
        record_deposit(s, chain=CHAIN, asset="USDC", address=deposit.address, amount=5_000_000)
    world.sim.finalize_all()
    assert world.differences() == []

    created = discover_solana_sweeps(
        world.sessions, world.source, chain=CHAIN, hot_wallet=world.hot, min_base_units={}
    )
    assert created == 1
    worker = PayoutWorker(
        world.sessions,
        SolanaPayoutChain(world.sender(), deposit_key=world.keystore.derive_solana),
        WorkerOptions(worker_id="w1"),
    )
    worker.run_once()
    world.sim.finalize_all()
    worker.run_until_idle()
    with world.sessions() as s:
        sweep = s.scalars(select(Payout).where(Payout.reason == "sweep")).one()
    assert (sweep.status, sweep.amount) == ("confirmed", 7_000_000)
    assert world.token_balance(deposit.address) == 0  # both accounts emptied
    assert world.differences() == []
    assert world.clean()


def test_a_failed_sweep_backs_off_with_one_warning(
    world: SolanaWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    deposit = world.keystore.derive_solana(0)
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        s.add(
            DepositAddress(
                agent_id=agent.id, chain="solana", address=deposit.address, derivation_index=0
            )
        )
        s.flush()
        world.credit(s, agent.id, "USDC", 3_000_000, holder=deposit.address)
    world.sim.finalize_all()

    def sweep() -> int:
        return discover_solana_sweeps(
            world.sessions, world.source, chain=CHAIN, hot_wallet=world.hot, min_base_units={}
        )

    assert sweep() == 1
    with world.sessions() as s, s.begin():  # as the chain would have it: the sweep failed
        s.scalars(select(Payout).where(Payout.reason == "sweep")).one().status = "failed"
    with captured_logs() as logs:
        assert sweep() == 0
        assert sweep() == 0
    backing_off = [e for e in logs if e["event"] == "sweep_backing_off"]
    assert len(backing_off) == 1 and backing_off[0]["failures"] == 1
    monkeypatch.setattr(sweeps, "SOLANA_SWEEP_RETRY", timedelta(0))
    assert sweep() == 1  # the delay has passed: swept again
