"""Two-leg ledger transfers/s on PostgreSQL at 1 and 16 clients, beside pgbench TPC-B.

Usage: python -m bench.ledger [--seconds 20] [--accounts 1000] [--processes 2] [--record]

Each escrowd operation is one transaction posting two linked transfers (a payment and its
fee: buyer -> seller, buyer -> platform fees) with their audit rows, through
`escrow.ledger.post_alone` (a posting that is a transaction of its own). pgbench runs its
builtin tpcb-like script with the same client count against the same server in the same
run. Target: escrowd at 16 clients >= 50 % of pgbench's tps. On PostgreSQL each posting is
one autocommit call of the escrowd_post function, so the Python client's CPU per posting
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
from bench.pg import URL_BASE, admin, pgbench_tps
from escrow import ledger
from escrow.accounts import platform_fees
from escrow.errors import InsufficientFunds
from migrations.runner import upgrade_to_head
from models import AccountKind, TransferCode
from models.db import make_engine, make_session_factory

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


@dataclass(frozen=True)
class Config:
    url: str
    account_ids: list[int]
    fees_id: int


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
            key = f"{n}-{i}"
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
    clients: int, processes: int, seconds: float, accounts_n: int
) -> tuple[float, float, int]:
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
        rate, cpu_ms = spread(
            _clients,
            Config(url, ids, fees_id),
            clients=clients,
            processes=min(processes, clients),
            seconds=seconds,
        )
        with sessions() as session:
            violations = ledger.check(session)
        return rate, cpu_ms, len(violations)
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--accounts", type=int, default=1000)
    parser.add_argument(
        "--processes", type=int, default=2, help="client processes (threads split over them)"
    )
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    rows = []
    for clients in (1, 16):
        escrowd_tps, cpu_ms, violations = run_escrowd(
            clients, args.processes, args.seconds, args.accounts
        )
        baseline_tps = pgbench_tps(clients, int(args.seconds))
        ratio = escrowd_tps / baseline_tps
        rows.append((clients, escrowd_tps, cpu_ms, baseline_tps, ratio, violations))
        print(
            f"clients={clients:2d}  escrowd two-leg transfers/s={escrowd_tps:8.1f}  "
            f"client CPU ms/posting={cpu_ms:5.2f}  "
            f"pgbench tpcb-like tps={baseline_tps:8.1f}  ratio={ratio:5.2f}  "
            f"ledger violations={violations}"
        )
    if args.record:
        lines = [
            "",
            f"## bench/ledger.py — {dt.date.today().isoformat()}",
            f"Machine: {platform.node()}, {platform.processor() or platform.machine()}, "
            "2 cores, PostgreSQL 15 on the same host. "
            f"{args.seconds:.0f} s per run, {args.accounts} accounts, clients spread over "
            f"up to {args.processes} processes.",
            "",
            "| clients | escrowd two-leg postings/s | client CPU ms/posting "
            "| pgbench tpcb-like tps | ratio | violations |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c} | {e:.1f} | {cpu:.2f} | {p:.1f} | {r:.2f} | {v} |"
            for c, e, cpu, p, r, v in rows
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
