"""A deposit's credit through a reorg deeper than the confirmation depth, on anvil: the
reversal takes back what the agent still has, the deposit says what happened (reversed,
or reversed short by N) in its row, the API's read and its webhook, and when the
transaction is mined again the deposit ends in one state: confirmed at its new block with
its whole value standing once, whether it came back at the same log index or another."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from eth_typing import HexStr
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.evm import _rpc, mine_blocks, revert, snapshot
from escrowd.escrow import accounts, ledger, service
from escrowd.escrow.deposits import credit_view
from escrowd.models import AccountKind, Deposit, TransferCode, WebhookEvent
from escrowd.models.db import make_engine, make_session_factory
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import (
    assert_books_clean,
    available,
    make_poller,
    poll_until_done,
    watch,
)

pytestmark = pytest.mark.anvil
AMOUNT = 7_000_000


@pytest.fixture
def lite(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def _spend(sessions: sessionmaker[Session], agent_id: int, amount: int) -> None:
    """The agent moves part of its balance on (an escrow, a withdrawal) before the reorg."""
    with sessions() as s, s.begin():
        ledger.post(
            s,
            [
                ledger.TransferSpec(
                    "spent-before-the-reorg",
                    accounts.agent_available(s, agent_id, "USDC").id,
                    ledger.get_or_create_account(s, AccountKind.GENERAL, "elsewhere", "USDC").id,
                    amount,
                    TransferCode.ADJUSTMENT,
                    "test",
                    "spend",
                )
            ],
            actor="test",
        )


def _deposits(sessions: sessionmaker[Session], agent_id: int) -> list[Deposit]:
    with sessions() as s:
        return list(s.scalars(select(Deposit).where(Deposit.agent_id == agent_id)))


def _events(sessions: sessionmaker[Session], event_type: str) -> list[dict[str, object]]:
    with sessions() as s:
        return [
            json.loads(e.payload)["data"]
            for e in s.scalars(
                select(WebhookEvent)
                .where(WebhookEvent.type == event_type)
                .order_by(WebhookEvent.id)
            )
        ]


def _credited_then_reorged(
    chain: EvmChain, sessions: sessionmaker[Session], spent: int
) -> tuple[int, HexStr, object]:
    """A deposit credited at the confirmation depth, part of it spent, then a longer fork
    without it: returns (agent id, the raw transaction, the poller)."""
    agent, address = watch(sessions)
    poller = make_poller(chain, sessions, confirmations=2, max_reorg_depth=8)
    poll_until_done(poller)
    fork = snapshot(chain.w3)
    tx_hash = chain.token.transfer(chain.accounts[1], address, AMOUNT)
    mine_blocks(chain.w3, 3)
    poll_until_done(poller)
    poller.confirm_once()
    assert available(sessions, agent) == AMOUNT
    if spent:
        _spend(sessions, agent, spent)
    raw = HexStr(str(_rpc(chain.w3, "eth_getRawTransactionByHash", [tx_hash])))
    revert(chain.w3, fork)
    mine_blocks(chain.w3, 5)
    result = poller.poll_once()
    assert result.reorg and result.error is None
    return agent, raw, poller


@pytest.mark.parametrize("spent", [0, 4_000_000], ids=["reversed", "short"])
def test_a_reversed_deposit_says_so_and_ends_credited_once_when_it_returns(
    anvil_chain: EvmChain, lite: sessionmaker[Session], spent: int
) -> None:
    chain = anvil_chain
    agent, raw, poller = _credited_then_reorged(chain, lite, spent)

    [orphan] = _deposits(lite, agent)
    view = credit_view(orphan)
    assert orphan.status == "orphaned"
    if spent:
        # 3 USDC were left to take back; the other 4 stand, and the deposit says so.
        assert (view.state, view.reversal_shortfall_base_units) == ("reversal_short", spent)
        assert view.note is not None and f"short by {spent}" in view.note
    else:
        assert (view.state, view.credited_base_units) == ("reversed", 0)
    assert available(lite, agent) == 0
    [orphaned_event] = _events(lite, "deposit.orphaned")
    assert orphaned_event["credit_state"] == view.state
    assert orphaned_event["reversal_shortfall_base_units"] == str(spent)
    with lite() as s:
        [listed] = service.list_deposits(s, agent=service.get_agent(s, orphaned_event["agent"]))  # type: ignore[arg-type]
        assert credit_view(listed) == view

    chain.w3.eth.send_raw_transaction(raw)
    mine_blocks(chain.w3, 3)
    poll_until_done(poller)
    poller.confirm_once()
    [back] = _deposits(lite, agent)
    assert back.id == orphan.id and back.status == "confirmed"
    assert (back.credit_state, back.credited_base_units) == ("credited", AMOUNT)
    assert back.block_hash == chain.source.block_header(back.block_number).hash
    # Its whole value stands once: what was spent before plus what the agent holds now.
    assert available(lite, agent) == AMOUNT - spent
    assert [e["credit_state"] for e in _events(lite, "deposit.confirmed")] == ["credited"] * 2
    assert_books_clean(lite)


def test_a_short_reversed_deposit_returning_at_another_log_index_stays_one_deposit(
    anvil_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = anvil_chain
    agent, raw, poller = _credited_then_reorged(chain, lite, 4_000_000)
    [orphan] = _deposits(lite, agent)
    # Mined again behind another transfer of the token in its block: its log index moves.
    _rpc(chain.w3, "evm_setAutomine", [False])
    chain.w3.eth.send_raw_transaction(raw)
    # A higher tip orders it first in the block.
    chain.token.contract.functions.transfer(chain.accounts[3], 1).transact(
        {"from": chain.accounts[2], "maxPriorityFeePerGas": 10**11, "maxFeePerGas": 10**12}
    )
    mine_blocks(chain.w3, 1)
    _rpc(chain.w3, "evm_setAutomine", [True])
    mine_blocks(chain.w3, 2)
    poll_until_done(poller)
    poller.confirm_once()
    [back] = _deposits(lite, agent)
    assert back.id == orphan.id and back.log_index != orphan.log_index
    assert (back.status, back.credit_state, back.credited_base_units) == (
        "confirmed",
        "credited",
        AMOUNT,
    )
    assert available(lite, agent) == AMOUNT - 4_000_000
    assert_books_clean(lite)
