"""``escrowd devnet solana`` serves JSON-RPC in the foreground, writes the USDC mint
authority's keypair so outside tools can mint test USDC, and stops on Ctrl-C."""

from __future__ import annotations

import base64
import json
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
from solders.hash import Hash
from solders.keypair import Keypair
from solders.message import Message
from solders.pubkey import Pubkey
from solders.transaction import VersionedTransaction
from spl.token.constants import TOKEN_PROGRAM_ID
from spl.token.instructions import (
    create_idempotent_associated_token_account,
    get_associated_token_address,
    mint_to_checked,
)
from spl.token.models import MintToCheckedParams

RUN_APP = "from escrowd.daemon.cli_devnet import devnet_app; devnet_app(prog_name='escrowd devnet')"


def call(url: str, method: str, params: list[Any]) -> Any:
    body = {"jsonrpc": "2.0", "id": 1, "method": method, "params": params}
    answer = httpx.post(url, json=body, timeout=5).json()
    assert "error" not in answer, answer
    return answer["result"]


def wait_for(predicate: Any, timeout_s: float = 20) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = predicate()
            if value:
                return value
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_devnet_solana_serves_and_hands_out_the_mint_authority(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    authority_file = tmp_path / "authority.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            RUN_APP,
            "solana",
            "--port",
            str(port),
            "--slot-ms",
            "20",
            "--mint-authority-file",
            str(authority_file),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        printed = _printed(proc, "usdc mint authority keypair: ")
        assert printed["solana rpc"] == url
        assert printed["usdc mint authority keypair"] == str(authority_file.resolve())
        wait_for(lambda: call(url, "getSlot", [{"commitment": "processed"}]) > 5)
        assert stat.S_IMODE(authority_file.stat().st_mode) == 0o600
        authority = Keypair.from_bytes(bytes(json.loads(authority_file.read_text())))
        mint = Pubkey.from_string(printed["usdc mint"])
        config = {"encoding": "jsonParsed", "commitment": "processed"}
        info = call(url, "getAccountInfo", [str(mint), config])["value"]
        assert info["data"]["parsed"]["info"]["mintAuthority"] == str(authority.pubkey())
        # An outside tool mints test USDC with it (fees from an airdrop).
        call(url, "requestAirdrop", [str(authority.pubkey()), 10**9])
        wait_for(
            lambda: call(url, "getBalance", [str(authority.pubkey()), {"commitment": "processed"}])[
                "value"
            ]
        )
        owner = Keypair().pubkey()
        ata = get_associated_token_address(owner, mint)
        blockhash = Hash.from_string(call(url, "getLatestBlockhash", [])["value"]["blockhash"])
        instructions = [
            create_idempotent_associated_token_account(authority.pubkey(), owner, mint),
            mint_to_checked(
                MintToCheckedParams(
                    program_id=TOKEN_PROGRAM_ID,
                    mint=mint,
                    dest=ata,
                    mint_authority=authority.pubkey(),
                    amount=25_000_000,
                    decimals=6,
                )
            ),
        ]
        message = Message.new_with_blockhash(instructions, authority.pubkey(), blockhash)
        raw = bytes(VersionedTransaction(message, [authority]))
        call(url, "sendTransaction", [base64.b64encode(raw).decode(), {"encoding": "base64"}])
        balance = wait_for(
            lambda: call(url, "getTokenAccountBalance", [str(ata), {"commitment": "processed"}])
        )
        assert balance["value"]["amount"] == "25000000"

        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=10)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _printed(proc: subprocess.Popen[str], last: str) -> dict[str, str]:
    """The "name: value" lines the command prints, up to the one starting with `last`."""
    assert proc.stdout is not None
    found: dict[str, str] = {}
    for line in proc.stdout:
        match = re.match(r"^(solana rpc|usdc mint|usdc mint authority keypair): (\S+)$", line)
        if match:
            found[match.group(1)] = match.group(2)
        if line.startswith(last):
            return found
    raise AssertionError(f"the command exited before printing {last!r}")
