"""EVM backfill benchmark: the `escrowd backfill evm` process, start to exit, with its
deposits credited, beside ethereum-etl's `export_token_transfers` and a raw `eth_getLogs`
scan over the same anvil blocks in the same run; and poll cost with 1,000 vs 1,000,000
watched addresses.

    python -m bench.evm_backfill [--part backfill|credit|poll] [--transfers 50000] [--blocks 250]
                                 [--rounds 3] [--etl /tmp/etl-venv39]
                                 [--baseline /path/to/main/.venv/bin/escrowd]

Credit part: the same history recorded pending (`--no-confirm`, untimed), then the
confirmation pass the daemon runs, timed as it reports itself, crediting every deposit:
crediting alone, on a fresh database copy each round.

Backfill part: anvil gets `--transfers` USDC Transfer logs over `--blocks` blocks, half of
them to 1,000 deposit addresses (1,000 agents, written straight into the database), and 12
more blocks so all are past the confirmation depth. Each round times, in ABBA order, the
escrowd process (`escrowd --config ... backfill evm --chain bench --from F --to L` on a
fresh PostgreSQL database: scan, record, then credit every deposit), ethereum-etl 2.4.2 from
its own virtual environment (`--etl`; it does not start on Python 3.11: make one with
Python 3.9, never a project dependency), and a raw `eth_getLogs` + filter with no database.
After each escrowd run every agent's ledger balance must equal what the chain sent its
address, and `escrowd ledger check` and `escrowd audit verify` must pass. `--baseline`
times another checkout's escrowd (main's, installed in its own venv) in the same rounds.

Each escrowd's own modules are byte-compiled before the rounds, as installing a wheel
does: an editable install run with PYTHONDONTWRITEBYTECODE set (this machine's shells set
it) would otherwise compile every escrowd module from source at each start, ~0.13 s that
no installed escrowd pays (ethereum-etl, pip-installed, starts from bytecode too).

Where the time goes, per escrowd run: start-up + exit (process wall outside the command's
own scan and confirmation timings), the scan (which credits final deposits in-window when
the escrowd has that), the final confirmation pass, the process's CPU, the CPU of the
PostgreSQL backends serving it (sampled from /proc), of the anvil node, and of the whole
machine (how much of its cores the run kept busy); then the fetch + decode + filter of the
same windows alone, in the benchmark's process. And PostgreSQL's part alone: the rows the
first (untimed) escrowd run wrote, loaded by COPY into a fresh database copy in one
transaction on one connection, each round: with the run's start-up, the least wall time any
client writing those rows on one connection could take.

Needs anvil (`npm ci`) and PostgreSQL (ESCROWD_TEST_PG_URL / ESCROWD_TEST_PG_DSN as in the
tests). Run it as a module: bench/escrow.py would shadow the escrow package as a script.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import requests
import tomli_w
from eth_account import Account
from sqlalchemy import text

from escrowd.config.settings import EvmChainSettings
from escrowd.devnet.anvil import AnvilProcess
from escrowd.devnet.evm import TestUSDC, deploy_test_usdc, dev_accounts, mine_blocks, web3_for_url
from escrowd.escrow.deposits import LedgerDepositSink
from escrowd.indexer.evm_poller import EvmPoller
from escrowd.indexer.evm_source import TRANSFER_TOPIC, JsonRpcEvmSource
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import Chain
from escrowd.models.db import make_engine, make_session_factory

PG_ADMIN_DSN = os.environ.get(
    "ESCROWD_TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/postgres"
)
PG_URL_BASE = os.environ.get("ESCROWD_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
CHAIN = "bench"
WATCHED = 1_000
CONFIRMATIONS = 12
ESCROWD = Path(sys.executable).with_name("escrowd")


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def admin(sql: str) -> None:
    with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.encode())


@dataclass(frozen=True)
class History:
    token: str
    first: int
    last: int
    watched: list[str]
    expected: dict[str, int]
    transfers: int


def build_chain(url: str, transfers: int, blocks: int) -> History:
    """`transfers` Transfer logs over `blocks` blocks (one batch transaction per block),
    every other one to a watched address, then CONFIRMATIONS empty blocks."""
    per_tx = max(1, transfers // max(1, blocks))
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
        for batch in range(transfers // per_tx):
            recipients, amounts = [], []
            for i in range(per_tx):
                n = batch * per_tx + i
                to = watched[n // 2 % WATCHED] if n % 2 == 0 else others[n // 2 % WATCHED]
                amount = 1 + n % 997
                recipients.append(to)
                amounts.append(amount)
                if n % 2 == 0:
                    expected[to] += amount
            last_tx = token.batch_transfer(sender, recipients, amounts, wait=False, gas=29_000_000)
        if last_tx:
            w3.eth.wait_for_transaction_receipt(last_tx, timeout=300)  # type: ignore[arg-type]
        last = w3.eth.block_number
        mine_blocks(w3, CONFIRMATIONS)
        for address in watched[:20]:  # the chain's own word on a sample
            assert token.balance_of(address) == expected[address]
        return History(token.address, first, last, watched, expected, transfers // per_tx * per_tx)


def make_template() -> str:
    """A migrated database with the 1,000 agents and their deposit addresses; each escrowd
    run gets a copy."""
    name = f"bench_tmpl_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"{PG_URL_BASE}/{name}")
    try:
        upgrade_to_head(engine)
    finally:
        engine.dispose()
    return name


def seed_addresses(template: str, watched: list[str]) -> None:
    engine = make_engine(f"{PG_URL_BASE}/{template}")
    try:
        with engine.begin() as conn:
            for i, address in enumerate(watched):
                agent_id = conn.execute(
                    text(
                        "INSERT INTO agents (external_id, created_at) VALUES (:e, now()) "
                        "RETURNING id"
                    ),
                    {"e": f"agent-{i}"},
                ).scalar_one()
                conn.execute(
                    text(
                        "INSERT INTO deposit_addresses (agent_id, chain, address, "
                        "derivation_index, created_at) VALUES (:a, :c, :addr, :i, now())"
                    ),
                    {"a": agent_id, "c": Chain.EVM.value, "addr": address, "i": i},
                )
    finally:
        engine.dispose()


@dataclass(frozen=True)
class EscrowdRun:
    wall_s: float
    scan_s: float
    credit_s: float
    credited: int
    # CPU of the escrowd process, and of the PostgreSQL backends serving it.
    client_cpu_s: float
    pg_cpu_s: float
    # CPU of the anvil node, and of the whole machine (every process), over the run.
    anvil_cpu_s: float
    machine_busy_s: float

    @property
    def outside_s(self) -> float:
        """Process start-up and exit: the wall time outside the scan and the final pass."""
        return self.wall_s - self.scan_s - self.credit_s


class BackendCpu:
    """CPU time of the PostgreSQL backends connected to one database, sampled from /proc
    while a command runs (PostgreSQL is local; a backend's last few milliseconds before it
    exits can be missed)."""

    def __init__(self, database: str) -> None:
        self.database = database
        self._ticks: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> BackendCpu:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        with psycopg.connect(PG_ADMIN_DSN, autocommit=True) as conn:
            while not self._stop.wait(0.02):
                pids = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = %s", [self.database]
                ).fetchall()
                for (pid,) in pids:
                    try:
                        self._ticks[pid] = cpu_ticks(pid)
                    except OSError:
                        continue

    @property
    def seconds(self) -> float:
        return sum(self._ticks.values()) / os.sysconf("SC_CLK_TCK")


def cpu_ticks(pid: int) -> int:
    """User + system CPU of a process so far, in clock ticks (utime and stime, fields 14
    and 15 of proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def process_cpu_s(pid: int) -> float:
    return cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")


def machine_busy_s() -> float:
    """CPU time every core of the machine spent outside idle and I/O wait, so far."""
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(
        int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
    )
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# Run by the escrowd's own interpreter. compile_dir skips symlinked folders (the
# repository's escrowd/ links its parts), so each part is compiled where it really is;
# imports through the link find the same __pycache__.
_BYTE_COMPILE = (
    "import compileall, os, escrowd\n"
    "root = os.path.dirname(escrowd.__file__)\n"
    "parts = [os.path.realpath(e.path) for e in os.scandir(root) if e.is_dir()]\n"
    "ok = all(compileall.compile_dir(d, quiet=1) for d in [root, *parts])\n"
    "raise SystemExit(0 if ok else 1)\n"
)


def byte_compile(escrowd: Path) -> None:
    """Write the bytecode of `escrowd`'s package, as a wheel install does."""
    # -I: the package that escrowd imports, whatever the current directory or PYTHONPATH.
    subprocess.run([str(escrowd.with_name("python")), "-I", "-c", _BYTE_COMPILE], check=True)


def escrowd_backfill(
    url: str,
    history: History,
    template: str,
    workdir: Path,
    escrowd: Path = ESCROWD,
    *,
    anvil_pid: int,
    recorded_first: bool = False,
    written: dict[str, bytes] | None = None,
) -> EscrowdRun:
    """One timed `escrowd backfill evm` over the history on a fresh copy of `template`.
    `recorded_first`: the range is scanned with `--no-confirm` first (untimed), so the timed
    run scans nothing new and its confirmation pass, the daemon's confirmation step, credits
    every deposit: crediting alone. `written` gets the rows the run wrote (`dump_rows`)."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    database_url = f"{PG_URL_BASE}/{name}"
    config = workdir / f"{name}.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "data_dir": str(workdir),
                "database_url": database_url,
                "log": {"level": "warning"},
                "evm_chains": [
                    {
                        "name": CHAIN,
                        "chain_id": 31337,
                        "rpc_urls": [url],
                        "usdc_address": history.token,
                        "confirmations": CONFIRMATIONS,
                    }
                ],
            }
        )
    )
    try:
        command = [str(escrowd), "--config", str(config), "backfill", "evm", "--chain", CHAIN]
        command += ["--from", str(history.first), "--to", str(history.last)]
        if recorded_first:
            subprocess.run(
                [*command, "--no-confirm"], capture_output=True, timeout=1800, check=True
            )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        with BackendCpu(name) as backends:
            anvil_before, busy_before = process_cpu_s(anvil_pid), machine_busy_s()
            started = time.perf_counter()
            proc = subprocess.run(
                command, capture_output=True, text=True, timeout=1800, check=False
            )
            wall_s = time.perf_counter() - started
            anvil_cpu_s = process_cpu_s(anvil_pid) - anvil_before
            busy_s = machine_busy_s() - busy_before
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_cpu_s = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        assert proc.returncode == 0, proc.stderr[-2000:]
        match = re.search(r"confirmed (\d+), orphaned 0 in ([0-9.]+)s", proc.stderr)
        assert match is not None, proc.stderr[-2000:]
        credited, credit_s = int(match.group(1)), float(match.group(2))
        scanned = re.search(r"new deposits in ([0-9.]+)s", proc.stderr)
        assert scanned is not None, proc.stderr[-2000:]
        check_books(config, database_url, history)
        if written is not None:
            written.update(dump_rows(name))
        return EscrowdRun(
            wall_s,
            float(scanned.group(1)),
            credit_s,
            credited,
            client_cpu_s,
            backends.seconds,
            anvil_cpu_s,
            busy_s,
        )
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# What a backfill writes, in the order it writes it; the rows these refer to first (the
# asset and the accounts, registered at start-up: not timed).
REFERRED = ("assets", "ledger_accounts")
WRITTEN = ("deposits", "audit_log", "audit_heads", "webhook_events", "ledger_transfers")


def _dsn(database: str) -> str:
    return psycopg.conninfo.make_conninfo(PG_ADMIN_DSN, dbname=database)


def dump_rows(database: str) -> dict[str, bytes]:
    """Every row of the REFERRED and WRITTEN tables of `database`, in COPY's text form."""
    out: dict[str, bytes] = {}
    with psycopg.connect(_dsn(database)) as conn:
        for table in (*REFERRED, *WRITTEN):
            with conn.cursor() as cursor, cursor.copy(f'COPY "{table}" TO STDOUT') as copy:
                out[table] = b"".join(bytes(block) for block in copy)
    return out


def database_alone(template: str, written: dict[str, bytes]) -> tuple[float, float]:
    """PostgreSQL's part alone: the rows one escrowd run wrote, loaded into a fresh copy of
    `template` by COPY in one transaction on one connection, no client work between the
    tables. (wall seconds, the backend's CPU seconds): what one connection's writes cost
    the server however the client builds them."""
    name = f"bench_{uuid.uuid4().hex[:10]}"
    admin(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')

    def load(conn: psycopg.Connection[Any], tables: tuple[str, ...]) -> None:
        with conn.transaction():
            for table in tables:
                with conn.cursor() as cursor, cursor.copy(f'COPY "{table}" FROM STDIN') as copy:
                    copy.write(written[table])

    try:
        with psycopg.connect(_dsn(name)) as conn:
            load(conn, REFERRED)
            backend = conn.info.backend_pid
            cpu_before = process_cpu_s(backend)
            started = time.perf_counter()
            load(conn, WRITTEN)
            wall_s = time.perf_counter() - started
            return wall_s, process_cpu_s(backend) - cpu_before
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def without_first_sightings(written: dict[str, bytes]) -> dict[str, bytes]:
    """`written` less the rows that record a deposit as seen before it is credited (its
    deposit_seen audit row and deposit.pending event): what a run would write if a deposit
    credited in the window it is found got only its crediting rows."""

    def keep(table: str, line: bytes) -> bool:
        fields = line.split(b"\t", 2)
        if table == "audit_log":  # id, stream, ...
            return not fields[1].startswith(b"deposits-seen:")
        if table == "webhook_events":  # id, type, ...
            return fields[1] != b"deposit.pending"
        return True

    return {
        table: b"".join(line for line in data.splitlines(keepends=True) if keep(table, line))
        for table, data in written.items()
    }


def check_books(config: Path, database_url: str, history: History) -> None:
    """Every agent's balance is what the chain sent its address; ledger and audit clean."""
    for args in (["ledger", "check"], ["audit", "verify"]):
        proc = subprocess.run(
            [str(ESCROWD), "--config", str(config), *args],
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, f"escrowd {' '.join(args)}: {proc.stdout[-2000:]}"
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            balances: dict[str, int] = dict(
                conn.execute(
                    text(
                        "SELECT a.address, l.credits_posted - l.debits_posted "
                        "FROM deposit_addresses a JOIN ledger_accounts l "
                        "ON l.owner = a.agent_id::text AND l.kind = 'agent_available'"
                    )
                ).all()
            )
    finally:
        engine.dispose()
    wrong = [a for a in history.watched if int(balances.get(a, 0)) != history.expected[a]]
    assert not wrong, f"{len(wrong)} agents' balances differ from the chain, e.g. {wrong[0]}"


def etl_export(etl_venv: Path, url: str, history: History) -> float | str:
    exe = etl_venv / "bin" / "ethereumetl"
    if not exe.exists():
        return f"ethereum-etl not installed at {exe}"
    out = Path(f"/tmp/etl-{uuid.uuid4().hex[:8]}.csv")
    command = [str(exe), "export_token_transfers", "--start-block", str(history.first)]
    command += ["--end-block", str(history.last), "--provider-uri", url]
    command += ["--tokens", history.token, "--output", str(out)]
    started = time.perf_counter()
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    elapsed_s = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        return f"exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}"
    with out.open() as rows:
        exported = sum(1 for _ in rows) - 1
    out.unlink()
    assert exported == history.transfers, f"ethereum-etl exported {exported} rows"
    return elapsed_s


def raw_get_logs(url: str, history: History) -> float:
    """eth_getLogs over the range (2,000-block windows, as escrowd's default) and the
    watched-address filter, nothing stored: the floor for any indexer."""
    watched = {a.lower() for a in history.watched}
    started = time.perf_counter()
    found = 0
    with requests.Session() as http:
        for start in range(history.first, history.last + 1, 2_000):
            end = min(history.last, start + 1_999)
            body: dict[str, Any] = {
                "jsonrpc": "2.0",
                "id": 1,
                "method": "eth_getLogs",
                "params": [
                    {
                        "fromBlock": hex(start),
                        "toBlock": hex(end),
                        "address": history.token,
                        "topics": [TRANSFER_TOPIC],
                    }
                ],
            }
            for entry in http.post(url, json=body, timeout=300).json()["result"]:
                if "0x" + entry["topics"][2][-40:] in watched:
                    found += 1
    elapsed_s = time.perf_counter() - started
    assert found == history.transfers // 2, found
    return elapsed_s


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


def fetch_decode(url: str, history: History) -> float:
    """What escrowd's scan does before storing, in this process: its JSON-RPC source reads
    the range's Transfer logs in windows sized as the poller sizes them, decodes them and
    picks the watched ones."""
    from escrowd.indexer.evm_poller import AdaptiveWindow

    watched = {a.lower() for a in history.watched}
    window = AdaptiveWindow(2_000)
    found = 0
    started = time.perf_counter()
    with JsonRpcEvmSource([url], chain=CHAIN) as source:
        block = history.first
        while block <= history.last:
            to_block = min(history.last, block + window.size - 1)
            logs, _ = source.logs_with_end_header(history.token, block, to_block)
            window.succeeded(to_block - block + 1, len(logs))
            found += sum(1 for entry in logs if entry.to_addr.lower() in watched)
            block = to_block + 1
    elapsed_s = time.perf_counter() - started
    assert found == history.transfers // 2, found
    return elapsed_s


def _escrowd_cell(run: EscrowdRun, n: int) -> str:
    return f"{run.wall_s:.2f} s, {n / run.wall_s:,.0f}/s"


def run_backfill(
    url: str,
    history: History,
    rounds: int,
    etl_venv: Path,
    baseline: Path | None,
    *,
    anvil_pid: int,
) -> None:
    """Each round: this escrowd, `baseline` (another checkout's escrowd, e.g. main's),
    ethereum-etl and the raw scan, in an order reversed every other round."""
    template = make_template()
    try:
        seed_addresses(template, history.watched)
        workdir = Path(f"/tmp/bench-backfill-{uuid.uuid4().hex[:8]}")
        workdir.mkdir()
        n = history.transfers
        print(
            "| round | escrowd backfill + credit, process wall | baseline escrowd | "
            "ethereum-etl | raw eth_getLogs | escrowd / etl | escrowd / raw | "
            "escrowd / baseline |\n|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        byte_compile(ESCROWD)
        if baseline is not None:
            byte_compile(baseline)
        # One untimed run of each escrowd first: the first backfill after the chain was built
        # ran slower than the next one whichever escrowd it was (anvil and PostgreSQL
        # caches warming up).
        written: dict[str, bytes] = {}
        escrowd_backfill(url, history, template, workdir, anvil_pid=anvil_pid, written=written)
        if baseline is not None:
            escrowd_backfill(url, history, template, workdir, baseline, anvil_pid=anvil_pid)
        walls: dict[str, list[float]] = {"escrowd": [], "baseline": [], "etl": [], "raw": []}
        alone: list[tuple[float, float]] = []
        crediting_rows_only = without_first_sightings(written)
        alone_crediting: list[tuple[float, float]] = []
        splits: list[tuple[str, EscrowdRun]] = []
        for number in range(1, rounds + 1):
            order = ["escrowd", "baseline", "etl", "raw"]
            if number % 2 == 0:
                order.reverse()
            got: dict[str, EscrowdRun | float | str] = {}
            for step in order:
                if step == "escrowd":
                    ours = escrowd_backfill(url, history, template, workdir, anvil_pid=anvil_pid)
                    splits.append(("escrowd", ours))
                    got[step] = ours
                elif step == "baseline":
                    if baseline is None:
                        got[step] = "no --baseline"
                        continue
                    theirs = escrowd_backfill(
                        url, history, template, workdir, baseline, anvil_pid=anvil_pid
                    )
                    splits.append(("baseline", theirs))
                    got[step] = theirs
                elif step == "etl":
                    got[step] = etl_export(etl_venv, url, history)
                    alone.append(database_alone(template, written))
                    alone_crediting.append(database_alone(template, crediting_rows_only))
                else:
                    got[step] = raw_get_logs(url, history)
            run, base, etl, raw = got["escrowd"], got["baseline"], got["etl"], got["raw"]
            assert isinstance(run, EscrowdRun) and isinstance(raw, float)
            walls["escrowd"].append(run.wall_s)
            walls["raw"].append(raw)
            cells = [f"| {number} | {_escrowd_cell(run, n)}"]
            if isinstance(base, EscrowdRun):
                walls["baseline"].append(base.wall_s)
                cells.append(_escrowd_cell(base, n))
            else:
                cells.append(f"not run: {base}")
            if isinstance(etl, float):
                walls["etl"].append(etl)
                cells.append(f"{etl:.2f} s, {n / etl:,.0f}/s")
            else:
                cells.append(f"not run: {etl}")
            cells.append(f"{raw:.2f} s, {n / raw:,.0f}/s")
            cells.append(f"{etl / run.wall_s:.2f}x" if isinstance(etl, float) else "-")
            cells.append(f"{raw / run.wall_s:.0%}")
            cells.append(
                f"{base.wall_s / run.wall_s:.2f}x faster" if isinstance(base, EscrowdRun) else "-"
            )
            print(" | ".join(cells) + " |", flush=True)
        cores = os.cpu_count() or 1
        print(
            "\n| run | process wall | start-up + exit | scan + record (+ credit in-window) | "
            "final confirmation pass | escrowd CPU | PostgreSQL backends' CPU | anvil CPU | "
            f"machine busy (of {cores} cores) |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
        )
        for label, split in splits:
            print(
                f"| {label} | {split.wall_s:.2f} s | {split.outside_s:.2f} s | "
                f"{split.scan_s:.2f} s | {split.credit_s:.2f} s ({split.credited:,} deposits) | "
                f"{split.client_cpu_s:.2f} s | {split.pg_cpu_s:.2f} s | "
                f"{split.anvil_cpu_s:.2f} s | {split.machine_busy_s:.2f} s, "
                f"{split.machine_busy_s / (cores * split.wall_s):.0%} |"
            )
        fetch_s = [fetch_decode(url, history) for _ in range(rounds)]
        print(
            f"\nfetch + decode + filter alone, in one process (escrowd's source and windows): "
            f"{min(fetch_s):.2f}-{max(fetch_s):.2f} s"
        )
        rows = {table: written[table].count(b"\n") for table in WRITTEN}
        fewer = {table: crediting_rows_only[table].count(b"\n") for table in WRITTEN}
        own_runs = [split for label, split in splits if label == "escrowd"]
        print(
            "\nPostgreSQL alone, the rows of one run ("
            + ", ".join(f"{table} {count:,}" for table, count in rows.items())
            + ") by COPY in one transaction on one connection: "
            + ", ".join(f"{wall:.2f} s ({cpu:.2f} s CPU)" for wall, cpu in alone)
            + ". Lower bound on one connection, start-up + that: "
            + ", ".join(
                f"{run.outside_s + wall:.2f} s ({(run.outside_s + wall) / run.wall_s:.0%} of "
                f"the run's {run.wall_s:.2f} s)"
                for run, (wall, _) in zip(own_runs, alone, strict=True)
            )
            + f". Without the first-sighting rows (audit_log {fewer['audit_log']:,}, "
            + f"webhook_events {fewer['webhook_events']:,}): "
            + ", ".join(f"{wall:.2f} s ({cpu:.2f} s CPU)" for wall, cpu in alone_crediting)
        )
        if len(walls["etl"]) == rounds:
            # #18's targets as wall time: >= 5x ethereum-etl's rate, >= 30 % of raw's.
            pairs = zip(walls["etl"], walls["raw"], strict=True)
            allowed = [min(etl / 5, raw / 0.30) for etl, raw in pairs]
            print(
                "Wall time the targets allow per round (the smaller of ethereum-etl / 5 and "
                "raw / 0.30): " + ", ".join(f"{a:.2f} s" for a in allowed)
            )

        def ratio(a: str, b: str) -> str:
            if not walls[a] or not walls[b]:
                return "n/a"
            values = sorted(x / y for x, y in zip(walls[a], walls[b], strict=True))
            return f"{values[0]:.2f}-{values[-1]:.2f} (total {sum(walls[a]) / sum(walls[b]):.2f})"

        total = sum(walls["escrowd"])
        print(
            f"\nOver the {rounds} rounds: escrowd {n * rounds / total:,.0f} transfers/s; "
            f"etl wall / escrowd wall {ratio('etl', 'escrowd')}; raw / escrowd "
            f"{ratio('raw', 'escrowd')}; baseline / escrowd {ratio('baseline', 'escrowd')}. "
            f"Every escrowd run credited {n // 2:,} deposits, balances equal the chain's, "
            "ledger check and audit verify clean."
        )
    finally:
        admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


def run_credit(url: str, history: History, rounds: int, *, anvil_pid: int) -> None:
    """Crediting alone: each round records the range pending, then times the confirmation
    pass that credits every deposit (on a fresh database copy)."""
    template = make_template()
    try:
        seed_addresses(template, history.watched)
        workdir = Path(f"/tmp/bench-backfill-{uuid.uuid4().hex[:8]}")
        workdir.mkdir()
        byte_compile(ESCROWD)
        print(
            "| round | deposits credited | confirmation pass | deposits/s | process wall | "
            "PostgreSQL backends' CPU |\n|---:|---:|---:|---:|---:|---:|"
        )
        for number in range(1, rounds + 1):
            run = escrowd_backfill(
                url, history, template, workdir, anvil_pid=anvil_pid, recorded_first=True
            )
            assert run.credited == history.transfers // 2, run
            print(
                f"| {number} | {run.credited:,} | {run.credit_s:.2f} s | "
                f"{run.credited / run.credit_s:,.0f} | {run.wall_s:.2f} s | {run.pg_cpu_s:.2f} s |",
                flush=True,
            )
    finally:
        admin(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--part", choices=["backfill", "credit", "poll"], default="backfill")
    parser.add_argument("--transfers", type=int, default=50_000)
    parser.add_argument("--blocks", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--etl", type=Path, default=Path("/tmp/etl-venv39"))
    parser.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="another checkout's escrowd executable (e.g. main's) timed in the same rounds",
    )
    parser.add_argument(
        "--watched", type=int, default=1_000_000, help="with --part poll: watched addresses"
    )
    args = parser.parse_args()
    with AnvilProcess(extra_args=["--gas-limit", "30000000"]) as anvil:
        if args.part in ("backfill", "credit"):
            started = time.perf_counter()
            history = build_chain(anvil.url, args.transfers, args.blocks)
            print(
                f"chain built: {history.transfers} transfers in blocks "
                f"[{history.first}, {history.last}] in {time.perf_counter() - started:.1f}s"
            )
            if args.part == "credit":
                run_credit(anvil.url, history, args.rounds, anvil_pid=anvil.pid)
            else:
                run_backfill(
                    anvil.url, history, args.rounds, args.etl, args.baseline, anvil_pid=anvil.pid
                )
        else:
            token = build_chain(anvil.url, 0, 1).token
            refresh_s, poll_s, rss = poll_cost(anvil.url, token, args.watched)
            print(
                f"| poll, {args.watched:,} watched | first load {refresh_s:.2f} s | "
                f"median poll {poll_s * 1000:.1f} ms | RSS {rss:.0f} MB |"
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()
