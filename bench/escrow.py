"""Escrow fund + release pairs/s on PostgreSQL, 16 clients, beside pgbench TPC-B.

Usage: python -m bench.escrow [--seconds 15] [--clients 16] [--processes 2] [--record]

Three runs against the same PostgreSQL server in one invocation:
1. service layer: each client funds an escrow and releases it, each step one transaction,
   through the in-process interface `escrow.EscrowService` (on PostgreSQL each step is one
   database function call in autocommit), its own buyer and worker; the clients are
   threads spread over `--processes` processes;
2. HTTP: the same pairs as POST /v1/escrows and POST /v1/escrows/{job}/release through a
   real uvicorn server on localhost (httpx clients, one per thread, API key + idempotency);
3. pgbench builtin tpcb-like with the same client count (scale = clients, so pgbench does
   not serialize on its branch rows).
Then `ledger.check` over the escrow databases must find zero violations. Target: service
layer escrow operations/s (fund or release, each one transaction) >= 50 % of pgbench tps.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.clients import run_threads, spread
from bench.pg import URL_BASE, admin, pgbench_tps
from config.settings import Settings
from daemon.api import create_app
from daemon.logs import configure_logging
from escrow import accounts, apikeys, ledger, service
from escrow.interface import EscrowService
from migrations.runner import upgrade_to_head
from models import ApiScope, TransferCode
from models.db import make_engine, make_session_factory
from models.registry import ensure_asset

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
AMOUNT = 1_000_000


def _setup(engine: Engine, clients: int) -> sessionmaker[Session]:
    upgrade_to_head(engine)
    sessions = make_session_factory(engine)
    with sessions() as s, s.begin():
        ensure_asset(s, chain="base", symbol="USDC", decimals=6, token_address="0x" + "ab" * 20)
        for n in range(clients):
            buyer = service.register_agent(s, f"buyer-{n}")
            service.register_agent(s, f"worker-{n}")
            ledger.post(
                s,
                [
                    ledger.TransferSpec(
                        idempotency_key=f"seed-{n}",
                        debit_account_id=accounts.custody(s, "base", "USDC").id,
                        credit_account_id=accounts.agent_available(s, buyer.id, "USDC").id,
                        amount=10**15,
                        code=TransferCode.DEPOSIT,
                        ref_type="bench",
                        ref_id=str(n),
                    )
                ],
                actor="bench",
            )
    return sessions


def _run_clients(
    clients: int, seconds: float, make: Callable[[int], Callable[[int], None]]
) -> float:
    """Run `clients` threads for `seconds`; each calls its pair function repeatedly.
    Returns completed pairs per second."""
    done = [0] * clients
    deadline = time.monotonic() + seconds
    barrier = threading.Barrier(clients + 1)

    def client(n: int) -> None:
        pair = make(n)
        barrier.wait()
        i = 0
        while time.monotonic() < deadline:
            pair(i)
            i += 1
        done[n] = i

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.monotonic()
    for thread in threads:
        thread.join()
    return sum(done) / (time.monotonic() - started)


@dataclass(frozen=True)
class ServiceConfig:
    url: str


def _service_pairs(
    config: ServiceConfig, first: int, count: int, seconds: float, ready: Callable[[], None]
) -> int:
    """Clients first..first+count-1 as threads of this process, each doing fund + release
    pairs (each step one transaction) for `seconds` after `ready()`. Returns escrow
    transactions completed (two per pair)."""
    configure_logging(level="warning")
    escrows = EscrowService(make_engine(config.url, pool_size=count + 2))

    def client(slot: int, running: Callable[[], bool]) -> int:
        n = first + slot
        i = 0
        while running():
            job = f"svc-{n}-{i}"
            escrows.fund_escrow(
                job_id=job,
                buyer=f"buyer-{n}",
                worker=f"worker-{n}",
                asset="USDC",
                amount=AMOUNT,
                fee_bps=250,
            )
            escrows.release_escrow(job)
            i += 1
        return 2 * i

    done = run_threads(count, seconds, ready, client)
    escrows.close()
    return done


def bench_service(
    engine: Engine, clients: int, seconds: float, processes: int
) -> tuple[float, float]:
    """Service-layer escrow transactions/s and client CPU ms per transaction: `clients`
    threads spread over `processes` processes (the daemons are stateless, so more processes
    is how a deployment uses more cores)."""
    _setup(engine, clients)
    url = engine.url.render_as_string(hide_password=False)
    return spread(
        _service_pairs, ServiceConfig(url), clients=clients, processes=processes, seconds=seconds
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def bench_http(engine: Engine, clients: int, seconds: float, data_dir: Path) -> float:
    sessions = _setup(engine, clients)
    with sessions() as s, s.begin():
        _, key = apikeys.create_key(s, name="bench", scope=ApiScope.WRITE)
    app = create_app(Settings(data_dir=data_dir), engine)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/v1"
    auth = {"Authorization": f"Bearer {key}"}

    def make(n: int) -> Callable[[int], None]:
        http = httpx.Client(timeout=30)

        def pair(i: int) -> None:
            job = f"http-{n}-{i}"
            body = {
                "job_id": job,
                "buyer": f"buyer-{n}",
                "worker": f"worker-{n}",
                "asset": "USDC",
                "amount": "1",
                "fee_bps": 250,
            }
            funded = http.post(
                f"{base}/escrows", json=body, headers={**auth, "Idempotency-Key": f"f-{job}"}
            )
            assert funded.status_code == 201, funded.text
            released = http.post(
                f"{base}/escrows/{job}/release", headers={**auth, "Idempotency-Key": f"r-{job}"}
            )
            assert released.status_code == 200, released.text

        return pair

    try:
        return _run_clients(clients, seconds, make)
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def _with_database(run: Callable[[Engine], float], clients: int) -> tuple[float, int]:
    name = f"bench_escrow_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{URL_BASE}/{name}", pool_size=clients + 4)
    try:
        rate = run(engine)
        with make_session_factory(engine, read_only=True)() as s:
            violations = len(ledger.check(s))
        return rate, violations
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="service-layer client processes")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    # Per-operation info logs would measure the terminal, not escrowd.
    configure_logging(level="warning")
    clients, seconds = args.clients, args.seconds
    data_dir = Path(f"/tmp/escrowd-bench-{uuid.uuid4().hex[:8]}")

    svc_cpu_ms = [0.0]

    def service_run(engine: Engine) -> float:
        tx_per_s, svc_cpu_ms[0] = bench_service(engine, clients, seconds, args.processes)
        return tx_per_s / 2

    svc_pairs, svc_violations = _with_database(service_run, clients)
    http_pairs, http_violations = _with_database(
        lambda e: bench_http(e, clients, seconds, data_dir), clients
    )
    baseline_tps = pgbench_tps(clients, int(seconds))
    ratio = 2 * svc_pairs / baseline_tps
    print(
        f"service layer: {svc_pairs:8.1f} fund+release pairs/s ({2 * svc_pairs:.1f} escrow "
        f"tx/s, client CPU {svc_cpu_ms[0]:.2f} ms per escrow tx)"
    )
    print(
        f"HTTP:          {http_pairs:8.1f} fund+release pairs/s ({2 * http_pairs:.1f} requests/s)"
    )
    print(f"pgbench tpcb-like, {clients} clients: {baseline_tps:.1f} tps")
    print(f"service escrow tx/s / pgbench tps = {ratio:.2f} (target >= 0.50)")
    print(f"ledger check violations: service {svc_violations}, HTTP {http_violations}")
    if args.record:
        lines = [
            "",
            "## Escrow fund + release (bench/escrow.py)",
            "",
            f"Machine: 2-core python-svc ({platform.machine()}), date {dt.date.today()}, "
            f"PostgreSQL 15 on the same host, {clients} concurrent clients, {seconds:.0f} s per "
            "run, one buyer/worker pair per client, fee 250 bps. Each pair = fund (1 "
            "transaction) + release (1 transaction).",
            "",
            "| path | pairs/s | escrow transactions/s | ledger violations |",
            "|---|---:|---:|---:|",
            f"| service layer (EscrowService, {args.processes} processes, client CPU "
            f"{svc_cpu_ms[0]:.2f} ms/tx) | {svc_pairs:.1f} | {2 * svc_pairs:.1f} "
            f"| {svc_violations} |",
            f"| HTTP (uvicorn, httpx, API key + Idempotency-Key) | {http_pairs:.1f} "
            f"| {2 * http_pairs:.1f} | {http_violations} |",
            f"| pgbench tpcb-like -c {clients} -s {max(clients, 10)} "
            f"| | {baseline_tps:.1f} tps | |",
            "",
            f"Service-layer escrow transactions/s / pgbench tps = {ratio:.2f} (target >= 0.50).",
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
