"""Solana crediting: finalized-to-credited for a burst of deposits, on PostgreSQL.

    python -m bench.solana_credit [--deposits 10000] [--rounds 3] [--sample 1000]

A LiteSVM simulator (in-process, over HTTP) gets a burst of `--deposits` SOL transfers to
1,000 watched wallets, 50 per block. In each round a fresh PostgreSQL database (a copy of
one holding the agents and their deposit addresses) records them at `confirmed` with the
real SolanaRpcSource and SolanaPoller (untimed); then, with the whole burst finalized, the
clock runs from the first confirmation step to the last deposit credited, the daemon's
step as it is (`getSignatureStatuses` in pages of 256, at most 5,000 deposits a step, each
step's credits set-based in one transaction). "Crediting" is the sink's share of it.

Baseline, interleaved in the same run (ABBA): the same burst credited one deposit at a
time, the path every deposit took before (its row locked, `ledger.post`, an audit row and
an event each), timed over the first `--sample` deposits. After every set-based round each
wallet's balance must equal the lamports sent to it, and `ledger check` and `audit verify`
must pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import time
import uuid
from collections.abc import Sequence

import psycopg
import structlog
from solders.keypair import Keypair
from solders.pubkey import Pubkey
from sqlalchemy import func, insert, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import SolanaSettings
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import accounts, audit, ledger
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.sink import Finalized
from escrowd.indexer.solana_indexer import SolanaPoller
from escrowd.indexer.solana_source import SolanaRpcSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Agent, Deposit, DepositAddress, DepositStatus
from escrowd.models.db import make_engine, make_session_factory

ADMIN_DSN = os.environ.get("ESCROWD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres")
URL_BASE = os.environ.get("ESCROWD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
TX_PER_BLOCK = 50
WALLETS = 1_000


def admin(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.encode())


class TimedSink(LedgerDepositSink):
    """The ledger sink, timing its crediting."""

    def __init__(self) -> None:
        super().__init__()
        self.credit_s = 0.0

    def confirmed_many(self, session: Session, deposits: Sequence[Finalized]) -> int:
        started = time.perf_counter()
        try:
            return self.credit_one_way(session, deposits)
        finally:
            self.credit_s += time.perf_counter() - started

    def credit_one_way(self, session: Session, deposits: Sequence[Finalized]) -> int:
        return super().confirmed_many(session, deposits)


class OneByOneSink(TimedSink):
    """The baseline: each deposit locked and credited on its own through `ledger.post`."""

    def credit_one_way(self, session: Session, deposits: Sequence[Finalized]) -> int:
        credited = 0
        for final in deposits:
            deposit = session.get(Deposit, final.id, with_for_update=True)
            if deposit is None or deposit.status != DepositStatus.PENDING:
                continue
            self.confirmed(session, deposit)
            credited += 1
        return credited


def build_burst(sim: SolanaSimulator, wallets: list[Pubkey], deposits: int) -> dict[str, int]:
    """`deposits` SOL transfers, TX_PER_BLOCK per block; lamports sent per wallet."""
    rng = random.Random(5)
    payers = [Keypair() for _ in range(8)]
    for payer in payers:
        sim.airdrop(payer.pubkey(), 10**15)
    sim.advance_slots(1)
    sent: dict[str, int] = {}
    for i in range(deposits):
        to = wallets[rng.randrange(len(wallets))]
        lamports = 10**6 + i
        sim.transfer_sol(payers[i % len(payers)], to, lamports)
        sent[str(to)] = sent.get(str(to), 0) + lamports
        if (i + 1) % TX_PER_BLOCK == 0:
            sim.advance_slots(1)
    sim.advance_slots(2)
    return sent


def make_template(wallets: list[Pubkey]) -> str:
    name = f"bench_solcred_tmpl_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{URL_BASE}/{name}")
    try:
        upgrade_to_head(engine)
        with engine.begin() as conn:
            conn.execute(insert(Agent), [{"external_id": f"agent-{i}"} for i in range(WALLETS)])
            ids = dict(conn.execute(select(Agent.external_id, Agent.id)).all())
            conn.execute(
                insert(DepositAddress),
                [
                    {
                        "agent_id": ids[f"agent-{i}"],
                        "chain": "solana",
                        "address": str(wallet),
                        "derivation_index": i,
                    }
                    for i, wallet in enumerate(wallets)
                ],
            )
    finally:
        engine.dispose()
    return name


def run(
    sim: SolanaSimulator, template: str, sink: TimedSink, limit: int | None, sent: dict[str, int]
) -> tuple[int, float, float]:
    """(deposits credited, seconds from the first confirmation step to the last credit,
    seconds of it in the sink)."""
    name = f"bench_solcred_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    engine = make_engine(f"{URL_BASE}/{name}")
    sessions: sessionmaker[Session] = make_session_factory(engine)
    try:
        # From slot 0: a first start otherwise begins at the current finalized slot, past
        # the burst, and finds nothing to credit.
        settings = SolanaSettings(
            name="solana", rpc_urls=[sim.url], usdc_mint=str(Keypair().pubkey()), start_slot=0
        )
        with SolanaRpcSource([sim.url], timeout_s=60) as source:
            poller = SolanaPoller(settings, source, sessions, sink, max_slots_per_poll=100_000)
            target = source.get_slot("confirmed")
            while (poller.poll_once().scanned_through_slot or 0) < target:
                pass
            with sessions() as session:
                pending = session.scalar(select(func.count()).select_from(Deposit)) or 0
            if limit is not None:
                poller.max_confirm_per_step = limit
            started = time.perf_counter()
            credited = 0
            while credited < (limit or pending):
                step = poller.confirm_once()
                assert step.error is None and step.confirmed > 0, step
                credited += step.confirmed
            elapsed_s = time.perf_counter() - started
        if limit is None:
            check(sessions, sent)
        return credited, elapsed_s, sink.credit_s
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def check(sessions: sessionmaker[Session], sent: dict[str, int]) -> None:
    with sessions() as session:
        assert (
            session.scalar(
                select(func.count()).select_from(Deposit).where(Deposit.status != "confirmed")
            )
            == 0
        )
        for address, agent_id in session.execute(
            select(DepositAddress.address, DepositAddress.agent_id)
        ):
            account = accounts.agent_available(session, agent_id, "SOL")
            assert ledger.balance(session, account) == sent.get(address, 0), address
        assert ledger.check(session) == []
        report = audit.verify(session)
        assert report.ok, report.first_problem


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--deposits", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sample", type=int, default=1_000)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with SolanaSimulator(skip_every_slots=7) as sim:
        wallets = [Keypair().pubkey() for _ in range(WALLETS)]
        started = time.perf_counter()
        sent = build_burst(sim, wallets, args.deposits)
        sim.finalize_all()
        print(f"burst: {args.deposits} deposits built in {time.perf_counter() - started:.1f} s")
        template = make_template(wallets)
        try:
            print(
                "| round | set-based: finalized to credited | of it crediting | "
                "one by one (baseline) | set-based / baseline |\n|---:|---:|---:|---:|---:|"
            )
            set_total = one_total = 0.0
            set_count = one_count = 0
            for number in range(1, args.rounds + 1):
                order = ["set", "one"] if number % 2 else ["one", "set"]
                got = {}
                for kind in order:
                    if kind == "set":
                        got[kind] = run(sim, template, TimedSink(), None, sent)
                    else:
                        got[kind] = run(sim, template, OneByOneSink(), args.sample, sent)
                (n_set, set_s, set_credit_s), (n_one, one_s, _) = got["set"], got["one"]
                set_total, set_count = set_total + set_s, set_count + n_set
                one_total, one_count = one_total + one_s, one_count + n_one
                print(
                    f"| {number} | {n_set:,} in {set_s:.2f} s, {n_set / set_s:,.0f} deposits/s "
                    f"| {set_credit_s:.2f} s, {n_set / set_credit_s:,.0f} deposits/s | "
                    f"{n_one:,} in {one_s:.2f} s, {n_one / one_s:,.0f} deposits/s | "
                    f"{(n_set / set_s) / (n_one / one_s):.1f}x |"
                )
            print(
                f"\nOver the rounds: set-based {set_count / set_total:,.0f} deposits/s "
                f"finalized to credited, one by one {one_count / one_total:,.0f} deposits/s "
                f"({(set_count / set_total) / (one_count / one_total):.1f}x); every set-based "
                "round credited the whole burst, balances equal the lamports sent, ledger "
                "check and audit verify clean."
            )
        finally:
            admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


if __name__ == "__main__":
    main()
