"""`escrowd run` as a subprocess on SQLite: sd_notify, watchdog, SIGTERM, HTTP endpoints."""

from __future__ import annotations

import re
import socket
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from escrowd.config.settings import load_settings
from escrowd.daemon.runner import Daemon, SchemaNotAtHead
from escrowd.models.db import make_engine
from tests.daemon_support import DaemonProcess, daemon_env

PROBE_TABLE = (
    "CREATE TABLE escrowd_test_probe (instance TEXT, started_at DOUBLE PRECISION, "
    "ended_at DOUBLE PRECISION)"
)


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    # AF_UNIX paths are limited to ~108 bytes; pytest's tmp_path can be longer.
    path = f"/tmp/escrowd-notify-{tmp_path.name[-24:]}-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    yield sock, path
    sock.close()
    Path(path).unlink(missing_ok=True)


def _collect(sock: socket.socket, seconds: float) -> list[str]:
    messages: list[str] = []
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        sock.settimeout(remaining)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def _lines(messages: list[str]) -> list[str]:
    return [line for message in messages for line in message.splitlines()]


def _start(tmp_path: Path, sqlite_url: str, **extra: str) -> DaemonProcess:
    return DaemonProcess(
        ["run"], daemon_env(tmp_path / "data", sqlite_url, **extra), tmp_path / "daemon.log"
    )


def test_ready_status_and_periodic_watchdog(
    tmp_path: Path, sqlite_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    daemon = _start(tmp_path, sqlite_url, NOTIFY_SOCKET=path, WATCHDOG_USEC="400000")
    try:
        first: list[str] = []
        ready_deadline = time.monotonic() + 20
        while "READY=1" not in first and time.monotonic() < ready_deadline:
            first += _lines(_collect(sock, 0.5))
        assert "READY=1" in first
        assert any(re.fullmatch(r"STATUS=running \d+ jobs; API on .*", line) for line in first)
        pings = _lines(_collect(sock, 1.5)).count("WATCHDOG=1")
        # WATCHDOG_USEC=0.4 s -> a ping every 0.2 s.
        assert pings >= 4
        daemon.wait_for("sqlite_single_instance")
        _check_http_endpoints(
            daemon.wait_for("api_listening")["port"], daemon.wait_for("worker_listening")["port"]
        )
        assert daemon.terminate() == 0
        assert any(line.startswith("STOPPING=1") for line in _lines(_collect(sock, 0.5)))
    finally:
        daemon.close()


def test_wedged_job_stops_the_watchdog(
    tmp_path: Path, sqlite_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    daemon = _start(
        tmp_path,
        sqlite_url,
        NOTIFY_SOCKET=path,
        WATCHDOG_USEC="400000",
        ESCROWD_DAEMON__WATCHDOG_STALE_S="1.5",
        ESCROWD_DAEMON__SHUTDOWN_TIMEOUT_S="1",
        ESCROWD_TEST_WEDGE_JOB="audit_checkpoint",
    )
    try:
        daemon.wait_for("daemon_ready")
        early = _lines(_collect(sock, 1.0))
        assert "READY=1" in early and "WATCHDOG=1" in early
        daemon.wait_for("watchdog_withheld", timeout_s=5)
        _collect(sock, 0.3)
        later = _lines(_collect(sock, 1.5))
        assert "WATCHDOG=1" not in later
        stale = daemon.wait_for("watchdog_withheld")
        assert stale["stale_jobs"] == ["audit_checkpoint"]
        # The wedged tick never finishes: shutdown gives up after its timeout, exit 1.
        assert daemon.terminate() == 1
        assert daemon.wait_for("shutdown_timeout")["running_jobs"] == ["audit_checkpoint"]
    finally:
        daemon.close()


def test_sigterm_exits_zero_after_the_tick_in_flight(tmp_path: Path, sqlite_url: str) -> None:
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.execute(PROBE_TABLE)
    # Ticks of 1 s every 0.2 s: the probe job is always in the middle of one.
    daemon = _start(
        tmp_path,
        sqlite_url,
        ESCROWD_TEST_PROBE="1",
        ESCROWD_TEST_PROBE_INTERVAL_S="0.2",
        ESCROWD_TEST_PROBE_HOLD_S="1.0",
    )
    try:
        daemon.wait_for("daemon_ready")
        time.sleep(0.5)
        stop_requested = time.time()
        assert daemon.terminate(timeout_s=10) == 0
        assert time.time() - stop_requested < 5
    finally:
        daemon.close()
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        rows = db.execute("SELECT started_at, ended_at FROM escrowd_test_probe").fetchall()
    # The tick running when SIGTERM arrived was finished (and committed) before exit...
    assert [row for row in rows if row[0] < stop_requested < row[1]]
    # ...and no new tick started after it.
    assert all(started < stop_requested + 0.1 for started, _ in rows)


def _check_http_endpoints(api_port: int, jobs_port: int) -> None:
    for port in (api_port, jobs_port):
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "alive"}
        ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
        assert ready.status_code == 200, ready.text
    # The job series live in the jobs process: Prometheus scrapes both ports.
    base = f"http://127.0.0.1:{jobs_port}"
    families = {
        family.name: family
        for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
    }
    ok_jobs = {
        sample.labels["job"]
        for sample in families["escrowd_job_runs"].samples
        if sample.labels.get("outcome") == "ok" and sample.value >= 1
    }
    assert {"escrow_expiry", "webhooks", "audit_checkpoint"} <= ok_jobs
    assert "escrowd_job_duration_seconds" in families
    assert "escrowd_escrows" in families


def test_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    settings = load_settings(environ={"ESCROWD_DATA_DIR": str(tmp_path)})
    daemon = Daemon(settings, engine, serve_api=False)
    with pytest.raises(SchemaNotAtHead, match="escrowd migrate"):
        daemon.start()
    assert daemon.jobs == []
    engine.dispose()
