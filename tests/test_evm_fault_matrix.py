"""The EVM indexer under a faulty node: anvil behind the fault-injecting proxy
(devnet/rpc_proxy.py), the real JsonRpcEvmSource, poller and confirmation step, SQLite.

Each fault runs twice on one database: alone, then combined with a real reorg (a snapshot
reverted, one deposit mined again one block later, another dropped), deposits spread over
many blocks. After each phase the fault stops and two polls run; then per address the
credited total equals the chain's own Transfer logs, every deposit.orphaned event and every
reversal is of a block whose hash really changed (none at all without the reorg), and
neither poll reported an error.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import requests
from eth_typing import HexStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import (
    deploy_test_usdc,
    dev_accounts,
    mine_blocks,
    revert,
    snapshot,
    web3_for_url,
)
from escrowd.devnet.rpc_proxy import RANGE_WORDINGS, Fault, RpcProxy
from escrowd.indexer.errors import RpcError
from escrowd.indexer.evm_poller import EvmPoller, PollResult
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.models import AuditLog, LedgerTransfer, TransferCode, WebhookEvent
from escrowd.models.db import make_engine, make_session_factory
from tests.evm_fixtures import EvmChain, require_anvil
from tests.evm_indexer_helpers import CHAIN, assert_books_clean, available, make_poller, watch

pytestmark = pytest.mark.anvil

CONFIRMATIONS = 2
# Short timeouts (a hang costs one), Retry-After up to 1 s waited for in place.
POLICY = RetryPolicy(timeout_s=0.5, attempts_per_url=2, backoff_base_s=0.01, backoff_max_s=1.0)
ADDRESSES = 3


@dataclass(frozen=True)
class Case:
    name: str
    faults: Callable[[], list[Fault]]
    # Two upstreams (the same node), each request to one at random: a load balancer.
    balanced: bool = False


CASES = [
    Case("head_logs_incomplete", lambda: [Fault.of("head_logs_incomplete", times=4)]),
    Case("node_behind", lambda: [Fault.of("node_behind", blocks=CONFIRMATIONS + 3)]),
    Case(
        "load_balancer_lagging_replica",
        lambda: [Fault.of("node_behind", blocks=4, upstream=1)],
        balanced=True,
    ),
    # One answer from a replica on another fork (head check, window, headers or the
    # confirmation step's read): never a rollback or an orphaned deposit.
    Case("stale_fork_answer", lambda: [Fault.of("other_fork", depth=2, times=1)]),
    Case("http_429", lambda: [Fault.of("http_status", status=429, retry_after_s=1, times=1)]),
    Case("http_5xx", lambda: [Fault.of("http_status", status=503, times=3)]),
    Case("hang", lambda: [Fault.of("hang", hang_s=5, times=1)]),
    Case("truncated", lambda: [Fault.of("truncated", times=2)]),
    Case("non_json", lambda: [Fault.of("non_json", times=2)]),
    Case(
        "range_refusals",
        lambda: [
            Fault.of("range_refusal", wording="alchemy", max_blocks=2, times=2),
            Fault.of("range_refusal", wording="geth", max_blocks=1),
        ],
    ),
    Case(
        "null_block",
        lambda: [Fault.of("result", value=None, methods=["eth_getBlockByNumber"], times=3)],
    ),
]


@pytest.fixture(scope="module")
def chain() -> Iterator[EvmChain]:
    """One anvil for the module: every case starts at the head the last one left."""
    require_anvil()
    with AnvilProcess() as anvil, requests.Session() as http:
        w3 = web3_for_url(anvil.url, session=http)
        token = deploy_test_usdc(w3)
        accounts = dev_accounts(w3)
        token.mint(accounts[1], 10**15)
        with JsonRpcEvmSource([anvil.url], policy=POLICY, chain="anvil") as source:
            yield EvmChain(source=source, w3=w3, token=token, accounts=accounts, url=anvil.url)


@dataclass
class Drill:
    chain: EvmChain
    sessions: sessionmaker[Session]
    poller: EvmPoller
    start: int
    agents: list[tuple[int, str]]
    errors: list[str] = field(default_factory=list)
    amount: int = 1_000

    def deposit(self, index: int) -> str:
        self.amount += 1
        return self.chain.token.transfer(
            self.chain.accounts[1], self.agents[index % ADDRESSES][1], self.amount
        )

    def tick(self, *, faulty: bool) -> PollResult:
        """One scheduler tick (poll, then confirm). Under a fault an RPC error is a
        reported failure; anything else, or any error once the fault stopped, fails."""
        result = self.poller.poll_once()
        try:
            self.poller.confirm_once()
        except RpcError as exc:
            if not faulty:
                raise
            self.errors.append(f"confirm: {exc}")
        if result.error is not None:
            assert faulty, result.error
            self.errors.append(result.error)
        return result

    def canonical_hashes(self) -> set[str]:
        head = self.chain.source.head()
        numbers = list(range(self.start, head + 1))
        return {h.hash for h in self.chain.source.block_headers(numbers)}

    def check(self, *, reorged: bool) -> None:
        head = self.chain.source.head()
        logs = self.chain.source.get_transfer_logs(self.chain.token.address, self.start, head)
        for agent_id, address in self.agents:
            on_chain = sum(e.amount for e in logs if e.to_addr == address)
            assert available(self.sessions, agent_id) == on_chain, address
        canonical = self.canonical_hashes()
        with self.sessions() as session:
            orphan_rows = list(
                session.scalars(select(AuditLog).where(AuditLog.action == "deposit_orphaned"))
            )
            orphan_events = session.scalars(
                select(WebhookEvent.id).where(WebhookEvent.type == "deposit.orphaned")
            ).all()
            reversed_ids = session.scalars(
                select(LedgerTransfer.ref_id).where(
                    LedgerTransfer.code == TransferCode.DEPOSIT_REVERSAL
                )
            ).all()
        assert len(orphan_events) == len(orphan_rows)
        if not reorged:
            assert orphan_rows == [] and reversed_ids == []
        # Only a block whose hash changed orphans a deposit or reverses its credit.
        for row in orphan_rows:
            assert json.loads(row.details)["block_hash"] not in canonical, row.details
        orphaned_streams = {row.stream for row in orphan_rows}
        for deposit_id in reversed_ids:
            assert f"deposit:{CHAIN}:{deposit_id}" in orphaned_streams
        assert_books_clean(self.sessions)


def _raw_tx(chain: EvmChain, tx_hash: str) -> HexStr:
    raw = chain.w3.provider.make_request("eth_getRawTransactionByHash", [tx_hash])  # type: ignore[arg-type]
    return HexStr(str(raw["result"]))


def _recover(drill: Drill, proxy: RpcProxy, *, reorged: bool) -> None:
    """The fault stops: within two polls everything is credited as the chain says."""
    proxy.clear()
    mine_blocks(drill.chain.w3, CONFIRMATIONS + 1)
    for _ in range(2):
        result = drill.tick(faulty=False)
        assert result.error is None
    assert result.done and result.lag_blocks == 0
    drill.check(reorged=reorged)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_deposits_under_a_fault_alone_and_with_a_reorg(
    chain: EvmChain, sqlite_url: str, case: Case
) -> None:
    assert chain.url is not None
    engine = make_engine(sqlite_url)
    sessions = make_session_factory(engine)
    upstreams = [chain.url, chain.url] if case.balanced else [chain.url]
    mode = "random" if case.balanced else "first"
    with (
        RpcProxy(upstreams, mode=mode) as proxy,
        JsonRpcEvmSource([proxy.url], policy=POLICY, chain=CHAIN) as source,
    ):
        start = chain.source.head() + 1
        poller = make_poller(
            chain, sessions, source, confirmations=CONFIRMATIONS, max_reorg_depth=16
        )
        poller.start_block = start
        drill = Drill(chain, sessions, poller, start, [watch(sessions) for _ in range(ADDRESSES)])
        drill.tick(faulty=False)

        # The fault alone, deposits in six blocks, one poll after each.
        for fault in case.faults():
            proxy.add(fault)
        for i in range(6):
            drill.deposit(i)
            drill.tick(faulty=True)
        _recover(drill, proxy, reorged=False)

        # The fault and a real reorg: A is mined again one block later, B is dropped.
        for fault in case.faults():
            proxy.add(fault)
        fork = snapshot(chain.w3)
        moved = drill.deposit(0)
        drill.tick(faulty=True)
        drill.deposit(1)
        drill.tick(faulty=True)
        mine_blocks(chain.w3, CONFIRMATIONS)
        drill.tick(faulty=True)
        raw = _raw_tx(chain, moved)
        revert(chain.w3, fork)
        mine_blocks(chain.w3, 1)
        chain.w3.eth.send_raw_transaction(raw)
        drill.deposit(2)
        mine_blocks(chain.w3, CONFIRMATIONS + 2)
        for _ in range(3):
            drill.tick(faulty=True)
        _recover(drill, proxy, reorged=True)
    engine.dispose()


def test_every_provider_range_wording_is_understood() -> None:
    from escrowd.indexer.errors import RangeTooLarge
    from escrowd.indexer.evm_source import classify_rpc_error

    for wording, (code, template, suggests) in RANGE_WORDINGS.items():
        message = template.format(max=100, start="0x10", end="0x73")
        error = classify_rpc_error({"code": code, "message": message})
        assert isinstance(error, RangeTooLarge), wording
        assert error.suggested_to_block == (0x73 if suggests else None), wording
