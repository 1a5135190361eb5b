"""Two `escrowd run` daemons on one PostgreSQL: each job runs in one of them at a time,
and when one dies the other takes its jobs over."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import make_url

from tests.daemon_support import DaemonProcess, daemon_env

pytestmark = pytest.mark.postgres


def _rows(dsn: str) -> list[tuple[str, float, float]]:
    with psycopg.connect(dsn) as db:
        rows = db.execute(
            "SELECT instance, started_at, ended_at FROM escrowd_test_probe ORDER BY started_at"
        ).fetchall()
    return [(str(i), float(s), float(e)) for i, s, e in rows]


def test_two_daemons_never_run_a_job_at_once_and_hand_over(tmp_path: Path, pg_url: str) -> None:
    dsn = make_url(pg_url).set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(dsn, autocommit=True) as db:
        db.execute(
            "CREATE TABLE escrowd_test_probe (instance TEXT, started_at DOUBLE PRECISION, "
            "ended_at DOUBLE PRECISION)"
        )
    daemons = {
        name: DaemonProcess(
            ["run"],
            daemon_env(
                tmp_path / name,
                pg_url,
                ESCROWD_TEST_PROBE="1",
                ESCROWD_TEST_INSTANCE=name,
                ESCROWD_TEST_PROBE_INTERVAL_S="0.2",
            ),
            tmp_path / f"{name}.log",
        )
        for name in ("a", "b")
    }
    try:
        for daemon in daemons.values():
            daemon.wait_for("daemon_ready")
        time.sleep(3.0)
        rows = _rows(dsn)
        assert len(rows) >= 5
        # Ticks of the probe job, whichever instance ran them, never overlap in time.
        for (_, _, previous_end), (_, start, _) in itertools.pairwise(rows):
            assert start >= previous_end
        assert {instance for instance, _, _ in rows} <= {"a", "b"}

        # Kill the instance that ran the latest tick: no clean unlock, only a dead socket.
        victim = rows[-1][0]
        survivor = "b" if victim == "a" else "a"
        daemons[victim].proc.kill()
        daemons[victim].proc.wait(10)
        killed_at = time.time()
        time.sleep(1.5)
        after = [row for row in _rows(dsn) if row[1] > killed_at]
        assert after, "nobody took the probe job over"
        assert {instance for instance, _, _ in after} == {survivor}
        # Taken over within one interval (0.2 s) plus one tick (0.3 s), with slack.
        assert after[0][1] - killed_at < 1.0
        assert daemons[survivor].terminate() == 0
    finally:
        for daemon in daemons.values():
            daemon.close()
