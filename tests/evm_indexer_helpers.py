"""Builders for the EVM indexer tests: chain settings for a test chain, watched agents,
balances and invariant checks."""

from __future__ import annotations

import itertools

from eth_account import Account
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings
from escrowd.escrow import accounts, audit, ledger
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_source import EvmSource
from escrowd.models import Agent, Chain, Deposit, DepositAddress
from tests.evm_fixtures import EvmChain

CHAIN = "testevm"
_index = itertools.count()


def chain_settings(chain: EvmChain, **overrides: object) -> EvmChainSettings:
    values: dict[str, object] = {
        "name": CHAIN,
        "chain_id": chain.source.chain_id(),
        "rpc_urls": [chain.url or "http://127.0.0.1:9"],
        "usdc_address": chain.token.address,
        "confirmations": 3,
        "max_reorg_depth": 8,
        "max_block_window": 100,
    }
    values.update(overrides)
    return EvmChainSettings.model_validate(values)


def make_poller(
    chain: EvmChain,
    sessions: sessionmaker[Session],
    source: EvmSource | None = None,
    **overrides: object,
) -> EvmPoller:
    return EvmPoller(
        chain_settings(chain, **overrides), source or chain.source, sessions, LedgerDepositSink()
    )


def watch(sessions: sessionmaker[Session], address: str | None = None) -> tuple[int, str]:
    """A new agent with a deposit address on the test chain; returns (agent id, address)."""
    address = address or Account.create().address
    index = next(_index)
    with sessions() as session, session.begin():
        agent = Agent(external_id=f"agent-{index}-{address[-6:]}")
        session.add(agent)
        session.flush()
        session.add(
            DepositAddress(
                agent_id=agent.id, chain=Chain.EVM, address=address, derivation_index=index
            )
        )
        return agent.id, address


def available(sessions: sessionmaker[Session], agent_id: int) -> int:
    with sessions() as session:
        return ledger.balance(session, accounts.agent_available(session, agent_id, "USDC"))


def deposits(sessions: sessionmaker[Session]) -> list[Deposit]:
    with sessions() as session:
        return list(session.scalars(select(Deposit).order_by(Deposit.id)))


def assert_books_clean(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        assert ledger.check(session) == []
        report = audit.verify(session)
        assert report.ok, report.first_problem


def poll_until_done(poller: EvmPoller, *, attempts: int = 20) -> None:
    for _ in range(attempts):
        result = poller.poll_once()
        if result.error is None and result.done:
            return
    raise AssertionError(f"poller did not reach the head: {result}")
