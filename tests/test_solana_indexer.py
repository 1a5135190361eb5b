"""The Solana deposit indexer against the LiteSVM simulator, through the real RPC client,
crediting through the ledger sink (the same one EVM deposits use)."""

from __future__ import annotations

import os
import shutil
import socket
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.signature import Signature
from solders.system_program import TransferParams, transfer
from solders.transaction import VersionedTransaction
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import accounts, audit, ledger
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.errors import BlockNotAvailable, SlotSkipped
from escrowd.indexer.sink import StoredDeposit
from escrowd.indexer.solana_indexer import BLOCK_SCAN, PER_ADDRESS, SolanaPoller, rpc_source
from escrowd.indexer.solana_source import (
    Commitment,
    SolanaBlock,
    SolanaRpcSource,
    SolanaTransaction,
    TransactionDetails,
)
from escrowd.models import AuditLog, ChainCursor, Deposit, DepositStatus
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.allocation import allocate_deposit_address, get_or_create_agent
from escrowd.wallets.hd import SolanaSeedDeriver
from escrowd.wallets.secrets import Secret

CHAIN = "solana"
SOL = 10**9
USDC = 10**6


@dataclass
class Agent:
    id: int
    keypair: Keypair  # the derived deposit key, so tests can send funds out of it

    @property
    def pubkey(self) -> Pubkey:
        return self.keypair.pubkey()


@dataclass
class World:
    sim: SolanaSimulator
    usdc: Pubkey
    payer: Keypair
    deriver: SolanaSeedDeriver


@pytest.fixture
def world() -> Iterator[World]:
    with SolanaSimulator(skip_every_slots=7) as sim:
        usdc = sim.create_usdc_mint()
        payer = Keypair()
        sim.airdrop(payer.pubkey(), 100 * SOL)
        sim.mint_to(usdc, payer.pubkey(), 1_000 * USDC)
        deriver = SolanaSeedDeriver(Secret(os.urandom(64)), usdc_mint=str(usdc))
        yield World(sim, usdc, payer, deriver)


def settings_for(world: World, urls: Sequence[str], threshold: int) -> SolanaSettings:
    return SolanaSettings(
        name=CHAIN,
        rpc_urls=list(urls),
        usdc_mint=str(world.usdc),
        block_scan_threshold=threshold,
        signatures_page_limit=2,  # tiny pages, so paging is exercised
        start_slot=0,  # the history is sent before the first poll
    )


def make_poller(
    world: World,
    sessions: sessionmaker[Session],
    *,
    strategy: str = PER_ADDRESS,
    urls: Sequence[str] | None = None,
    sink: LedgerDepositSink | None = None,
    blocks_per_commit: int = 50,
) -> SolanaPoller:
    threshold = 1 if strategy == BLOCK_SCAN else 1000
    rpc_urls = list(urls) if urls is not None else [world.sim.url]
    source = SolanaRpcSource(rpc_urls, timeout_s=5, max_rounds=2, backoff_base_s=0.01)
    return SolanaPoller(
        settings_for(world, rpc_urls, threshold),
        source,
        sessions,
        sink or LedgerDepositSink(),
        blocks_per_commit=blocks_per_commit,
    )


def add_agents(world: World, sessions: sessionmaker[Session], names: Sequence[str]) -> list[Agent]:
    agents = []
    with sessions() as session, session.begin():
        for name in names:
            agent = get_or_create_agent(session, name)
            session.flush()
            row = allocate_deposit_address(session, agent.id, "solana", world.deriver)
            agents.append(Agent(agent.id, world.deriver.keypair(row.derivation_index)))
    return agents


def balance(sessions: sessionmaker[Session], agent: Agent, asset: str) -> int:
    with sessions() as session, session.begin():
        return ledger.balance(session, accounts.agent_available(session, agent.id, asset))


def deposits(sessions: sessionmaker[Session]) -> list[tuple[str, int, int, int, str]]:
    with sessions() as session:
        rows = session.scalars(select(Deposit).order_by(Deposit.id)).all()
        return sorted((d.tx_hash, d.log_index, d.agent_id, d.amount, d.status) for d in rows)


def assert_books_clean(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        assert ledger.check(session) == []
        report = audit.verify(session)
        assert report.ok, report.first_problem


def send_failing_transfer(world: World, to: Pubkey) -> str:
    """A transfer of more lamports than the sender has, sent without preflight: it lands
    with meta.err and only its fee charged."""
    poor = Keypair()
    world.sim.airdrop(poor.pubkey(), SOL // 100)
    ix = transfer(TransferParams(from_pubkey=poor.pubkey(), to_pubkey=to, lamports=50 * SOL))
    message = Message.new_with_blockhash([ix], poor.pubkey(), world.sim.latest_blockhash())
    raw = bytes(VersionedTransaction(message, [poor]))
    return str(world.sim.send_transaction(raw, skip_preflight=True))


def send_sol_to_many(world: World, recipients: Sequence[tuple[Pubkey, int]]) -> str:
    ixs = [
        transfer(TransferParams(from_pubkey=world.payer.pubkey(), to_pubkey=to, lamports=amount))
        for to, amount in recipients
    ]
    message = Message.new_with_blockhash(ixs, world.payer.pubkey(), world.sim.latest_blockhash())
    return str(world.sim.send_transaction(bytes(VersionedTransaction(message, [world.payer]))))


def build_history(world: World, agents: Sequence[Agent]) -> dict[str, int]:
    """Deposits and non-deposits of every kind; returns the expected credit per
    (agent name, asset) key: "<agent index>:<asset>"."""
    sim, usdc, payer = world.sim, world.usdc, world.payer
    a, b = agents[0], agents[1]
    sim.transfer_sol(payer, a.pubkey, 2 * SOL)
    sim.advance_slots(1)
    # The recipient's token account is created in its own transaction first, so the
    # transfer itself lists A's token account but not A's wallet.
    usdc_to_a = sim.transfer_token(payer, usdc, a.pubkey, 5 * USDC)
    recorded = sim.chain.transaction(usdc_to_a)
    assert recorded is not None and a.pubkey not in recorded.account_keys
    sim.mint_to(usdc, b.pubkey, 1 * USDC)
    send_sol_to_many(world, [(a.pubkey, 3 * SOL // 10), (b.pubkey, SOL // 10)])
    sim.advance_slots(3)
    fake = sim.create_mint(6)
    sim.mint_to(fake, payer.pubkey(), 500 * USDC)
    sim.transfer_token(payer, fake, b.pubkey, 77 * USDC)  # a fake "USDC": ignored
    send_failing_transfer(world, a.pubkey)  # failed: never credited
    sim.advance_slots(2)
    sim.transfer_sol(a.keypair, payer.pubkey(), SOL // 2)  # out of A: not a deposit
    sim.transfer_token(a.keypair, usdc, payer.pubkey(), 1 * USDC)  # out of A: not a deposit
    sim.advance_slots(2)
    return {
        "0:SOL": 2 * SOL + 3 * SOL // 10,
        "0:USDC": 5 * USDC,
        "1:SOL": SOL // 10,
        "1:USDC": 1 * USDC,
    }


def assert_credited(
    sessions: sessionmaker[Session], agents: Sequence[Agent], expected: dict[str, int]
) -> None:
    got = {
        f"{i}:{asset}": balance(sessions, agent, asset)
        for i, agent in enumerate(agents)
        for asset in ("SOL", "USDC")
    }
    assert got == expected


ZERO = {"0:SOL": 0, "0:USDC": 0, "1:SOL": 0, "1:USDC": 0}


@pytest.mark.parametrize("strategy", [PER_ADDRESS, BLOCK_SCAN])
def test_deposits_credited_once_at_finalized(world: World, engine: Engine, strategy: str) -> None:
    sessions = make_session_factory(engine)
    agents = add_agents(world, sessions, ["alice", "bob"])
    expected = build_history(world, agents)
    poller = make_poller(world, sessions, strategy=strategy)

    found = poller.poll_once()
    assert found.error is None and found.strategy == strategy
    # SOL x2 for A (two transactions), SOL + USDC for B, USDC for A.
    assert found.deposits_found == 5
    assert {d[4] for d in deposits(sessions)} == {DepositStatus.PENDING}
    assert poller.confirm_once().confirmed == 0  # confirmed is not finalized
    assert_credited(sessions, agents, ZERO)

    world.sim.finalize_all()
    for _ in range(2):  # polling and confirming again changes nothing
        assert poller.poll_once().deposits_found == 0
        poller.confirm_once()
    assert_credited(sessions, agents, expected)
    assert {d[4] for d in deposits(sessions)} == {DepositStatus.CONFIRMED}
    assert len(deposits(sessions)) == 5
    assert_books_clean(sessions)
    with sessions() as session:
        actions = session.scalars(select(AuditLog.action)).all()
    # One sighting and one credit per deposit, however often it was polled.
    assert actions.count("deposit_seen") == 5
    assert actions.count("ledger_deposit") == 5


def sqlite_copy(template: Path, path: Path) -> sessionmaker[Session]:
    shutil.copyfile(template, path)
    return make_session_factory(make_engine(f"sqlite:///{path}"))


def test_both_strategies_find_the_same_deposits(
    world: World, sqlite_template: Path, tmp_path: Path
) -> None:
    per_address_db = sqlite_copy(sqlite_template, tmp_path / "per_address.db")
    block_scan_db = sqlite_copy(sqlite_template, tmp_path / "block_scan.db")
    agents = add_agents(world, per_address_db, ["alice", "bob"])
    assert add_agents(world, block_scan_db, ["alice", "bob"]) == agents
    build_history(world, agents)
    world.sim.finalize_all()

    found = {}
    for name, sessions in (("per_address", per_address_db), ("block_scan", block_scan_db)):
        poller = make_poller(world, sessions, strategy=name, blocks_per_commit=3)
        assert poller.poll_once().error is None
        assert poller.confirm_once().confirmed == 5
        found[name] = deposits(sessions)
    assert found["per_address"] == found["block_scan"]
    assert len(found["per_address"]) == 5

    # The watched set outgrew the threshold: switching to block scans from start_slot
    # re-reads the same history and neither records nor credits anything twice.
    switched = make_poller(world, per_address_db, strategy=BLOCK_SCAN)
    assert switched.poll_once().deposits_found == 0
    assert switched.confirm_once().confirmed == 0
    assert deposits(per_address_db) == found["per_address"]


class CrashingSink(LedgerDepositSink):
    """Dies once more than `survive` new deposits were handed over: a crash after
    fetching, before the commit of that batch."""

    def __init__(self, survive: int) -> None:
        super().__init__()
        self.left = survive

    def recorded_many(self, session: Session, deposits: Sequence[StoredDeposit]) -> None:
        if len(deposits) > self.left:
            raise RuntimeError("injected crash before commit")
        self.left -= len(deposits)
        super().recorded_many(session, deposits)


@pytest.mark.parametrize("strategy", [PER_ADDRESS, BLOCK_SCAN])
@pytest.mark.parametrize("survive", [0, 2])
def test_restart_mid_scan_loses_and_doubles_nothing(
    world: World, sessions: sessionmaker[Session], strategy: str, survive: int
) -> None:
    agents = add_agents(world, sessions, ["alice", "bob"])
    expected = build_history(world, agents)
    world.sim.finalize_all()

    crashing = make_poller(
        world, sessions, strategy=strategy, sink=CrashingSink(survive), blocks_per_commit=2
    )
    with pytest.raises(RuntimeError, match="injected crash"):
        crashing.poll_once()
    partial = deposits(sessions)
    assert len(partial) < 5  # the failed batch rolled back with its cursor

    fresh = make_poller(world, sessions, strategy=strategy, blocks_per_commit=2)
    assert fresh.poll_once().deposits_found == 5 - len(partial)
    assert fresh.confirm_once().confirmed == 5
    assert_credited(sessions, agents, expected)

    # Forgetting every cursor and rescanning from scratch finds the same deposits again:
    # each (chain, signature, index) is stored and credited once.
    with sessions() as session, session.begin():
        for cursor in session.scalars(select(ChainCursor)):
            session.delete(cursor)
    again = make_poller(world, sessions, strategy=strategy)
    assert again.poll_once().deposits_found == 0
    assert again.confirm_once().confirmed == 0
    assert_credited(sessions, agents, expected)
    assert_books_clean(sessions)


def dead_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def sample(name: str, chain: str = CHAIN) -> float:
    return REGISTRY.get_sample_value(name, {"chain": chain}) or 0.0


@pytest.mark.parametrize("strategy", [PER_ADDRESS, BLOCK_SCAN])
def test_failover_to_the_second_url_and_all_dead_keeps_the_cursor(
    world: World, sessions: sessionmaker[Session], strategy: str
) -> None:
    agents = add_agents(world, sessions, ["alice", "bob"])
    expected = build_history(world, agents)
    world.sim.finalize_all()

    dead = make_poller(world, sessions, strategy=strategy, urls=[dead_url()])
    errors_before = sample("escrowd_solana_rpc_errors_total")
    failed = dead.poll_once()
    assert failed.error is not None and "failed on all 1 Solana RPC URL" in failed.error
    assert dead.confirm_once().error is not None
    assert sample("escrowd_solana_rpc_errors_total") == errors_before + 2
    with sessions() as session:
        assert session.scalars(select(ChainCursor)).all() == []
    assert deposits(sessions) == []

    urls = [dead_url(), world.sim.url]
    # One round: the dead URL, then the live one.
    settings = settings_for(world, urls, 1 if strategy == BLOCK_SCAN else 1000).model_copy(
        update={"rpc_max_retries": 0}
    )
    poller = SolanaPoller(settings, rpc_source(settings), sessions, LedgerDepositSink())
    assert poller.poll_once().deposits_found == 5
    assert poller.confirm_once().confirmed == 5
    assert_credited(sessions, agents, expected)
    assert sample("escrowd_solana_slots_behind") == 0


@pytest.mark.parametrize("strategy", [PER_ADDRESS, BLOCK_SCAN])
def test_transaction_of_a_dropped_block_is_orphaned_only_once_it_cannot_land(
    world: World, sessions: sessionmaker[Session], strategy: str
) -> None:
    """A fork drops the block a deposit was seen in. The deposit stays pending while its
    blockhash could still land it elsewhere and until two reads agree it is absent; the
    same signed transaction landing again later is credited once, at its new slot."""
    agents = add_agents(world, sessions, ["alice", "bob"])
    kept = str(world.sim.transfer_sol(world.payer, agents[1].pubkey, 1 * SOL))
    world.sim.advance_slots(1)
    lost = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, 4 * SOL))
    world.sim.advance_slots(1)
    moved_tx = world.sim.chain.transaction(Signature.from_string(lost))
    assert moved_tx is not None
    poller = make_poller(world, sessions, strategy=strategy)
    assert poller.poll_once().deposits_found == 2

    assert world.sim.drop_blocks(moved_tx.slot) == [Signature.from_string(lost)]
    assert world.sim.chain.transaction(Signature.from_string(lost)) is None
    relanded_sig = str(world.sim.transfer_sol(world.payer, agents[1].pubkey, 2 * SOL))
    # The confirmed slot went back with the fork: polls wait until it passes what they saw.
    assert poller.poll_once().error is not None
    world.sim.advance_slots(4)
    assert poller.poll_once().error is None
    world.sim.finalize_all()
    assert poller.poll_once().error is None
    first = poller.confirm_once()
    # Kept and the new deposit are final; the dropped one may still land: it waits.
    assert (first.confirmed, first.orphaned, first.waiting) == (2, 0, 1)

    world.sim.advance_slots(200)  # more than a blockhash's lifetime of blocks
    world.sim.finalize_all()
    second = poller.confirm_once()
    assert (second.confirmed, second.orphaned, second.waiting) == (0, 0, 1)  # absent once
    world.sim.advance_slots(3)
    third = poller.confirm_once()
    assert (third.confirmed, third.orphaned) == (0, 1)  # absent again, at a later slot
    statuses = {d[0]: d[4] for d in deposits(sessions)}
    assert statuses == {
        lost: DepositStatus.ORPHANED,
        kept: DepositStatus.CONFIRMED,
        relanded_sig: DepositStatus.CONFIRMED,
    }
    assert balance(sessions, agents[0], "SOL") == 0
    assert balance(sessions, agents[1], "SOL") == 3 * SOL
    assert_books_clean(sessions)


def test_the_same_transaction_landing_again_after_a_fork_is_credited_once(
    world: World, sessions: sessionmaker[Session]
) -> None:
    agents = add_agents(world, sessions, ["alice", "bob"])
    # Signed against a block that survives the fork, so it can land again after it.
    ix = transfer(
        TransferParams(
            from_pubkey=world.payer.pubkey(), to_pubkey=agents[0].pubkey, lamports=3 * SOL
        )
    )
    message = Message.new_with_blockhash([ix], world.payer.pubkey(), world.sim.latest_blockhash())
    raw = bytes(VersionedTransaction(message, [world.payer]))
    world.sim.advance_slots(1)
    sig = world.sim.send_transaction(raw)
    record = world.sim.chain.transaction(sig)
    assert record is not None
    world.sim.advance_slots(1)
    poller = make_poller(world, sessions, strategy=BLOCK_SCAN)
    assert poller.poll_once().deposits_found == 1
    world.sim.drop_blocks(record.slot)
    # The sender broadcasts the same signed bytes again: they land in a later block.
    world.sim.send_transaction(raw)
    landed = world.sim.chain.transaction(sig)
    assert landed is not None and landed.slot > record.slot
    world.sim.finalize_all()
    assert poller.poll_once().deposits_found == 0  # the same (signature, index)
    assert poller.confirm_once().confirmed == 1
    with sessions() as session:
        deposit = session.scalars(select(Deposit)).one()
    assert (deposit.status, deposit.block_number) == (DepositStatus.CONFIRMED, landed.slot)
    assert balance(sessions, agents[0], "SOL") == 3 * SOL
    assert_books_clean(sessions)


class LaggingSource(SolanaRpcSource):
    """A node that has not got the blocks from `missing_from` on yet."""

    missing_from: int | None = None

    def get_block(
        self,
        slot: int,
        commitment: Commitment = "finalized",
        *,
        transaction_details: TransactionDetails = "full",
    ) -> SolanaBlock:
        if self.missing_from is not None and slot >= self.missing_from:
            raise BlockNotAvailable(f"Block not available for slot {slot}", code=-32004)
        return super().get_block(slot, commitment, transaction_details=transaction_details)


def test_block_scan_passes_skipped_slots_and_stops_at_unavailable(
    world: World, sessions: sessionmaker[Session]
) -> None:
    agents = add_agents(world, sessions, ["alice", "bob"])
    early = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, SOL))
    world.sim.advance_slots(20)  # slots 7, 14, 21 are skipped
    late = str(world.sim.transfer_sol(world.payer, agents[1].pubkey, 2 * SOL))
    recorded = world.sim.chain.transaction(Signature.from_string(late))
    assert recorded is not None
    late_slot = recorded.slot
    world.sim.advance_slots(3)
    source = LaggingSource([world.sim.url], timeout_s=5, max_rounds=1)
    source.missing_from = late_slot
    settings = settings_for(world, [world.sim.url], threshold=1)
    poller = SolanaPoller(settings, source, sessions, LedgerDepositSink(), blocks_per_commit=4)

    first = poller.poll_once()
    assert first.error is None and first.strategy == BLOCK_SCAN
    assert first.scanned_through_slot is not None
    assert first.scanned_through_slot < late_slot  # never past a missing block
    assert [d[0] for d in deposits(sessions)] == [early]

    source.missing_from = None
    second = poller.poll_once()
    assert second.scanned_through_slot == source.get_slot("confirmed")
    assert sorted(d[0] for d in deposits(sessions)) == sorted([early, late])
    # A skip is known only once finalized: above that a node says "not available".
    with pytest.raises(BlockNotAvailable) as above:
        source.get_block(7, "confirmed")
    assert above.value.code == -32004
    world.sim.finalize_all()
    with pytest.raises(SlotSkipped) as below:
        source.get_block(7, "confirmed")
    assert below.value.code == -32007
    assert poller.poll_once().deposits_found == 0


@pytest.mark.parametrize("same_amount", [True, False])
def test_transaction_finalized_in_another_slot_is_checked_there(
    world: World, sessions: sessionmaker[Session], same_amount: bool
) -> None:
    """A deposit first seen in a block that was dropped, its transaction landing again in
    a later slot: credited with the finalized slot and hash if it still pays the same,
    orphaned if not."""
    agents = add_agents(world, sessions, ["alice", "bob"])
    sig = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, 3 * SOL))
    world.sim.finalize_all()
    poller = make_poller(world, sessions)
    assert poller.poll_once().deposits_found == 1
    with sessions() as session, session.begin():
        deposit = session.scalars(select(Deposit)).one()
        real_slot, real_hash = deposit.block_number, deposit.block_hash
        deposit.block_number, deposit.block_hash = real_slot - 1, "dropped-fork-hash"
        if not same_amount:
            deposit.amount += 1

    result = poller.confirm_once()
    with sessions() as session:
        deposit = session.scalars(select(Deposit)).one()
    if same_amount:
        assert (result.confirmed, result.orphaned) == (1, 0)
        assert (deposit.block_number, deposit.block_hash) == (real_slot, real_hash)
        assert balance(sessions, agents[0], "SOL") == 3 * SOL
    else:
        assert (result.confirmed, result.orphaned) == (0, 1)
        assert deposit.status == DepositStatus.ORPHANED and deposit.tx_hash == sig
        assert balance(sessions, agents[0], "SOL") == 0
    assert_books_clean(sessions)


class ReplicaBehind(SolanaRpcSource):
    """Lists signatures but cannot serve some transactions yet (a lagging replica)."""

    unserved: frozenset[str] = frozenset()

    def get_transaction(
        self, signature: str, commitment: Commitment = "finalized"
    ) -> SolanaTransaction | None:
        if signature in self.unserved:
            return None
        return super().get_transaction(signature, commitment)


def test_per_address_never_moves_past_a_transaction_it_could_not_read(
    world: World, sessions: sessionmaker[Session]
) -> None:
    agents = add_agents(world, sessions, ["alice", "bob"])
    first = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, SOL))
    world.sim.advance_slots(1)
    second = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, 2 * SOL))
    world.sim.advance_slots(1)
    third = str(world.sim.transfer_sol(world.payer, agents[0].pubkey, 3 * SOL))
    world.sim.finalize_all()
    source = ReplicaBehind([world.sim.url], timeout_s=5, max_rounds=1)
    source.unserved = frozenset({second})
    settings = settings_for(world, [world.sim.url], threshold=1000)
    poller = SolanaPoller(settings, source, sessions, LedgerDepositSink())

    assert poller.poll_once().deposits_found == 1
    assert [d[0] for d in deposits(sessions)] == [first]
    with sessions() as session:
        cursor = session.scalars(
            select(ChainCursor).where(ChainCursor.key == str(agents[0].pubkey))
        ).one()
        assert cursor.signature == first

    source.unserved = frozenset()
    assert poller.poll_once().deposits_found == 2
    assert sorted(d[0] for d in deposits(sessions)) == sorted([first, second, third])
    poller.confirm_once()
    assert balance(sessions, agents[0], "SOL") == 6 * SOL
