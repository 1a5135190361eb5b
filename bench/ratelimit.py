"""What the per-key rate limit costs: authentication with and without counting.

Usage: python -m bench.ratelimit [--calls 2000] [--rounds 4] [--record]
                                 [--http-baseline-src DIR --http-seconds 10]

1. `ApiState.authenticate` alone, microseconds per call, on PostgreSQL (a fresh database on
   127.0.0.1) and SQLite (a file). Baseline in the same run: authentication as main did it,
   the key read by prefix and checked, nothing counted (PostgreSQL: one SELECT in
   autocommit on the statement connection; SQLite: a read transaction). Candidate:
   `authenticate` with counting, whose key (a limit far above the rate) gets claims of
   LEASE_MAX requests: one call in LEASE_MAX upserts the key's window row (PostgreSQL: one
   CTE statement; SQLite: a write transaction), the others read the key as the baseline
   does and take a request the process claimed. Rounds alternate the order (ABBA).
2. With --http-baseline-src (a `git archive` copy of main): GET /v1/networks through a real
   `escrowd run` per code tree, each on its own PostgreSQL database, driven by
   `wrk -t2 -c16`; the runs alternate baseline, branch, branch, baseline... The key's limit
   is raised by ESCROWD_API__RATE_LIMIT (a tree without rate limits ignores the unknown
   variable, e.g. `git archive d35bb3a`, the API before them), so the branch counts every
   request and refuses none.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, text

from bench.escrow import _free_port
from bench.pg import URL_BASE, admin
from escrowd.config.rate_limit import MAX_REQUESTS, RateLimit
from escrowd.config.settings import Settings
from escrowd.daemon.api_deps import ApiState
from escrowd.daemon.logs import configure_logging
from escrowd.escrow import apikeys
from escrowd.migrations.runner import upgrade_to_head
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory, statement_rows

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
REPO = Path(__file__).resolve().parent.parent
HIGH = RateLimit(requests=MAX_REQUESTS, window_s=1)
# main's key lookup (apikeys.PG_KEY_LOOKUP before this branch).
_PG_LOOKUP = (
    "SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL FROM api_keys WHERE prefix = %s"
)
_SQLITE_LOOKUP = text(
    "SELECT id, prefix, key_hash, scope, revoked_at IS NOT NULL FROM api_keys "
    "WHERE prefix = :prefix"
)


@contextmanager
def _pg_database() -> Iterator[str]:
    name = f"bench_rl_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        yield f"{URL_BASE}/{name}"
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _calls(work: Callable[[], object], calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        work()
    return (time.perf_counter() - started) / calls * 1e6


def bench_authenticate(engine: Engine, calls: int, rounds: int) -> list[tuple[float, float]]:
    """(baseline, counting) microseconds per call, per round."""
    upgrade_to_head(engine)
    sessions = make_session_factory(engine)
    with sessions() as s, s.begin():
        _, token = apikeys.create_key(s, name="bench", scope=ApiScope.READ, rate_limit=HIGH)
    state = ApiState(settings=Settings(), engine=engine, derivers={})
    # Both sides parse the token and hash its secret on every call, as authentication does.
    if engine.dialect.name == "postgresql":

        def baseline() -> apikeys.Principal:
            prefix, candidate = apikeys.parse(token)
            rows = statement_rows(engine, _PG_LOOKUP, (prefix,))
            return apikeys.check(apikeys.KeyRow(*rows[0]), candidate)
    else:

        def baseline() -> apikeys.Principal:
            prefix, candidate = apikeys.parse(token)
            row = state.read(lambda s: s.execute(_SQLITE_LOOKUP, {"prefix": prefix}).one())
            return apikeys.check(apikeys.KeyRow(*row), candidate)

    def counting() -> object:
        return state.authenticate(token)

    baseline()
    counting()
    results = []
    for n in range(rounds):
        if n % 2 == 0:
            base, count = _calls(baseline, calls), _calls(counting, calls)
        else:
            count, base = _calls(counting, calls), _calls(baseline, calls)
        results.append((base, count))
    return results


def _escrowd(
    src: Path, env: dict[str, str], *args: str, log: Path | None = None
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", "from escrowd.daemon.cli import main; main()", *args],
        cwd=src,
        env={**env, "PYTHONPATH": str(src)},
        stdout=subprocess.PIPE,
        stderr=log.open("wb") if log is not None else subprocess.DEVNULL,
    )


def _server(src: Path, url: str, data_dir: Path) -> tuple[subprocess.Popen[bytes], int, str]:
    port = _free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith("ESCROWD_")} | {
        "ESCROWD_DATABASE_URL": url,
        "ESCROWD_DATA_DIR": str(data_dir),
        "ESCROWD_API__PORT": str(port),
        "ESCROWD_API__RATE_LIMIT": str(HIGH),
        "ESCROWD_LOG__LEVEL": "warning",
        "ESCROWD_LOG__FORMAT": "json",
    }
    for args in (("migrate",), ("apikey", "create", "--name", "wrk", "--scope", "read")):
        done = _escrowd(src, env, *args)
        out, _ = done.communicate(timeout=120)
        assert done.returncode == 0, args
    key = next(line for line in out.decode().splitlines() if line.startswith("esk_"))
    data_dir.mkdir(parents=True, exist_ok=True)
    # The server's warnings and errors (an api_unhandled_error would show here).
    server = _escrowd(src, env, "run", log=data_dir / "server.log")
    print(f"server log: {data_dir / 'server.log'}")
    deadline = time.monotonic() + 60
    while subprocess.run(
        ["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/healthz"], check=False
    ).returncode:
        assert time.monotonic() < deadline and server.poll() is None, "server did not start"
        time.sleep(0.2)
    return server, port, key


def _wrk(port: int, key: str, seconds: int) -> tuple[float, float, int]:
    """Requests/s, median latency (ms) and non-2xx answers of one wrk run."""
    out = subprocess.run(
        [
            "wrk",
            "-t2",
            "-c16",
            f"-d{seconds}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {key}",
            f"http://127.0.0.1:{port}/v1/networks",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rate = float(re.search(r"Requests/sec:\s+([0-9.]+)", out).group(1))  # type: ignore[union-attr]
    median = re.search(r"50%\s+([0-9.]+)(us|ms|s)", out)
    assert median is not None
    scale = {"us": 1e-3, "ms": 1.0, "s": 1e3}[median.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    return rate, float(median.group(1)) * scale, int(bad.group(1)) if bad else 0


def bench_http(
    baseline_src: Path, rounds: int, seconds: int
) -> list[tuple[str, float, float, int]]:
    results = []
    with _pg_database() as base_url, _pg_database() as branch_url:
        tmp = Path(tempfile.mkdtemp(prefix="escrowd-bench-rl-"))
        servers = {
            "main": _server(baseline_src, base_url, tmp / "main"),
            "branch": _server(REPO, branch_url, tmp / "branch"),
        }
        try:
            for n in range(rounds):
                order = ("main", "branch") if n % 2 == 0 else ("branch", "main")
                for name in order:
                    _, port, key = servers[name]
                    results.append((name, *_wrk(port, key, seconds)))
        finally:
            for server, _, _ in servers.values():
                server.terminate()
                server.wait(30)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--http-baseline-src", type=Path)
    parser.add_argument("--http-seconds", type=int, default=10)
    parser.add_argument("--record", action="store_true", help="append to bench/RESULTS.md")
    args = parser.parse_args()
    configure_logging(level="warning")
    lines: list[str] = []
    for name in ("PostgreSQL", "SQLite"):
        if name == "PostgreSQL":
            with _pg_database() as url:
                engine = make_engine(url)
                rows = bench_authenticate(engine, args.calls, args.rounds)
                engine.dispose()
        else:
            with tempfile.TemporaryDirectory() as tmp:
                engine = make_engine(f"sqlite:///{tmp}/rl.db")
                rows = bench_authenticate(engine, args.calls, args.rounds)
                engine.dispose()
        for n, (base, count) in enumerate(rows, start=1):
            line = f"| {name} | {n} | {base:.0f} | {count:.0f} | {count - base:+.0f} |"
            print(line)
            lines.append(line)
    http_lines: list[str] = []
    if args.http_baseline_src is not None:
        for n, (name, rate, median_ms, bad) in enumerate(
            bench_http(args.http_baseline_src, args.rounds, args.http_seconds), start=1
        ):
            line = f"| {(n + 1) // 2} | {name} | {rate:.0f} | {median_ms:.2f} | {bad} |"
            print(line)
            http_lines.append(line)
    if args.record:
        when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M")
        out = [
            "",
            "### authenticate() alone (bench/ratelimit.py)",
            "",
            f"Machine: 2-core python-svc ({platform.machine()}), {when} UTC, PostgreSQL 15 on "
            f"the same host; {args.calls} calls per cell, rounds ABBA.",
            "",
            "| database | round | main: read the key (us/call) | branch: read + count "
            "(us/call) | difference |",
            "|---|---:|---:|---:|---:|",
            *lines,
        ]
        if http_lines:
            out += [
                "",
                f"### GET /v1/networks through `escrowd run` (wrk -t2 -c16 -d{args.http_seconds}s)",
                "",
                "| round | code | requests/s | median latency ms | non-2xx |",
                "|---:|---|---:|---:|---:|",
                *http_lines,
            ]
        with RESULTS.open("a", encoding="utf-8") as fh:
            fh.write("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
