"""PostgreSQL helpers shared by the benchmarks, and the pgbench baseline they compare with."""

from __future__ import annotations

import re
import statistics
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import psycopg

ADMIN_DSN = "postgresql://postgres@127.0.0.1:5432/postgres"
URL_BASE = "postgresql+psycopg://postgres@127.0.0.1:5432"
_COMMON = ("-h", "127.0.0.1", "-U", "postgres")


def admin(sql: str) -> None:
    with psycopg.connect(ADMIN_DSN, autocommit=True) as conn:
        conn.execute(sql.encode())


class PgBench:
    """pgbench's builtin tpcb-like script on a fresh database of the same server, loaded
    once so that it can run several times, between the runs it is compared with.

    Scale is at least the client count (pgbench's advice: fewer branches than clients
    measures lock waits on the branch rows, not the server)."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.scale = max(clients, 10)
        self._name = f"bench_pgbench_{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> PgBench:
        admin(f'CREATE DATABASE "{self._name}"')
        try:
            subprocess.run(
                ["pgbench", *_COMMON, "-i", "-q", "-s", str(self.scale), self._name],
                check=True,
                capture_output=True,
            )
        except BaseException:
            self._drop()
            raise
        return self

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _value: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._drop()

    def _drop(self) -> None:
        admin(f'DROP DATABASE IF EXISTS "{self._name}" WITH (FORCE)')

    def tps(self, seconds: int) -> float:
        threads = str(min(self.clients, 2))
        out = subprocess.run(
            [
                *("pgbench", *_COMMON, "-b", "tpcb-like", "-c", str(self.clients)),
                *("-j", threads, "-T", str(seconds), "-n", self._name),
            ],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        match = re.search(r"tps = ([0-9.]+)", out)
        assert match, out
        return float(match.group(1))


@dataclass(frozen=True)
class Round:
    """One measured run and the pgbench run beside it."""

    rate: float
    baseline_tps: float

    @property
    def ratio(self) -> float:
        return self.rate / self.baseline_tps


def interleaved(
    rounds: int, measure: Callable[[], float], baseline: Callable[[], float]
) -> list[Round]:
    """`rounds` runs of `measure` and of `baseline`, alternating which goes first (ABBA),
    so that a machine whose speed drifts during the invocation (shared hosts drift by tens
    of percent within minutes) weighs on both sides alike."""
    results = []
    for n in range(rounds):
        if n % 2 == 0:
            rate = measure()
            baseline_tps = baseline()
        else:
            baseline_tps = baseline()
            rate = measure()
        results.append(Round(rate, baseline_tps))
    return results


def pooled_ratio(rounds: list[Round]) -> float:
    """All rounds' operations over all rounds' pgbench transactions (the runs are equally
    long)."""
    return sum(r.rate for r in rounds) / sum(r.baseline_tps for r in rounds)


def median_ratio(rounds: list[Round]) -> float:
    return statistics.median(r.ratio for r in rounds)
