"""Solana payouts on the simulator (real JSON-RPC client): USDC and SOL confirmed at
finalized, expired blockhash -> re-sign, and a transaction that landed before a crash is
never sent again."""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import accounts, audit, ledger, reconcile, service
from escrowd.escrow.payout_worker import (
    CRASH_POINTS,
    CrashHook,
    PayoutWorker,
    SimulatedCrash,
    SolanaPayoutChain,
    WorkerOptions,
)
from escrowd.escrow.payouts import PlatformAddresses, request_payout
from escrowd.indexer.errors import RpcError
from escrowd.indexer.solana_sender import SolanaSender
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models import Escrow, Payout, PayoutReason, PayoutTransaction, TransferCode
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset
from escrowd.wallets.keystore import UnlockedKeystore, create_keystore
from escrowd.wallets.secrets import Secret
from tests.escrow_fixtures import audit_actions
from tests.payout_fixtures import record_deposit

CHAIN = "solana"
SOL_FLOAT = 10 * 10**9


@dataclass
class SolanaWorld:
    sim: SolanaSimulator
    source: SolanaRpcSource
    sessions: sessionmaker[Session]
    keystore: UnlockedKeystore
    mint: Pubkey

    @property
    def hot(self) -> str:
        return self.keystore.solana_hot_wallet.address

    def sender(self) -> SolanaSender:
        return SolanaSender(self.source, self.keystore.solana_hot_wallet, chain=CHAIN)

    def worker(
        self, crash: CrashHook | None = None, sender: SolanaSender | None = None
    ) -> PayoutWorker:
        return PayoutWorker(
            self.sessions,
            SolanaPayoutChain(sender or self.sender()),
            WorkerOptions(worker_id="w1"),
            crash=crash,
        )

    def credit(
        self, session: Session, agent_id: int, asset: str, amount: int, holder: str | None = None
    ) -> None:
        """A deposit: coins arrive at `holder` (default the hot wallet), custody -> agent.
        At a deposit address (`holder`) it is recorded and credited as the indexer does."""
        to = Pubkey.from_string(holder or self.hot)
        if asset == "USDC":
            self.sim.mint_to(self.mint, to, amount)
        else:
            self.sim.airdrop(to, amount)
        if holder is not None:
            record_deposit(session, chain=CHAIN, asset=asset, address=holder, amount=amount)
            return
        ledger.post(
            session,
            [
                ledger.TransferSpec(
                    idempotency_key=f"deposit:{agent_id}:{asset}:{amount}",
                    debit_account_id=accounts.custody(session, CHAIN, asset).id,
                    credit_account_id=accounts.agent_available(session, agent_id, asset).id,
                    amount=amount,
                    code=TransferCode.DEPOSIT,
                    ref_type="test",
                    ref_id=str(agent_id),
                )
            ],
            actor="test",
        )

    def request(
        self,
        session: Session,
        agent_id: int,
        asset: str,
        to: str,
        amount: int,
        key: str,
        **kw: object,
    ) -> int:
        return request_payout(
            session,
            chain=CHAIN,
            family="solana",
            asset_symbol=asset,
            agent_id=agent_id,
            destination=to,
            amount=amount,
            reason=kw.pop("reason", PayoutReason.WITHDRAWAL),  # type: ignore[arg-type]
            reference=key,
            idempotency_key=key,
            min_amount_base_units=1,
            platform=PlatformAddresses.of_keystore(self.keystore, str(self.mint)),
            **kw,  # type: ignore[arg-type]
        ).id

    def token_balance(self, owner: str) -> int:
        return sum(
            a.amount_base_units
            for a in self.source.get_token_accounts_by_owner(owner, str(self.mint))
        )

    def differences(self) -> list[reconcile.Difference]:
        def read(asset: object, addresses: object) -> int:
            from escrowd.models import Asset

            assert isinstance(asset, Asset) and isinstance(addresses, list)
            if asset.token_address is None:
                return sum(self.source.get_balance(a) for a in addresses)
            return sum(self.token_balance(a) for a in addresses)

        with self.sessions() as s:
            lines = reconcile.reconcile_chain(
                s,
                chain=CHAIN,
                addresses=reconcile.custody_addresses(s, "solana", self.hot),
                read_balance=read,
            )
        return reconcile.differences(lines)

    def clean(self) -> bool:
        with self.sessions() as s:
            return ledger.check(s) == [] and audit.verify(s).ok


@pytest.fixture
def world(sqlite_url: str, tmp_path: Path) -> Iterator[SolanaWorld]:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    keystore = create_keystore(tmp_path / "ks.json", Secret("pw-solana"), scrypt_log2_n=10)
    with (
        SolanaSimulator(blockhash_valid_blocks=20, finalized_lag_slots=4) as sim,
        SolanaRpcSource([sim.url], max_rounds=1) as source,
    ):
        mint = sim.create_usdc_mint()
        sim.airdrop(keystore.solana_hot_wallet.keypair().pubkey(), SOL_FLOAT)
        with sessions() as s, s.begin():
            ensure_asset(s, chain=CHAIN, symbol="USDC", decimals=6, token_address=str(mint))
            ensure_asset(s, chain=CHAIN, symbol="SOL", decimals=9, token_address=None)
            reconcile.record_operator_funding(
                s, chain=CHAIN, asset="SOL", amount=SOL_FLOAT, reference="fee-float"
            )
        yield SolanaWorld(sim, source, sessions, keystore, mint)
    engine.dispose()


def test_release_and_withdrawal_confirmed_at_finalized(world: SolanaWorld) -> None:
    worker_wallet = str(Keypair().pubkey())
    sol_destination = str(Keypair().pubkey())
    with world.sessions() as s, s.begin():
        buyer = service.register_agent(s, "buyer")
        worker = service.register_agent(s, "worker")
        world.credit(s, buyer.id, "USDC", 8_000_000)
        world.credit(s, worker.id, "SOL", 2 * 10**9)
        service.fund_escrow(
            s,
            job_id="job-s",
            buyer=buyer,
            worker=worker,
            asset="USDC",
            amount=8_000_000,
            fee_bps=250,
        )
        escrow = service.release_escrow(s, "job-s")
        usdc_id = world.request(
            s,
            worker.id,
            "USDC",
            worker_wallet,
            escrow.worker_amount or 0,
            "rel-s",
            reason=PayoutReason.RELEASE,
            escrow_id=escrow.id,
        )
        sol_id = world.request(s, worker.id, "SOL", sol_destination, 10**9, "sol-w")
    worker_loop = world.worker()
    worker_loop.run_once()
    with world.sessions() as s:
        assert {p.status for p in s.scalars(select(Payout))} == {"broadcast"}
    world.sim.finalize_all()
    worker_loop.run_once()
    assert world.token_balance(worker_wallet) == 8_000_000 - 200_000
    assert world.source.get_balance(sol_destination) == 10**9
    with world.sessions() as s:
        usdc = s.get(Payout, usdc_id)
        assert usdc is not None and usdc.status == "confirmed"
        assert s.scalars(select(Escrow.payout_tx_hash)).one() == usdc.tx_hash
        assert s.get(Payout, sol_id).status == "confirmed"  # type: ignore[union-attr]
    assert audit_actions(world.sessions, f"payout:{usdc_id}")[-3:] == [
        "ledger_payout",
        "ledger_adjustment",
        "payout_confirmed",
    ]
    assert world.clean()
    assert world.differences() == []


def test_expired_blockhash_is_resigned_and_only_the_new_signature_lands(world: SolanaWorld) -> None:
    destination = str(Keypair().pubkey())
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, "USDC", 3_000_000)
        payout_id = world.request(s, agent.id, "USDC", destination, 3_000_000, "exp-1")
    # The worker stores the signed transaction and dies before sending it.
    with pytest.raises(SimulatedCrash):
        world.worker(crash=CrashHook("after_store", exit_process=False)).run_once()
    with world.sessions() as s:
        first = s.get(Payout, payout_id)
        assert first is not None and first.status == "signed"
        old_sig, old_raw = first.tx_hash, first.raw_tx
    # Long enough for its blockhash to expire, and for that to be finalized.
    world.sim.advance_slots(40)
    worker = world.worker()
    worker.run_once()
    with pytest.raises(RpcError):
        world.source.send_raw_transaction(old_raw or b"")
    world.sim.finalize_all()
    worker.run_until_idle()
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "confirmed"
        sigs = list(
            s.scalars(
                select(PayoutTransaction.tx_hash).where(PayoutTransaction.payout_id == payout_id)
            )
        )
    assert len(sigs) == 2 and payout.tx_hash != old_sig
    assert world.source.get_signature_statuses([old_sig or ""])[0] is None
    assert world.token_balance(destination) == 3_000_000
    assert "payout_resigned" in audit_actions(world.sessions, f"payout:{payout_id}")
    assert world.clean()
    assert world.differences() == []


class CountingSender(SolanaSender):
    sends = 0

    def broadcast(self, raw_tx: bytes) -> str:
        CountingSender.sends += 1
        return super().broadcast(raw_tx)


def test_transaction_that_landed_before_the_crash_is_not_sent_again(world: SolanaWorld) -> None:
    destination = str(Keypair().pubkey())
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, "SOL", 2 * 10**9)
        payout_id = world.request(s, agent.id, "SOL", destination, 10**9, "landed-1")
    with pytest.raises(SimulatedCrash):
        world.worker(crash=CrashHook("after_broadcast", exit_process=False)).run_once()
    with world.sessions() as s:
        assert s.get(Payout, payout_id).status == "signed"  # type: ignore[union-attr]
    counting = CountingSender(world.source, world.keystore.solana_hot_wallet, chain=CHAIN)
    worker = world.worker(sender=counting)
    worker.run_once()
    world.sim.finalize_all()
    worker.run_once()
    assert CountingSender.sends == 0
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "confirmed"
        count = len(
            list(
                s.scalars(select(PayoutTransaction).where(PayoutTransaction.payout_id == payout_id))
            )
        )
    assert count == 1
    assert world.source.get_balance(destination) == 10**9
    assert world.clean()
    assert world.differences() == []


class DroppingSender(SolanaSender):
    """An RPC node that accepts transactions and loses them."""

    def broadcast(self, raw_tx: bytes) -> str:
        return "dropped"


def test_dropped_transaction_is_resigned_only_after_its_blockhash_expired(
    world: SolanaWorld,
) -> None:
    destination = str(Keypair().pubkey())
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, "USDC", 1_000_000)
        payout_id = world.request(s, agent.id, "USDC", destination, 1_000_000, "drop-1")
    dropping = DroppingSender(world.source, world.keystore.solana_hot_wallet, chain=CHAIN)
    impatient = PayoutWorker(
        world.sessions,
        SolanaPayoutChain(dropping),
        WorkerOptions(worker_id="w1", stuck_after_s=0.0, rebroadcast_after_s=0.0),
    )
    for _ in range(3):
        impatient.run_once()
        world.sim.advance_slots(2)
    with world.sessions() as s:
        payout = s.get(Payout, payout_id)
        assert payout is not None and payout.status == "broadcast"
        count = len(
            list(
                s.scalars(select(PayoutTransaction).where(PayoutTransaction.payout_id == payout_id))
            )
        )
    # Unknown and still valid: never signed again, however long it has waited.
    assert count == 1
    world.sim.advance_slots(40)
    worker = world.worker()
    worker.run_once()
    world.sim.finalize_all()
    worker.run_until_idle()
    assert world.token_balance(destination) == 1_000_000
    with world.sessions() as s:
        assert s.get(Payout, payout_id).status == "confirmed"  # type: ignore[union-attr]
    assert world.differences() == []


def test_crashes_at_every_step_pay_each_solana_payout_once(world: SolanaWorld) -> None:
    rng = random.Random(5)
    destinations = [str(Keypair().pubkey()) for _ in range(40)]
    with world.sessions() as s, s.begin():
        agent = service.register_agent(s, "agent")
        world.credit(s, agent.id, "USDC", 40 * 1_000_000)
        for i, destination in enumerate(destinations):
            world.request(s, agent.id, "USDC", destination, 1_000_000, f"sol-crash-{i}")
    crashes = 0
    for round_no in range(15):
        point = CRASH_POINTS[round_no % len(CRASH_POINTS)]
        hook = CrashHook(point, after=rng.randint(1, 6), exit_process=False)
        try:
            world.worker(crash=hook).run_until_idle(max_passes=3, pause_s=0)
        except SimulatedCrash:
            crashes += 1
        # Time passes between restarts: some blockhashes expire, some slots finalize.
        world.sim.advance_slots(rng.choice([1, 5, 30]))
    assert crashes >= 10
    worker = world.worker()
    for _ in range(5):
        worker.run_until_idle(max_passes=3, pause_s=0)
        world.sim.advance_slots(30)
        world.sim.finalize_all()
    worker.run_until_idle()
    with world.sessions() as s:
        assert set(s.scalars(select(Payout.status))) == {"confirmed"}
        signed = len(list(s.scalars(select(PayoutTransaction))))
    # Some transactions stored before a crash expired unsent and were signed again.
    assert signed > len(destinations)
    for destination in destinations:
        assert world.token_balance(destination) == 1_000_000
    assert world.token_balance(world.hot) == 0
    assert world.clean()
    assert world.differences() == []
