"""The Solana indexer against a misbehaving node: each fault of a real provider, switched
on in the simulator while deposits of every kind arrive, in both scanning modes, through
the real RPC client. While the fault lasts nothing is orphaned or credited twice; once it
stops, every address is credited exactly what the chain (read over RPC) says it holds."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_faults import FaultRule, SolanaFaults
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import audit, ledger
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.solana_indexer import BLOCK_SCAN, PER_ADDRESS, SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models import Deposit, DepositStatus
from escrowd.models.db import make_engine, make_session_factory
from tests.solana_history import Chain, add_agents, chain_totals, credited, send_every_kind


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    # Short finality and frequent skipped slots keep each case to a few dozen slots.
    with SolanaSimulator(skip_every_slots=5, finalized_lag_slots=8) as sim:
        yield Chain.on(sim)


@pytest.fixture(scope="module")
def source(chain: Chain) -> Iterator[SolanaRpcSource]:
    # One client for every case: building one costs about 0.25 s.
    with SolanaRpcSource(
        [chain.sim.url], timeout_s=5, max_rounds=2, backoff_base_s=0.01, retry_after_max_s=0.01
    ) as rpc:
        yield rpc


@pytest.fixture
def sim(chain: Chain) -> Iterator[SolanaSimulator]:
    yield chain.sim
    chain.sim.faults.clear()


@dataclass(frozen=True)
class Fault:
    name: str
    switch: Callable[[SolanaFaults], None]
    # The kind `SolanaFaults.injected` counts, to prove the fault was exercised.
    counted: str
    # The scanning modes that make the faulted request.
    strategies: tuple[str, ...] = (PER_ADDRESS, BLOCK_SCAN)


def rule(kind: str, *methods: str, **fields: int) -> Callable[[SolanaFaults], None]:
    def switch(faults: SolanaFaults) -> None:
        faults.add(FaultRule(kind, methods=frozenset(methods) or None, **fields))

    return switch


def error_on_blocks(code: int) -> Fault:
    # Every second getBlock answers the code: for a block that exists, as providers do.
    return Fault(str(code), rule("error", "getBlock", code=code, every=2), "error")


FAULTS = [
    Fault("lagging_replica", lambda f: f.set_lag(6), "lag"),
    Fault("load_balancer", lambda f: f.set_lag(6, alternate=True), "lag"),
    # Block scanning reads transactions from getBlock and asks getTransaction only after a
    # status miss, which null_status_and_transaction makes.
    Fault("null_transaction", rule("null", "getTransaction", every=2), "null", (PER_ADDRESS,)),
    Fault(
        "null_status_and_transaction",
        rule("null", "getSignatureStatuses", "getTransaction"),
        "null",
    ),
    Fault("null_block", rule("null", "getBlock", every=2), "null"),
    Fault("empty_before_page", rule("empty_before"), "empty_before"),
    Fault("http_429", rule("http_429", every=3, retry_after_s=1), "http_429"),
    error_on_blocks(-32001),
    error_on_blocks(-32004),
    error_on_blocks(-32007),
    error_on_blocks(-32009),
    error_on_blocks(-32014),
    Fault(
        "-32016",
        rule(
            "error",
            "getSlot",
            "getMultipleAccounts",
            "getSignaturesForAddress",
            code=-32016,
            every=2,
        ),
        "error",
    ),
]


def poller_for(
    chain: Chain, source: SolanaRpcSource, sessions: sessionmaker[Session], strategy: str
) -> SolanaPoller:
    settings = SolanaSettings(
        name="solana",
        rpc_urls=[chain.sim.url],
        usdc_mint=str(chain.usdc),
        block_scan_threshold=1 if strategy == BLOCK_SCAN else 1000,
        signatures_page_limit=2,  # tiny pages: paging (and its overlap) on every account
        token_account_rescan_s=2.0,  # every wallet's token accounts listed each poll
    )
    return SolanaPoller(settings, source, sessions, LedgerDepositSink(), blocks_per_commit=4)


def orphaned(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return list(
            session.scalars(select(Deposit.tx_hash).where(Deposit.status == DepositStatus.ORPHANED))
        )


@pytest.mark.parametrize(
    ("fault", "strategy"),
    [(f, strategy) for f in FAULTS for strategy in f.strategies],
    ids=[f"{f.name}-{strategy}" for f in FAULTS for strategy in f.strategies],
)
def test_deposits_match_the_chain_after_a_fault(
    chain: Chain,
    sim: SolanaSimulator,
    source: SolanaRpcSource,
    sqlite_url: str,
    fault: Fault,
    strategy: str,
) -> None:
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    _, agents = add_agents(sessions, chain, ["a", "b", "c"])
    wallets = [keypair.pubkey() for _, keypair in agents]
    poller = poller_for(chain, source, sessions, strategy)
    assert poller.poll_once().error is None  # a first start: from the finalized slot on

    fault.switch(sim.faults)
    send_every_kind(chain, wallets)
    for finalize in (False, True, False):
        if finalize:
            sim.finalize_all()
        sim.advance_slots(2)
        poller.poll_once()
        poller.confirm_once()
        assert orphaned(sessions) == []
    assert sim.faults.injected[fault.counted] > 0

    sim.faults.clear()
    sim.finalize_all()
    for _ in range(2):
        assert poller.poll_once().error is None
        assert poller.confirm_once().error is None
        sim.advance_slots(1)
    expected = chain_totals(poller.source, chain.usdc, wallets)
    assert all(expected.values())  # every address got SOL and USDC
    assert credited(sessions, [agent_id for agent_id, _ in agents]) == expected
    assert orphaned(sessions) == []
    with sessions() as session:
        assert ledger.check(session) == []
        assert audit.verify(session).ok
    engine.dispose()
