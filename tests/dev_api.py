"""`escrowd dev` as a subprocess for client tests, and a TCP proxy that misbehaves on cue.

The dev world's Solana simulator answers requestAirdrop with a real faucet transfer, so
a test funds an agent the way a user would: SOL sent to its deposit address, seen by the
poller, credited after finality.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.daemon_support import ENTRY

LAMPORTS_PER_SOL = 10**9


@dataclass
class DevApi:
    url: str
    api_key: str
    solana_rpc: str
    proc: subprocess.Popen[bytes]

    def airdrop(self, address: str, lamports: int) -> None:
        answer = httpx.post(
            self.solana_rpc,
            json={
                "jsonrpc": "2.0",
                "id": 1,
                "method": "requestAirdrop",
                "params": [address, lamports],
            },
            timeout=10.0,
        ).json()
        assert "result" in answer, answer


def _field(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(1) if found else None


@contextlib.contextmanager
def running_dev_api(data_dir: Path, timeout_s: float = 60.0) -> Iterator[DevApi]:
    """`escrowd dev` on a free port with its own data directory, stopped afterwards."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROWD_")}
    out_path = data_dir.parent / f"{data_dir.name}.out"
    err_path = data_dir.parent / f"{data_dir.name}.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-c", ENTRY, "dev", "--data-dir", str(data_dir), "--port", "0"],
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            text = out_path.read_text(errors="replace")
            key = _field(r"dev API key \(admin scope, shown once\): (esk_\S+)", text)
            if key is not None:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"escrowd dev did not start (exit {proc.poll()}):\n{text}\n"
                    + err_path.read_text(errors="replace")[-3000:]
                )
            time.sleep(0.05)
        url = _field(r"api: (http://\S+)", text)
        rpc = _field(r"LiteSVM simulator at (http://\S+),", text)
        assert url is not None and rpc is not None, text
        yield DevApi(url, key, rpc, proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.1)


# --- a proxy that drops or answers requests on cue ----------------------------------------


def _read_message(sock: socket.socket, buffer: bytearray) -> bytes | None:
    """One HTTP/1.1 message with a Content-Length body (all escrowd and httpx send), or
    None when the peer closed first."""
    while b"\r\n\r\n" not in buffer:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    head_end = buffer.index(b"\r\n\r\n") + 4
    length = 0
    for line in bytes(buffer[:head_end]).split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    while len(buffer) < head_end + length:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        buffer += chunk
    message = bytes(buffer[: head_end + length])
    del buffer[: head_end + length]
    return message


def _header(message: bytes, name: str) -> str | None:
    head = message.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    for line in head.split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


@dataclass
class Seen:
    """One request the proxy received, and what it did with it."""

    request_line: str
    idempotency_key: str | None
    action: str
    replayed: bool = False


@dataclass
class FaultProxy:
    """Relays HTTP/1.1 between clients and `upstream`. Each request takes the next action
    of `faults` (then "pass"): "drop" forwards it, waits for escrowd's whole answer and
    closes the client's connection instead of passing it on; "reset" closes it without
    forwarding; "<status>" or "<status>:<retry-after>" answers that status itself."""

    upstream: tuple[str, int]
    faults: list[str] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._closed = True
        self._server.close()

    def _next_action(self) -> str:
        with self._lock:
            return self.faults.pop(0) if self.faults else "pass"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        upstream = socket.create_connection(self.upstream)
        from_client, from_upstream = bytearray(), bytearray()
        with client, upstream:
            while True:
                request = _read_message(client, from_client)
                if request is None:
                    return
                action = self._next_action()
                seen = Seen(
                    request.split(b"\r\n", 1)[0].decode("latin-1"),
                    _header(request, "Idempotency-Key"),
                    action,
                )
                with self._lock:
                    self.seen.append(seen)
                if action == "reset":
                    return
                if action not in ("pass", "drop"):
                    status, _, retry_after = action.partition(":")
                    body = b"upstream unavailable"
                    head = f"HTTP/1.1 {status} Injected\r\nContent-Length: {len(body)}\r\n"
                    if retry_after:
                        head += f"Retry-After: {retry_after}\r\n"
                    client.sendall(head.encode() + b"\r\n" + body)
                    continue
                upstream.sendall(request)
                answer = _read_message(upstream, from_upstream)
                if answer is None:
                    return
                seen.replayed = _header(answer, "Idempotent-Replayed") == "true"
                if action == "drop":
                    return
                client.sendall(answer)
