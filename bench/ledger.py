"""Two-leg ledger transfers/s on PostgreSQL at 1 and 16 clients, beside pgbench TPC-B.

Usage: python -m bench.ledger [--seconds 10] [--rounds 3] [--accounts 1000] [--processes 2]
                              [--record]

Each escrowd operation is one transaction posting two linked transfers (a payment and its
fee: buyer -> seller, buyer -> platform fees) with their audit rows, through
`escrow.ledger.post_alone` (a posting that is a transaction of its own). pgbench runs its
builtin tpcb-like script with the same client count against the same server in the same
run, alternating with escrowd's runs (`--rounds` of each, bench.pg.interleaved). Target:
escrowd at 16 clients >= 50 % of pgbench's tps over the rounds. On PostgreSQL each posting
is one autocommit call of the escrowd_post function, so the Python client's CPU per posting
(process time, all threads) is printed too: client and server share the machine's cores.
The clients are threads spread over `--processes` processes (bench/clients.py), the way a
deployment runs several processes.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import platform
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.clients import run_threads, spread
from bench.pg import URL_BASE, PgBench, Round, admin, interleaved, median_ratio, pooled_ratio
from escrowd.escrow import ledger
from escrowd.escrow.accounts import platform_fees
from escrowd.escrow.errors import InsufficientFunds
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import AccountKind, TransferCode
from escrowd.models.db import make_engine, make_session_factory

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Config:
    url: str
    account_ids: list[int]
    fees_id: int
    # Idempotency keys are unique per run, so that runs can share a database.
    run: str


def _clients(
    config: Config, first: int, count: int, seconds: float, ready: Callable[[], None]
) -> int:
    """Clients first..first+count-1 as threads of this process; returns postings done."""
    engine = make_engine(config.url, pool_size=count + 1)

    def client(slot: int, running: Callable[[], bool]) -> int:
        n = first + slot
        rng = random.Random(n)
        i = 0
        while running():
            src, dst = rng.sample(config.account_ids, 2)
            amount = rng.randint(1_000, 1_000_000)
            key = f"{config.run}-{n}-{i}"
            specs = [
                ledger.TransferSpec(
                    f"p-{key}", src, dst, amount, TransferCode.ESCROW_RELEASE, "bench", key
                ),
                ledger.TransferSpec(
                    f"f-{key}", src, config.fees_id, amount // 40 + 1, TransferCode.FEE, "b", key
                ),
            ]
            # A refused posting is a real outcome of random amounts; it still counts.
            with contextlib.suppress(InsufficientFunds):
                ledger.post_alone(engine, specs, actor="bench", audit_stream=f"bench:{key}")
            i += 1
        return i

    done = run_threads(count, seconds, ready, client)
    engine.dispose()
    return done


def run_escrowd(
    clients: int, processes: int, seconds: float, accounts_n: int, rounds: int
) -> tuple[list[Round], list[float], int]:
    """`rounds` escrowd runs interleaved with pgbench runs; each round's postings/s and
    pgbench tps, the client CPU ms per posting of each run, and the ledger violations."""
    name = f"bench_ledger_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    url = f"{URL_BASE}/{name}"
    engine = make_engine(url)
    try:
        upgrade_to_head(engine)
        sessions = make_session_factory(engine)
        with sessions() as session:
            world = ledger.get_or_create_account(session, AccountKind.CUSTODY, "bench", "USDC")
            ids = []
            for i in range(accounts_n):
                acct = ledger.get_or_create_account(
                    session, AccountKind.AGENT_AVAILABLE, f"a{i}", "USDC"
                )
                ids.append(acct.id)
                ledger.post(
                    session,
                    [
                        ledger.TransferSpec(
                            f"seed-{i}", world.id, acct.id, 10**12, TransferCode.DEPOSIT, "b", "s"
                        )
                    ],
                    actor="bench",
                )
            fees_id = platform_fees(session, "USDC").id
            session.commit()
        cpu_ms: list[float] = []

        def escrowd() -> float:
            rate, cpu = spread(
                _clients,
                Config(url, ids, fees_id, uuid.uuid4().hex[:8]),
                clients=clients,
                processes=min(processes, clients),
                seconds=seconds,
            )
            cpu_ms.append(cpu)
            return rate

        with PgBench(clients) as pgbench:
            results = interleaved(rounds, escrowd, lambda: pgbench.tps(int(seconds)))
        with sessions() as session:
            violations = ledger.check(session)
        return results, cpu_ms, len(violations)
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10, help="length of each run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="escrowd and pgbench runs, interleaved"
    )
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--processes", type=int, default=2, help="client processes (threads split over them)"
    )
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    runs: list[tuple[int, list[Round], list[float], int]] = []
    for clients in (1, 16):
        rounds, cpu_ms, violations = run_escrowd(
            clients, args.processes, args.seconds, args.accounts, args.rounds
        )
        runs.append((clients, rounds, cpu_ms, violations))
        for n, (r, cpu) in enumerate(zip(rounds, cpu_ms, strict=True), start=1):
            print(
                f"clients={clients:2d} round {n}: escrowd two-leg transfers/s={r.rate:8.1f}  "
                f"client CPU ms/posting={cpu:5.2f}  pgbench tpcb-like tps={r.baseline_tps:8.1f}"
                f"  ratio={r.ratio:5.2f}"
            )
        print(
            f"clients={clients:2d}: ratio {pooled_ratio(rounds):.2f} over {len(rounds)} rounds "
            f"(per-round median {median_ratio(rounds):.2f}), ledger violations={violations}"
        )
    if args.record:
        lines = [
            "",
            f"## bench/ledger.py — {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC",
            f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
            "2 cores, PostgreSQL 15 on the same host. "
            f"{args.rounds} escrowd runs of {args.seconds:.0f} s interleaved with pgbench "
            f"runs (ABBA), {args.accounts} accounts, clients spread over up to "
            f"{args.processes} processes.",
            "",
            "| clients | round | escrowd two-leg postings/s | client CPU ms/posting "
            "| pgbench tpcb-like tps | ratio |",
            "|---|---|---|---|---|---|",
        ]
        for clients, rounds, cpu_ms, _ in runs:
            lines += [
                f"| {clients} | {n} | {r.rate:.1f} | {cpu:.2f} | {r.baseline_tps:.1f} "
                f"| {r.ratio:.2f} |"
                for n, (r, cpu) in enumerate(zip(rounds, cpu_ms, strict=True), start=1)
            ]
        lines.append("")
        lines += [
            f"{clients} clients: ratio {pooled_ratio(rounds):.2f} over the rounds, ledger "
            f"violations {violations}."
            for clients, rounds, _, violations in runs
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
