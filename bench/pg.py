"""PostgreSQL helpers shared by the benchmarks, and the pgbench baseline they compare with."""

from __future__ import annotations

import re
import subprocess
import uuid

import psycopg

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
URL_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432"


def admin(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.encode())


def pgbench_tps(clients: int, seconds: int) -> float:
    """pgbench's builtin tpcb-like script on a fresh database of the same server.

    Scale is at least the client count (pgbench's advice: fewer branches than clients
    measures lock waits on the branch rows, not the server)."""
    name = f"bench_pgbench_{uuid.uuid4().hex[:8]}"
    admin(f'CREATE DATABASE "{name}"')
    try:
        common = ["-h", "127.0.0.1", "-U", "postgres"]
        scale = str(max(clients, 10))
        subprocess.run(
            ["pgbench", *common, "-i", "-q", "-s", scale, name], check=True, capture_output=True
        )
        threads = str(min(clients, 2))
        out = subprocess.run(
            [
                *("pgbench", *common, "-b", "tpcb-like", "-c", str(clients), "-j", threads),
                *("-T", str(seconds), "-n", name),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        match = re.search(r"tps = ([0-9.]+)", out)
        assert match, out
        return float(match.group(1))
    finally:
        admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
