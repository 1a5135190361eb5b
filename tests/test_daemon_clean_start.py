"""A fresh `escrowd run` (PostgreSQL, anvil, the Solana simulator) with funded platform
wallets logs no warning and no error while every job ticks many times, the first sweeps
ticks included (the assets are not registered yet then), and stops cleanly."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import tomli_w
from prometheus_client.parser import text_string_to_metric_families
from solders.pubkey import Pubkey
from web3.types import Wei

from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret
from tests.daemon_support import DaemonProcess, daemon_env
from tests.evm_fixtures import EvmChain

pytestmark = [pytest.mark.postgres, pytest.mark.anvil]

PASSPHRASE = "clean-start-passphrase"
TICK_S = 0.2
# At the default intervals (payouts 2 s, sweeps 300 s) a minute is 30 payout ticks; here
# every job ticks at TICK_S, so a few seconds drive more ticks than that minute would.
RUN_S = 6.0


@pytest.fixture
def solana_sim() -> Iterator[SolanaSimulator]:
    sim = SolanaSimulator(slot_ms=40).start()
    yield sim
    sim.stop()


def test_a_fresh_daemon_logs_no_warning_or_error(
    tmp_path: Path, pg_url: str, anvil_chain: EvmChain, solana_sim: SolanaSimulator
) -> None:
    assert anvil_chain.url is not None
    keystore = create_keystore(tmp_path / "keystore.json", Secret(PASSPHRASE), scrypt_log2_n=10)
    w3, dev = anvil_chain.w3, anvil_chain.accounts[0]
    for wallet in (keystore.evm_hot_wallet.address, keystore.evm_gas_wallet.address):
        w3.eth.send_transaction({"from": dev, "to": wallet, "value": Wei(10**19)})
    anvil_chain.token.transfer(anvil_chain.accounts[1], keystore.evm_hot_wallet.address, 10**8)
    mint = solana_sim.create_usdc_mint()
    solana_sim.airdrop(Pubkey.from_string(keystore.solana_hot_wallet.address), 10**10)
    config = tmp_path / "escrowd.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "keystore": {"path": str(tmp_path / "keystore.json"), "scrypt_log2_n": 10},
                "payouts": {"interval_s": TICK_S, "sweep_interval_s": TICK_S},
                "subscriptions": {"interval_s": TICK_S},
                "evm_chains": [
                    {
                        "name": "evm",
                        "chain_id": 31337,
                        "rpc_urls": [anvil_chain.url],
                        "usdc_address": anvil_chain.token.address,
                        "confirmations": 2,
                        "poll_interval_s": TICK_S,
                        "token_scan_interval_s": TICK_S,
                    }
                ],
                "solana": {
                    "rpc_urls": [solana_sim.url],
                    "usdc_mint": str(mint),
                    "poll_interval_s": TICK_S,
                },
            }
        )
    )
    env = daemon_env(tmp_path / "data", pg_url, ESCROWD_KEYSTORE_PASSPHRASE=PASSPHRASE)
    daemon = DaemonProcess(["--config", str(config), "run"], env, tmp_path / "daemon.log")
    try:
        ready = daemon.wait_for("daemon_ready", timeout_s=30)
        port = daemon.wait_for("worker_listening")["port"]
        time.sleep(RUN_S)
        metrics = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        assert daemon.terminate(timeout_s=30) == 0
    finally:
        daemon.close()

    runs = {
        (sample.labels["job"], sample.labels["outcome"]): sample.value
        for family in text_string_to_metric_families(metrics)
        if family.name == "escrowd_job_runs"
        for sample in family.samples
        if sample.name == "escrowd_job_runs_total"
    }
    jobs = set(ready["jobs"])
    assert {"sweeps:evm", "sweeps:solana", "payouts:evm", "payouts:solana"} <= jobs
    for job in jobs:
        assert runs.get((job, "ok"), 0) >= 5, (job, runs)
        assert runs.get((job, "failed"), 0) == 0, (job, runs)
    loud = [e for e in daemon.events() if e.get("level") in ("warning", "error", "critical")]
    assert loud == []
    text = daemon.log_path.read_text(encoding="utf-8")
    assert "Traceback" not in text
