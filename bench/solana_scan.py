"""Solana block-scan indexer: deposits indexed/s, and time per poll with 1,000 vs 100,000
watched addresses.

Usage: python -m bench.solana_scan [--transactions 10000] [--db sqlite|postgres] [--record]

A LiteSVM simulator (in-process HTTP JSON-RPC, slots advanced by hand) gets a history of
`--transactions` transactions, 50 per block: SOL transfers to 1,000 watched wallets, USDC
mints to 200 of them, and SOL transfers to strangers. Fresh databases watch 1,000 and
100,000 addresses (the first 1,000 are the same, so all find the same deposits) and run
the real block-scan poller (SolanaRpcSource over HTTP) over the whole history: twice
with escrow's ledger sink (audit row + event per deposit), once with a sink that does
nothing, to separate the indexer's own cost. 1,000 deposits are then credited at
finalized. Five rounds of 250 new transactions time one incremental poll per database.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import structlog
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.sink import DepositSink, Finalized, StoredDeposit
from escrowd.indexer.solana_indexer import BLOCK_SCAN, SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Agent, Deposit, DepositAddress
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.addresses import associated_token_address

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
URL_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432"
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
TX_PER_BLOCK = 50
ACTIVE_WALLETS = 1_000
USDC_WALLETS = 200
SIZES = (1_000, 100_000)
CREDIT_SAMPLE = 1_000  # deposits credited to time the finalized step


class CountingSink:
    """Records nothing beyond the deposit row: isolates the indexer's own cost (RPC,
    decoding, extraction, the insert-once deposit row and the cursor) from the ledger's."""

    def recorded(self, session: Session, deposit: Deposit) -> None:
        pass

    def recorded_many(self, session: Session, deposits: Sequence[StoredDeposit]) -> None:
        pass

    def confirmed(self, session: Session, deposit: Deposit) -> None:
        raise AssertionError("the counting run does not confirm")

    def final_columns(
        self, session: Session, deposits: Sequence[tuple[int, int]]
    ) -> list[dict[str, Any]]:
        raise AssertionError("the counting run stores nothing final")

    def credited_new(self, session: Session, deposits: Sequence[StoredDeposit]) -> int:
        # Handed every batch of new deposits, none of them final in a scan.
        if deposits:
            raise AssertionError("the counting run stores nothing final")
        return 0

    def confirmed_many(self, session: Session, deposits: Sequence[Finalized]) -> int:
        raise AssertionError("the counting run does not confirm")

    def orphaned(self, session: Session, deposit: Deposit) -> None:
        raise AssertionError("the counting run does not confirm")


@dataclass
class Scan:
    label: str
    watched: int
    load_s: float
    scan_s: float
    deposits: int
    transactions: int
    credit_rate: float | None = None
    incremental_s: list[float] = field(default_factory=list)


def build_history(sim: SolanaSimulator, wallets: list[Pubkey], n_tx: int, usdc: Pubkey) -> int:
    """`n_tx` transactions, TX_PER_BLOCK per block; returns the deposits among them."""
    rng = random.Random(7)
    payers = [Keypair() for _ in range(8)]
    for payer in payers:
        sim.airdrop(payer.pubkey(), 10**15)
    for wallet in wallets[:USDC_WALLETS]:
        sim.chain.ensure_token_account(usdc, wallet)
    sim.advance_slots(1)
    deposits = 0
    for i in range(n_tx):
        kind = rng.random()
        # Amounts vary so no two transactions in one block are identical.
        if kind < 0.10:
            sim.mint_to(usdc, wallets[rng.randrange(USDC_WALLETS)], 1_000 + i)
            deposits += 1
        elif kind < 0.95:
            sim.transfer_sol(payers[i % len(payers)], rng.choice(wallets), 10**6 + i)
            deposits += 1
        else:
            sim.transfer_sol(payers[i % len(payers)], Keypair().pubkey(), 10**6 + i)
        if (i + 1) % TX_PER_BLOCK == 0:
            sim.advance_slots(1)
    return deposits


def make_db(kind: str, template: Path | None, workdir: Path) -> tuple[str, sessionmaker[Session]]:
    if kind == "sqlite":
        assert template is not None
        path = workdir / f"{uuid.uuid4().hex[:8]}.db"
        shutil.copyfile(template, path)
        url = f"sqlite:///{path}"
        return url, make_session_factory(make_engine(url))
    name = f"bench_solana_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{URL_BASE}/{name}")
    upgrade_to_head(engine)
    return name, make_session_factory(engine)


def drop_db(kind: str, name: str) -> None:
    if kind == "postgres":
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def watch(sessions: sessionmaker[Session], addresses: list[tuple[str, str]]) -> None:
    with sessions() as session, session.begin():
        session.execute(
            insert(Agent), [{"external_id": f"agent-{i}"} for i in range(len(addresses))]
        )
        ids = {
            row.external_id: row.id for row in session.execute(select(Agent.external_id, Agent.id))
        }
        session.execute(
            insert(DepositAddress),
            [
                {
                    "agent_id": ids[f"agent-{i}"],
                    "chain": "solana",
                    "address": address,
                    "derivation_index": i,
                    "token_account": token_account,
                }
                for i, (address, token_account) in enumerate(addresses)
            ],
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--transactions", type=int, default=10_000)
    parser.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    workdir = Path(tempfile.mkdtemp(prefix="bench_solana_"))
    template: Path | None = None
    if args.db == "sqlite":
        template = workdir / "template.db"
        engine = make_engine(f"sqlite:///{template}")
        upgrade_to_head(engine)
        engine.dispose()

    with SolanaSimulator(skip_every_slots=7) as sim:
        usdc = sim.create_usdc_mint()
        wallets = [Keypair().pubkey() for _ in range(max(SIZES))]
        active = wallets[:ACTIVE_WALLETS]
        started = time.perf_counter()
        expected = build_history(sim, active, args.transactions, usdc)
        sim.finalize_all()
        print(
            f"history: {args.transactions} transactions ({expected} deposits) in "
            f"{sim.chain.tip_block().slot} slots, built in {time.perf_counter() - started:.1f} s"
        )
        # Real ATAs for the wallets that receive USDC; the other token accounts only need
        # to occupy the in-memory map (computing 100,000 ATAs takes ~25 s and measures nothing).
        addresses = [(str(w), associated_token_address(str(w), str(usdc))) for w in active]
        addresses += [(str(w), str(Keypair().pubkey())) for w in wallets[ACTIVE_WALLETS:]]

        # The history is written before the first poll: scan it from slot 0.
        settings = SolanaSettings(
            name="solana",
            rpc_urls=[sim.url],
            usdc_mint=str(usdc),
            block_scan_threshold=1,
            start_slot=0,
        )
        runs = [
            ("ledger sink", 1_000, True),
            ("ledger sink", 100_000, True),
            ("indexer only", 1_000, False),
        ]
        scans: list[Scan] = []
        pollers: list[SolanaPoller] = []
        dbs: list[str] = []
        for label, size, ledger_sink in runs:
            name, sessions = make_db(args.db, template, workdir)
            dbs.append(name)
            watch(sessions, addresses[:size])
            source = SolanaRpcSource([sim.url], timeout_s=30)
            sink: DepositSink = LedgerDepositSink() if ledger_sink else CountingSink()
            poller = SolanaPoller(
                settings,
                source,
                sessions,
                sink,
                max_slots_per_poll=100_000,
                max_confirm_per_step=CREDIT_SAMPLE,
            )
            t0 = time.perf_counter()
            with sessions() as session:
                poller.watched.refresh(session)
            scan = Scan(label, size, time.perf_counter() - t0, 0.0, 0, 0)

            t0 = time.perf_counter()
            target = source.get_slot("confirmed")
            while True:
                result = poller.poll_once()
                assert result.error is None and result.strategy == BLOCK_SCAN, result
                scan.deposits += result.deposits_found
                scan.transactions += result.transactions_fetched
                if (result.scanned_through_slot or 0) >= target:
                    break
            scan.scan_s = time.perf_counter() - t0
            assert scan.deposits == expected, (scan.deposits, expected)
            with sessions() as session:
                assert session.scalar(select(func.count()).select_from(Deposit)) == expected
            print(
                f"{label}, {size:>7} watched: load set {scan.load_s:.2f} s; full scan "
                f"{scan.deposits} deposits in {scan.scan_s:.1f} s = "
                f"{scan.deposits / scan.scan_s:.0f} deposits/s "
                f"({scan.transactions / scan.scan_s:.0f} tx/s)"
            )
            if ledger_sink and size == SIZES[0]:
                t0 = time.perf_counter()
                credited = poller.confirm_once().confirmed
                assert credited == min(CREDIT_SAMPLE, expected), credited
                scan.credit_rate = credited / (time.perf_counter() - t0)
                print(f"  credit at finalized: {scan.credit_rate:.0f} deposits/s")
            scans.append(scan)
            pollers.append(poller)

        # Incremental polls: 5 new blocks of 50 transactions, 10 % of them deposits.
        payer = Keypair()
        sim.airdrop(payer.pubkey(), 10**15)
        rng = random.Random(11)
        for round_no in range(5):
            for i in range(5 * TX_PER_BLOCK):
                to = rng.choice(active) if i % 10 == 0 else Keypair().pubkey()
                sim.transfer_sol(payer, to, 10**6 + round_no * 1000 + i)
                if (i + 1) % TX_PER_BLOCK == 0:
                    sim.advance_slots(1)
            sim.advance_slots(2)
            for poller, scan in zip(pollers, scans, strict=True):
                t0 = time.perf_counter()
                result = poller.poll_once()
                scan.incremental_s.append(time.perf_counter() - t0)
                assert result.error is None and result.deposits_found == TX_PER_BLOCK // 2
        for scan in scans:
            print(
                f"{scan.label}, {scan.watched:>7} watched: incremental poll (5 blocks, "
                f"250 tx, 25 deposits) median {statistics.median(scan.incremental_s) * 1000:.0f} ms"
            )
        for name in dbs:
            drop_db(args.db, name)
    shutil.rmtree(workdir, ignore_errors=True)

    if args.record:
        record(args, scans, expected)


def record(args: argparse.Namespace, scans: list[Scan], expected: int) -> None:
    lines = [
        "",
        f"## Solana block-scan indexer ({args.db}; machine: 2-core python-svc, "
        f"date {dt.date(2026, 11, 23).isoformat()})",
        "",
        f"`python -m bench.solana_scan --transactions {args.transactions} --db {args.db}`: "
        f"LiteSVM simulator over HTTP, {args.transactions} transactions, {expected} of them "
        'deposits (SOL and USDC), 50 per block; real SolanaRpcSource; "ledger sink" = '
        'escrow\'s LedgerDepositSink (audit row + event per deposit seen), "indexer only" = '
        "a sink that does nothing beyond the deposit row. Incremental poll = 5 new blocks, "
        "250 transactions, 25 of them deposits; median of 5.",
        "",
        "| run | watched | load watched set | full scan | deposits/s | tx/s "
        "| credit at finalized | incremental poll |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scan in scans:
        credit = f"{scan.credit_rate:.0f} deposits/s" if scan.credit_rate else "-"
        lines.append(
            f"| {scan.label} | {scan.watched:,} | {scan.load_s:.2f} s | {scan.scan_s:.1f} s "
            f"| {scan.deposits / scan.scan_s:.0f} | {scan.transactions / scan.scan_s:.0f} "
            f"| {credit} | {statistics.median(scan.incremental_s) * 1000:.0f} ms |"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
