"""Escrows funded from one named deposit: over HTTP and in-process, on SQLite and
PostgreSQL, racing requests for one deposit, and deposits found by the real indexers
(EVM on eth-tester, SOL on the LiteSVM simulator) with the depositor they recorded."""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path
from typing import Any

import pytest
from solders.keypair import Keypair
from sqlalchemy import Engine, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import deposit_funding, service
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.escrow.interface import EscrowService
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models import ApiScope, Asset, Deposit, DepositAddress, DepositStatus, Escrow
from escrowd.models.db import make_session_factory
from escrowd.wallets.allocation import allocate_deposit_address
from escrowd.wallets.hd import SolanaSeedDeriver
from escrowd.wallets.secrets import Secret
from tests.escrow_fixtures import (
    CHAIN,
    available,
    credit,
    ledger_clean,
    make_client,
    make_key,
    make_settings,
    platform_fees,
    row_id,
    seed_agents,
)
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import make_poller, watch

USDC = 1_000_000
SOL = 10**9
SENDER = "0x" + "de" * 20
_blocks = itertools.count(100)


def tx(n: int) -> str:
    return "0x" + f"{n:02x}" * 32


def add_deposit(
    sessions: sessionmaker[Session],
    agent: str,
    tx_hash: str,
    amount: int,
    *,
    log_index: int = 0,
    confirm: bool = True,
) -> int:
    """A USDC deposit to `agent` as the indexer records it (pending), credited through the
    ledger sink when `confirm`."""
    sink = LedgerDepositSink()
    with sessions() as s, s.begin():
        owner = service.get_agent(s, agent)
        asset = s.scalars(select(Asset).where(Asset.chain == CHAIN, Asset.symbol == "USDC")).one()
        address = s.scalars(
            select(DepositAddress).where(DepositAddress.agent_id == owner.id)
        ).one_or_none()
        if address is None:
            address = DepositAddress(
                agent_id=owner.id, chain="evm", address=f"0x{owner.id:040x}",
                derivation_index=owner.id,
            )  # fmt: skip
            s.add(address)
            s.flush()
        deposit = Deposit(
            chain=CHAIN, tx_hash=tx_hash, log_index=log_index, asset_id=asset.id,
            agent_id=owner.id, deposit_address_id=address.id, from_address=SENDER,
            amount=amount, block_number=next(_blocks), block_hash="0x" + "ab" * 32,
            status=DepositStatus.PENDING,
        )  # fmt: skip
        s.add(deposit)
        s.flush()
        sink.recorded(s, deposit)
        if confirm:
            sink.confirmed(s, deposit)
        return deposit.id


def settle_deposit(sessions: sessionmaker[Session], deposit_id: int, *, orphan: bool) -> None:
    sink = LedgerDepositSink()
    with sessions() as s, s.begin():
        deposit = s.get_one(Deposit, deposit_id)
        if orphan:
            sink.orphaned(s, deposit)
        else:
            sink.confirmed(s, deposit)


class Api:
    def __init__(self, engine: Engine, sessions: sessionmaker[Session], tmp_path: Path) -> None:
        self.client = make_client(engine, tmp_path)
        self.auth = {"Authorization": f"Bearer {make_key(sessions, ApiScope.WRITE)}"}
        self.keys = itertools.count()

    def post(self, path: str, body: dict[str, Any], key: str | None = None) -> Any:
        headers = {**self.auth, "Idempotency-Key": key or f"k-{next(self.keys)}"}
        return self.client.post(f"/v1{path}", json=body, headers=headers)

    def get(self, path: str) -> Any:
        return self.client.get(f"/v1{path}", headers=self.auth)

    def fund(self, job: str, tx_hash: str, key: str | None = None, **more: Any) -> Any:
        named = {"network": CHAIN, "tx_hash": tx_hash}
        if "log_index" in more:
            named["log_index"] = more.pop("log_index")
        body = {"job_id": job, "worker": "bob", "deposit": named, **more}
        return self.post("/deposit-funded-escrows", body, key)


def error(response: Any) -> tuple[int, str, str]:
    found = response.json()["error"]
    return response.status_code, found["type"], found["message"]


def test_escrow_from_a_named_deposit_over_http(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    ids = seed_agents(sessions, "alice", "bob", "carol")
    api = Api(engine, sessions, tmp_path)
    first = add_deposit(sessions, "alice", tx(1), 10 * USDC, confirm=False)

    # Still pending: a clear "not yet", not a final refusal; the idempotency key stays
    # usable for the retry.
    status, kind, message = error(api.fund("job-d1", tx(1).upper().replace("0X", "0x"), "k1"))
    assert (status, kind) == (409, "deposit_pending")
    assert "is pending" in message and "once it is confirmed" in message
    assert error(api.fund("job-d1", tx(99)))[:2] == (404, "deposit_not_found")
    settle_deposit(sessions, first, orphan=False)
    funded = api.fund("job-d1", tx(1), "k1")
    assert funded.status_code == 201, funded.text
    body = funded.json()
    assert (body["buyer"], body["worker"], body["asset"], body["amount"]) == (
        "alice",
        "bob",
        "USDC",
        "10",
    )
    assert body["funded_from_deposit"] == {
        "deposit_id": first,
        "network": CHAIN,
        "tx_hash": tx(1),
        "log_index": 0,
        "depositor_address": SENDER,
    }
    replay = api.fund("job-d1", tx(1), "k1")
    assert (replay.json(), replay.headers["Idempotent-Replayed"]) == (body, "true")
    assert api.get("/escrows/job-d1").json()["funded_from_deposit"]["depositor_address"] == SENDER
    status, kind, message = error(api.fund("job-d2", tx(1)))
    assert (status, kind) == (409, "deposit_used") and "escrow job-d1" in message
    assert available(sessions, ids["alice"]) == 0

    # Part of a deposit: the rest stays the buyer's balance, and the deposit is used up.
    add_deposit(sessions, "alice", tx(2), 10 * USDC)
    assert api.fund("job-d3", tx(2), amount="4").json()["amount_base_units"] == "4000000"
    assert available(sessions, ids["alice"]) == 6 * USDC
    assert error(api.fund("job-d4", tx(2), amount="1"))[:2] == (409, "deposit_used")
    add_deposit(sessions, "alice", tx(3), 5 * USDC)
    assert error(api.fund("job-d4", tx(3), amount="5.5"))[:2] == (400, "invalid_amount")

    # One transaction, two deposits: the log index (or the buyer) says which.
    add_deposit(sessions, "alice", tx(4), 1 * USDC, log_index=0)
    add_deposit(sessions, "carol", tx(4), 2 * USDC, log_index=3)
    status, kind, message = error(api.fund("job-d5", tx(4)))
    assert (status, kind) == (400, "deposit_ambiguous") and "(0, 3)" in message
    assert error(api.fund("job-d5", tx(4), log_index=0, buyer="carol"))[:2] == (
        400,
        "deposit_agent_mismatch",
    )
    by_buyer = api.fund("job-d5", tx(4), buyer="carol")
    assert (by_buyer.status_code, by_buyer.json()["amount"]) == (201, "2")
    assert api.fund("job-d6", tx(4), log_index=0).json()["buyer"] == "alice"

    # A deposit its chain took back funds nothing.
    gone = add_deposit(sessions, "carol", tx(5), 3 * USDC)
    settle_deposit(sessions, gone, orphan=True)
    assert error(api.fund("job-d7", tx(5)))[:2] == (409, "deposit_unusable")

    # On PostgreSQL the fast front answers the release: the deposit is read for its answer.
    released = api.post("/escrows/job-d1/release", {})
    assert released.json()["worker_amount"] == "9.75"
    assert released.json()["funded_from_deposit"]["tx_hash"] == tx(1)
    assert available(sessions, ids["bob"]) == 9_750_000
    audit = api.client.get("/v1/audit?escrow=job-d1", headers=api.auth).json()["data"]
    again = api.post("/escrows/job-d3/release", {})
    assert again.json()["funded_from_deposit"]["tx_hash"] == tx(2)
    assert [row["action"] for row in audit][:3] == [
        "ledger_escrow_fund",
        "escrow_funded",
        "escrow_funded_from_deposit",
    ]
    assert audit[2]["details"]["depositor_address"] == SENDER
    assert ledger_clean(sessions)


def test_one_deposit_funds_one_escrow_when_requests_race(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    svc = EscrowService(engine, make_settings(tmp_path))
    ids = seed_agents(sessions, "alice", "bob")
    with sessions() as s, s.begin():
        credit(s, ids["alice"], 100 * USDC)  # enough for every request: only the deposit decides
    deposit_id = add_deposit(sessions, "alice", tx(7), 10 * USDC)
    barrier = threading.Barrier(8)
    outcomes: list[str] = []

    def attempt(n: int) -> None:
        barrier.wait()
        try:
            svc.fund_escrow_from_deposit(
                job_id=f"race-{n}", worker="bob", chain=CHAIN, tx_hash=tx(7)
            )
            outcomes.append("funded")
        except deposit_funding.DepositUsed:
            outcomes.append("used")

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(outcomes) == ["funded"] + ["used"] * 7
    assert available(sessions, ids["alice"]) == 100 * USDC
    with sessions() as s:
        [job] = s.scalars(select(Escrow.job_id).where(Escrow.deposit_id == deposit_id)).all()
    found = svc.escrow_funding_deposit(job)
    assert found is not None and (found.tx_hash, found.depositor_address) == (tx(7), SENDER)

    # The database refuses a second escrow naming the deposit, whatever the code does.
    svc.fund_escrow(job_id="plain", buyer="alice", worker="bob", asset="USDC", amount=1)
    assert svc.escrow_funding_deposit("plain") is None
    with sessions() as s, pytest.raises(IntegrityError):
        s.scalars(select(Escrow).where(Escrow.job_id == "plain")).one().deposit_id = deposit_id
        s.flush()
    assert ledger_clean(sessions)


def test_escrow_from_an_evm_deposit_names_its_sender(
    eth_tester_chain: EvmChain, sqlite_url: str, tmp_path: Path
) -> None:
    chain = eth_tester_chain
    svc = EscrowService.from_url(sqlite_url, make_settings(tmp_path))
    sessions = svc._sessions
    buyer, address = watch(sessions)
    seed_agents(sessions, "worker")
    sender = chain.accounts[2]
    tx_hash = chain.token.transfer(sender, address, 7_500_000)
    poller = make_poller(chain, sessions, confirmations=2)
    assert poller.poll_once().deposits_found == 1
    # Not deep enough yet: pending, and said so.
    with pytest.raises(deposit_funding.DepositPending):
        svc.fund_escrow_from_deposit(
            job_id="evm-job", worker="worker", chain="testevm", tx_hash=tx_hash
        )
    chain.source.mine_blocks(2)  # type: ignore[union-attr]
    assert poller.confirm_once().confirmed == 1
    escrow = svc.fund_escrow_from_deposit(
        job_id="evm-job",
        worker="worker",
        chain="testevm",
        tx_hash=tx_hash.upper().replace("0X", "0x"),
    )
    assert (escrow.amount_base_units, escrow.asset) == (7_500_000, "USDC")
    assert row_id(svc._sessions, escrow.buyer) == buyer
    # The sender of the ERC-20 Transfer, as its log named it.
    funding = svc.escrow_funding_deposit("evm-job")
    assert funding is not None and funding.depositor_address == sender
    svc.close()


def test_sol_escrow_from_a_solana_deposit(sqlite_url: str, tmp_path: Path) -> None:
    with SolanaSimulator() as sim:
        usdc = sim.create_usdc_mint()
        payer = Keypair()
        sim.airdrop(payer.pubkey(), 10 * SOL)
        settings = make_settings(tmp_path).model_copy(
            update={
                "solana": SolanaSettings(name="solana", rpc_urls=[sim.url], usdc_mint=str(usdc))
            }
        )
        svc = EscrowService.from_url(sqlite_url, settings)
        try:
            deriver = SolanaSeedDeriver(Secret(os.urandom(64)), usdc_mint=str(usdc))
            buyer = svc.register_agent("sol-buyer")
            svc.register_agent("sol-worker")
            with svc._sessions() as s, s.begin():
                row = allocate_deposit_address(
                    s, row_id(svc._sessions, buyer.id), "solana", deriver
                )
            signature = str(sim.transfer_sol(payer, deriver.keypair(row.derivation_index).pubkey(),
                                             2 * SOL + 1))  # fmt: skip
            sim.advance_slots(2)
            poller = SolanaPoller(
                settings.solana,  # type: ignore[arg-type]
                SolanaRpcSource([sim.url], timeout_s=5, max_rounds=2, backoff_base_s=0.01),
                make_session_factory(svc.engine),
                LedgerDepositSink(),
            )
            assert poller.poll_once().deposits_found == 1
            with pytest.raises(deposit_funding.DepositPending):
                svc.fund_escrow_from_deposit(
                    job_id="sol-job", worker="sol-worker", chain="solana", tx_hash=signature
                )
            sim.finalize_all()
            poller.poll_once()
            assert poller.confirm_once().confirmed == 1
            escrow = svc.fund_escrow_from_deposit(
                job_id="sol-job", worker="sol-worker", chain="solana", tx_hash=signature,
                fee_bps=300,
            )  # fmt: skip
            # Priced in SOL: lamports in, lamports out, the fee on them.
            assert (escrow.asset, escrow.amount_base_units) == ("SOL", 2 * SOL + 1)
            funding = svc.escrow_funding_deposit("sol-job")
            assert funding is not None and funding.depositor_address == str(payer.pubkey())
            released = svc.release_escrow("sol-job")
            assert (released.worker_amount_base_units, released.fee_amount_base_units) == (
                1_940_000_001,
                60_000_000,
            )
            worker_id = row_id(svc._sessions, "sol-worker")
            assert available(svc._sessions, worker_id, "SOL") == 1_940_000_001
            assert platform_fees(svc._sessions, "SOL") == 60_000_000
            assert ledger_clean(svc._sessions)
        finally:
            svc.close()
