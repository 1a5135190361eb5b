"""EVM indexer on eth-tester: deposits credited exactly once, filtering, adaptive window,
crash between fetching logs and committing."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.devnet.evm import deploy_test_usdc
from escrowd.indexer import evm_poller, store
from escrowd.indexer.errors import RangeTooLarge, RpcUnavailable
from escrowd.indexer.evm_poller import ChainIdMismatch
from escrowd.indexer.evm_source import BlockHeader, EthTesterSource, TransferLog
from escrowd.indexer.store import get_cursor
from escrowd.models import ChainBlock, DepositStatus
from escrowd.models.db import make_engine, make_session_factory
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import (
    CHAIN,
    assert_books_clean,
    available,
    deposits,
    make_poller,
    poll_until_done,
    watch,
)


def test_deposits_to_watched_addresses_are_credited_once(
    eth_tester_chain: EvmChain, sessions: sessionmaker[Session]
) -> None:
    chain = eth_tester_chain
    token, sender = chain.token, chain.accounts[1]
    alice, alice_addr = watch(sessions)
    bob, bob_addr = watch(sessions)
    stranger = chain.accounts[5]
    other_token = deploy_test_usdc(chain.w3)
    other_token.mint(alice_addr, 999_000_000)

    token.transfer(sender, alice_addr, 5_000_000)
    token.batch_transfer(sender, [alice_addr, bob_addr, stranger, bob_addr], [1, 2, 3, 4])
    token.transfer(sender, alice_addr, 0)
    token.transfer(sender, stranger, 77)

    poller = make_poller(chain, sessions, confirmations=5)
    result = poller.poll_once()
    assert result.error is None and result.done
    assert result.deposits_found == 4
    assert [d.status for d in deposits(sessions)] == [DepositStatus.PENDING] * 4
    # Not deep enough yet (5 confirmations): nothing is credited.
    assert poller.confirm_once().confirmed == 0
    assert available(sessions, alice) == 0

    chain.source.mine_blocks(5)  # type: ignore[union-attr]
    assert poller.confirm_once().confirmed == 4
    assert available(sessions, alice) == 5_000_001
    assert available(sessions, bob) == 6
    # One transaction with several Transfer logs gave one deposit per log.
    batch = [d for d in deposits(sessions) if d.amount in (1, 2, 4)]
    assert len({d.tx_hash for d in batch}) == 1 and len({d.log_index for d in batch}) == 3

    # Polling and confirming again changes nothing.
    again = poller.poll_once()
    assert again.deposits_found == 0 and again.error is None
    assert poller.confirm_once().confirmed == 0
    assert available(sessions, alice) == 5_000_001
    assert available(sessions, bob) == 6
    assert {d.status for d in deposits(sessions)} == {DepositStatus.CONFIRMED}
    assert_books_clean(sessions)


@pytest.fixture
def lite(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    """SQLite only: the tests that exercise the scan logic rather than the database."""
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def test_address_added_later_is_watched_from_the_next_poll(
    eth_tester_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = eth_tester_chain
    poller = make_poller(chain, lite, confirmations=0)
    poller.poll_once()
    carol, carol_addr = watch(lite)
    chain.token.transfer(chain.accounts[2], carol_addr, 123)
    assert poller.poll_once().deposits_found == 1
    poller.confirm_once()
    assert available(lite, carol) == 123


def test_wrong_chain_id_is_refused(eth_tester_chain: EvmChain, lite: sessionmaker[Session]) -> None:
    poller = make_poller(eth_tester_chain, lite, chain_id=1)
    with pytest.raises(ChainIdMismatch, match="chain_id 1"):
        poller.poll_once()
    with lite() as session:
        assert get_cursor(session, CHAIN).block_number is None


class LimitedSource(EthTesterSource):
    """Refuses log queries wider than ``limit`` blocks, like a hosted provider."""

    def __init__(self, inner: EthTesterSource, *, limit: int, suggest: bool = False) -> None:
        super().__init__(inner.tester)
        self.limit = limit
        self.suggest = suggest
        self.widths: list[int] = []

    def logs_with_end_header(
        self, contract: str, from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        width = to_block - from_block + 1
        self.widths.append(width)
        if width > self.limit:
            suggested = from_block + self.limit - 1 if self.suggest else None
            raise RangeTooLarge("block range too large", suggested_to_block=suggested)
        return super().logs_with_end_header(contract, from_block, to_block)


@pytest.mark.parametrize("suggest", [False, True])
def test_window_shrinks_on_refusals_covers_every_block_and_grows_back(
    eth_tester_chain: EvmChain, lite: sessionmaker[Session], suggest: bool
) -> None:
    chain = eth_tester_chain
    agent, address = watch(lite)
    for amount in range(1, 9):
        chain.token.transfer(chain.accounts[1], address, amount)
        chain.source.mine_blocks(3)  # type: ignore[union-attr]
    source = LimitedSource(chain.source, limit=5, suggest=suggest)  # type: ignore[arg-type]
    poller = make_poller(chain, lite, source, max_block_window=64, confirmations=0)
    poll_until_done(poller)
    assert sorted(d.amount for d in deposits(lite)) == list(range(1, 9))
    accepted = [w for w in source.widths if w <= 5]
    refused = [w for w in source.widths if w > 5]
    # The provider's suggestion is used as is; without one the window halves (64 -> 4).
    assert max(accepted) == (5 if suggest else 4)
    assert len(refused) < len(accepted)  # it does not keep hammering the limit

    source.limit = 10_000
    source.widths.clear()
    chain.source.mine_blocks(300)  # type: ignore[union-attr]
    poll_until_done(poller)
    assert max(source.widths) == 64  # grew back to max_block_window
    assert not poller.poll_once().error
    poller.confirm_once()
    assert available(lite, agent) == sum(range(1, 9))


def test_crash_between_fetching_logs_and_committing_loses_and_doubles_nothing(
    eth_tester_chain: EvmChain, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = eth_tester_chain
    agent, address = watch(sessions)
    for amount in (10, 20, 30):
        chain.token.transfer(chain.accounts[1], address, amount)
    real_record = store.record_deposits

    def dying_record(*args: object, **kwargs: object) -> int:
        # The deposits reach the database, then the process dies before the commit.
        real_record(*args, **kwargs)  # type: ignore[arg-type]
        raise SystemExit("killed mid-commit")

    monkeypatch.setattr(evm_poller, "record_deposits", dying_record)
    poller = make_poller(chain, sessions, confirmations=0)
    with pytest.raises(SystemExit):
        poller.poll_once()
    # The first deposit was rolled back with the cursor: nothing half-committed.
    assert deposits(sessions) == []
    with sessions() as session:
        assert get_cursor(session, CHAIN).block_number is None

    monkeypatch.setattr(evm_poller, "record_deposits", real_record)
    restarted = make_poller(chain, sessions, confirmations=0)
    poll_until_done(restarted)
    restarted.confirm_once()
    assert sorted(d.amount for d in deposits(sessions)) == [10, 20, 30]
    assert available(sessions, agent) == 60
    assert_books_clean(sessions)


def test_recent_block_hashes_are_kept_and_bounded(
    eth_tester_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = eth_tester_chain
    chain.source.mine_blocks(40)  # type: ignore[union-attr]
    poller = make_poller(chain, lite, max_reorg_depth=8, max_block_window=7)
    poll_until_done(poller)
    head = chain.source.head()
    with lite() as session:
        stored: Sequence[int] = session.scalars(
            select(ChainBlock.block_number).order_by(ChainBlock.block_number)
        ).all()
    assert stored[-1] == head
    assert stored[0] >= head - 8
    assert list(stored) == list(range(stored[0], head + 1))  # contiguous near the head


class PrefetchProbe(EthTesterSource):
    """Counts the windows fetched on the poller's prefetch thread; can refuse one window."""

    def __init__(self, inner: EthTesterSource, *, refuse_from: int | None = None) -> None:
        super().__init__(inner.tester)
        self.refuse_from = refuse_from
        self.prefetched = 0
        self.changed = threading.Condition()

    def logs_with_end_header(
        self, contract: str, from_block: int, to_block: int
    ) -> tuple[list[TransferLog], BlockHeader]:
        if from_block == self.refuse_from:
            raise RpcUnavailable("node down")
        result = super().logs_with_end_header(contract, from_block, to_block)
        if threading.current_thread() is not threading.main_thread():
            with self.changed:
                self.prefetched += 1
                self.changed.notify_all()
        return result


def test_next_window_is_fetched_while_this_one_commits(
    eth_tester_chain: EvmChain, lite: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    chain = eth_tester_chain
    agent, address = watch(lite)
    for amount in range(1, 7):
        chain.token.transfer(chain.accounts[1], address, amount)
        chain.source.mine_blocks(2)  # type: ignore[union-attr]
    source = PrefetchProbe(chain.source)  # type: ignore[arg-type]
    real_record = store.record_deposits
    overlapped: list[bool] = []

    def watching_record(*args: object, **kwargs: object) -> int:
        # Commit number n overlaps a fetch when window n+1 arrives before it ends.
        wanted = len(overlapped) + 1
        with source.changed:
            overlapped.append(source.changed.wait_for(lambda: source.prefetched >= wanted, 1.0))
        return real_record(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(evm_poller, "record_deposits", watching_record)
    poller = make_poller(chain, lite, source, max_block_window=4, confirmations=0)
    windows: list[evm_poller.WindowDone] = []
    result = poller.poll_once(on_window=windows.append)
    assert result.error is None and result.done and result.deposits_found == 6
    scanned = [w.scanned_to for w in windows]
    assert len(windows) >= 4 and scanned == sorted(scanned)
    assert windows[-1].scanned_to == result.scanned_to == chain.source.head()
    assert windows[-1].cursor == result.cursor == chain.source.head() - 1  # settles 1 deep
    assert sum(w.deposits_found for w in windows) == 6
    # Every commit but the last ran while the next window was being fetched.
    assert overlapped == [True] * (len(windows) - 1) + [False]
    poller.confirm_once()
    assert available(lite, agent) == sum(range(1, 7))


def test_failed_prefetch_keeps_the_windows_committed_before_it(
    eth_tester_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = eth_tester_chain
    agent, address = watch(lite)
    for amount in (10, 20, 30):
        chain.token.transfer(chain.accounts[1], address, amount)
        chain.source.mine_blocks(4)  # type: ignore[union-attr]
    start = chain.source.head() - 14
    source = PrefetchProbe(chain.source, refuse_from=start + 5)  # type: ignore[arg-type]
    poller = make_poller(chain, lite, source, max_block_window=5, confirmations=0)
    poller.start_block = start
    failed = poller.poll_once()
    assert failed.error is not None and "node down" in failed.error
    with lite() as session:
        assert get_cursor(session, CHAIN).block_number == start + 4
    committed = len(deposits(lite))

    source.refuse_from = None
    poll_until_done(poller)
    poller.confirm_once()
    assert committed < 3 and sorted(d.amount for d in deposits(lite)) == [10, 20, 30]
    assert available(lite, agent) == 60
    assert_books_clean(lite)


def test_window_slow_starts_and_keeps_dense_ranges_to_the_log_bound() -> None:
    window = evm_poller.AdaptiveWindow(2_000, max_logs=10_000, start_blocks=16)
    sizes = []
    # Sparse history: a catch-up opens small and doubles after every light window.
    for _ in range(8):
        sizes.append(window.size)
        window.succeeded(window.size, 10)
    assert sizes == [16, 32, 64, 128, 256, 512, 1024, 2000]
    # A dense stretch: 500 logs per block. The next window aims at the log bound...
    window.succeeded(2_000, 1_000_000)
    assert window.size == 20
    # ...stays there while a doubling would overshoot it...
    for _ in range(5):
        window.succeeded(20, 10_000)
    assert window.size == 20
    # ...and grows back cautiously (every third light window) once blocks thin out.
    grown = []
    for _ in range(6):
        window.succeeded(window.size, 100)
        grown.append(window.size)
    assert grown == [20, 20, 40, 40, 40, 80]
