"""`escrowd run --role all|api|worker`: API worker processes on one socket, the jobs in a
process of their own, each role ready, stopped and watched as an operator sees it."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from escrowd.escrow import apikeys
from escrowd.models import ApiScope
from escrowd.models.db import make_engine, make_session_factory
from tests.daemon_support import DaemonProcess, daemon_env


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = f"/tmp/escrowd-roles-{tmp_path.name[-24:]}-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.2)
    yield sock, path
    sock.close()
    Path(path).unlink(missing_ok=True)


def _messages(sock: socket.socket, seconds: float) -> list[str]:
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            continue
    return lines


def _parent_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid ..."; comm may hold spaces, so split after ')'.
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _admin_key(url: str) -> str:
    engine = make_engine(url)
    with make_session_factory(engine)() as session, session.begin():
        _, key = apikeys.create_key(session, name="roles", scope=ApiScope.ADMIN)
    engine.dispose()
    return key


def _job_runs(port: int) -> set[str]:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        sample.labels["job"]
        for family in text_string_to_metric_families(text)
        if family.name == "escrowd_job_runs"
        for sample in family.samples
        if sample.labels.get("outcome") == "ok" and sample.value >= 1
    }


@pytest.mark.postgres
def test_all_role_serves_from_worker_processes_and_stops_them_on_sigterm(
    tmp_path: Path, pg_url: str, notify_socket: tuple[socket.socket, str]
) -> None:
    sock, path = notify_socket
    key = _admin_key(pg_url)
    daemon = DaemonProcess(
        ["run", "--workers", "2"],
        daemon_env(tmp_path / "data", pg_url, NOTIFY_SOCKET=path),
        tmp_path / "daemon.log",
    )
    try:
        ready = daemon.wait_for("daemon_ready", timeout_s=30)
        assert ready["role"] == "all"
        listening = daemon.wait_for("api_listening")
        assert listening["workers"] == 2
        pids = daemon.wait_for("api_workers_started")["pids"]
        assert len(set(pids)) == 2
        assert all(_parent_of(pid) == daemon.proc.pid for pid in pids)
        lines = _messages(sock, 1.0)
        assert "READY=1" in lines
        assert any(line.endswith("(2 workers)") for line in lines if line.startswith("STATUS="))

        base = f"http://127.0.0.1:{listening['port']}"
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}) as api:
            created = api.post(
                "/v1/agents", json={"id": "buyer"}, headers={"Idempotency-Key": "roles-buyer"}
            )
            assert created.status_code == 201, created.text
            for _ in range(20):
                answer = api.get("/v1/agents/buyer/balances")
                assert answer.status_code == 200, answer.text
            assert (
                api.get("/v1/agents/buyer/balances", headers={"Authorization": ""}).status_code
                == 401
            )
        # The job series are the jobs process's, on the worker port.
        jobs_port = daemon.wait_for("worker_listening")["port"]
        deadline = time.monotonic() + 10
        while "webhooks" not in _job_runs(jobs_port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert {"webhooks", "escrow_expiry"} <= _job_runs(jobs_port)

        assert daemon.terminate() == 0
        assert all(_gone(pid) for pid in pids)
        assert any(line.startswith("STOPPING=1") for line in _messages(sock, 0.5))
    finally:
        daemon.close()


@pytest.mark.postgres
def test_api_and_worker_roles_run_apart_on_one_database(tmp_path: Path, pg_url: str) -> None:
    key = _admin_key(pg_url)
    api = DaemonProcess(
        ["api", "--workers", "1"], daemon_env(tmp_path / "api", pg_url), tmp_path / "api.log"
    )
    worker = DaemonProcess(["worker"], daemon_env(tmp_path / "worker", pg_url), tmp_path / "w.log")
    try:
        api_ready = api.wait_for("daemon_ready", timeout_s=30)
        assert (api_ready["role"], api_ready["jobs"]) == ("api", [])
        worker_ready = worker.wait_for("daemon_ready", timeout_s=30)
        assert worker_ready["role"] == "worker"
        assert "webhooks" in worker_ready["jobs"]
        assert worker_ready["api_port"] is None
        assert not any(e["event"] == "api_listening" for e in worker.events())

        port = api.wait_for("api_listening")["port"]
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/agents",
            headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "roles-agent"},
            json={"id": "buyer", "name": "Buyer"},
        )
        assert answer.status_code == 201, answer.text
        assert answer.json()["id"] == "buyer"
        jobs_port = worker.wait_for("worker_listening")["port"]
        assert httpx.get(f"http://127.0.0.1:{jobs_port}/readyz").status_code == 200
        deadline = time.monotonic() + 10
        while "webhooks" not in _job_runs(jobs_port) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "webhooks" in _job_runs(jobs_port)
        assert api.terminate() == 0
        assert worker.terminate() == 0
    finally:
        api.close()
        worker.close()


@pytest.mark.postgres
def test_a_dead_api_worker_stops_the_daemon_with_exit_1(tmp_path: Path, pg_url: str) -> None:
    daemon = DaemonProcess(
        ["run", "--role", "api", "--workers", "2"],
        daemon_env(tmp_path / "data", pg_url),
        tmp_path / "daemon.log",
    )
    try:
        pids = daemon.wait_for("api_workers_started", timeout_s=30)["pids"]
        daemon.wait_for("daemon_ready")
        os.kill(pids[0], signal.SIGKILL)
        daemon.wait_for("api_worker_exited", timeout_s=10)
        assert daemon.proc.wait(15) == 1
        assert all(_gone(pid) for pid in pids)
    finally:
        daemon.close()


@pytest.mark.postgres
def test_api_workers_of_a_killed_supervisor_shut_down_and_free_the_port(
    tmp_path: Path, pg_url: str
) -> None:
    daemon = DaemonProcess(
        ["run", "--role", "api", "--workers", "2"],
        daemon_env(tmp_path / "data", pg_url),
        tmp_path / "daemon.log",
    )
    try:
        pids = daemon.wait_for("api_workers_started", timeout_s=30)["pids"]
        port = daemon.wait_for("api_listening")["port"]
        daemon.wait_for("daemon_ready")
        daemon.proc.kill()
        daemon.proc.wait(5)
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(pid) for pid in pids)
        assert len(daemon.wait_for("api_worker_orphaned")) > 0
        with socket.socket() as again:
            again.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            again.bind(("127.0.0.1", port))
    finally:
        daemon.close()


def test_sqlite_is_served_by_one_api_process(tmp_path: Path, sqlite_url: str) -> None:
    daemon = DaemonProcess(
        ["run", "--workers", "3"],
        daemon_env(tmp_path / "data", sqlite_url),
        tmp_path / "daemon.log",
    )
    try:
        daemon.wait_for("daemon_ready", timeout_s=30)
        port = daemon.wait_for("api_listening")["port"]
        assert daemon.wait_for("api_listening")["workers"] == 1
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "alive"}
        assert daemon.terminate() == 0
    finally:
        daemon.close()
