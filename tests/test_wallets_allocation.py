"""Deposit-address allocation: idempotent per agent, next index per chain, race-safe."""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.models import Agent, DepositAddress
from escrowd.models.db import make_session_factory
from escrowd.wallets.allocation import (
    allocate_deposit_address,
    get_or_create_agent,
    list_deposit_addresses,
)
from escrowd.wallets.errors import InvalidDerivation
from escrowd.wallets.hd import (
    EVM_ACCOUNT_PATH,
    EvmXpubDeriver,
    ExtendedPrivateKey,
    SolanaSeedDeriver,
)
from escrowd.wallets.mnemonic import mnemonic_to_seed
from escrowd.wallets.secrets import Secret

SEED = mnemonic_to_seed(Secret("abandon " * 11 + "about"))
XPUB = ExtendedPrivateKey.from_seed(SEED).derive(EVM_ACCOUNT_PATH).public().serialize()
USDC_MINT = "EPjFWdd5AufqSSqeM2qN1xzybapC8G4wEGGkZwyTDt1v"


@pytest.fixture(scope="module")
def evm() -> EvmXpubDeriver:
    return EvmXpubDeriver(XPUB)


@pytest.fixture(scope="module")
def solana() -> SolanaSeedDeriver:
    return SolanaSeedDeriver(SEED, USDC_MINT)


def _agent(sessions: sessionmaker[Session], external_id: str) -> int:
    with sessions() as session, session.begin():
        return get_or_create_agent(session, external_id).id


def test_same_agent_twice_gets_the_same_address(
    sessions: sessionmaker[Session], evm: EvmXpubDeriver
) -> None:
    agent_id = _agent(sessions, "agent-a")
    with sessions() as session, session.begin():
        first = allocate_deposit_address(session, agent_id, "evm", evm)
        first_values = (first.address, first.derivation_index)
    with sessions() as session, session.begin():
        again = allocate_deposit_address(session, agent_id, "evm", evm)
        assert (again.address, again.derivation_index) == first_values
    assert first_values == ("0x9858EfFD232B4033E47d90003D41EC34EcaEda94", 0)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(DepositAddress)) == 1


def test_agents_get_consecutive_indexes_per_chain_and_solana_gets_its_ata(
    sessions: sessionmaker[Session], evm: EvmXpubDeriver, solana: SolanaSeedDeriver
) -> None:
    ids = [_agent(sessions, f"agent-{i}") for i in range(3)]
    with sessions() as session, session.begin():
        evm_rows = [allocate_deposit_address(session, i, "evm", evm) for i in ids]
        sol_rows = [allocate_deposit_address(session, i, "solana", solana) for i in ids]
    assert [r.derivation_index for r in evm_rows] == [0, 1, 2]
    assert [r.address for r in evm_rows] == evm.addresses(0, 3)
    assert [r.derivation_index for r in sol_rows] == [0, 1, 2]
    assert sol_rows[0].address == "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
    assert all(r.token_account and r.token_account != r.address for r in sol_rows)
    assert all(r.token_account is None for r in evm_rows)
    with sessions() as session:
        listed = list_deposit_addresses(session, "solana")
        assert [r.address for r in listed] == [r.address for r in sol_rows]


def test_wrong_deriver_or_chain_changes_nothing(
    sessions: sessionmaker[Session], evm: EvmXpubDeriver
) -> None:
    agent_id = _agent(sessions, "agent-x")
    with sessions() as session, session.begin():
        with pytest.raises(InvalidDerivation, match="deriver is for"):
            allocate_deposit_address(session, agent_id, "solana", evm)
        with pytest.raises(InvalidDerivation, match="unknown chain"):
            allocate_deposit_address(session, agent_id, "bitcoin", evm)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(DepositAddress)) == 0


def test_get_or_create_agent_is_idempotent(sessions: sessionmaker[Session]) -> None:
    assert _agent(sessions, "same") == _agent(sessions, "same")
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(Agent)) == 1


@pytest.mark.postgres
def test_postgres_16_threads_allocate_for_2000_agents_without_duplicates(
    pg_engine: Engine, evm: EvmXpubDeriver, solana: SolanaSeedDeriver
) -> None:
    sessions = make_session_factory(pg_engine)
    agent_count = 2000
    with sessions() as session, session.begin():
        session.add_all([Agent(external_id=f"load-{i}") for i in range(agent_count)])
    with sessions() as session:
        agent_ids = list(session.scalars(select(Agent.id)))
    # Some agents are asked for twice (in different threads) so same-agent races happen too.
    work = [(a, chain) for a in agent_ids for chain in ("evm", "solana")]
    work = work + work[::-1][:200]
    barrier = threading.Barrier(16)

    def run(chunk: list[tuple[int, str]]) -> list[tuple[int, str, str]]:
        barrier.wait()
        got = []
        for agent_id, chain in chunk:
            deriver = evm if chain == "evm" else solana
            with sessions() as session, session.begin():
                row = allocate_deposit_address(session, agent_id, chain, deriver)
                got.append((agent_id, chain, row.address))
        return got

    chunks = [work[i::16] for i in range(16)]
    # The advisory-lock holder needs the GIL back after each round trip; with the default
    # 5 ms switch interval, 15 busy threads make every round trip cost up to 5 ms.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = [item for part in pool.map(run, chunks) for item in part]
    finally:
        sys.setswitchinterval(switch_interval)
    elapsed = time.perf_counter() - started

    with sessions() as session:
        rows = session.execute(
            select(
                DepositAddress.agent_id,
                DepositAddress.chain,
                DepositAddress.address,
                DepositAddress.derivation_index,
            )
        ).all()
    assert len(rows) == 2 * agent_count
    per_agent = Counter((r.agent_id, r.chain) for r in rows)
    assert set(per_agent) == {(a, c) for a in agent_ids for c in ("evm", "solana")}
    assert set(per_agent.values()) == {1}
    for chain, deriver in (("evm", evm), ("solana", solana)):
        chain_rows = [r for r in rows if r.chain == chain]
        indexes = sorted(r.derivation_index for r in chain_rows)
        assert indexes == list(range(agent_count))  # no duplicates, no gaps
        assert len({r.address for r in chain_rows}) == agent_count
        for r in chain_rows[:50]:
            assert deriver.derive_address(r.derivation_index).address == r.address
    # Every caller, including the repeated asks, saw the row that was stored.
    stored = {(r.agent_id, r.chain): r.address for r in rows}
    assert all(stored[(a, c)] == address for a, c, address in results)
    # Typically 15-25 s on the shared 2-core box. The bound catches a return of the
    # retry storm the advisory lock prevents (that took 110 s), not normal jitter.
    assert elapsed < 60, f"allocation took {elapsed:.1f} s"
