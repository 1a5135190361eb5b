"""Withdrawals you can read back, balances with money on its way in and out, and the
words chain family and network kept apart (issues #20 items 1 and 6, #23 item 6)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from escrowd.config.settings import EvmChainSettings, Settings, SolanaSettings
from escrowd.daemon.api import create_app
from escrowd.escrow import service
from escrowd.escrow.webhooks import SecretCipher
from escrowd.models import ApiScope, Asset, ChainCursor, Deposit, DepositAddress, Payout, utcnow
from escrowd.models.registry import ensure_asset
from tests.escrow_fixtures import (
    PLATFORM,
    SOLANA_USDC_MINT,
    USDC_ADDRESS,
    credit,
    derivers,
    make_key,
    seed_agents,
)

DEST = "0x" + "12" * 20
ETH_USDC = "0x" + "cd" * 20


def _settings(data_dir: Path) -> Settings:
    """Two EVM networks and Solana, as an operator with several chains would configure."""

    def evm(name: str, chain_id: int, token: str, confirmations: int) -> EvmChainSettings:
        return EvmChainSettings(
            name=name,
            chain_id=chain_id,
            rpc_urls=["http://127.0.0.1:9"],
            usdc_address=token,
            confirmations=confirmations,
        )

    return Settings(
        data_dir=data_dir,
        evm_chains=[evm("base", 8453, USDC_ADDRESS, 5), evm("ethereum", 1, ETH_USDC, 12)],
        solana=SolanaSettings(rpc_urls=["http://127.0.0.1:9"], usdc_mint=SOLANA_USDC_MINT),
    )


class Api:
    def __init__(self, client: TestClient, key: str) -> None:
        self.client = client
        self.auth = {"Authorization": f"Bearer {key}"}
        self.count = 0

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        self.count += 1
        headers = {**self.auth, "Idempotency-Key": f"req-{self.count}"}
        return self.client.post(f"/v1{path}", json=body, headers=headers)

    def get(self, path: str, **params: Any) -> Any:
        return self.client.get(f"/v1{path}", params=params, headers=self.auth)


@pytest.fixture
def api(engine: Engine, sessions: sessionmaker[Session], tmp_path: Path) -> Api:
    seed_agents(sessions, "alice", "bob", balance=20_000_000)
    with sessions() as s, s.begin():
        ensure_asset(s, chain="ethereum", symbol="USDC", decimals=6, token_address=ETH_USDC)
        ensure_asset(s, chain="solana", symbol="USDC", decimals=6, token_address=SOLANA_USDC_MINT)
    app = create_app(
        _settings(tmp_path),
        engine,
        deriver=derivers(),
        webhook_cipher=SecretCipher(bytes(32)),
        platform=PLATFORM,
    )
    return Api(TestClient(app, raise_server_exceptions=False), make_key(sessions, ApiScope.WRITE))


def _withdraw(api: Api, agent: str, amount: str, **network: str) -> Any:
    body = {"agent_id": agent, "asset": "USDC", "to_address": DEST, "amount": amount}
    response = api.post("/withdrawals", {**body, **(network or {"network": "base"})})
    assert response.status_code == 201, response.text
    return response.json()


def test_withdrawals_are_listed_filtered_paged_and_read_one_by_one(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    first = _withdraw(api, "alice", "1.5")
    second = _withdraw(api, "alice", "2", network="ethereum")
    # The old field name still works for backends that send it.
    third = _withdraw(api, "bob", "3", chain="base")
    assert (first["network"], second["network"], third["network"]) == ("base", "ethereum", "base")
    assert first["chain_family"] == "evm" and first["status"] == "requested"

    # The payout sender moves them on: one broadcast, one confirmed, one failed.
    now = utcnow()
    with sessions() as s, s.begin():
        rows = {p.id: p for p in s.scalars(select(Payout))}
        rows[first["id"]].status = "confirmed"
        rows[first["id"]].tx_hash = "0x" + "aa" * 32
        rows[first["id"]].block_number = 100
        rows[first["id"]].broadcast_at = now - timedelta(minutes=2)
        rows[first["id"]].confirmed_at = now
        rows[second["id"]].status = "broadcast"
        rows[second["id"]].tx_hash = "0x" + "bb" * 32
        rows[third["id"]].status = "failed"
        rows[third["id"]].error = "reverted on chain"
        s.add(ChainCursor(chain="base", key="", block_number=104, block_hash="0x1"))

    page = api.get("/withdrawals", limit=2)
    assert page.status_code == 200
    assert [w["id"] for w in page.json()["data"]] == [first["id"], second["id"]]
    rest = api.get("/withdrawals", limit=2, cursor=page.json()["next_cursor"]).json()
    assert [w["id"] for w in rest["data"]] == [third["id"]] and rest["next_cursor"] is None

    one = api.get(f"/withdrawals/{first['id']}").json()
    assert (one["amount"], one["amount_base_units"], one["destination"]) == ("1.5", "1500000", DEST)
    assert (one["tx_hash"], one["block_number"], one["confirmations"]) == ("0x" + "aa" * 32, 100, 5)
    assert one["confirmed_at"] is not None and one["broadcast_at"] is not None
    assert api.get(f"/withdrawals/{second['id']}").json()["confirmations"] is None
    failed = api.get(f"/withdrawals/{third['id']}").json()
    assert (failed["status"], failed["failure_reason"]) == ("failed", "reverted on chain")

    def ids(**params: Any) -> list[int]:
        response = api.get("/withdrawals", **params)
        assert response.status_code == 200, response.text
        return [w["id"] for w in response.json()["data"]]

    assert ids(agent="alice") == [first["id"], second["id"]]
    assert ids(network="base") == [first["id"], third["id"]]
    assert ids(chain="ethereum") == [second["id"]]
    assert ids(status="failed") == [third["id"]]
    assert ids(agent="bob", status="confirmed") == []

    missing = api.get("/withdrawals/999999")
    assert (missing.status_code, missing.json()["error"]["type"]) == (404, "withdrawal_not_found")
    unknown = api.get("/withdrawals", status="lost")
    assert unknown.status_code == 400
    assert "'requested'" in unknown.json()["error"]["message"]
    assert api.get("/withdrawals", agent="carol").status_code == 404


def test_balances_show_incoming_deposits_and_pending_withdrawals(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    _withdraw(api, "alice", "1.25")
    failed = _withdraw(api, "alice", "2")
    with sessions() as s, s.begin():
        alice = service.get_agent(s, "alice")
        asset = s.scalars(select(Asset).where(Asset.chain == "base")).one()
        address = DepositAddress(agent_id=alice.id, chain="evm", address=DEST, derivation_index=0)
        s.add(address)
        s.flush()
        for n, (amount, status) in enumerate(
            [(4_000_000, "pending"), (500_000, "pending"), (9_000_000, "confirmed")]
        ):
            s.add(
                Deposit(
                    chain="base",
                    tx_hash=f"0x{n}",
                    log_index=0,
                    asset_id=asset.id,
                    agent_id=alice.id,
                    deposit_address_id=address.id,
                    amount=amount,
                    block_number=10 + n,
                    block_hash="0xb",
                    status=status,
                )
            )
        s.get_one(Payout, failed["id"]).status = "failed"
        credit(s, alice.id, 2_000_000)  # the failed payout's hold, returned
    rows = api.get("/agents/alice/balances").json()["balances"]
    usdc = next(row for row in rows if row["asset"] == "USDC")
    assert usdc["available"] == "18.75"
    assert (usdc["incoming"], usdc["incoming_base_units"]) == ("4.5", "4500000")
    assert (usdc["pending_withdrawals"], usdc["pending_withdrawals_base_units"]) == (
        "1.25",
        "1250000",
    )
    bob = api.get("/agents/bob/balances").json()["balances"][0]
    assert (bob["available"], bob["incoming"], bob["pending_withdrawals"]) == ("20", "0", "0")


def test_chain_family_and_network_are_named_apart(api: Api) -> None:
    address = api.post("/agents/alice/deposit-addresses/evm")
    assert address.status_code == 201
    body = address.json()
    # One EVM address receives on every configured EVM network.
    assert (body["chain_family"], body["networks"]) == ("evm", ["base", "ethereum"])
    solana = api.post("/agents/alice/deposit-addresses/solana").json()
    assert (solana["chain_family"], solana["networks"]) == ("solana", ["solana"])

    networks = api.get("/networks").json()
    assert [(n["network"], n["chain_family"]) for n in networks] == [
        ("base", "evm"),
        ("ethereum", "evm"),
        ("solana", "solana"),
    ]
    assert networks[1]["confirmations"] == 12 and networks[1]["assets"][0]["asset"] == "USDC"

    family = api.get("/deposits", network="evm")
    assert family.status_code == 400
    assert family.json()["error"] == {
        "type": "unknown_network",
        "message": "'evm' is a chain family, not a network; use a network: base, ethereum, solana",
    }
    unknown = api.get("/deposits", chain="polygon")
    assert unknown.status_code == 400
    assert "configured networks: base, ethereum, solana" in unknown.json()["error"]["message"]
    assert api.get("/withdrawals", network="arbitrum").status_code == 400
    refused = api.post(
        "/withdrawals",
        {
            "agent_id": "alice",
            "asset": "USDC",
            "network": "polygon",
            "to_address": DEST,
            "amount": "1",
        },
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "unknown_network"
    assert "base, ethereum, solana" in refused.json()["error"]["message"]
    both = api.post(
        "/withdrawals",
        {
            "agent_id": "alice",
            "asset": "USDC",
            "network": "base",
            "chain": "base",
            "to_address": DEST,
            "amount": "1",
        },
    )
    assert both.status_code == 400
    assert api.get("/withdrawals").json()["data"] == []
    assert api.get("/agents/alice/balances").json()["balances"][0]["available"] == "20"
