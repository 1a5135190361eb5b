"""Start `escrowd run` / `escrowd dev` as subprocesses and read their JSON log lines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

ENTRY = "from escrowd.daemon.cli import main; main()"


class DaemonProcess:
    def __init__(self, args: list[str], env: Mapping[str, str], log_path: Path) -> None:
        self.log_path = log_path
        full_env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("ESCROWD_", "NOTIFY_SOCKET", "WATCHDOG_"))
        }
        full_env.update(env)
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY, *args],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.DEVNULL,
            stderr=self._log,
        )

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("{"):
                try:
                    found.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return found

    def wait_for(self, event: str, timeout_s: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for entry in self.events():
                if entry.get("event") == event:
                    return entry
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(
            f"no {event!r} within {timeout_s}s (exit {self.proc.poll()}):\n"
            + self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]
        )

    def terminate(self, timeout_s: float = 15.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def daemon_env(data_dir: Path, database_url: str, **extra: str) -> dict[str, str]:
    """Settings for a fast test daemon: any free port, sub-second job intervals."""
    env = {
        "ESCROWD_DATA_DIR": str(data_dir),
        "ESCROWD_DATABASE_URL": database_url,
        "ESCROWD_API__PORT": "0",
        "ESCROWD_WORKER__PORT": "0",
        "ESCROWD_LOG__LEVEL": "info",
        "ESCROWD_ESCROW__EXPIRY_INTERVAL_S": "0.3",
        "ESCROWD_WEBHOOKS__INTERVAL_S": "0.3",
        "ESCROWD_DAEMON__AUDIT_CHECKPOINT_INTERVAL_S": "0.3",
        "ESCROWD_DAEMON__SHUTDOWN_TIMEOUT_S": "5",
    }
    env.update(extra)
    return env
