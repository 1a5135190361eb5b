"""Where Solana scanning starts and continues, which token accounts are deposits, and what
a per-address poll costs, on a simulator at mainnet's slot height (about 4x10^8)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.solana_indexer import BLOCK_SCAN, PER_ADDRESS, SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.models import ChainCursor, Deposit
from escrowd.models.db import make_engine, make_session_factory
from tests.solana_history import SOL, USDC, Chain, add_agents, chain_totals, credited

MAINNET_SLOT = 400_000_000


@pytest.fixture(scope="module")
def chain() -> Iterator[Chain]:
    with SolanaSimulator(first_slot=MAINNET_SLOT, skip_every_slots=5, finalized_lag_slots=8) as sim:
        yield Chain.on(sim)


@pytest.fixture(scope="module")
def source(chain: Chain) -> Iterator[SolanaRpcSource]:
    with SolanaRpcSource([chain.sim.url], timeout_s=5, max_rounds=1) as rpc:
        yield rpc


def poller_for(
    chain: Chain,
    source: SolanaRpcSource,
    sessions: sessionmaker[Session],
    *,
    threshold: int,
    **settings: object,
) -> SolanaPoller:
    config = SolanaSettings(
        name="solana",
        rpc_urls=[chain.sim.url],
        usdc_mint=str(chain.usdc),
        block_scan_threshold=threshold,
        **settings,  # type: ignore[arg-type]
    )
    return SolanaPoller(config, source, sessions, LedgerDepositSink())


def chain_cursor(sessions: sessionmaker[Session]) -> int | None:
    with sessions() as session:
        return session.scalar(select(ChainCursor.block_number).where(ChainCursor.key == ""))


def settle(chain: Chain, poller: SolanaPoller) -> None:
    chain.sim.finalize_all()
    for _ in range(2):
        assert poller.poll_once().error is None
        assert poller.confirm_once().error is None


def test_first_block_scan_starts_at_the_finalized_slot(
    chain: Chain, source: SolanaRpcSource, sqlite_url: str
) -> None:
    sessions = make_session_factory(make_engine(sqlite_url))
    [(agent_id, keypair)] = add_agents(sessions, chain, ["a"])[1]
    poller = poller_for(chain, source, sessions, threshold=1)
    calls_before = source.calls.total()
    finalized = source.get_slot("finalized")
    first = poller.poll_once()
    assert first.error is None and first.strategy == BLOCK_SCAN
    # From the finalized slot to the confirmed one: a few slots, not 4x10^8 from 0.
    cursor = chain_cursor(sessions)
    assert cursor is not None and finalized <= cursor <= source.get_slot("confirmed")
    assert first.blocks_scanned <= cursor - finalized
    assert source.calls.total() - calls_before < 20

    chain.send([chain.sol(keypair.pubkey(), 3 * SOL)])
    chain.sim.advance_slots(2)
    assert poller.poll_once().deposits_found == 1
    settle(chain, poller)
    assert credited(sessions, [agent_id]) == chain_totals(source, chain.usdc, [keypair.pubkey()])


def test_a_start_slot_the_node_has_pruned_is_refused(sqlite_url: str) -> None:
    with SolanaSimulator(first_slot=1_000, skip_every_slots=None, finalized_lag_slots=4) as sim:
        chain = Chain.on(sim)
        sim.advance_slots(40)
        pruned_below = sim.prune_history(1_020)
        sessions = make_session_factory(make_engine(sqlite_url))
        [(agent_id, keypair)] = add_agents(sessions, chain, ["a"])[1]
        chain.send([chain.sol(keypair.pubkey(), SOL)])  # before the first poll
        sim.advance_slots(2)
        with SolanaRpcSource([sim.url], timeout_s=5, max_rounds=1) as rpc:
            stops = REGISTRY.get_sample_value(
                "escrowd_solana_scan_stops_total", {"chain": "solana", "reason": "history_pruned"}
            )
            early = poller_for(chain, rpc, sessions, threshold=1, start_slot=1_010)
            refused = early.poll_once()
            assert refused.error is not None and "start_slot 1010" in refused.error
            assert str(pruned_below) in refused.error
            assert chain_cursor(sessions) is None
            after = REGISTRY.get_sample_value(
                "escrowd_solana_scan_stops_total", {"chain": "solana", "reason": "history_pruned"}
            )
            assert (after or 0) == (stops or 0) + 1

            poller = poller_for(chain, rpc, sessions, threshold=1, start_slot=pruned_below)
            assert poller.poll_once().deposits_found == 1  # scanned from start_slot on
            settle(chain, poller)
            assert credited(sessions, [agent_id]) == chain_totals(
                rpc, chain.usdc, [keypair.pubkey()]
            )


def test_crossing_the_threshold_continues_where_per_address_stood(
    chain: Chain, source: SolanaRpcSource, engine: Engine
) -> None:
    sessions = make_session_factory(engine)
    _, agents = add_agents(sessions, chain, ["a", "b"])
    wallets = [keypair.pubkey() for _, keypair in agents]
    poller = poller_for(chain, source, sessions, threshold=3)
    assert poller.poll_once().strategy == PER_ADDRESS
    chain.send([chain.sol(wallets[0], SOL), chain.sol(wallets[1], 2 * SOL)])
    chain.sim.advance_slots(2)
    seen = poller.poll_once()
    assert seen.deposits_found == 2
    stood = chain_cursor(sessions)
    assert stood is not None and stood == seen.scanned_through_slot

    # After the last per-address poll: a deposit, then a third address crosses the
    # threshold and receives too.
    chain.send([chain.create_ata(wallets[1]), chain.usdc_checked(chain.ata(wallets[1]), 4 * USDC)])
    chain.sim.advance_slots(1)
    _, more = add_agents(sessions, chain, ["c"])
    agents += more
    wallets.append(more[0][1].pubkey())
    chain.send([chain.sol(wallets[2], SOL // 2)])
    chain.sim.advance_slots(2)
    crossed = poller.poll_once()
    assert crossed.strategy == BLOCK_SCAN and crossed.error is None
    assert crossed.deposits_found == 2
    # Only the slots after where the per-address polls stood were read.
    assert 0 < crossed.blocks_scanned <= chain.sim.chain.current_slot() - stood
    settle(chain, poller)
    assert credited(sessions, [a for a, _ in agents]) == chain_totals(source, chain.usdc, wallets)


def test_an_idle_per_address_poll_costs_a_call_per_hundred_accounts(
    chain: Chain, source: SolanaRpcSource, sqlite_url: str
) -> None:
    sessions = make_session_factory(make_engine(sqlite_url))
    _, agents = add_agents(sessions, chain, [f"agent-{i}" for i in range(150)])
    poller = poller_for(chain, source, sessions, threshold=500)
    first = poller.poll_once()
    assert first.error is None and first.rpc_requests is not None
    # 300 accounts (wallets and their ATAs): 3 getMultipleAccounts, 1 getSlot, and the
    # token accounts of 1 wallet in rotation; accounts that never existed are not paged.
    # The first poll also reads where to start (the finalized slot and its block).
    assert first.rpc_requests <= 7
    idle = poller.poll_once()
    assert idle.rpc_requests == 5

    a, b = agents[7][1].pubkey(), agents[42][1].pubkey()
    chain.send([chain.sol(a, SOL)])
    chain.send([chain.create_ata(b), chain.usdc_checked(chain.ata(b), 2 * USDC)])
    chain.sim.advance_slots(2)
    pages_before = source.calls["getSignaturesForAddress"]
    busy = poller.poll_once()
    assert busy.deposits_found == 2 and busy.accounts_checked == 2
    assert source.calls["getSignaturesForAddress"] - pages_before == 2
    assert busy.rpc_requests is not None and busy.rpc_requests <= 14


@pytest.mark.parametrize("strategy", [PER_ADDRESS, BLOCK_SCAN])
def test_usdc_in_a_token_account_other_than_the_ata_is_credited(
    chain: Chain, source: SolanaRpcSource, sqlite_url: str, strategy: str
) -> None:
    sessions = make_session_factory(make_engine(sqlite_url))
    _, agents = add_agents(sessions, chain, ["a", "b"])
    wallets = [keypair.pubkey() for _, keypair in agents]
    # Two wallets, one listed per poll: every token account is found within two polls.
    poller = poller_for(chain, source, sessions, threshold=1 if strategy == BLOCK_SCAN else 10)
    assert poller.poll_once().error is None
    other = chain.other_token_account(wallets[0])
    chain.send([chain.usdc_checked(other, 6 * USDC)])
    chain.send([chain.create_ata(wallets[0]), chain.usdc_checked(chain.ata(wallets[0]), USDC)])
    chain.sim.advance_slots(2)
    found = sum(poller.poll_once().deposits_found for _ in range(3))
    assert found == 2
    with sessions() as session:
        amounts = sorted(session.scalars(select(Deposit.amount)))
    assert amounts == [USDC, 6 * USDC]
    settle(chain, poller)
    totals = chain_totals(source, chain.usdc, wallets)
    assert totals["0:USDC"] == 7 * USDC
    assert credited(sessions, [a for a, _ in agents]) == totals
