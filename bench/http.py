"""The HTTP API under wrk against a real `escrowd run`, beside pgbench, in one run.

Usage: python -m bench.http [--seconds 15] [--rounds 2] [--connections 16] [--workers 2]

Needs wrk (Debian: `apt-get install wrk`) and pgbench (`apt-get install postgresql-client`
or the server package), and PostgreSQL on 127.0.0.1:5432 as user postgres.

On a fresh PostgreSQL database: migrate, create the buyers (each with a large balance), as
many workers, a page of deposits and 20,000 funded escrows (for the releases), and the API
key (`bench_api_key`, the one place that decides what key the bench uses), then start
`escrowd run` (`--workers` API processes and the jobs process: expiry, webhooks, audit
checkpoint, subscriptions; no chain is configured, so no poller runs). Each round runs
pgbench tpcb-like (-c connections, scale >= connections), then wrk (-c connections,
keep-alive, `--seconds` each) on
  fund      POST /v1/escrows, unique job ids and Idempotency-Keys, buyers and workers in turn
  release   POST /v1/escrows/{job}/release of the funded escrows, each once
  balances  GET /v1/agents/{id}/balances
  deposits  GET /v1/deposits?limit=50
for this tree, then the same for `--baseline-src` if given; a last pgbench closes the
run. Before the first round each request runs 3 s unmeasured against each daemon, so that
its API processes have their connections, prepared statements and caches, and 1 s before
each round (the pgbench run before it closed the daemons' idle connections). Each wrk
figure is compared with the mean of the pgbench runs before and after its round. Prints
requests/s, p50/p99, non-2xx and the ratio, then runs `escrowd ledger check` on each
database.
Targets (issue #19): fund and release >= 0.35 of pgbench tps, balances >= 1.0, p99 <= 50
ms, 0 non-2xx, ledger check clean.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from bench.pg import ADMIN_DSN, URL_BASE, PgBench, admin
from escrowd.daemon.logs import configure_logging
from escrowd.escrow import accounts, apikeys, ledger, service
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import ApiScope, Deposit, DepositAddress, Escrow, TransferCode
from escrowd.models.db import make_engine, make_session_factory
from escrowd.models.registry import ensure_asset

LUA = Path(__file__).resolve().parent / "http.lua"
ENTRY = "from escrowd.daemon.cli import main; main()"
BUYERS = 64
DEPOSITS = 200
PREFUNDED = 20_000
OPERATIONS = ("fund", "release", "balances", "deposits")
START_TIMEOUT_S = 60.0
WARM_UP_S = 3
ROUND_WARM_UP_S = 1


def bench_api_key(session: Session) -> str:
    """The API key every request of the bench presents, with a rate limit far above the
    bench's rate (counted, never refused). A `--baseline-src` tree from before per-key
    rate limits seeds through this function too, without one."""
    if "rate_limit" not in inspect.signature(apikeys.create_key).parameters:
        _, key = apikeys.create_key(session, name="bench-http", scope=ApiScope.ADMIN)
        return key
    from escrowd.config.rate_limit import MAX_REQUESTS, RateLimit

    _, key = apikeys.create_key(
        session,
        name="bench-http",
        scope=ApiScope.ADMIN,
        rate_limit=RateLimit(requests=MAX_REQUESTS, window_s=1),
    )
    return key


def _seed(engine: Engine) -> str:
    upgrade_to_head(engine)
    sessions = make_session_factory(engine)
    with sessions() as s, s.begin():
        usdc = ensure_asset(
            s, chain="base", symbol="USDC", decimals=6, token_address="0x" + "ab" * 20
        )
        for n in range(BUYERS):
            service.register_agent(s, f"worker-{n}")
        custody = accounts.custody(s, "base", "USDC").id
        for n in range(BUYERS):
            buyer = service.register_agent(s, f"buyer-{n}")
            ledger.post(
                s,
                [
                    ledger.TransferSpec(
                        idempotency_key=f"seed-{n}",
                        debit_account_id=custody,
                        credit_account_id=accounts.agent_available(s, buyer.id, "USDC").id,
                        amount=10**15,
                        code=TransferCode.DEPOSIT,
                        ref_type="bench",
                        ref_id=str(n),
                    )
                ],
                actor="bench",
            )
        owner = service.get_agent(s, "buyer-0")
        address = DepositAddress(
            agent_id=owner.id, chain="evm", address="0x" + "cd" * 20, derivation_index=0
        )
        s.add(address)
        s.flush()
        # Pending deposits: a full page to list, and no credit for `ledger check` to expect.
        s.add_all(
            Deposit(
                chain="base",
                tx_hash=f"0x{n:064x}",
                log_index=0,
                asset_id=usdc.id,
                agent_id=owner.id,
                deposit_address_id=address.id,
                from_address="0x" + "ef" * 20,
                amount=1_000_000 + n,
                block_number=1_000 + n,
                block_hash=f"0x{n + 1:064x}",
            )
            for n in range(DEPOSITS)
        )
        key = bench_api_key(s)
    # Escrows for the release runs to settle each once: more than the fund runs make.
    for first in range(0, PREFUNDED, 2_000):
        with sessions() as s, s.begin():
            buyers = [service.get_agent(s, f"buyer-{n}") for n in range(BUYERS)]
            workers = [service.get_agent(s, f"worker-{n}") for n in range(BUYERS)]
            for n in range(first, first + 2_000):
                service.fund_escrow(
                    s,
                    job_id=f"pre-{n}",
                    buyer=buyers[n % BUYERS],
                    worker=workers[(n * 7 + 1) % BUYERS],
                    asset="USDC",
                    amount=10_000,
                    fee_bps=100,
                    actor="bench",
                )
    return key


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    log_path: Path
    port: int

    def workers(self) -> list[int]:
        """The API worker processes' pids, from their start-up events in the log."""
        pids: list[int] = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"api_workers_started"' in line:
                pids = [int(pid) for pid in json.loads(line).get("pids", [])]
        return pids


def _python(src: Path | None) -> str:
    """The interpreter of an escrowd: this one, or the baseline tree's own virtual
    environment (`src`/.venv) when it has one. The baseline must import its own code: an
    editable install of this tree would win over PYTHONPATH in this interpreter."""
    if src is not None and (src / ".venv" / "bin" / "python").exists():
        return str(src / ".venv" / "bin" / "python")
    return sys.executable


def _env(data_dir: Path, url: str, src: Path | None) -> dict[str, str]:
    """The environment of an escrowd command on `url`; `src`: the baseline's source tree,
    imported instead of this one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ESCROWD_", "PYTHONPATH"))}
    env.update(ESCROWD_DATA_DIR=str(data_dir), ESCROWD_DATABASE_URL=url)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def _start_daemon(url: str, data_dir: Path, workers: int, src: Path | None) -> Daemon:
    env = _env(data_dir, url, src)
    env.update(
        ESCROWD_API__PORT="0",
        ESCROWD_WORKER__PORT="0",
        ESCROWD_LOG__LEVEL="info",
        ESCROWD_LOG__FORMAT="json",
    )
    # A baseline without the process model runs one process, with no --workers option.
    args = ["run"] if src is not None else ["run", "--workers", str(workers)]
    log_path = data_dir / "daemon.log"
    with log_path.open("wb") as log_file:
        proc = subprocess.Popen(
            [_python(src), "-c", ENTRY, *args],
            env=env,
            cwd=data_dir,
            stdout=subprocess.DEVNULL,
            stderr=log_file,
        )
    deadline = time.monotonic() + START_TIMEOUT_S
    port = None
    while time.monotonic() < deadline and proc.poll() is None:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == "api_listening":
                    port = int(event["port"])
                if event.get("event") == "daemon_ready" and port is not None:
                    return Daemon(proc, log_path, port)
        time.sleep(0.1)
    proc.kill()
    raise SystemExit(f"escrowd run did not start:\n{log_path.read_text()[-3000:]}")


# Seeds a database with the code of the tree on PYTHONPATH (the baseline's schema and
# models), through this file's _seed; prints the API key.
_SEED_ELSEWHERE = """
import runpy, sys
from escrowd.models.db import make_engine
bench = runpy.run_path(sys.argv[1], run_name="bench_http_seed")
engine = make_engine(sys.argv[2])
print(bench["_seed"](engine))
engine.dispose()
"""


class Target:
    """One escrowd under test: its database, daemon, API key and funded jobs."""

    def __init__(self, label: str, workers: int, src: Path | None) -> None:
        self.label = label
        self.src = src
        self.name = f"bench_http_{uuid.uuid4().hex[:8]}"
        self.url = f"{URL_BASE}/{self.name}"
        self.data_dir = Path(tempfile.mkdtemp(prefix="bench-http-"))
        self.jobs = self.data_dir / "jobs.txt"
        self.jobs.write_text("")
        admin(f'CREATE DATABASE "{self.name}"')
        self.engine = make_engine(self.url)
        try:
            self._start(workers)
        except BaseException:
            self.drop()
            raise

    def _start(self, workers: int) -> None:
        src = self.src
        if src is None:
            self.key = _seed(self.engine)
        else:
            seeded = subprocess.run(
                [_python(src), "-c", _SEED_ELSEWHERE, str(Path(__file__).resolve()), self.url],
                env=_env(self.data_dir, self.url, src),
                cwd=self.data_dir,
                capture_output=True,
                text=True,
                check=True,
            )
            self.key = seeded.stdout.strip().splitlines()[-1]
        self.daemon = _start_daemon(self.url, self.data_dir, workers, src)

    def stop(self) -> None:
        self.daemon.proc.terminate()
        code = self.daemon.proc.wait(60)
        print(f"\n{self.label}: escrowd run exited {code}")
        loud = [
            line
            for line in self.daemon.log_path.read_text(errors="replace").splitlines()
            if '"level": "error"' in line or '"level": "warning"' in line
        ]
        print(f"{self.label}: daemon warnings and errors: {len(loud)}")
        for line in loud[:5]:
            print(f"  {line[:300]}")
        self.engine.dispose()
        code, out = _ledger_check(self.url, self.data_dir, self.src)
        print(f"{self.label}: escrowd ledger check: exit {code}: {out[-300:]}")
        with psycopg.connect(
            f"postgresql://postgres@127.0.0.1:5432/{self.name}", autocommit=True
        ) as conn:
            row = conn.execute("SELECT count(*) FROM escrows").fetchone()
            print(f"{self.label}: escrows in the database: {row[0] if row else 0}")

    def drop(self) -> None:
        self.engine.dispose()
        admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        shutil.rmtree(self.data_dir, ignore_errors=True)


@dataclass(frozen=True)
class WrkResult:
    op: str
    requests_per_s: float
    p50_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: int
    replays: int
    # CPU microseconds per request, by who spent them (see CpuMeter).
    cpu_us: dict[str, float]


_TICK_US = 1e6 / os.sysconf("SC_CLK_TCK")


def _ticks(pid: int) -> int:
    """User + system CPU clock ticks of process `pid` so far (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12])


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


class CpuMeter:
    """Where a run's CPU went, from /proc: the API worker processes, escrowd's jobs process
    (with the supervisor), the PostgreSQL processes serving the bench's database and the
    server's own (WAL writer, checkpointer...), and wrk; per request once divided."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.start = self._sample()
        self.wrk_start = resource.getrusage(resource.RUSAGE_CHILDREN)

    def _groups(self) -> dict[str, list[int]]:
        supervisor = self.target.daemon.proc.pid
        workers = self.target.daemon.workers()
        jobs = [supervisor, *(p for p in _children(supervisor) if p not in workers)]
        with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
            server = [
                int(pid)
                for (pid,) in conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND "
                    "(datname = %s OR datname IS NULL)",
                    (self.target.name,),
                )
            ]
        return {"api": workers, "jobs": jobs, "postgres": server}

    def _sample(self) -> dict[str, dict[int, int]]:
        return {group: {pid: _ticks(pid) for pid in pids} for group, pids in self._groups().items()}

    def per_request(self, requests: int) -> dict[str, float]:
        end = self._sample()
        wrk_end = resource.getrusage(resource.RUSAGE_CHILDREN)
        spent = {
            # A process that started during the run counts from zero, one that ended is lost.
            group: sum(ticks - self.start[group].get(pid, 0) for pid, ticks in pids.items())
            * _TICK_US
            for group, pids in end.items()
        }
        spent["wrk"] = (
            wrk_end.ru_utime + wrk_end.ru_stime - self.wrk_start.ru_utime - self.wrk_start.ru_stime
        ) * 1e6
        return {group: us / max(requests, 1) for group, us in spent.items()}


def _wrk(target: Target, op: str, seconds: int, connections: int) -> WrkResult:
    threads = 2
    port, key, jobs = target.daemon.port, target.key, target.jobs
    env = {
        **os.environ,
        "BENCH_OP": op,
        "BENCH_KEY": key,
        "BENCH_RUN": uuid.uuid4().hex[:10],
        "BENCH_BUYERS": str(BUYERS),
        "BENCH_THREADS": str(threads),
        "BENCH_JOBS": str(jobs),
    }
    meter = CpuMeter(target)
    out = subprocess.run(
        [
            *("wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s"),
            *("--timeout", "10s", "-s", str(LUA), f"http://127.0.0.1:{port}"),
        ],
        env=env,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    line = next(line for line in out.splitlines() if line.startswith("BENCH "))
    figures = json.loads(line.removeprefix("BENCH "))
    requests = int(figures["requests"])
    listed = len(jobs.read_text().splitlines()) if op == "release" else requests
    return WrkResult(
        op=op,
        requests_per_s=requests / (figures["duration_us"] / 1e6),
        p50_ms=figures["p50_us"] / 1000,
        p99_ms=figures["p99_us"] / 1000,
        non_2xx=int(figures["non_2xx"]),
        socket_errors=int(figures["socket_errors"]),
        replays=max(0, requests - listed),
        cpu_us=meter.per_request(requests),
    )


def _warm_up(target: Target, seconds: int, connections: int) -> None:
    """Each request for `seconds`, not measured: a server that has run a while, whose API
    processes have their connections open, statements prepared and caches filled."""
    for op in OPERATIONS:
        if op == "release":
            _funded_jobs(target.engine, target.jobs)
        _wrk(target, op, seconds, connections)


def _funded_jobs(engine: Engine, path: Path) -> int:
    with make_session_factory(engine, read_only=True)() as s:
        jobs = list(s.scalars(select(Escrow.job_id).where(Escrow.status == "funded")))
    path.write_text("".join(f"{job}\n" for job in jobs))
    return len(jobs)


def _ledger_check(url: str, data_dir: Path, src: Path | None) -> tuple[int, str]:
    done = subprocess.run(
        [_python(src), "-c", ENTRY, "ledger", "check"],
        env=_env(data_dir, url, src),
        cwd=data_dir,
        capture_output=True,
        text=True,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).strip()


def _pgbench(pgbench: PgBench, seconds: int) -> float:
    """pgbench's tps; tried again when it could not connect (a server shared with other
    benchmarks may be at max_connections for a moment)."""
    # The daemons' idle pooled connections (each API process keeps its own) would leave
    # pgbench short of PostgreSQL's max_connections; the daemons reconnect on next use.
    admin(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname LIKE 'bench_http_%' AND state = 'idle'"
    )
    for attempt in range(3):
        try:
            return pgbench.tps(seconds)
        except subprocess.CalledProcessError as exc:
            print(f"pgbench failed (attempt {attempt + 1}): {str(exc.stderr)[-300:]}", flush=True)
            time.sleep(5)
    return pgbench.tps(seconds)


def _server_load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f}/{five:.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2, help="API worker processes")
    parser.add_argument(
        "--baseline-src",
        type=Path,
        help="a source tree of another escrowd (e.g. `git archive main`), measured the same "
        "way after this one in every round, with its own database; run with the tree's "
        ".venv when it has one (`pip install -e .` there)",
    )
    args = parser.parse_args()
    for tool in ("wrk", "pgbench"):
        if shutil.which(tool) is None:
            raise SystemExit(f"{tool} is not installed: apt-get install {tool}")

    configure_logging(fmt="console", level="warning")
    targets: list[Target] = []
    try:
        targets.append(Target("branch", args.workers, None))
        if args.baseline_src is not None:
            targets.append(Target("baseline", args.workers, args.baseline_src.resolve()))
        started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        print(
            f"# {platform.node()} {os.cpu_count()} cores, {started}, escrowd run --workers "
            f"{args.workers}, wrk -c {args.connections} -d {args.seconds}s"
        )
        results: dict[tuple[str, str], list[tuple[WrkResult, float]]] = {}
        for target in targets:
            _warm_up(target, WARM_UP_S, args.connections)
        with PgBench(args.connections) as pgbench:
            baseline = [_pgbench(pgbench, args.seconds)]
            print(f"pgbench {baseline[-1]:8.1f} tps  ({_server_load()})", flush=True)
            for round_ in range(1, args.rounds + 1):
                measured = []
                for target in targets:
                    # pgbench needed the daemons' idle connections closed (see _pgbench).
                    _warm_up(target, ROUND_WARM_UP_S, args.connections)
                    for op in OPERATIONS:
                        if op == "release":
                            _funded_jobs(target.engine, target.jobs)
                        result = _wrk(target, op, args.seconds, args.connections)
                        measured.append((target.label, result))
                        print(
                            f"round {round_} {target.label:8s} {op:9s} "
                            f"{result.requests_per_s:8.1f} req/s  "
                            f"p50 {result.p50_ms:6.1f} ms  p99 {result.p99_ms:6.1f} ms  "
                            f"non-2xx {result.non_2xx}  socket errors {result.socket_errors}"
                            + (f"  replays {result.replays}" if result.replays else "")
                            + f"  ({_server_load()})"
                            + "\n      CPU per request: "
                            + ", ".join(f"{k} {v:.0f} us" for k, v in result.cpu_us.items()),
                            flush=True,
                        )
                baseline.append(_pgbench(pgbench, args.seconds))
                print(f"pgbench {baseline[-1]:8.1f} tps  ({_server_load()})", flush=True)
                around = statistics.mean(baseline[-2:])
                for label, result in measured:
                    results.setdefault((label, result.op), []).append((result, around))
        print()
        print("| escrowd | request | requests/s | p50 | p99 | non-2xx | pgbench tps | ratio |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for (label, op), rows in sorted(results.items(), key=lambda item: item[0][1]):
            for n, (result, around) in enumerate(rows, 1):
                print(
                    f"| {label} | {op} (round {n}) | {result.requests_per_s:,.0f}"
                    f" | {result.p50_ms:.1f} ms | {result.p99_ms:.1f} ms | {result.non_2xx}"
                    f" | {around:,.0f} | {result.requests_per_s / around:.2f} |"
                )
        for target in targets:
            target.stop()
    finally:
        for target in targets:
            if target.daemon.proc.poll() is None:
                target.daemon.proc.kill()
            target.drop()


if __name__ == "__main__":
    main()
