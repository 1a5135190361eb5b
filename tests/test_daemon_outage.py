"""One chain's node down: `escrowd run` keeps the watchdog fed, the API serving and the
other chain crediting, and reports that chain (readiness, metrics, an alert event)."""

from __future__ import annotations

import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families

from escrowd.config.settings import load_settings
from escrowd.daemon.runner import Daemon
from escrowd.devnet.anvil import free_port
from escrowd.models.db import make_engine
from tests.daemon_support import DaemonProcess, daemon_env
from tests.evm_fixtures import EvmChain


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    path = f"/tmp/escrowd-outage-{tmp_path.name[-20:]}-{time.monotonic_ns()}.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(0.1)
    yield sock, path
    sock.close()
    Path(path).unlink(missing_ok=True)


def _drain(sock: socket.socket) -> list[str]:
    lines: list[str] = []
    while True:
        try:
            lines += sock.recv(4096).decode().splitlines()
        except TimeoutError:
            return lines


def _chain(name: str, chain_id: int, url: str, token: str) -> dict[str, object]:
    return {
        "name": name,
        "chain_id": chain_id,
        "rpc_urls": [url],
        "usdc_address": token,
        "confirmations": 0,
        "poll_interval_s": 0.3,
        "rpc_timeout_s": 1.0,
        "rpc_max_retries": 0,
    }


@pytest.mark.anvil
def test_one_chain_down_is_reported_while_the_daemon_and_the_other_chain_keep_working(
    anvil_chain: EvmChain,
    sqlite_url: str,
    tmp_path: Path,
    notify_socket: tuple[socket.socket, str],
) -> None:
    assert anvil_chain.url is not None
    token = anvil_chain.token.address
    chains = [
        _chain("base", 31337, anvil_chain.url, token),
        _chain("down", 8453, f"http://127.0.0.1:{free_port()}", token),
    ]
    deposit_address = str(Account.create().address)
    with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
        db.execute("INSERT INTO agents (id, external_id, created_at) VALUES (1, 'buyer', '2025')")
        db.execute(
            "INSERT INTO deposit_addresses (agent_id, chain, address, derivation_index, "
            "created_at) VALUES (1, 'evm', ?, 0, '2025')",
            (deposit_address,),
        )
    sock, path = notify_socket
    stale_s = 1.0
    daemon = DaemonProcess(
        ["run"],
        daemon_env(
            tmp_path / "data",
            sqlite_url,
            NOTIFY_SOCKET=path,
            WATCHDOG_USEC="400000",
            ESCROWD_EVM_CHAINS=json.dumps(chains),
            ESCROWD_DAEMON__WATCHDOG_STALE_S=str(stale_s),
            ESCROWD_DAEMON__UNREADY_AFTER_FAILED_POLLS="2",
            # Another program's variable: a warning, not a reason to refuse to start.
            ESCROWD_SRC="/opt/src",
        ),
        tmp_path / "daemon.log",
    )
    try:
        assert daemon.wait_for("unknown_environment_variable")["variable"] == "ESCROWD_SRC"
        port = daemon.wait_for("api_listening")["port"]
        # Poller readiness and the job series are the jobs process's, on its own port.
        base = f"http://127.0.0.1:{daemon.wait_for('worker_listening')['port']}"
        unavailable = daemon.wait_for("chain_unavailable", timeout_s=20)
        assert unavailable["chain"] == "down"
        assert unavailable["level"] == "error"
        assert "failed polls in a row" in unavailable["reason"]
        assert "RpcUnavailable" in unavailable["reason"]

        anvil_chain.token.transfer(anvil_chain.accounts[1], deposit_address, 2_500_000)
        before = _drain(sock)
        assert any(line.startswith("STATUS=") and "degraded: down" in line for line in before)
        # Longer than the watchdog's stale threshold with one chain failing every tick.
        time.sleep(stale_s + 1.0)
        lines = _drain(sock)
        assert lines.count("WATCHDOG=1") >= 6, lines
        assert not any(e["event"] == "watchdog_withheld" for e in daemon.events())

        assert httpx.get(f"{base}/healthz").json() == {"status": "alive"}
        assert httpx.get(f"http://127.0.0.1:{port}/readyz").status_code == 200
        ready = httpx.get(f"{base}/readyz")
        assert ready.status_code == 503
        problems = ready.json()["problems"]
        assert list(problems) == ["poller:down"]
        assert "failed polls in a row" in problems["poller:down"]
        metrics = {
            family.name: family
            for family in text_string_to_metric_families(httpx.get(f"{base}/metrics").text)
        }

        def sample(name: str, **labels: str) -> float:
            return next(
                s.value
                for s in metrics[name].samples
                if all(s.labels.get(k) == v for k, v in labels.items())
            )

        assert sample("escrowd_ready") == 0
        assert sample("escrowd_readiness_problem", check="poller:down") == 1
        assert sample("escrowd_chain_failed_polls", chain="down") >= 2
        assert sample("escrowd_chain_failed_polls", chain="base") == 0
        assert sample("escrowd_chain_lag", chain="base", unit="blocks") == 0
        # The healthy chain credited the deposit made during the outage.
        with sqlite3.connect(sqlite_url.removeprefix("sqlite:///")) as db:
            rows = db.execute(
                "SELECT chain, amount, status, credit_state, credited_base_units FROM deposits"
            ).fetchall()
        # Token amounts are decimal text on SQLite (they may exceed 64 bits).
        assert rows == [("base", "2500000", "confirmed", "credited", 2_500_000)]
        assert daemon.terminate() == 0
    finally:
        daemon.close()


def test_an_api_that_stops_answering_wedges_the_daemon(tmp_path: Path, sqlite_url: str) -> None:
    engine = make_engine(sqlite_url)
    settings = load_settings(environ={"ESCROWD_DATA_DIR": str(tmp_path)})
    daemon = Daemon(settings, engine)
    alive = threading.Event()
    server = threading.Thread(target=alive.wait, daemon=True)
    server.start()
    daemon._server, daemon._server_thread = object(), server  # type: ignore[assignment]
    daemon._api_answered = time.monotonic()
    assert daemon.wedged(120.0) == []
    daemon._api_answered = time.monotonic() - 121
    assert daemon.wedged(120.0) == ["api"]
    daemon._api_answered = time.monotonic()
    alive.set()
    server.join(5)
    assert daemon.wedged(120.0) == ["api"]
    engine.dispose()
