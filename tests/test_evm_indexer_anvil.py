"""EVM indexer against anvil: reorgs (snapshot/revert + a re-mined transaction), RPC
faults behind a fault-injecting proxy, and a poller process killed with SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w
import typer
from eth_typing import HexStr
from sqlalchemy.orm import Session, sessionmaker
from typer.testing import CliRunner

from escrowd.config.settings import Settings
from escrowd.daemon import jobs
from escrowd.daemon.cli import CliState
from escrowd.daemon.cli_backfill import backfill_app, backfill_key
from escrowd.daemon.jobs import JobContext
from escrowd.devnet.evm import mine_blocks, revert, snapshot
from escrowd.devnet.rpc_proxy import Fault, RpcProxy
from escrowd.escrow.deposits import DEEP_REORG_REVERSALS
from escrowd.indexer.errors import RpcUnavailable
from escrowd.indexer.evm_source import JsonRpcEvmSource, RetryPolicy
from escrowd.indexer.reorg import CREDITED_ORPHANED
from escrowd.indexer.store import get_cursor
from escrowd.models import DepositStatus
from escrowd.models.db import make_engine, make_session_factory
from tests.evm_fixtures import EvmChain
from tests.evm_indexer_helpers import (
    CHAIN,
    assert_books_clean,
    available,
    chain_settings,
    deposits,
    make_poller,
    poll_until_done,
    watch,
)
from tests.test_evm_source_faults import fault

pytestmark = pytest.mark.anvil
CONFIRMATIONS = 3
FAST = RetryPolicy(timeout_s=0.75, attempts_per_url=2, backoff_base_s=0.01, backoff_max_s=0.05)


@pytest.fixture
def lite(sqlite_url: str) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(sqlite_url)
    yield make_session_factory(engine)
    engine.dispose()


def _raw_tx(chain: EvmChain, tx_hash: str) -> HexStr:
    method = "eth_getRawTransactionByHash"
    raw = chain.w3.provider.make_request(method, [tx_hash])  # type: ignore[arg-type]
    return HexStr(str(raw["result"]))


def _counter(metric: object, *labels: str) -> float:
    return float(metric.labels(*labels)._value.get())  # type: ignore[attr-defined]


@pytest.mark.parametrize("depth", [1, CONFIRMATIONS, CONFIRMATIONS + 2])
def test_reorg_orphans_abandoned_deposits_and_credits_remined_once(
    anvil_chain: EvmChain, lite: sessionmaker[Session], depth: int
) -> None:
    chain = anvil_chain
    alice, alice_addr = watch(lite)
    bob, bob_addr = watch(lite)
    poller = make_poller(chain, lite, confirmations=CONFIRMATIONS, max_reorg_depth=8)
    poll_until_done(poller)
    fork_point = snapshot(chain.w3)
    tx_alice = chain.token.transfer(chain.accounts[1], alice_addr, 7_000_000)
    if depth >= 2:
        chain.token.transfer(chain.accounts[2], bob_addr, 9_000_000)
    mine_blocks(chain.w3, depth - (2 if depth >= 2 else 1))
    poll_until_done(poller)
    poller.confirm_once()
    credited_before = depth > CONFIRMATIONS
    assert available(lite, alice) == (7_000_000 if credited_before else 0)
    reversals = _counter(CREDITED_ORPHANED, CHAIN)

    # The fork: alice's transaction is mined again one block later, bob's is gone.
    raw = _raw_tx(chain, tx_alice)
    revert(chain.w3, fork_point)
    mine_blocks(chain.w3, 1)
    chain.w3.eth.send_raw_transaction(raw)
    mine_blocks(chain.w3, depth)
    result = poller.poll_once()
    assert result.reorg and result.error is None
    assert all(d.status == DepositStatus.ORPHANED for d in deposits(lite) if d.amount == 9_000_000)
    assert available(lite, bob) == 0  # no phantom credit (reversed if it had been credited)

    mine_blocks(chain.w3, CONFIRMATIONS)
    poll_until_done(poller)
    poller.confirm_once()
    assert available(lite, alice) == 7_000_000  # credited exactly once
    assert available(lite, bob) == 0
    [alice_deposit] = [d for d in deposits(lite) if d.agent_id == alice]
    assert alice_deposit.status == DepositStatus.CONFIRMED
    assert alice_deposit.block_hash == chain.source.block_header(alice_deposit.block_number).hash
    if credited_before:
        assert _counter(CREDITED_ORPHANED, CHAIN) == reversals + 2
        assert _counter(DEEP_REORG_REVERSALS, CHAIN, "reversed") >= 2
    assert_books_clean(lite)


def test_reorg_deeper_than_max_reorg_depth_halts_the_cursor(
    anvil_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = anvil_chain
    mine_blocks(chain.w3, 3)
    fork_point = snapshot(chain.w3)
    mine_blocks(chain.w3, 12)
    poller = make_poller(chain, lite, confirmations=2, max_reorg_depth=4, start_block=2)
    poll_until_done(poller)
    cursor_before = poller.poll_once().cursor
    revert(chain.w3, fork_point)
    chain.token.transfer(chain.accounts[1], chain.accounts[2], 1)  # a different block 6
    mine_blocks(chain.w3, 14)
    result = poller.poll_once()
    assert result.error is not None and result.error.startswith("DeepReorg")
    with lite() as session:
        assert get_cursor(session, CHAIN).block_number == cursor_before


def test_rpc_faults_skip_no_block_and_fail_over(
    anvil_chain: EvmChain, lite: sessionmaker[Session]
) -> None:
    chain = anvil_chain
    assert chain.url is not None
    agent, address = watch(lite)
    with RpcProxy([chain.url]) as flaky, RpcProxy([chain.url]) as backup:
        source = JsonRpcEvmSource([flaky.url, backup.url], policy=FAST, chain=CHAIN)
        poller = make_poller(chain, lite, source, confirmations=1, max_block_window=2)
        amounts = [11, 12, 13, 14, 15, 16]
        for name, amount in zip(["hang", "429", "garbage", "lag", "500", "stale_hash"], amounts):
            chain.token.transfer(chain.accounts[1], address, amount)
            flaky.add(fault(name, times=2))
            result = poller.poll_once()
            assert result.cursor is None or result.cursor <= chain.source.head()

        # Both endpoints down: the poll reports it and the cursor stays put.
        with lite() as session:
            cursor = get_cursor(session, CHAIN).block_number
        chain.token.transfer(chain.accounts[1], address, 17)
        flaky.clear()
        flaky.add(fault("500"))
        backup.add(fault("500"))
        down = poller.poll_once()
        assert down.error is not None and "RpcUnavailable" in down.error
        with lite() as session:
            assert get_cursor(session, CHAIN).block_number == cursor

        flaky.clear()
        backup.clear()
        mine_blocks(chain.w3, 2)
        poll_until_done(poller)
        poller.confirm_once()
        assert backup.requests > 0  # failover was used
        source.close()
    assert sorted(d.amount for d in deposits(lite)) == [*amounts, 17]
    assert available(lite, agent) == sum(amounts) + 17
    assert_books_clean(lite)


_CHILD = textwrap.dedent(
    """
    import sys
    from escrowd.escrow.deposits import LedgerDepositSink
    from escrowd.indexer.evm_poller import EvmPoller
    from escrowd.indexer.evm_source import JsonRpcEvmSource
    from escrowd.config.settings import EvmChainSettings
    from escrowd.models.db import make_engine, make_session_factory

    settings = EvmChainSettings.model_validate_json(sys.argv[1])
    sessions = make_session_factory(make_engine(sys.argv[2]))
    poller = EvmPoller(settings, JsonRpcEvmSource(settings.rpc_urls), sessions, LedgerDepositSink())
    while True:
        poller.poll_once(max_windows=1)
    """
)


def test_poller_killed_mid_run_loses_and_doubles_nothing(
    anvil_chain: EvmChain, lite: sessionmaker[Session], sqlite_url: str, tmp_path: Path
) -> None:
    chain = anvil_chain
    agent, address = watch(lite)
    others = [watch(lite)[1] for _ in range(3)]
    expected = 0
    for i in range(20):
        amount = 1_000 + i
        chain.token.batch_transfer(chain.accounts[1], [address, *others], [amount] * 4)
        expected += amount
    poller = make_poller(chain, lite, confirmations=0, max_block_window=1)
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, poller.settings.model_dump_json(), sqlite_url],
        cwd=Path(__file__).resolve().parent.parent,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(deposits(lite)) < 20:
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=10)
    killed_at = len(deposits(lite))
    assert 0 < killed_at < 4 * 20

    poll_until_done(poller)
    poller.confirm_once()
    mine = [d for d in deposits(lite) if d.agent_id == agent]
    assert len(mine) == 20 and len(deposits(lite)) == 80
    assert available(lite, agent) == expected
    assert_books_clean(lite)


def test_backfill_command_scans_a_range_resumably(
    anvil_chain: EvmChain, lite: sessionmaker[Session], sqlite_url: str, tmp_path: Path
) -> None:
    chain = anvil_chain
    agent, address = watch(lite)
    first = chain.source.head() + 1
    for amount in (100, 200, 300):
        chain.token.transfer(chain.accounts[1], address, amount)
    mine_blocks(chain.w3, CONFIRMATIONS)
    settings = make_poller(chain, lite, confirmations=CONFIRMATIONS).settings
    config = tmp_path / "escrowd.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "data_dir": str(tmp_path),
                "database_url": sqlite_url,
                "evm_chains": [settings.model_dump(mode="json")],
            }
        )
    )
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = CliState(config_path=config)

    app.add_typer(backfill_app, name="backfill")
    runner = CliRunner()
    args = ["backfill", "evm", "--chain", CHAIN, "--from", str(first)]
    partial = runner.invoke(app, [*args, "--to", str(first)])
    assert partial.exit_code == 0, partial.output
    assert "blocks/s" in partial.output and "deposits 1" in partial.output
    assert available(lite, agent) == 100

    done = runner.invoke(app, args)
    assert done.exit_code == 0, done.output
    again = runner.invoke(app, args)  # same range: resumes at its end, finds nothing new
    assert again.exit_code == 0 and "0 new deposits" in again.output
    assert available(lite, agent) == 600
    with lite() as session:
        assert get_cursor(session, CHAIN).block_number is None  # the live cursor is untouched
    assert_books_clean(lite)

    unknown = runner.invoke(app, ["backfill", "evm", "--chain", "nope", "--from", "0"])
    assert unknown.exit_code == 2 and "no EVM network named 'nope'" in unknown.output


def _backfill_cli(config: Path) -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def root(ctx: typer.Context) -> None:
        ctx.obj = CliState(config_path=config)

    app.add_typer(backfill_app, name="backfill")
    return app


def test_backfill_above_the_head_exits_at_once(
    anvil_chain: EvmChain, lite: sessionmaker[Session], sqlite_url: str, tmp_path: Path
) -> None:
    settings = make_poller(anvil_chain, lite).settings
    config = tmp_path / "escrowd.toml"
    config.write_text(
        tomli_w.dumps(
            {"database_url": sqlite_url, "evm_chains": [settings.model_dump(mode="json")]}
        )
    )
    head = anvil_chain.source.head()
    runner = CliRunner()
    app = _backfill_cli(config)
    for args in (["--from", str(head + 1000)], ["--from", "0", "--to", str(head + 1)]):
        started = time.monotonic()
        result = runner.invoke(app, ["backfill", "evm", "--chain", CHAIN, *args])
        assert result.exit_code == 2, result.output
        assert f"is above the head of {CHAIN} (block {head})" in result.output
        assert time.monotonic() - started < 5
    with lite() as session:
        assert get_cursor(session, CHAIN, backfill_key(head + 1000, None)).block_number is None


@pytest.mark.parametrize("retries", [0, 1])
def test_daemon_and_backfill_sources_retry_as_configured(
    anvil_chain: EvmChain,
    lite: sessionmaker[Session],
    sqlite_url: str,
    tmp_path: Path,
    retries: int,
) -> None:
    assert anvil_chain.url is not None
    with RpcProxy([anvil_chain.url]) as proxy:
        proxy.add(Fault.of("http_status", status=503))
        chain = chain_settings(
            anvil_chain, rpc_urls=[proxy.url], rpc_max_retries=retries, rpc_timeout_s=1.0
        )
        settings = Settings(data_dir=tmp_path, database_url=sqlite_url, evm_chains=[chain])
        ctx = JobContext(settings=settings, engine=make_engine(sqlite_url), sessions=lite)
        jobs.evm_jobs(ctx)  # builds the chain's source as the daemon does
        with pytest.raises(RpcUnavailable):
            ctx.evm_sources[CHAIN].head()
        assert proxy.requests == retries + 1  # one try, then rpc_max_retries more

        config = tmp_path / "escrowd.toml"
        config.write_text(tomli_w.dumps(settings.model_dump(mode="json", exclude_none=True)))
        before = proxy.requests
        result = CliRunner().invoke(
            _backfill_cli(config), ["backfill", "evm", "--chain", CHAIN, "--from", "0"]
        )
        assert result.exit_code == 1 and f"cannot read the head of {CHAIN}" in result.output
        assert proxy.requests - before == retries + 1
        for close in ctx.closers:
            close()
        ctx.engine.dispose()
