"""`escrowd dev --demo` in a fresh directory: the README's first command."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

from tests.daemon_support import ENTRY

DEMO_STEPS = (
    "create a buyer and a worker",
    "derive the buyer's deposit addresses",
    "deposit USDC on the EVM chain",
    "deposit SOL and USDC on Solana",
    "wait for confirmations",
    "fund an escrow from the buyer",
    "release it to the worker, minus the fee",
    "pay the worker out on chain",
    "balances",
    "audit verify",
    "ledger check",
)


def test_dev_demo_runs_end_to_end_in_a_fresh_directory(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ESCROWD_")}
    done = subprocess.run(
        [sys.executable, "-c", ENTRY, "dev", "--demo"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr[-3000:]
    for title in DEMO_STEPS:
        assert re.search(rf"\] {re.escape(title)}[^:]*: ok", out), f"step {title!r}:\n{out}"
    assert "skipped" not in out
    assert "buyer 2 SOL, 30 USDC; worker 0 USDC" in out
    assert "holds 117 USDC on chain" in out
    assert re.search(r"dev API key \(admin scope, shown once\): esk_\w+_\S+", out)
    data_dir = tmp_path / ".escrowd-dev"
    passphrase = data_dir / "keystore-passphrase"
    assert stat.S_IMODE(passphrase.stat().st_mode) == 0o600
    keystore = (data_dir / "keystore.json").read_text()
    # The keystore holds only ciphertext: not the passphrase, not a readable mnemonic.
    assert passphrase.read_text().strip() not in keystore
    assert passphrase.read_text().strip() not in out + done.stderr
