"""EVM backfill benchmark: escrowd's backfill vs ethereum-etl's export_token_transfers over
the same anvil blocks, and poll cost with 1,000 vs 1,000,000 watched addresses.

    /work/venv/bin/python -m bench.evm_backfill [--part backfill|poll] [--transfers 50000]

Needs anvil (`npm ci`) and PostgreSQL (ESCROWD_TEST_PG_URL / ESCROWD_TEST_PG_DSN as in the
tests). ethereum-etl runs from its own virtual environment (``--etl``); when it cannot be
run, the error is printed instead of a figure. Prints the figures as a markdown table.
"""

from __future__ import annotations

import argparse
import gc
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg
import requests
from eth_account import Account
from sqlalchemy import func, select, text

from escrowd.config.settings import EvmChainSettings
from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import TestUSDC, deploy_test_usdc, dev_accounts, web3_for_url
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_source import JsonRpcEvmSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Agent, Chain, Deposit, DepositAddress
from escrowd.models.db import make_engine, make_session_factory

PG_ADMIN_DSN = os.environ.get(
    "ESCROWD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_URL_BASE = os.environ.get("ESCROWD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
CHAIN = "bench"
PER_TX = 500
WATCHED = 1_000


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql)


def build_chain(url: str, transfers: int) -> tuple[str, int, int, list[str], dict[str, int]]:
    """Token + ``transfers`` Transfer logs, half to the watched addresses."""
    with requests.Session() as http:
        w3 = web3_for_url(url, session=http)
        token = deploy_test_usdc(w3)
        sender = dev_accounts(w3)[1]
        watched = [Account.create().address for _ in range(WATCHED)]
        others = [Account.create().address for _ in range(WATCHED)]
        token.mint(sender, 10**15)
        first = w3.eth.block_number + 1
        expected: dict[str, int] = dict.fromkeys(watched, 0)
        last_tx = ""
        for batch in range(transfers // PER_TX):
            recipients, amounts = [], []
            for i in range(PER_TX):
                n = batch * PER_TX + i
                to = watched[n // 2 % WATCHED] if n % 2 == 0 else others[n // 2 % WATCHED]
                amount = 1 + n % 997
                recipients.append(to)
                amounts.append(amount)
                if n % 2 == 0:
                    expected[to] += amount
            last_tx = token.batch_transfer(sender, recipients, amounts, wait=False, gas=29_000_000)
        if last_tx:
            w3.eth.wait_for_transaction_receipt(last_tx, timeout=120)  # type: ignore[arg-type]
        last = w3.eth.block_number
        for address in watched[:20]:  # the chain's own word on a sample
            assert token.balance_of(address) == expected[address]
        return token.address, first, last, watched, expected


def escrowd_backfill(
    url: str,
    token: str,
    first: int,
    last: int,
    watched: list[str],
    expected: dict[str, int],
    max_block_window: int,
) -> tuple[float, int, float]:
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{PG_URL_BASE}/{name}")
    try:
        upgrade_to_head(engine)
        sessions = make_session_factory(engine)
        with sessions() as session, session.begin():
            for i, address in enumerate(watched):
                agent = Agent(external_id=f"a{i}")
                session.add(agent)
                session.flush()
                session.add(
                    DepositAddress(
                        agent_id=agent.id, chain=Chain.EVM, address=address, derivation_index=i
                    )
                )
        settings = EvmChainSettings(
            name=CHAIN,
            chain_id=31337,
            rpc_urls=[url],
            usdc_address=token,
            confirmations=0,
            max_block_window=max_block_window,
        )
        with JsonRpcEvmSource([url], chain=CHAIN) as source:
            poller = EvmPoller(
                settings,
                source,
                sessions,
                LedgerDepositSink(),
                cursor_key=f"backfill:{first}-{last}",
                start_block=first,
                stop_block=last,
                track_reorgs=False,
            )
            gc.freeze()  # as `escrowd backfill evm` does before its loop
            started = time.perf_counter()
            while not (result := poller.poll_once()).done:
                assert result.error is None, result.error
            elapsed_s = time.perf_counter() - started
        with sessions() as session:
            totals = dict(
                session.execute(
                    select(DepositAddress.address, func.sum(Deposit.amount))
                    .join(Deposit, Deposit.deposit_address_id == DepositAddress.id)
                    .group_by(DepositAddress.address)
                ).all()
            )
            found = session.scalar(select(func.count()).select_from(Deposit)) or 0
        mismatched = [a for a in watched if int(totals.get(a, 0)) != expected[a]]
        assert not mismatched, f"{len(mismatched)} addresses differ, e.g. {mismatched[0]}"
        return elapsed_s, int(found), rss_mb()
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def etl_export(
    etl_venv: Path, url: str, token: str, first: int, last: int
) -> tuple[float, int] | str:
    exe = etl_venv / "bin" / "ethereumetl"
    if not exe.exists():
        return f"ethereum-etl not installed at {exe}"
    out = Path(f"/tmp/etl-{uuid.uuid4().hex[:8]}.csv")
    started = time.perf_counter()
    proc = subprocess.run(
        [
            str(exe),
            "export_token_transfers",
            "--start-block",
            str(first),
            "--end-block",
            str(last),
            "--provider-uri",
            url,
            "--tokens",
            token,
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    elapsed_s = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    rows = sum(1 for _ in out.open()) - 1
    out.unlink()
    return elapsed_s, rows


def poll_cost(url: str, token: str, watched_count: int) -> tuple[float, float, float]:
    """(first refresh s, median poll s over a 10-block window with 200 transfers, RSS MB)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{PG_URL_BASE}/{name}")
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO agents (external_id, created_at) "
                    "SELECT 'a' || g, now() FROM generate_series(1, :n) g"
                ),
                {"n": watched_count},
            )
            conn.execute(
                text(
                    "INSERT INTO deposit_addresses (agent_id, chain, address, derivation_index, "
                    "created_at) SELECT id, :chain, '0x' || lpad(to_hex(id), 40, '0'), id, now() "
                    "FROM agents"
                ),
                {"chain": Chain.EVM.value},
            )
        sessions = make_session_factory(engine)
        settings = EvmChainSettings(
            name=CHAIN, chain_id=31337, rpc_urls=[url], usdc_address=token, confirmations=0
        )
        with requests.Session() as http, JsonRpcEvmSource([url], chain=CHAIN) as source:
            w3 = web3_for_url(url, session=http)
            usdc = TestUSDC(w3, token, dev_accounts(w3)[0])
            sender = dev_accounts(w3)[1]
            poller = EvmPoller(settings, source, sessions, LedgerDepositSink())
            # Start the live cursor at the head: only the measured windows are scanned.
            poller.start_block = source.head() + 1
            started = time.perf_counter()
            poller.poll_once()
            refresh_s = time.perf_counter() - started
            watched_hits = [f"0x{i:040x}" for i in range(1, 11)]
            times = []
            for _ in range(7):
                recipients = [*watched_hits, *[Account.create().address for _ in range(10)]] * 10
                for _ in range(10):
                    usdc.batch_transfer(sender, recipients[:20], [1] * 20, gas=2_000_000)
                started = time.perf_counter()
                result = poller.poll_once()
                times.append(time.perf_counter() - started)
                assert result.error is None and result.deposits_found == 100, result
            times.sort()
            return refresh_s, times[len(times) // 2], rss_mb()
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transfers", type=int, default=50_000)
    parser.add_argument("--etl", type=Path, default=Path("/tmp/etl-venv"))
    parser.add_argument(
        "--watched", type=int, default=1_000_000, help="with --part poll: watched addresses"
    )
    parser.add_argument("--part", choices=["backfill", "poll"], default="backfill")
    parser.add_argument(
        "--max-block-window", type=int, default=2_000, help="escrowd's blocks per eth_getLogs"
    )
    args = parser.parse_args()
    with AnvilProcess(extra_args=["--gas-limit", "30000000"]) as anvil:
        started = time.perf_counter()
        token, first, last, watched, expected = build_chain(anvil.url, args.transfers)
        print(
            f"chain built: {args.transfers} transfers in blocks [{first}, {last}] "
            f"in {time.perf_counter() - started:.1f}s"
        )
        if args.part == "backfill":
            elapsed_s, found, rss = escrowd_backfill(
                anvil.url, token, first, last, watched, expected, args.max_block_window
            )
            print(
                f"| escrowd backfill | {args.transfers} transfers | {elapsed_s:.1f} s | "
                f"{args.transfers / elapsed_s:,.0f} transfers/s | {found} deposits recorded, "
                f"per-address totals equal the chain's | RSS {rss:.0f} MB |"
            )
            etl = etl_export(args.etl, anvil.url, token, first, last)
            if isinstance(etl, str):
                print(f"| ethereum-etl export_token_transfers | not run: {etl} |")
            else:
                print(
                    f"| ethereum-etl export_token_transfers | {etl[1]} rows | {etl[0]:.1f} s | "
                    f"{etl[1] / etl[0]:,.0f} transfers/s |"
                )
        if args.part == "poll":
            for count in (args.watched,):
                refresh_s, poll_s, rss = poll_cost(anvil.url, token, count)
                print(
                    f"| poll, {count:,} watched | first load {refresh_s:.2f} s | "
                    f"median poll {poll_s * 1000:.1f} ms | RSS {rss:.0f} MB |"
                )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
