"""`escrowd run` on PostgreSQL against anvil and the Solana simulator, driven only through
its HTTP API: deposits credited, escrow released, payout confirmed; SIGTERM -> exit 0
with nothing left half-done."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import tomli_w
from eth_account import Account
from prometheus_client.parser import text_string_to_metric_families
from solders.pubkey import Pubkey
from sqlalchemy import select
from web3.types import Wei

from escrowd.devnet.evm import mine_blocks, web3_for_url
from escrowd.devnet.solana_rpc import SolanaSimulator
from escrowd.escrow import apikeys, audit, ledger
from escrowd.models import ApiScope, Payout
from escrowd.models.db import make_engine, make_session_factory
from escrowd.wallets.keystore import create_keystore
from escrowd.wallets.secrets import Secret
from tests.daemon_support import DaemonProcess, daemon_env
from tests.evm_fixtures import EvmChain

pytestmark = [pytest.mark.postgres, pytest.mark.anvil]

PASSPHRASE = "e2e-daemon-passphrase"
USDC = 10**6
LAMPORTS = 10**9


@pytest.fixture
def solana_sim() -> Iterator[SolanaSimulator]:
    sim = SolanaSimulator(slot_ms=40).start()
    yield sim
    sim.stop()


class Api:
    def __init__(self, port: int, key: str) -> None:
        self.client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}/v1",
            headers={"Authorization": f"Bearer {key}"},
            timeout=30,
        )

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = self.client.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
        assert response.status_code in (200, 201), response.text
        return response.json()

    def balances(self, agent: str) -> dict[str, int]:
        body = self.client.get(f"/agents/{agent}/balances").json()
        return {b["asset"]: int(b["available_base_units"]) for b in body["balances"]}


def _wait(what: str, check: Any, timeout_s: float = 45.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def test_daemon_end_to_end_over_the_api(
    tmp_path: Path, pg_url: str, anvil_chain: EvmChain, solana_sim: SolanaSimulator
) -> None:
    assert anvil_chain.url is not None
    keystore = create_keystore(tmp_path / "keystore.json", Secret(PASSPHRASE), scrypt_log2_n=10)
    w3 = anvil_chain.w3
    hot = keystore.evm_hot_wallet.address
    w3.eth.send_transaction({"from": anvil_chain.accounts[0], "to": hot, "value": Wei(10**19)})
    anvil_chain.token.transfer(anvil_chain.accounts[1], hot, 500 * USDC)
    mint = solana_sim.create_usdc_mint()
    config = tmp_path / "escrowd.toml"
    config.write_text(
        tomli_w.dumps(
            {
                "keystore": {"path": str(tmp_path / "keystore.json"), "scrypt_log2_n": 10},
                "payouts": {"interval_s": 0.3, "min_usdc_base_units": 1},
                # Deposit addresses are stored per chain family, so the chain is "evm".
                "evm_chains": [
                    {
                        "name": "evm",
                        "chain_id": 31337,
                        "rpc_urls": [anvil_chain.url],
                        "usdc_address": anvil_chain.token.address,
                        "confirmations": 2,
                        "poll_interval_s": 0.3,
                    }
                ],
                "solana": {
                    "rpc_urls": [solana_sim.url],
                    "usdc_mint": str(mint),
                    "poll_interval_s": 0.3,
                },
            }
        )
    )
    engine = make_engine(pg_url)
    sessions = make_session_factory(engine)
    with sessions() as session, session.begin():
        _, key = apikeys.create_key(session, name="e2e", scope=ApiScope.ADMIN)

    # anvil mines only on transactions; confirmations need blocks on top.
    stop_mining = threading.Event()
    miner_w3 = web3_for_url(anvil_chain.url)

    def mine() -> None:
        while not stop_mining.wait(0.3):
            mine_blocks(miner_w3, 1)

    miner = threading.Thread(target=mine, daemon=True)
    miner.start()
    env = daemon_env(tmp_path / "data", pg_url, ESCROWD_KEYSTORE_PASSPHRASE=PASSPHRASE)
    daemon = DaemonProcess(["--config", str(config), "run"], env, tmp_path / "daemon.log")
    try:
        ready = daemon.wait_for("daemon_ready", timeout_s=30)
        assert {"evm_poll:evm", "solana_poll:solana", "payouts:evm"} <= set(ready["jobs"])
        port = daemon.wait_for("api_listening")["port"]
        api = Api(port, key)
        for agent in ("buyer", "worker"):
            api.post("/agents", {"id": agent})
        evm_address = api.post("/agents/buyer/deposit-addresses/evm")["address"]
        sol_address = api.post("/agents/buyer/deposit-addresses/solana")["address"]

        anvil_chain.token.transfer(anvil_chain.accounts[1], evm_address, 100 * USDC)
        owner = Pubkey.from_string(sol_address)
        solana_sim.transfer_sol(solana_sim.faucet, owner, 2 * LAMPORTS)
        solana_sim.mint_to(mint, owner, 50 * USDC)
        _wait(
            "deposits credited",
            lambda: api.balances("buyer") == {"USDC": 150 * USDC, "SOL": 2 * LAMPORTS},
        )

        api.post(
            "/escrows",
            {
                "job_id": "job-1",
                "buyer": "buyer",
                "worker": "worker",
                "asset": "USDC",
                "amount": "120",
                "fee_bps": 250,
            },
        )
        assert api.post("/escrows/job-1/release")["status"] == "released"
        assert api.balances("worker") == {"USDC": 117 * USDC}

        destination = str(Account.create().address)
        payout = api.post(
            "/withdrawals",
            {
                "agent_id": "worker",
                "asset": "USDC",
                "chain": "evm",
                "to_address": destination,
                "amount": "117",
            },
        )

        def payout_status() -> str:
            with sessions() as session:
                return session.scalars(select(Payout.status).where(Payout.id == payout["id"])).one()

        _wait("payout confirmed", lambda: payout_status() == "confirmed")
        assert anvil_chain.token.balance_of(destination) == 117 * USDC
        # Both pollers are live and within their lag thresholds.
        jobs_port = daemon.wait_for("worker_listening")["port"]
        readyz = httpx.get(f"http://127.0.0.1:{jobs_port}/readyz")
        assert readyz.status_code == 200, readyz.text
        metrics = httpx.get(f"http://127.0.0.1:{jobs_port}/metrics").text
        lags = {
            sample.labels["chain"]: sample.value
            for family in text_string_to_metric_families(metrics)
            if family.name == "escrowd_chain_lag"
            for sample in family.samples
        }
        assert set(lags) == {"evm", "solana"}
        assert lags["evm"] <= 200
        assert api.balances("worker").get("USDC", 0) == 0
        api.client.close()

        assert daemon.terminate(timeout_s=30) == 0
    finally:
        stop_mining.set()
        miner.join(5)
        daemon.close()

    with sessions() as session:
        assert ledger.check(session) == []
        assert audit.verify(session).ok
        statuses = set(session.scalars(select(Payout.status)))
    assert statuses == {"confirmed"}
    engine.dispose()
