"""The HTTP API end to end: agents, balances, escrows, withdrawals, deposits and audit."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from escrowd.escrow import service
from escrowd.models import ApiScope, Asset, Deposit, DepositAddress
from tests.escrow_fixtures import (
    credit,
    derivers,
    ledger_clean,
    make_client,
    make_key,
    seed_asset,
)

DEST = "0x" + "12" * 20


class Api:
    """A client with a write key that sends a fresh Idempotency-Key on every POST."""

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

    def balance(self, agent: str) -> tuple[str, str]:
        response = self.get(f"/agents/{agent}/balances")
        assert response.status_code == 200
        rows = {row["asset"]: row for row in response.json()["balances"]}
        usdc = rows.get("USDC", {"available": "0", "escrowed_as_buyer": "0"})
        return usdc["available"], usdc["escrowed_as_buyer"]

    def audit(self, job: str) -> list[str]:
        response = self.get("/audit", escrow=job)
        assert response.status_code == 200
        return [row["action"] for row in response.json()["data"]]


@pytest.fixture
def api(engine: Engine, sessions: sessionmaker[Session], tmp_path: Path) -> Api:
    key = make_key(sessions, ApiScope.WRITE)
    return Api(make_client(engine, tmp_path), key)


def _deposit(sessions: sessionmaker[Session], external_id: str, amount: int) -> None:
    with sessions() as s, s.begin():
        seed_asset(s)
        credit(s, service.get_agent(s, external_id).id, amount)


def test_full_lifecycle_over_http(api: Api, sessions: sessionmaker[Session]) -> None:
    for agent in ("alice", "bob"):
        created = api.post("/agents", {"id": agent, "name": agent.title()})
        assert created.status_code == 201
        assert created.json()["id"] == agent
    assert api.get("/agents/alice").json()["name"] == "Alice"
    _deposit(sessions, "alice", 100_000_000)
    assert api.balance("alice") == ("100", "0")

    funded = api.post(
        "/escrows",
        {
            "job_id": "job-1",
            "buyer": "alice",
            "worker": "bob",
            "asset": "USDC",
            "amount": "12.5",
            "fee_bps": 250,
        },
    )
    assert funded.status_code == 201
    assert (funded.json()["status"], funded.json()["amount_base_units"]) == ("funded", "12500000")
    assert api.balance("alice") == ("87.5", "12.5")
    assert api.audit("job-1") == ["ledger_escrow_fund", "escrow_funded"]
    assert api.get("/escrows/job-1").json()["status"] == "funded"

    released = api.post("/escrows/job-1/release")
    assert released.status_code == 200
    body = released.json()
    assert (body["status"], body["worker_amount"], body["fee_amount"]) == (
        "released",
        "12.1875",
        "0.3125",
    )
    assert api.balance("alice") == ("87.5", "0")
    assert api.balance("bob") == ("12.1875", "0")
    assert api.audit("job-1")[-3:] == ["ledger_escrow_release", "ledger_fee", "escrow_released"]

    trail = api.audit("job-1")
    late = api.post("/escrows/job-1/refund")
    assert late.status_code == 409
    assert api.audit("job-1") == trail  # a refused change writes nothing
    assert late.json()["error"] == {
        "type": "escrow_conflict",
        "message": "escrow job-1 is already released; it cannot be refunded",
    }

    withdrawal = api.post(
        "/withdrawals",
        {
            "agent_id": "bob",
            "asset": "USDC",
            "chain": "base",
            "to_address": DEST,
            "amount": "10.1875",
        },
    )
    assert withdrawal.status_code == 201
    assert withdrawal.json()["status"] == "requested"
    assert api.balance("bob") == ("2", "0")

    agent_rows = api.get("/audit", agent="bob").json()["data"]
    assert [r["action"] for r in agent_rows][-2:] == ["ledger_payout_hold", "payout_requested"]
    assert ledger_clean(sessions)


def test_dispute_split_refund_and_expiry_over_http(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    for agent in ("alice", "bob"):
        api.post("/agents", {"id": agent})
    _deposit(sessions, "alice", 3_000_000)
    base = {"buyer": "alice", "worker": "bob", "asset": "USDC", "amount": "1", "fee_bps": 333}
    soon = datetime.now(UTC) + timedelta(minutes=1)
    for job, extra in (("d", {}), ("r", {}), ("e", {"expires_at": soon.isoformat()})):
        assert api.post("/escrows", {**base, "job_id": job, **extra}).status_code == 201
    assert api.balance("alice") == ("0", "3")

    split = api.post("/escrows/d/resolve", {"worker_amount": "0.999999"}).json()
    # fee = floor(999999 * 333 / 10000) = 33299; the buyer gets the 1 unit not awarded.
    assert (split["worker_amount_base_units"], split["fee_amount_base_units"]) == (
        "966700",
        "33299",
    )
    assert split["refund_amount_base_units"] == "1"
    assert api.post("/escrows/r/refund").json()["refund_amount"] == "1"
    assert api.balance("alice") == ("1.000001", "1")

    with sessions() as s, s.begin():
        assert service.expire_due_escrows(s, soon) == ["e"]
    assert api.get("/escrows/e").json()["status"] == "refunded"
    assert api.audit("e")[-3:] == ["escrow_expired", "ledger_refund", "escrow_refunded"]
    assert api.balance("alice") == ("2.000001", "0")
    assert api.balance("bob") == ("0.9667", "0")
    assert ledger_clean(sessions)


BAD_ESCROW_REQUESTS: list[tuple[dict[str, Any], int, str]] = [
    ({"amount": "1.0000001"}, 400, "invalid_amount"),  # 7 decimals for a 6-decimal asset
    ({"amount": "-1"}, 400, "validation_error"),
    ({"amount": "1e3"}, 400, "validation_error"),
    ({"amount": "0"}, 400, "validation_error"),
    ({"amount": "5"}, 422, "insufficient_funds"),
    ({"asset": "DOGE"}, 400, "unknown_asset"),
    ({"worker": "alice"}, 400, "validation_error"),
    ({"buyer": "nobody"}, 404, "agent_not_found"),
    ({"fee_bps": 10_001}, 400, "validation_error"),
]


def test_bad_escrow_requests_get_typed_errors_and_change_nothing(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    for agent in ("alice", "bob"):
        api.post("/agents", {"id": agent})
    _deposit(sessions, "alice", 1_000_000)
    request = {"job_id": "j", "buyer": "alice", "worker": "bob", "asset": "USDC", "amount": "1"}
    for body, status, error_type in BAD_ESCROW_REQUESTS:
        response = api.post("/escrows", {**request, **body})
        assert (response.status_code, response.json()["error"]["type"]) == (status, error_type)
    assert api.get("/escrows/j").status_code == 404
    assert api.balance("alice") == ("1", "0")


def test_agents_named_in_escrows_are_looked_up_once_and_unknown_ones_are_not_remembered(
    api: Api, sessions: sessionmaker[Session]
) -> None:
    api.post("/agents", {"id": "bob", "name": "Bob"})
    with sessions() as s, s.begin():
        seed_asset(s)
    request = {"job_id": "j", "buyer": "dave", "worker": "bob", "asset": "USDC", "amount": "1"}
    assert api.post("/escrows", request).status_code == 404
    # Registered after the 404: the API must not have remembered "dave" as unknown.
    api.post("/agents", {"id": "dave", "name": "Dave"})
    _deposit(sessions, "dave", 2_000_000)
    funded = api.post("/escrows", request).json()
    assert (funded["buyer"], funded["worker"]) == ("dave", "bob")
    # A new display name shows at once, although the agent was looked up for the escrow.
    api.post("/agents", {"id": "dave", "name": "Dave Two"})
    assert api.get("/agents/dave").json()["name"] == "Dave Two"
    released = api.post("/escrows/j/release").json()
    assert (released["status"], released["buyer"], released["worker"]) == (
        "released",
        "dave",
        "bob",
    )
    assert api.post("/escrows", {**request, "job_id": "k"}).json()["buyer"] == "dave"
    assert api.balance("dave") == ("0", "1")
    assert api.balance("bob") == ("0.975", "0")
    assert ledger_clean(sessions)


def test_deposits_list_filters_and_paginates(api: Api, sessions: sessionmaker[Session]) -> None:
    for agent in ("alice", "bob"):
        api.post("/agents", {"id": agent})
    with sessions() as s, s.begin():
        seed_asset(s)
        asset = s.query(Asset).one()
        for n, agent in enumerate(("alice", "bob")):
            agent_id = service.get_agent(s, agent).id
            address = DepositAddress(
                agent_id=agent_id, chain="evm", address=f"0x{n:040x}", derivation_index=n
            )
            s.add(address)
            s.flush()
            for i in range(3):
                s.add(
                    Deposit(
                        chain="base",
                        tx_hash=f"0x{n}{i}",
                        log_index=0,
                        asset_id=asset.id,
                        agent_id=agent_id,
                        deposit_address_id=address.id,
                        amount=1_500_000,
                        block_number=10 + i,
                        block_hash="0xb",
                        status="confirmed" if i else "pending",
                    )
                )
    first = api.get("/deposits", agent="alice", limit=2).json()
    assert [d["tx_hash"] for d in first["data"]] == ["0x00", "0x01"]
    assert first["data"][0]["amount"] == "1.5"
    second = api.get("/deposits", agent="alice", limit=2, cursor=first["next_cursor"]).json()
    assert [d["tx_hash"] for d in second["data"]] == ["0x02"]
    assert second["next_cursor"] is None
    pending = api.get("/deposits", status="pending").json()["data"]
    assert sorted(d["agent_id"] for d in pending) == ["alice", "bob"]
    assert api.get("/deposits", status="lost").json()["error"]["type"] == "validation_error"
    assert api.get("/deposits", agent="carol").status_code == 404


def test_deposit_address_needs_unlocked_keystore(api: Api) -> None:
    api.post("/agents", {"id": "alice"})
    response = api.post("/agents/alice/deposit-addresses/evm")
    assert response.status_code == 503
    assert "keystore not unlocked" in response.json()["error"]["message"]
    assert api.get("/agents/alice/deposit-addresses/evm").status_code == 404


def test_unknown_route_and_openapi(api: Api) -> None:
    missing = api.get("/nothing-here")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "not_found"
    spec = api.client.get("/openapi.json").json()
    assert "/v1/escrows/{job_id}/release" in spec["paths"]


def test_deposit_addresses_are_allocated_once_per_agent_and_chain(
    engine: Engine, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    api = Api(make_client(engine, tmp_path, deriver=derivers()), make_key(sessions, ApiScope.WRITE))
    for agent in ("alice", "bob"):
        api.post("/agents", {"id": agent})
    _deposit(sessions, "bob", 5_000_000)
    alice = api.post("/agents/alice/deposit-addresses/evm")
    assert alice.status_code == 201
    # The first address of the public "abandon ... about" test phrase (BIP-44 m/44'/60'/0'/0/0).
    assert alice.json()["address"] == "0x9858EfFD232B4033E47d90003D41EC34EcaEda94"
    assert api.post("/agents/alice/deposit-addresses/evm").json() == alice.json()
    bob = api.post("/agents/bob/deposit-addresses/evm").json()
    assert bob["derivation_index"] == 1
    assert api.get("/agents/bob/deposit-addresses/evm").json() == bob
    solana = api.post("/agents/alice/deposit-addresses/solana").json()
    assert solana["address"] == "HAgk14JpMQLgt6rVgv7cBQFJWFto5Dqxi472uT3DKpqk"
    assert solana["token_account"] is None or len(solana["token_account"]) >= 32
    refused = api.post(
        "/withdrawals",
        {
            "agent_id": "bob",
            "asset": "USDC",
            "chain": "base",
            "to_address": alice.json()["address"],
            "amount": "1",
        },
    )
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_address"
