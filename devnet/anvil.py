"""Find and run anvil (the EVM JSON-RPC node from the npm package `@foundry-rs/anvil`,
installed by `npm ci` at the repo root) for tests, benchmarks and local development."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType

import httpx
import structlog

log = structlog.get_logger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
# The platform package holds the real binary; node_modules/.bin/anvil is a node wrapper
# that spawns it, so running the binary directly leaves no orphan when we kill it.
_NPM_CANDIDATES = (
    "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil",
    "node_modules/@foundry-rs/anvil-linux-arm64/bin/anvil",
    "node_modules/@foundry-rs/anvil-darwin-arm64/bin/anvil",
    "node_modules/@foundry-rs/anvil-darwin-amd64/bin/anvil",
    "node_modules/.bin/anvil",
)


class AnvilError(RuntimeError):
    """anvil could not be found or did not start."""


def find_anvil() -> Path | None:
    """$ESCROWD_ANVIL, else the npm install under the repo root, else PATH."""
    override = os.environ.get("ESCROWD_ANVIL")
    if override:
        path = Path(override)
        return path if path.is_file() and os.access(path, os.X_OK) else None
    for relative in _NPM_CANDIDATES:
        path = REPO_ROOT / relative
        if path.is_file() and os.access(path, os.X_OK):
            return path
    found = shutil.which("anvil")
    return Path(found) if found else None


_PR_SET_PDEATHSIG = 1
# Loaded in the parent so the forked child only makes one foreign call before exec.
_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Linux: SIGTERM anvil if our process dies without running __exit__ (e.g. SIGKILL)."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AnvilProcess:
    """Context manager: an anvil node on 127.0.0.1:<free port>, stopped on exit.

    Automines each transaction unless ``block_time_s`` is given. ``url`` is its
    JSON-RPC endpoint once entered.
    """

    def __init__(
        self,
        *,
        chain_id: int = 31337,
        block_time_s: float | None = None,
        accounts: int = 10,
        startup_timeout_s: float = 15.0,
        binary: Path | None = None,
        extra_args: list[str] | None = None,
    ) -> None:
        self.chain_id = chain_id
        self.block_time_s = block_time_s
        self.accounts = accounts
        self.startup_timeout_s = startup_timeout_s
        self.binary = binary or find_anvil()
        self.extra_args = list(extra_args or [])
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._last_stderr = ""

    @property
    def pid(self) -> int:
        """The anvil process's id (benchmarks read its CPU time)."""
        if self._proc is None:
            raise AnvilError("anvil is not running; use AnvilProcess as a context manager")
        return self._proc.pid

    @property
    def url(self) -> str:
        if self._proc is None:
            raise AnvilError("anvil is not running; use AnvilProcess as a context manager")
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        if self.binary is None:
            raise AnvilError("anvil not found: run `npm ci` in the repo root or set ESCROWD_ANVIL")
        # A port can be taken between free_port() and anvil's bind: try a few.
        for _ in range(3):
            self.port = free_port()
            args = [
                str(self.binary),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--chain-id",
                str(self.chain_id),
                "--accounts",
                str(self.accounts),
                "--silent",
                *self.extra_args,
            ]
            if self.block_time_s is not None:
                args += ["--block-time", str(self.block_time_s)]
            # stderr goes to a file, not a pipe nobody reads, so a chatty anvil never blocks.
            with tempfile.TemporaryFile() as stderr:
                self._proc = subprocess.Popen(
                    args,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                    # Safe despite threads: the hook takes no Python-level locks.
                    preexec_fn=_die_with_parent,  # noqa: PLW1509
                )
                if self._wait_ready():
                    log.info("anvil_started", port=self.port, chain_id=self.chain_id)
                    return
                self.stop()
                stderr.seek(0)
                self._last_stderr = stderr.read()[-2000:].decode(errors="replace")
        raise AnvilError(
            f"anvil did not answer eth_chainId within {self.startup_timeout_s}s: "
            f"{self._last_stderr.strip() or 'no output'}"
        )

    def _wait_ready(self) -> bool:
        assert self._proc is not None
        deadline = time.monotonic() + self.startup_timeout_s
        body = {"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    return False
                try:
                    reply = client.post(f"http://127.0.0.1:{self.port}", json=body).json()
                    if int(reply["result"], 16) == self.chain_id:
                        return True
                except (httpx.HTTPError, ValueError, KeyError, TypeError):
                    pass
                time.sleep(0.05)
        return False

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def __enter__(self) -> AnvilProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
