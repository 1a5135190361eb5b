"""A deposit is credited once when confirmation passes race: two daemons, or a backfill and
the daemon, crediting the same deposits at the same moment (set-based, whole passes)."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from eth_account import Account
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.evm import mine_blocks
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.indexer.sink import Finalized
from escrowd.indexer.store import FoundDeposit, Watched, record_deposits
from escrowd.models import Agent, Chain, Deposit, DepositAddress, LedgerTransfer, TransferCode
from escrowd.models.db import make_session_factory
from escrowd.models.registry import ensure_asset
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import CHAIN, assert_books_clean, available, make_poller, watch

POLICY = RetryPolicy(timeout_s=5.0, attempts_per_url=3, backoff_base_s=0.05)


def _credits_per_deposit(sessions: sessionmaker[Session]) -> Counter[str]:
    with sessions() as s:
        return Counter(
            s.scalars(
                select(LedgerTransfer.ref_id).where(
                    LedgerTransfer.ref_type == "deposit",
                    LedgerTransfer.code == TransferCode.DEPOSIT,
                )
            )
        )


@pytest.mark.postgres
def test_a_pass_finding_the_deposits_claimed_waits_then_credits_none_again(
    pg_engine: Engine,
) -> None:
    sessions = make_session_factory(pg_engine)
    with sessions() as s, s.begin():
        asset_id = ensure_asset(
            s, chain=CHAIN, symbol="USDC", decimals=6, token_address="0x" + "01" * 20
        ).id
        found = []
        for i in range(20):
            agent = Agent(external_id=f"racer-{i}")
            s.add(agent)
            s.flush()
            address = DepositAddress(
                agent_id=agent.id, chain=Chain.EVM, address=f"0x{i + 1:040x}", derivation_index=i
            )
            s.add(address)
            s.flush()
            found.append(
                FoundDeposit(
                    f"0x{i:064x}",
                    0,
                    asset_id,
                    Watched(address.id, agent.id, address.address, None),
                    None,
                    1_000 + i,
                    5,
                    "0x" + "05" * 32,
                )
            )
        record_deposits(s, CHAIN, found, LedgerDepositSink())
    with sessions() as s:
        pending = [Finalized(d.id, d.block_hash) for d in s.scalars(select(Deposit))]

    second: list[int] = []
    first = sessions()
    first.begin()
    assert LedgerDepositSink().confirmed_many(first, pending) == 20

    def late_pass() -> None:
        with sessions() as s, s.begin():
            second.append(LedgerDepositSink().confirmed_many(s, list(reversed(pending))))

    racer = threading.Thread(target=late_pass)
    racer.start()
    racer.join(timeout=0.5)
    assert racer.is_alive(), "the second pass must wait for the first one's row locks"
    first.commit()
    first.close()
    racer.join(timeout=30)
    assert second == [0]
    assert set(_credits_per_deposit(sessions).values()) == {1}
    assert_books_clean(sessions)


@pytest.mark.parametrize("credit_final", [False, True], ids=["pass", "in-window"])
def test_backfill_and_two_daemons_confirming_at_once_credit_each_deposit_once(
    anvil_chain: EvmChain, engine: Engine, credit_final: bool
) -> None:
    """With ``credit_final`` the backfill credits final deposits in the window that finds
    them while both daemons record and confirm the same ones: the three start scanning
    together instead of confirming together."""
    chain = anvil_chain
    assert chain.url is not None
    sessions = make_session_factory(engine)
    agents = [watch(sessions) for _ in range(30)]
    recipients, amounts = [], []
    for n in range(300):
        watched = n % 2 == 0
        recipients.append(agents[n // 2 % 30][1] if watched else Account.create().address)
        amounts.append(1_000 + n)
    for start in range(0, 300, 100):
        chain.token.batch_transfer(
            chain.accounts[1], recipients[start : start + 100], amounts[start : start + 100]
        )
    mine_blocks(chain.w3, 3)

    def poller(backfill: bool, source: JsonRpcEvmSource) -> EvmPoller:
        live = make_poller(chain, sessions, source, confirmations=2)
        if not backfill:
            return live
        return EvmPoller(
            live.settings,
            source,
            sessions,
            LedgerDepositSink(),
            cursor_key="backfill:0-head",
            start_block=0,
            track_reorgs=False,
            credit_final=credit_final,
        )

    start = threading.Barrier(3)
    confirmed: list[int] = []
    errors: list[BaseException] = []

    def run(backfill: bool) -> None:
        try:
            with JsonRpcEvmSource([chain.url or ""], policy=POLICY, chain=CHAIN) as source:
                mine = poller(backfill, source)
                if credit_final:
                    start.wait(timeout=30)
                for _ in range(20):
                    if mine.poll_once().done:
                        break
                if not credit_final:
                    start.wait(timeout=30)
                confirmed.append(mine.confirm_once().confirmed)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(b,)) for b in (True, False, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors, errors
    with sessions() as s:
        total = s.scalar(select(func.count()).select_from(Deposit))
        statuses = set(s.scalars(select(Deposit.status)))
    assert total == 150 and statuses == {"confirmed"}
    if not credit_final:
        assert sum(confirmed) == 150  # each pass reports only what it credited
    credits = _credits_per_deposit(sessions)
    assert len(credits) == 150 and set(credits.values()) == {1}
    for agent_id, address in agents:
        sent = sum(a for r, a in zip(recipients, amounts, strict=True) if r == address)
        assert available(sessions, agent_id) == sent
    assert_books_clean(sessions)
