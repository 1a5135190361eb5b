"""Solana indexer: JSON-RPC requests per poll at 100, 499, 500 and 10,000 deposit addresses.

Usage: python -m bench.solana_rpc_cost [--rounds 10] [--record]

A LiteSVM simulator (in-process HTTP, slots advanced by hand) and one SQLite database per
poller. Each round is one poll interval of mainnet-like timing (2 s polls of 400 ms slots:
5 slots): 20 unrelated transfers per slot and 3 deposits to random watched addresses (SOL
to a wallet, USDC to a wallet without a token account yet, in the transaction that creates
its ATA, and USDC to an existing ATA); then every poller polls once and runs one
confirmation step, through its own real SolanaRpcSource, which counts the requests sent.

Pollers, interleaved on the same chain in every round:
- default: the shipped settings (per-address below block_scan_threshold = 500, block scan
  from 500 on; token accounts listed in rotation within 600 s);
- per-address and block scan forced (threshold raised / 1), to compare the modes;
- baseline (named): escrowd's per-address polling before issue 17, replayed here:
  getSignaturesForAddress for every wallet and every ATA on every poll, getTransaction for
  each new signature and one block header per slot with a deposit.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import structlog
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import insert, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Agent, DepositAddress
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.addresses import associated_token_address
from tests.solana_history import SOL, USDC, Chain

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SIZES = (100, 499, 500, 10_000)
SLOTS_PER_POLL = 5  # 2 s polls, 400 ms slots
FILLER_PER_SLOT = 20
DEPOSITS_PER_POLL = 3


@dataclass
class Run:
    label: str
    source: SolanaRpcSource
    poll: Callable[[], None]
    confirm: Callable[[], None]
    per_poll: list[int] = field(default_factory=list)
    per_confirm: list[int] = field(default_factory=list)
    methods: Counter[str] = field(default_factory=Counter)
    mode: str = ""


class BaselinePoller:
    """The per-address polling of escrowd before issue 17 (its request pattern)."""

    def __init__(self, source: SolanaRpcSource, accounts: list[str]) -> None:
        self.source = source
        self.accounts = accounts
        self.cursors: dict[str, str | None] = dict.fromkeys(accounts)
        self.seen: set[str] = set()

    def poll(self) -> None:
        self.source.get_slot("confirmed")
        slots: set[int] = set()
        for account in self.accounts:
            page = self.source.get_signatures_for_address(
                account, until=self.cursors[account], commitment="confirmed"
            )
            if page:
                self.cursors[account] = page[0].signature
            for info in page:
                if info.signature not in self.seen:
                    self.seen.add(info.signature)
                    tx = self.source.get_transaction(info.signature, "confirmed")
                    assert tx is not None
                    slots.add(tx.slot)
        for slot in slots:
            self.source.get_block(slot, "confirmed", transaction_details="none")


def watch(sessions: sessionmaker[Session], wallets: list[str], mint: str) -> None:
    with sessions() as session, session.begin():
        session.execute(insert(Agent), [{"external_id": f"agent-{i}"} for i in range(len(wallets))])
        ids = {
            row.external_id: row.id for row in session.execute(select(Agent.external_id, Agent.id))
        }
        session.execute(
            insert(DepositAddress),
            [
                {
                    "agent_id": ids[f"agent-{i}"],
                    "chain": "solana",
                    "address": wallet,
                    "derivation_index": i,
                    "token_account": associated_token_address(wallet, mint),
                }
                for i, wallet in enumerate(wallets)
            ],
        )


def poller_run(
    label: str, sim: SolanaSimulator, usdc: Pubkey, sessions: sessionmaker[Session], threshold: int
) -> Run:
    settings = SolanaSettings(
        name="solana", rpc_urls=[sim.url], usdc_mint=str(usdc), block_scan_threshold=threshold
    )
    source = SolanaRpcSource([sim.url], timeout_s=60)
    poller = SolanaPoller(settings, source, sessions, LedgerDepositSink())

    def poll() -> None:
        result = poller.poll_once()
        assert result.error is None, result.error
        run.mode = result.strategy

    def confirm() -> None:
        assert poller.confirm_once().error is None

    run = Run(label, source, poll, confirm)
    return run


def deposit_round(
    chain: Chain, wallets: list[Pubkey], funded: set[Pubkey], rng: random.Random
) -> None:
    sol_to, new_ata, old_ata = rng.sample(wallets, 3)
    for slot in range(SLOTS_PER_POLL):
        chain.sim.chain.add_filler_transactions(FILLER_PER_SLOT)
        if slot == 0:
            chain.send([chain.sol(sol_to, SOL // 10)])
        if slot == 1 and new_ata not in funded:
            chain.send([chain.create_ata(new_ata), chain.usdc_checked(chain.ata(new_ata), USDC)])
            funded.add(new_ata)
        if slot == 2:
            target = old_ata if old_ata in funded else next(iter(funded), None)
            if target is not None:
                chain.send([chain.usdc_checked(chain.ata(target), 2 * USDC)])
        chain.sim.advance_slots(1)


def measure(size: int, rounds: int, workdir: Path, template: Path) -> list[Run]:
    with SolanaSimulator(skip_every_slots=7) as sim:
        chain = Chain.on(sim)
        keypairs = [Keypair() for _ in range(size)]
        wallets = [str(k.pubkey()) for k in keypairs]
        runs = []
        for label, threshold in (
            ("default", 500),
            ("per-address", 10**9),
            ("block scan", 1),
        ):
            path = workdir / f"{size}-{label}.db"
            shutil.copyfile(template, path)
            sessions = make_session_factory(make_engine(f"sqlite:///{path}"))
            watch(sessions, wallets, str(chain.usdc))
            runs.append(poller_run(label, sim, chain.usdc, sessions, threshold))
        baseline_source = SolanaRpcSource([sim.url], timeout_s=60)
        accounts = [a for w in wallets for a in (w, associated_token_address(w, str(chain.usdc)))]
        baseline = BaselinePoller(baseline_source, accounts)
        runs.append(
            Run("baseline", baseline_source, baseline.poll, lambda: None, mode="per_address")
        )
        for run in runs:  # first polls: starting points, nothing to find yet
            run.poll()
        rng = random.Random(size)
        funded: set[Pubkey] = set()
        for _ in range(rounds):
            deposit_round(chain, [k.pubkey() for k in keypairs], funded, rng)
            for run in runs:
                before = Counter(run.source.calls)
                run.poll()
                after_poll = Counter(run.source.calls)
                run.confirm()
                run.per_poll.append(sum((after_poll - before).values()))
                run.per_confirm.append(sum((Counter(run.source.calls) - after_poll).values()))
                run.methods.update(after_poll - before)
        for run in runs:
            run.source.close()
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    workdir = Path(tempfile.mkdtemp(prefix="bench_solana_cost_"))
    template = workdir / "template.db"
    engine = make_engine(f"sqlite:///{template}")
    upgrade_to_head(engine)
    engine.dispose()

    rows = []
    started = time.perf_counter()
    for size in SIZES:
        runs = measure(size, args.rounds, workdir, template)
        by_label = {run.label: run for run in runs}
        rows.append((size, by_label))
        for run in runs:
            methods = ", ".join(f"{m} {n / args.rounds:.1f}" for m, n in run.methods.most_common())
            confirm = statistics.mean(run.per_confirm)
            print(
                f"{size:>6} addresses, {run.label:>11} ({run.mode}): "
                f"{statistics.mean(run.per_poll):7.1f} requests/poll "
                f"(max {max(run.per_poll)}), confirm {confirm:.1f}: {methods}"
            )
    shutil.rmtree(workdir, ignore_errors=True)
    print(f"took {time.perf_counter() - started:.0f} s")
    if args.record:
        record(args.rounds, rows)


def record(rounds: int, rows: list[tuple[int, dict[str, Run]]]) -> None:
    load = os.getloadavg()[0]
    lines = [
        "",
        "## Solana RPC requests per poll (bench/solana_rpc_cost.py)",
        "",
        f"Machine: 2-core python-svc ({platform.machine()}, {os.cpu_count()} CPUs), Python "
        f"{platform.python_version()}, date {date.today().isoformat()}, 1-min load average at "
        f"the end {load:.1f} (shared box; request counts do not depend on load).",
        "",
        f"`python -m bench.solana_rpc_cost --rounds {rounds}`: per poll interval 5 slots, "
        f"{FILLER_PER_SLOT} unrelated transfers per slot and {DEPOSITS_PER_POLL} deposits to "
        "random watched addresses; requests counted by each poller's SolanaRpcSource (mean "
        f"over {rounds} polls; max in brackets). Baseline = escrowd's per-address polling "
        "before issue 17 (getSignaturesForAddress for every wallet and ATA each poll), "
        "replayed on the same chain in the same rounds.",
        "",
        "| addresses | default: mode | default | per-address | block scan | baseline "
        "| confirm step |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for size, runs in rows:
        cells = [
            f"{statistics.mean(runs[label].per_poll):.1f} ({max(runs[label].per_poll)})"
            for label in ("default", "per-address", "block scan", "baseline")
        ]
        confirm = statistics.mean(runs["default"].per_confirm)
        lines.append(
            f"| {size:,} | {runs['default'].mode.replace('_', '-')} | "
            + " | ".join(cells)
            + f" | {confirm:.1f} |"
        )
    with RESULTS.open("a") as out:
        out.write("\n".join(lines) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
