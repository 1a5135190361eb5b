"""Escrow fund + release pairs/s on PostgreSQL, 16 clients, beside pgbench TPC-B.

Usage: python -m bench.escrow [--seconds 10] [--rounds 3] [--clients 16] [--processes 2]
                              [--record]

Against the same PostgreSQL server in one invocation:
1. service layer: each client funds an escrow and releases it, each step one transaction,
   through the in-process interface `escrow.EscrowService` (on PostgreSQL each step is one
   database function call in autocommit), its own buyer and worker; the clients are
   threads spread over `--processes` processes;
2. HTTP: the same pairs as POST /v1/escrows and POST /v1/escrows/{job}/release through a
   real uvicorn server on localhost in a process of its own, as the daemon runs beside a
   marketplace backend (httpx clients, one per thread, API key + idempotency);
3. pgbench builtin tpcb-like with the same client count (scale = clients, so pgbench does
   not serialize on its branch rows).
The service-layer and pgbench runs alternate, `--rounds` of each (bench.pg.interleaved): on
a shared host the machine's speed drifts within minutes, and one run of each, minutes
apart, measured the drift as much as escrowd. Then `ledger.check` over the escrow databases
must find zero violations. Target: service layer escrow operations/s (fund or release, each
one transaction) >= 50 % of pgbench tps, taken over all rounds (`bench.pg.pooled_ratio`);
each round's ratio is printed too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import multiprocessing
import platform
import socket
import statistics
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvicorn
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from bench.clients import run_threads, spread
from bench.pg import URL_BASE, PgBench, admin, interleaved, median_ratio, pooled_ratio
from escrowd.config.rate_limit import MAX_REQUESTS, RateLimit
from escrowd.config.settings import Settings
from escrowd.daemon.api import create_app
from escrowd.daemon.logs import configure_logging
from escrowd.escrow import accounts, apikeys, ledger, service
from escrowd.escrow.interface import EscrowService
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import ApiScope, TransferCode
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
# The bench key's own limit, far above any rate here: counted, never refused.
BENCH_LIMIT = RateLimit(requests=MAX_REQUESTS, window_s=1)
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


@dataclass(frozen=True)
class ServiceConfig:
    url: str
    # Job ids are unique per run, so that runs can share a database.
    run: str


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
            job = f"svc-{config.run}-{n}-{i}"
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


def service_rate(
    engine: Engine, clients: int, seconds: float, processes: int
) -> tuple[float, float]:
    """Service-layer escrow transactions/s and client CPU ms per transaction: `clients`
    threads spread over `processes` processes (the daemons are stateless, so more processes
    is how a deployment uses more cores)."""
    url = engine.url.render_as_string(hide_password=False)
    return spread(
        _service_pairs,
        ServiceConfig(url, uuid.uuid4().hex[:8]),
        clients=clients,
        processes=processes,
        seconds=seconds,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _serve(url: str, port: int, data_dir: Path) -> None:
    """The API in a process of its own, as escrowd runs it beside the marketplace backend."""
    configure_logging(level="warning")
    app = create_app(Settings(data_dir=data_dir), make_engine(url, pool_size=20))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def _wait_until_serving(port: int, server: multiprocessing.process.BaseProcess) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/openapi.json", timeout=5).raise_for_status()
            return
        except httpx.TransportError:
            if not server.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the API server did not start") from None
            time.sleep(0.1)


def bench_http(engine: Engine, clients: int, seconds: float, data_dir: Path) -> float:
    """Fund + release pairs/s over HTTP: the API server in its own process, `clients`
    threads of this one posting to it."""
    sessions = _setup(engine, clients)
    with sessions() as s, s.begin():
        _, key = apikeys.create_key(s, name="bench", scope=ApiScope.WRITE, rate_limit=BENCH_LIMIT)
    port = _free_port()
    url = engine.url.render_as_string(hide_password=False)
    server = multiprocessing.get_context("spawn").Process(
        target=_serve, args=(url, port, data_dir), daemon=True
    )
    server.start()
    base = f"http://127.0.0.1:{port}/v1"
    auth = {"Authorization": f"Bearer {key}"}

    def client(n: int, running: Callable[[], bool]) -> int:
        http = httpx.Client(timeout=30)
        i = 0
        while running():
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
            i += 1
        return i

    started = [0.0]

    def ready() -> None:
        _wait_until_serving(port, server)
        started[0] = time.monotonic()

    try:
        pairs = run_threads(clients, seconds, ready, client)
        return pairs / (time.monotonic() - started[0])
    finally:
        server.terminate()
        server.join(timeout=10)


@contextmanager
def _database(clients: int) -> Iterator[Engine]:
    name = f"bench_escrow_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{URL_BASE}/{name}", pool_size=clients + 4)
    try:
        yield engine
    finally:
        engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _violations(engine: Engine) -> int:
    with make_session_factory(engine, read_only=True)() as s:
        return len(ledger.check(s))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10, help="length of each run")
    parser.add_argument(
        "--rounds", type=int, default=3, help="service-layer and pgbench runs, interleaved"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2, help="service-layer client processes")
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    # Per-operation info logs would measure the terminal, not escrowd.
    configure_logging(level="warning")
    clients, seconds = args.clients, args.seconds
    data_dir = Path(f"/tmp/escrowd-bench-{uuid.uuid4().hex[:8]}")

    cpu_ms: list[float] = []
    with _database(clients) as engine, PgBench(clients) as pgbench:
        _setup(engine, clients)

        def service() -> float:
            rate, cpu = service_rate(engine, clients, seconds, args.processes)
            cpu_ms.append(cpu)
            return rate

        rounds = interleaved(args.rounds, service, lambda: pgbench.tps(int(seconds)))
        svc_violations = _violations(engine)
    with _database(clients) as engine:
        http_pairs = bench_http(engine, clients, seconds, data_dir)
        http_violations = _violations(engine)

    for n, (r, cpu) in enumerate(zip(rounds, cpu_ms, strict=True), start=1):
        print(
            f"round {n}: service layer {r.rate:7.1f} escrow tx/s (client CPU {cpu:.2f} ms/tx), "
            f"pgbench {r.baseline_tps:7.1f} tps, ratio {r.ratio:.2f}"
        )
    pooled, median = pooled_ratio(rounds), median_ratio(rounds)
    svc_tx = statistics.mean(r.rate for r in rounds)
    print(f"service layer: {svc_tx / 2:8.1f} fund+release pairs/s ({svc_tx:.1f} escrow tx/s)")
    print(
        f"HTTP:          {http_pairs:8.1f} fund+release pairs/s ({2 * http_pairs:.1f} requests/s)"
    )
    pgbench_mean = statistics.mean(r.baseline_tps for r in rounds)
    print(f"pgbench tpcb-like, {clients} clients: {pgbench_mean:.1f} tps")
    print(
        f"service escrow tx/s / pgbench tps = {pooled:.2f} over {len(rounds)} rounds "
        f"(per-round median {median:.2f}; target >= 0.50)"
    )
    print(f"ledger check violations: service {svc_violations}, HTTP {http_violations}")
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
        lines = [
            "",
            "## Escrow fund + release (bench/escrow.py)",
            "",
            f"Machine: 2-core python-svc ({platform.machine()}), {when} UTC, PostgreSQL 15 "
            f"on the same host, {clients} concurrent clients, one "
            "buyer/worker pair per client, fee 250 bps. Each pair = fund (1 transaction) + "
            f"release (1 transaction). {len(rounds)} service-layer runs of {seconds:.0f} s "
            f"interleaved with pgbench tpcb-like -c {clients} -s {pgbench.scale} runs (ABBA).",
            "",
            "| round | service escrow tx/s | client CPU ms/tx | pgbench tps | ratio |",
            "|---|---:|---:|---:|---:|",
            *(
                f"| {n} | {r.rate:.1f} | {cpu:.2f} | {r.baseline_tps:.1f} | {r.ratio:.2f} |"
                for n, (r, cpu) in enumerate(zip(rounds, cpu_ms, strict=True), start=1)
            ),
            "",
            f"HTTP (uvicorn, httpx, API key + Idempotency-Key): {http_pairs:.1f} pairs/s "
            f"({2 * http_pairs:.1f} requests/s). Ledger violations: service {svc_violations}, "
            f"HTTP {http_violations}.",
            "",
            f"Service-layer escrow transactions/s / pgbench tps = {pooled:.2f} over all rounds "
            f"(per-round median {median:.2f}; target >= 0.50).",
        ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
