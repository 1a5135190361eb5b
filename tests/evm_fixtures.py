"""EVM chain fixtures: an in-process eth-tester chain and a real anvil node, each with
TestUSDC deployed and funded dev accounts. Import them into tests/conftest.py:

    from tests.evm_fixtures import anvil_chain, eth_tester_chain  # noqa: F401
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from web3 import Web3

from escrowd.devnet.anvil import AnvilProcess, find_anvil
from escrowd.devnet.evm import (
    TestUSDC,
    deploy_test_usdc,
    dev_accounts,
    web3_for_tester,
    web3_for_url,
)
from escrowd.indexer.evm_source import EthTesterSource, JsonRpcEvmSource, RetryPolicy

# Every dev account starts with this many micro-USDC (1,000,000 USDC).
INITIAL_TOKEN_BALANCE = 1_000_000 * 10**6


@dataclass
class EvmChain:
    """A running chain: ``accounts[0]`` owns the token (balance 0); accounts[1:] hold
    INITIAL_TOKEN_BALANCE each. ``url`` is set for JSON-RPC chains (anvil)."""

    source: EthTesterSource | JsonRpcEvmSource
    w3: Web3
    token: TestUSDC
    accounts: list[str]
    url: str | None = None


def require_anvil() -> None:
    """Skip when anvil is missing, but fail under CI=true: CI must run the anvil tests."""
    if find_anvil() is not None:
        return
    message = "anvil not found: run `npm ci` in the repo root (or set ESCROWD_ANVIL)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def _fund(token: TestUSDC, accounts: list[str]) -> None:
    # One mint and one batch transfer: two transactions instead of one per account.
    holders = accounts[1:]
    token.mint(token.owner, INITIAL_TOKEN_BALANCE * len(holders))
    token.batch_transfer(token.owner, holders, [INITIAL_TOKEN_BALANCE] * len(holders))


@pytest.fixture
def eth_tester_chain() -> EvmChain:
    source = EthTesterSource()
    w3 = web3_for_tester(source.tester)
    token = deploy_test_usdc(w3)
    accounts = dev_accounts(w3)
    _fund(token, accounts)
    return EvmChain(source=source, w3=w3, token=token, accounts=accounts)


@pytest.fixture
def anvil_chain() -> Iterator[EvmChain]:
    require_anvil()
    with AnvilProcess() as anvil, requests.Session() as session:
        w3 = web3_for_url(anvil.url, session=session)
        token = deploy_test_usdc(w3)
        accounts = dev_accounts(w3)
        _fund(token, accounts)
        policy = RetryPolicy(timeout_s=5.0, attempts_per_url=3, backoff_base_s=0.05)
        with JsonRpcEvmSource([anvil.url], policy=policy, chain="anvil") as source:
            yield EvmChain(source=source, w3=w3, token=token, accounts=accounts, url=anvil.url)
