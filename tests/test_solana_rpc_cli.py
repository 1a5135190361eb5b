"""``escrowd devnet solana`` serves JSON-RPC in the foreground and stops on Ctrl-C."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx

RUN_APP = "from escrowd.daemon.cli_devnet import devnet_app; devnet_app(prog_name='escrowd devnet')"


def test_devnet_solana_command_serves_until_interrupted() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_APP, "solana", "--port", str(port), "--slot-ms", "20"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        body = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "getSlot",
            "params": [{"commitment": "processed"}],
        }
        deadline = time.monotonic() + 20
        slot = None
        while time.monotonic() < deadline:
            try:
                slot = httpx.post(url, json=body, timeout=2).json()["result"]
                if slot > 5:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        assert slot is not None and slot > 5, "the simulator did not serve advancing slots"
        proc.send_signal(signal.SIGINT)
        output, _ = proc.communicate(timeout=10)
        assert proc.returncode == 0
        assert f"solana rpc: {url}" in output
        assert "usdc mint: " in output
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
